"""Where hardness comes from: per-sample scores of a batch, and the two signals that produce them.

A :class:`Scores` object hands the hard-sample criteria what they ask for -- whether each sample is
misclassified, its cross-entropy loss, its margin -- and computes only what is asked.

Signals (registry :data:`SIGNALS`, names as in ``augment.signal``):

* ``forward`` -- an extra no-grad forward of the clean batch (Algorithm 1 as printed). BatchNorm
  runs in ``eval`` (running statistics) or ``train`` (batch statistics) mode as configured; either
  way the running statistics and ``num_batches_tracked`` are left exactly as they were, and every
  module's train/eval flag is restored afterwards. Dropout and other train-only layers run in eval
  mode: the point is the clean model's prediction.
* ``cached`` -- a per-sample memory keyed by dataset index, written by :meth:`CachedSignal.observe`
  from clean training forwards (steps that ``prob`` left unmixed), so it costs no extra compute.
  **Never-seen samples count as hard**: misclassified, loss +inf, margin -inf. At initialisation
  nearly every sample is misclassified, so this is what ``forward`` would say too, and it makes every
  sample eligible as a source until it has been observed once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from hardmix.config import BN_MODES, ConfigError

__all__ = ["Scores", "LogitScores", "MemoryScores", "ForwardSignal", "CachedSignal", "SIGNALS",
           "frozen_norm", "clean_logits", "margins"]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Logit of the true class minus the best other logit, ``(B,)`` (negative = misclassified)."""
    logits = logits.detach().float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


class Scores:
    """Per-sample hardness of one batch. Subclasses implement the three views lazily."""

    def wrong(self) -> Tensor:
        """Bool ``(B,)``: the model's top-1 prediction is not the label."""
        raise NotImplementedError

    def loss(self) -> Tensor:
        """Float ``(B,)``: cross-entropy loss of each sample."""
        raise NotImplementedError

    def margin(self) -> Tensor:
        """Float ``(B,)``: true-class logit minus the best other logit."""
        raise NotImplementedError


class LogitScores(Scores):
    """Scores computed from clean logits (each view computed once, on first use)."""

    def __init__(self, logits: Tensor, y: Tensor):
        self.logits, self.y = (logits.detach() if logits.requires_grad else logits), y
        self._cache: dict[str, Tensor] = {}

    def wrong(self) -> Tensor:
        if "wrong" not in self._cache:
            self._cache["wrong"] = self.logits.argmax(1) != self.y
        return self._cache["wrong"]

    def loss(self) -> Tensor:
        if "loss" not in self._cache:
            self._cache["loss"] = F.cross_entropy(self.logits.float(), self.y, reduction="none")
        return self._cache["loss"]

    def margin(self) -> Tensor:
        if "margin" not in self._cache:
            self._cache["margin"] = margins(self.logits, self.y)
        return self._cache["margin"]


class MemoryScores(Scores):
    """Scores read from a :class:`CachedSignal` memory at the batch's dataset indices."""

    def __init__(self, memory: "CachedSignal", index: Tensor):
        self.memory, self.index = memory, index

    def wrong(self) -> Tensor:
        return self.memory.wrong_mem.index_select(0, self.index)

    def loss(self) -> Tensor:
        return self.memory.loss_mem.index_select(0, self.index)

    def margin(self) -> Tensor:
        return self.memory.margin_mem.index_select(0, self.index)


