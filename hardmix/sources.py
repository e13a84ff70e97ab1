"""Source selection: which sample pastes into which. HardMix is a source-selection rule.

Three registries, names as in the config (``hardmix.config``):

* :data:`CRITERIA` -- which samples are hard: ``misclassified`` (argmax ≠ y, the paper),
  ``topk_loss`` (the k highest-loss samples) and ``low_margin`` (the k samples with the smallest
  margin between the true-class logit and the best other one). ``k`` is a count (>= 1) or a
  fraction of the batch (< 1).
* :data:`FALLBACKS` -- what happens when fewer than ``min_hard`` samples are hard: ``random`` (plain
  CutMix from the whole batch), ``skip`` (no mixing this step: every sample is its own source) and
  ``topk_loss`` (the top-k loss set stands in for the hard set).
* :data:`SOURCES` -- the strategies: ``random`` (a permutation of the batch) and ``hard``.

The hard source batch follows Algorithm 1: every hard sample once plus ``B - n_hard`` random repeats
of hard samples, shuffled. Everything stays on the device with shapes fixed by ``B`` -- no host read
of how many samples are hard: random keys sort the hard samples first, a random permutation gives
each target a slot, and slots past ``n_hard`` draw a uniform repeat; fallbacks are ``torch.where``
selections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from hardmix.config import ConfigError, check_k, uses_k
from hardmix.hardness import Scores

__all__ = ["CRITERIA", "FALLBACKS", "SOURCES", "Selection", "RandomSource", "HardSource",
           "hard_source_index", "topk_mask", "check_k"]


def topk_mask(values: Tensor, count: int) -> Tensor:
    """Bool ``(B,)``: True at the ``count`` largest entries of ``values``."""
    idx = values.topk(count).indices
    return torch.zeros(values.shape[0], dtype=torch.bool, device=values.device).index_fill_(0, idx, True)


# --------------------------------------------------------------------------------------------
# Criteria: (scores, k) -> hard mask (B,) bool
# --------------------------------------------------------------------------------------------


def misclassified(scores: Scores, k: float) -> Tensor:
    """Hard = the model's top-1 prediction is wrong (the paper). Ignores ``k``."""
    return scores.wrong()


def topk_loss(scores: Scores, k: float) -> Tensor:
    """Hard = the ``k`` samples with the highest cross-entropy loss (never empty)."""
    loss = scores.loss()
    return topk_mask(loss, check_k(k, loss.shape[0]))


def low_margin(scores: Scores, k: float) -> Tensor:
    """Hard = the ``k`` samples with the smallest true-class margin (never empty)."""
    margin = scores.margin()
    return topk_mask(-margin, check_k(k, margin.shape[0]))


Criterion = Callable[[Scores, float], Tensor]

#: Hard-sample criteria by name (``augment.criterion``).
CRITERIA: dict[str, Criterion] = {
    "misclassified": misclassified,
    "topk_loss": topk_loss,
    "low_margin": low_margin,
}


# --------------------------------------------------------------------------------------------
# Fallbacks: the hard set to draw from when too few samples are hard; `skip` is handled by the caller
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fallback:
    """A fallback policy: ``replace(hard, n_hard, fired, scores, k) -> (hard set, its size)`` used
    instead of the criterion's (both device tensors; sizes >= 1), or ``skip`` mixing."""

    name: str
    replace: Optional[Callable[[Tensor, Tensor, Tensor, Scores, float], tuple[Tensor, Tensor]]]
    skip: bool = False


def _fallback_random(hard: Tensor, n_hard: Tensor, fired: Tensor, scores: Scores,
                     k: float) -> tuple[Tensor, Tensor]:
    # Drawing from all B samples makes the source batch a random permutation: plain CutMix.
    return hard, torch.where(fired, hard.shape[0], n_hard)


def _fallback_topk(hard: Tensor, n_hard: Tensor, fired: Tensor, scores: Scores,
                   k: float) -> tuple[Tensor, Tensor]:
    count = check_k(k, hard.shape[0])
    return torch.where(fired, topk_loss(scores, k), hard), torch.where(fired, count, n_hard)


#: Fallback policies by name (``augment.fallback``).
FALLBACKS: dict[str, Fallback] = {
    "random": Fallback("random", _fallback_random),
    "skip": Fallback("skip", None, skip=True),
    "topk_loss": Fallback("topk_loss", _fallback_topk),
}


