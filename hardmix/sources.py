"""Source selection: which sample pastes into which. HardMix is a source-selection rule.

Three registries, names as in the config (``hardmix.config``):

* :data:`CRITERIA` -- which samples are hard: ``misclassified`` (argmax ≠ y, the paper),
  ``history`` (misclassified in at least m of the last n observations of that sample: the
  abstract's "frequently misclassified"), ``topk_loss`` (the k highest-loss samples) and
  ``low_margin`` (the k samples with the smallest margin between the true-class logit and the
  best other one). ``k`` is a count (>= 1) or a fraction of the batch (< 1).
* :data:`FALLBACKS` -- what a *thresholded* criterion (``misclassified``, ``history``; see
  :data:`hardmix.methods.CRITERIA`) does when fewer than ``min_hard`` samples are hard:
  ``random`` (plain CutMix from the whole batch), ``skip`` (no mixing this step: every sample is
  its own source), ``topk_loss`` (the top-k loss set stands in for the hard set) and ``topup``
  (the hard samples kept, topped up with the next-highest-loss ones to ``min_hard`` distinct
  sources: the "few sources" mechanism's test). A top-k
  criterion always has its k samples: no fallback, whatever ``min_hard`` says.
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

from hardmix.config.rules import check_k
from hardmix.config.schema import AugmentConfig
from hardmix.errors import ConfigError
from hardmix.hardness import Scores
from hardmix.methods import CRITERIA as CRITERION_SPECS
from hardmix.methods import FALLBACKS as FALLBACK_SPECS

__all__ = ["CRITERIA", "FALLBACKS", "SOURCES", "Selection", "RandomSource", "HardSource",
           "hard_source_index", "topk_mask"]


def topk_mask(values: Tensor, count: int) -> Tensor:
    """Bool ``(B,)``: True at the ``count`` largest entries of ``values``."""
    idx = values.topk(count).indices
    return torch.zeros(values.shape[0], dtype=torch.bool, device=values.device).index_fill_(0, idx, True)


# --------------------------------------------------------------------------------------------
# Criteria: (scores, augment config) -> hard mask (B,) bool
# --------------------------------------------------------------------------------------------


def misclassified(scores: Scores, cfg: AugmentConfig) -> Tensor:
    """Hard = the model's top-1 prediction is wrong (the paper's Algorithm 1)."""
    return scores.wrong()


def history(scores: Scores, cfg: AugmentConfig) -> Tensor:
    """Hard = misclassified in at least ``history_min_wrong`` of the last ``history_window``
    observations of that sample (the current one included with the forward signal)."""
    return scores.history(cfg.history_window, cfg.history_min_wrong)


def topk_loss(scores: Scores, cfg: AugmentConfig) -> Tensor:
    """Hard = the ``k`` samples with the highest cross-entropy loss (never empty)."""
    loss = scores.loss()
    return topk_mask(loss, check_k(cfg.k, loss.shape[0]))


def low_margin(scores: Scores, cfg: AugmentConfig) -> Tensor:
    """Hard = the ``k`` samples with the smallest true-class margin (never empty)."""
    margin = scores.margin()
    return topk_mask(-margin, check_k(cfg.k, margin.shape[0]))


Criterion = Callable[[Scores, AugmentConfig], Tensor]

#: Hard-sample criteria by name (``augment.criterion``; their specs: hardmix.methods.CRITERIA).
CRITERIA: dict[str, Criterion] = {
    "misclassified": misclassified,
    "history": history,
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
    replace: Optional[Callable[[Tensor, Tensor, Tensor, Scores, AugmentConfig],
                               tuple[Tensor, Tensor]]]
    skip: bool = False


def _fallback_random(hard: Tensor, n_hard: Tensor, fired: Tensor, scores: Scores,
                     cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    # Drawing from all B samples makes the source batch a random permutation: plain CutMix.
    return hard, torch.where(fired, hard.shape[0], n_hard)


def _fallback_topk(hard: Tensor, n_hard: Tensor, fired: Tensor, scores: Scores,
                   cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    count = check_k(cfg.k, hard.shape[0])
    return torch.where(fired, topk_loss(scores, cfg), hard), torch.where(fired, count, n_hard)


def _fallback_topup(hard: Tensor, n_hard: Tensor, fired: Tensor, scores: Scores,
                    cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    # HardMix's sources kept, never fewer than min_hard distinct ones: the hard samples rank
    # above every other (+inf against finite losses), the highest remaining losses fill up.
    count = min(cfg.min_hard, hard.shape[0])  # a short last batch holds fewer
    loss = scores.loss().float()
    finite = loss.nan_to_num(nan=torch.finfo(loss.dtype).min, posinf=torch.finfo(loss.dtype).max)
    topped = topk_mask(torch.where(hard, torch.full_like(finite, float("inf")), finite), count)
    return torch.where(fired, topped, hard), torch.where(fired, count, n_hard)


#: Fallback policies by name (``augment.fallback``).
FALLBACKS: dict[str, Fallback] = {
    "random": Fallback("random", _fallback_random),
    "skip": Fallback("skip", None, skip=True),
    "topk_loss": Fallback("topk_loss", _fallback_topk),
    "topup": Fallback("topup", _fallback_topup),
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

    def __init__(self, cfg: Optional[AugmentConfig] = None):
        self.cfg = cfg

    def __call__(self, batch: int, device: torch.device, generator: torch.Generator,
                 scores: Optional[Scores] = None) -> Selection:
        return Selection(torch.randperm(batch, generator=generator, device=device))


class HardSource:
    """Sources drawn only from the hard samples of the batch (HardMix). A thresholded criterion
    has a fallback policy for batches with fewer than ``min_hard`` hard samples; a top-k
    criterion needs none (its set always has k samples)."""

    name = "hard"
    needs_scores = True

    def __init__(self, cfg: AugmentConfig):
        if cfg.criterion not in CRITERIA:
            raise ConfigError("augment.criterion", cfg.criterion,
                              f"must be one of {', '.join(CRITERIA)}")
        if cfg.fallback not in FALLBACKS:
            raise ConfigError("augment.fallback", cfg.fallback,
                              f"must be one of {', '.join(FALLBACKS)}")
        self.cfg = cfg
        self.criterion = CRITERIA[cfg.criterion]
        thresholded = CRITERION_SPECS[cfg.criterion].thresholded
        self.fallback = FALLBACKS[cfg.fallback] if thresholded else None

    def __call__(self, batch: int, device: torch.device, generator: torch.Generator,
                 scores: Optional[Scores] = None) -> Selection:
        if scores is None:
            raise ValueError("hard sources need hardness scores")
        hard = self.criterion(scores, self.cfg)
        n_hard = hard.sum()
        if self.fallback is None:  # a top-k set: never short, no fallback
            return Selection(hard_source_index(hard, generator, n_hard, at_least_one=True),
                             n_hard, torch.zeros((), dtype=torch.bool, device=device), None)
        fired = n_hard < self.cfg.min_hard
        if self.fallback.replace is not None:
            hard, n_used = self.fallback.replace(hard, n_hard, fired, scores, self.cfg)
            index = hard_source_index(hard, generator, n_used, at_least_one=True)
        else:
            index = hard_source_index(hard, generator, n_hard)
        skipped = None
        if self.fallback.skip:
            index = torch.where(fired, torch.arange(batch, device=device), index)
            skipped = fired
        return Selection(index, n_hard, fired, skipped)


#: Source-selection strategies by name (``MethodSpec.source``).
SOURCES = {"random": RandomSource, "hard": HardSource}

assert set(CRITERIA) == set(CRITERION_SPECS) and set(FALLBACKS) == set(FALLBACK_SPECS), \
    "every criterion and fallback of the method table needs its function here"