@contextmanager
def frozen_norm(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with its normalisation layers in ``bn_mode``, running stats frozen.

    In ``train`` mode BatchNorm normalises with batch statistics; its running-statistics buffers and
    ``num_batches_tracked`` are detached from the module for the duration (so BatchNorm neither reads
    nor updates them) and put back untouched. Every module's ``training`` flag is restored on exit,
    also when the forward raises.
    """
    if bn_mode not in BN_MODES:
        raise ConfigError("augment.bn_mode", bn_mode, f"must be one of {', '.join(BN_MODES)}")
    modes = [(m, m.training) for m in model.modules()]
    saved: list[tuple[_NormBase, Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = []
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, _NormBase) and m.track_running_stats:
                    saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
                    m.running_mean = m.running_var = m.num_batches_tracked = None
                    m.train()
        yield model
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        for m, was_training in modes:
            m.training = was_training


def clean_logits(model: nn.Module, x: Tensor, bn_mode: str = "eval") -> Tensor:
    """Logits of a no-grad forward of ``x`` that leaves the model exactly as it was.

    A ``DistributedDataParallel`` wrapper is looked through: its forward would broadcast buffers and
    touch the gradient reducer, neither of which a hardness probe should do.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with torch.no_grad(), frozen_norm(inner, bn_mode):
        return inner(x)


class ForwardSignal:
    """Hardness from clean logits: the caller's ``logits`` if given, else an extra forward."""

    name = "forward"
    needs_index = False

    def __init__(self, bn_mode: str = "eval", **_: object):
        if bn_mode not in BN_MODES:
            raise ConfigError("augment.bn_mode", bn_mode, f"must be one of {', '.join(BN_MODES)}")
        self.bn_mode = bn_mode

    def scores(self, x: Tensor, y: Tensor, model: Optional[nn.Module] = None,
               logits: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Scores:
        if logits is None:
            if model is None:
                raise ValueError("signal='forward' needs model= or logits= to find hard samples")
            logits = clean_logits(model, x, self.bn_mode)
        return LogitScores(logits, y)

    def observe(self, logits: Tensor, y: Tensor, index: Optional[Tensor],
                mask: Optional[Tensor] = None) -> None:
        """Nothing to remember: hardness is recomputed at every mixed step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CachedSignal:
    """Per-sample hardness remembered from clean forwards, keyed by dataset index.

    The memory (loss, margin, misclassified flag and seen flag per sample, 10 bytes each) lives on
    the batch's device and is created on first use. Unseen samples read as hard (see module doc).
    Under data-parallel training each rank keeps its own memory of the samples it has observed.
    """

    name = "cached"
    needs_index = True

    def __init__(self, dataset_size: Optional[int] = None, **_: object):
        if dataset_size is None or int(dataset_size) < 1:
            raise ConfigError("augment.signal", "cached",
                              "needs dataset_size (the number of training samples) to key its memory")
        self.dataset_size = int(dataset_size)
        self.loss_mem: Optional[Tensor] = None
        self.margin_mem: Optional[Tensor] = None
        self.wrong_mem: Optional[Tensor] = None
        self.seen_mem: Optional[Tensor] = None

    def _ensure(self, device: torch.device) -> None:
        if self.loss_mem is None:
            n = self.dataset_size
            self.loss_mem = torch.full((n,), float("inf"), device=device)
            self.margin_mem = torch.full((n,), float("-inf"), device=device)
            self.wrong_mem = torch.ones(n, dtype=torch.bool, device=device)
            self.seen_mem = torch.zeros(n, dtype=torch.bool, device=device)
        elif self.loss_mem.device != device:
            for name in ("loss_mem", "margin_mem", "wrong_mem", "seen_mem"):
                setattr(self, name, getattr(self, name).to(device))

    def scores(self, x: Tensor, y: Tensor, model: Optional[nn.Module] = None,
               logits: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Scores:
        if index is None:
            raise ValueError("signal='cached' needs index= (the dataset index of every sample)")
        self._ensure(y.device)
        return MemoryScores(self, index.to(y.device))

    def observe(self, logits: Tensor, y: Tensor, index: Optional[Tensor],
                mask: Optional[Tensor] = None) -> None:
        """Remember the hardness of ``index``'s samples from clean ``logits``.

        ``mask`` (bool ``(B,)``, optional) limits the update to some rows without a host sync, e.g.
        ``mask=out.unmixed`` to learn from the samples a mixed step left clean.
        """
        if index is None:
            raise ValueError("signal='cached' needs index= to observe")
        self._ensure(y.device)
        index = index.to(y.device)
        logits = logits.detach().float()
        loss = F.cross_entropy(logits, y, reduction="none")
        margin = margins(logits, y)
        wrong = logits.argmax(1) != y
        seen = torch.ones_like(wrong)
        if mask is not None:
            mask = mask.to(y.device)
            loss = torch.where(mask, loss, self.loss_mem.index_select(0, index))
            margin = torch.where(mask, margin, self.margin_mem.index_select(0, index))
            wrong = torch.where(mask, wrong, self.wrong_mem.index_select(0, index))
            seen = mask | self.seen_mem.index_select(0, index)
        self.loss_mem.index_copy_(0, index, loss)
        self.margin_mem.index_copy_(0, index, margin)
        self.wrong_mem.index_copy_(0, index, wrong)
        self.seen_mem.index_copy_(0, index, seen)

    def seen_fraction(self) -> Tensor:
        """0-d tensor: share of the data set observed at least once (0 before any observation)."""
        if self.seen_mem is None:
            return torch.zeros(())
        return self.seen_mem.float().mean()

    def state_dict(self) -> dict:
        if self.loss_mem is None:
            return {"dataset_size": self.dataset_size}
        return {"dataset_size": self.dataset_size, "loss": self.loss_mem, "margin": self.margin_mem,
                "wrong": self.wrong_mem, "seen": self.seen_mem}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("dataset_size", self.dataset_size)) != self.dataset_size:
            raise ValueError(f"cached hardness memory is for {state['dataset_size']} samples, "
                             f"this HardMix has dataset_size={self.dataset_size}")
        if "loss" not in state:
            return
        device = self.loss_mem.device if self.loss_mem is not None else state["loss"].device
        self.loss_mem = state["loss"].to(device).clone()
        self.margin_mem = state["margin"].to(device).clone()
        self.wrong_mem = state["wrong"].to(device).clone()
        self.seen_mem = state["seen"].to(device).clone()


#: Hardness signals by name (``augment.signal``).
SIGNALS = {"forward": ForwardSignal, "cached": CachedSignal}