# --------------------------------------------------------------------------------------------
# The source batch
# --------------------------------------------------------------------------------------------


def hard_source_index(hard: Tensor, generator: Optional[torch.Generator] = None,
                      n_hard: Optional[Tensor] = None, at_least_one: bool = False) -> Tensor:
    """The source of every target: each hard sample once, ``B - n_hard`` random hard repeats, shuffled.

    ``hard`` is a bool ``(B,)`` mask; ``n_hard`` the number of samples to draw from (default: its
    sum); ``at_least_one`` promises ``n_hard >= 1`` and saves a clamp. No host read of ``n_hard``:
    a stable sort puts the hard samples first, a random permutation gives every target a slot,
    slot ``s < n_hard`` takes the s-th of them and a later slot a uniformly drawn one (a random
    integer modulo ``n_hard``; its bias is below B / 2**31). With ``n_hard = B`` the result is a
    uniformly random permutation of the batch whatever ``hard`` is. With no hard sample at all the
    result is meaningless: callers apply a fallback first.
    """
    b, dev = hard.shape[0], hard.device
    n = hard.sum() if n_hard is None else n_hard
    order = hard.argsort(descending=True, stable=True)
    slot = torch.randperm(b, generator=generator, device=dev)
    rep = torch.randint(0, 2**31 - 1, (b,), generator=generator, device=dev)
    rep = rep % (n if at_least_one else n.clamp_min(1))
    return order.index_select(0, torch.where(slot < n, slot, rep))


@dataclass
class Selection:
    """The outcome of source selection for one batch (all tensors stay on the device).

    ``index``: source of every target, long ``(B,)``. ``n_hard``: 0-d long count by the criterion
    (before any fallback; 0 for random sources). ``fired``: 0-d bool, the fallback fired.
    ``skipped``: 0-d bool or None, mixing is skipped this step (``skip`` fallback fired).
    """

    index: Tensor
    n_hard: Optional[Tensor] = None
    fired: Optional[Tensor] = None
    skipped: Optional[Tensor] = None


class RandomSource:
    """A random permutation of the batch: the source rule of CutMix, Mixup and SaliencyMix."""

    name = "random"
    needs_scores = False

    def __call__(self, batch: int, device: torch.device, generator: torch.Generator,
                 scores: Optional[Scores] = None) -> Selection:
        return Selection(torch.randperm(batch, generator=generator, device=device))


class HardSource:
    """Sources drawn only from the hard samples of the batch (HardMix), with a fallback policy."""

    name = "hard"
    needs_scores = True

    def __init__(self, criterion: str = "misclassified", k: float = 0.25, fallback: str = "random",
                 min_hard: int = 1):
        if criterion not in CRITERIA:
            raise ConfigError("augment.criterion", criterion, f"must be one of {', '.join(CRITERIA)}")
        if fallback not in FALLBACKS:
            raise ConfigError("augment.fallback", fallback, f"must be one of {', '.join(FALLBACKS)}")
        if int(min_hard) != min_hard or min_hard < 1:
            raise ConfigError("augment.min_hard", min_hard, "must be an integer >= 1")
        if uses_k(criterion, fallback):
            check_k(k)  # against the batch at call time
        self.criterion, self.k = CRITERIA[criterion], float(k)
        self.fallback, self.min_hard = FALLBACKS[fallback], int(min_hard)

    def __call__(self, batch: int, device: torch.device, generator: torch.Generator,
                 scores: Optional[Scores] = None) -> Selection:
        if scores is None:
            raise ValueError("hard sources need hardness scores")
        hard = self.criterion(scores, self.k)
        n_hard = hard.sum()
        fired = n_hard < self.min_hard
        if self.fallback.replace is not None:
            hard, n_used = self.fallback.replace(hard, n_hard, fired, scores, self.k)
            index = hard_source_index(hard, generator, n_used, at_least_one=True)
        else:
            index = hard_source_index(hard, generator, n_hard)
        skipped = None
        if self.fallback.skip:
            index = torch.where(fired, torch.arange(batch, device=device), index)
            skipped = fired
        return Selection(index, n_hard, fired, skipped)


#: Source-selection strategies by name.
SOURCES = {"random": RandomSource, "hard": HardSource}
