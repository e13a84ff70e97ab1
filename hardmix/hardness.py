"""Where hardness comes from: per-sample scores of a batch, a per-sample memory, and the two
signals that produce scores.

A :class:`Scores` object hands the hard-sample criteria what they ask for -- whether each sample
is misclassified, its cross-entropy loss, its margin, its recent misclassification history --
and computes only what is asked.

:class:`SampleMemory` remembers, per dataset index, the latest loss, margin and misclassified
flag and the last ``history_window`` misclassified flags (bits of one byte), from clean forwards.
It serves the ``cached`` signal and the ``history`` criterion. **Never-seen samples count as
hard** (misclassified, loss +inf, margin -inf): early in training nearly every sample is
misclassified, so that is what a fresh forward would say too, and every sample can serve as a
source until it has been observed.

Signals (registry :data:`SIGNALS`, names as in ``augment.signal``):

* ``forward`` -- an extra no-grad forward of the clean batch (Algorithm 1 as printed). BatchNorm
  runs in ``eval`` (running statistics) or ``train`` (batch statistics) mode as configured; either
  way the running statistics and ``num_batches_tracked`` are left exactly as they were, and every
  module's train/eval flag is restored afterwards. With a memory (``history`` criterion) the
  forward is recorded in it before the criterion reads it.
* ``cached`` -- the memory alone, fed by :meth:`SampleMemory.observe` from clean training
  forwards (steps that ``prob`` left unmixed, and the rows a mixed step left clean), so it costs
  no extra compute.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from hardmix.config.schema import BN_MODES
from hardmix.errors import ConfigError

__all__ = ["Scores", "LogitScores", "MemoryScores", "SampleMemory", "ForwardSignal",
           "CachedSignal", "SIGNALS", "frozen_norm", "clean_logits", "margins", "history_hard"]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Logit of the true class minus the best other logit, ``(B,)`` (negative = misclassified)."""
    logits = logits.detach().float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


@functools.lru_cache(maxsize=8)
def _popcount_table(device: torch.device) -> Tensor:
    """Set bits of every byte value: long (256,), computed on ``device`` (no host copy)."""
    v = torch.arange(256, device=device)
    return sum(((v >> i) & 1) for i in range(8))


def history_hard(bits: Tensor, count: Tensor, window: int, min_wrong: int) -> Tensor:
    """Bool ``(B,)``: misclassified in at least ``min_wrong`` of the last ``window``
    observations. ``bits`` holds the flags (newest in bit 0), ``count`` how many of them are
    real (at most ``window``). With fewer observations than ``window`` the same *rate* decides
    (``wrong / count >= min_wrong / window``); a sample never observed is hard."""
    wrong = _popcount_table(bits.device).index_select(0, bits.long())
    count = count.long()
    return (count == 0) | (wrong * window >= min_wrong * count)


class Scores:
    """Per-sample hardness of one batch. Subclasses implement the views lazily."""

    def wrong(self) -> Tensor:
        """Bool ``(B,)``: the model's top-1 prediction is not the label."""
        raise NotImplementedError

    def loss(self) -> Tensor:
        """Float ``(B,)``: cross-entropy loss of each sample."""
        raise NotImplementedError

    def margin(self) -> Tensor:
        """Float ``(B,)``: true-class logit minus the best other logit."""
        raise NotImplementedError

    def history(self, window: int, min_wrong: int) -> Tensor:
        """Bool ``(B,)``: frequently misclassified (see :func:`history_hard`)."""
        raise ValueError("the history criterion needs a per-sample memory: build HardMix with "
                         "dataset_size and pass index=")


class LogitScores(Scores):
    """Scores computed from clean logits (each view computed once, on first use); the history
    view reads ``memory`` at ``index`` when there is one."""

    def __init__(self, logits: Tensor, y: Tensor, memory: Optional["SampleMemory"] = None,
                 index: Optional[Tensor] = None):
        self.logits, self.y = (logits.detach() if logits.requires_grad else logits), y
        self.memory, self.index = memory, index
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

    def history(self, window: int, min_wrong: int) -> Tensor:
        if self.memory is None or self.index is None:
            return super().history(window, min_wrong)
        return self.memory.history(self.index, window, min_wrong)


class MemoryScores(Scores):
    """Scores read from a :class:`SampleMemory` at the batch's dataset indices."""

    def __init__(self, memory: "SampleMemory", index: Tensor):
        self.memory, self.index = memory, index

    def wrong(self) -> Tensor:
        return self.memory.wrong_mem.index_select(0, self.index)

    def loss(self) -> Tensor:
        return self.memory.loss_mem.index_select(0, self.index)

    def margin(self) -> Tensor:
        return self.memory.margin_mem.index_select(0, self.index)

    def history(self, window: int, min_wrong: int) -> Tensor:
        return self.memory.history(self.index, window, min_wrong)


class SampleMemory:
    """Per-sample hardness keyed by dataset index, on the batch's device (created on first use).

    Per sample: latest loss and margin (float32), misclassified and seen flags, the last
    ``window`` misclassified flags as bits of a byte and how many of them are real (12 bytes in
    all). Under data-parallel training each rank keeps the memory of the samples it observes.
    """

    _FIELDS = ("loss_mem", "margin_mem", "wrong_mem", "seen_mem", "bits_mem", "count_mem")

    def __init__(self, dataset_size: Optional[int], window: int = 8):
        if dataset_size is None or int(dataset_size) < 1:
            raise ConfigError("dataset_size", dataset_size,
                              "is needed (the number of training samples) to key the per-sample "
                              "memory of signal=cached and criterion=history")
        self.dataset_size, self.window = int(dataset_size), int(window)
        for name in self._FIELDS:
            setattr(self, name, None)

    def ensure(self, device: torch.device) -> None:
        if self.loss_mem is None:
            n = self.dataset_size
            self.loss_mem = torch.full((n,), float("inf"), device=device)
            self.margin_mem = torch.full((n,), float("-inf"), device=device)
            self.wrong_mem = torch.ones(n, dtype=torch.bool, device=device)
            self.seen_mem = torch.zeros(n, dtype=torch.bool, device=device)
            self.bits_mem = torch.zeros(n, dtype=torch.uint8, device=device)
            self.count_mem = torch.zeros(n, dtype=torch.uint8, device=device)
        elif self.loss_mem.device != device:
            for name in self._FIELDS:
                setattr(self, name, getattr(self, name).to(device))

    def observe(self, logits: Tensor, y: Tensor, index: Tensor,
                mask: Optional[Tensor] = None) -> None:
        """Remember the hardness of ``index``'s samples from clean ``logits``; ``mask`` (bool
        ``(B,)``) limits the update to some rows without a host sync."""
        self.ensure(y.device)
        index = index.to(y.device)
        logits = logits.detach().float()
        loss = F.cross_entropy(logits, y, reduction="none")
        margin = margins(logits, y)
        wrong = logits.argmax(1) != y
        keep = (1 << self.window) - 1
        bits = ((self.bits_mem.index_select(0, index).long() << 1) | wrong.long()) & keep
        count = (self.count_mem.index_select(0, index).long() + 1).clamp_max(self.window)
        seen = torch.ones_like(wrong)
        if mask is not None:
            mask = mask.to(y.device)
            loss = torch.where(mask, loss, self.loss_mem.index_select(0, index))
            margin = torch.where(mask, margin, self.margin_mem.index_select(0, index))
            wrong = torch.where(mask, wrong, self.wrong_mem.index_select(0, index))
            seen = mask | self.seen_mem.index_select(0, index)
            bits = torch.where(mask, bits, self.bits_mem.index_select(0, index).long())
            count = torch.where(mask, count, self.count_mem.index_select(0, index).long())
        self.loss_mem.index_copy_(0, index, loss)
        self.margin_mem.index_copy_(0, index, margin)
        self.wrong_mem.index_copy_(0, index, wrong)
        self.seen_mem.index_copy_(0, index, seen)
        self.bits_mem.index_copy_(0, index, bits.to(torch.uint8))
        self.count_mem.index_copy_(0, index, count.to(torch.uint8))

    def history(self, index: Tensor, window: int, min_wrong: int) -> Tensor:
        """Bool ``(B,)``: :func:`history_hard` over the last ``window`` observations."""
        self.ensure(index.device)
        index = index.to(self.bits_mem.device)
        mask = (1 << window) - 1
        bits = self.bits_mem.index_select(0, index) & mask
        count = self.count_mem.index_select(0, index).clamp_max(window)
        return history_hard(bits, count, window, min_wrong)

    def seen_fraction(self) -> Tensor:
        """0-d tensor: share of the data set observed at least once (0 before any observation)."""
        if self.seen_mem is None:
            return torch.zeros(())
        return self.seen_mem.float().mean()

    def state_dict(self) -> dict:
        if self.loss_mem is None:
            return {"dataset_size": self.dataset_size}
        return {"dataset_size": self.dataset_size, "loss": self.loss_mem, "margin": self.margin_mem,
                "wrong": self.wrong_mem, "seen": self.seen_mem, "bits": self.bits_mem,
                "count": self.count_mem}

    def load_state_dict(self, state: dict, device: Optional[torch.device] = None) -> None:
        """Restore :meth:`state_dict` onto ``device`` (default: where the memory is, else where
        the state is)."""
        if int(state.get("dataset_size", self.dataset_size)) != self.dataset_size:
            raise ValueError(f"the hardness memory is for {state['dataset_size']} samples, "
                             f"this HardMix has dataset_size={self.dataset_size}")
        if "loss" not in state:
            return
        if device is None:
            device = self.loss_mem.device if self.loss_mem is not None else state["loss"].device
        self.loss_mem = state["loss"].to(device).clone()
        self.margin_mem = state["margin"].to(device).clone()
        self.wrong_mem = state["wrong"].to(device).clone()
        self.seen_mem = state["seen"].to(device).clone()
        # Checkpoints from before the history memory: one observation, the latest flag.
        self.bits_mem = (state["bits"] if "bits" in state
                         else state["wrong"].to(torch.uint8)).to(device).clone()
        self.count_mem = (state["count"] if "count" in state
                          else state["seen"].to(torch.uint8)).to(device).clone()


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
    """Hardness from clean logits: the caller's ``logits`` if given, else an extra forward.
    With a ``memory`` (history criterion) every such forward is an observation."""

    name = "forward"
    #: Whether the training forward of a mixed step should be observed too (no: the extra
    #: forward already observed the clean batch this step).
    observes_mixed_steps = False

    def __init__(self, bn_mode: str = "eval", memory: Optional[SampleMemory] = None):
        if bn_mode not in BN_MODES:
            raise ConfigError("augment.bn_mode", bn_mode, f"must be one of {', '.join(BN_MODES)}")
        self.bn_mode, self.memory = bn_mode, memory

    def scores(self, x: Tensor, y: Tensor, model: Optional[nn.Module] = None,
               logits: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Scores:
        if logits is None:
            if model is None:
                raise ValueError("signal='forward' needs model= or logits= to find hard samples")
            logits = clean_logits(model, x, self.bn_mode)
        if self.memory is not None:
            if index is None:
                raise ValueError("the history criterion needs index= (the dataset index of "
                                 "every sample)")
            self.memory.observe(logits, y, index)
        return LogitScores(logits, y, self.memory, index)


class CachedSignal:
    """Hardness read from the per-sample memory (no extra forward)."""

    name = "cached"
    observes_mixed_steps = True  # the clean rows of a mixed step are observations

    def __init__(self, bn_mode: str = "eval", memory: Optional[SampleMemory] = None):
        if memory is None:
            raise ConfigError("augment.signal", "cached",
                              "needs dataset_size (the number of training samples) to key its "
                              "memory")
        self.memory = memory

    def scores(self, x: Tensor, y: Tensor, model: Optional[nn.Module] = None,
               logits: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Scores:
        if index is None:
            raise ValueError("signal='cached' needs index= (the dataset index of every sample)")
        self.memory.ensure(y.device)
        return MemoryScores(self.memory, index.to(y.device))


#: Hardness signals by name (``augment.signal``).
SIGNALS = {"forward": ForwardSignal, "cached": CachedSignal}
