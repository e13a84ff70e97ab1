"""``HardMix``: HardMix and its baselines as one drop-in, per-batch augmentation.

A method is a (mixer, source) pair from :data:`METHODS`: the mixer decides *how* two images are
combined (:data:`hardmix.mix.MIXERS`), the source rule *which* sample pastes into which
(:data:`hardmix.sources.SOURCES`). HardMix is the CutMix mixer with hard sources.

Randomness and data-parallel training: every call draws from a *host* generator seeded by
``seed`` -- the ``prob`` coin, the batch box centre and, for a method that reads ``alpha``, the
batch λ (an inert field never moves the stream) -- so every rank agrees on whether to mix (and
on the batch box) without any communication, and the extra forward of ``signal="forward"``
happens on exactly the same steps on every rank. Per-sample draws (source
permutations, per-sample λ and boxes) use a generator on the batch's device, seeded from ``seed``
and the rank (``torch.distributed`` when initialised), so ranks mix differently but reproducibly.
Nothing in a call reads a device value on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hardmix.checkpoint import host_bytes
from hardmix.config.rules import check_fields, check_k
from hardmix.config.schema import AugmentConfig, to_dict
from hardmix.hardness import SIGNALS, SampleMemory
from hardmix.loss import mixed_cross_entropy, mixed_target
from hardmix.methods import METHODS, active_fields, check_augment, resolved_box, uses_memory
from hardmix.mix import MIXERS, Draws, MixerOptions, Workspace, beta_host
from hardmix.config.schema import MAX_HISTORY
from hardmix.sources import SOURCES

__all__ = ["HardMix", "MixOutput", "METHODS"]

_STAT_NAMES = ("n_hard", "hard_share", "fallback", "distinct_sources")


class MixOutput:
    """The result of one :class:`HardMix` call.

    Attributes:
        x: the mixed images (the input itself when not mixed, or when mixing in place).
        y_a: target labels (weight ``lam``); y_b: source labels (weight ``1 - lam``).
        lam: float32 ``(B,)``, the weight of ``y_a`` per sample (1 where nothing was pasted).
        source_index: long ``(B,)``, the sample whose content went into each target.
        mixed: Python bool, this step was mixed (the host-side ``prob`` coin; the same on every
            rank). A ``skip`` fallback happens on the device: ``mixed`` stays True, ``lam`` is 1
            and ``stats["fallback"]`` is 1.
    """

    __slots__ = ("x", "y_a", "y_b", "lam", "source_index", "mixed", "num_classes", "_n_hard",
                 "_fired", "_skipped", "_has_sources", "_stats")

    def __init__(self, x: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor, source_index: Tensor,
                 mixed: bool, num_classes: Optional[int] = None, n_hard: Optional[Tensor] = None,
                 fired: Optional[Tensor] = None, skipped: Optional[Tensor] = None,
                 has_sources: bool = False):
        self.x, self.y_a, self.y_b, self.lam = x, y_a, y_b, lam
        self.source_index, self.mixed, self.num_classes = source_index, mixed, num_classes
        self._n_hard, self._fired, self._skipped = n_hard, fired, skipped
        self._has_sources = has_sources
        self._stats: Optional[dict[str, Tensor]] = None

    def loss(self, logits: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
        """``mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing)`` (plain CE if unmixed)."""
        if not self._has_sources:
            return mixed_cross_entropy(logits, self.y_a, None, None, label_smoothing, reduction)
        return mixed_cross_entropy(logits, self.y_a, self.y_b, self.lam, label_smoothing, reduction)

    def target(self, num_classes: Optional[int] = None, label_smoothing: float = 0.0) -> Tensor:
        """Soft targets ``(B, C)`` (timm style) equal to what :meth:`loss` trains against."""
        c = self._classes(num_classes)
        return mixed_target(self.y_a, self.y_b, self.lam, c, label_smoothing)

    @property
    def stats(self) -> dict[str, Tensor]:
        """Step statistics as float32 0-d tensors on the batch's device (no host sync).

        ``n_hard`` (hard samples by the criterion, before any fallback), ``hard_share``
        (n_hard / B), ``fallback`` (1 if the fallback fired) and ``distinct_sources`` (distinct
        samples that gave content; 0 when nothing was pasted). All 0 on unmixed steps and for
        methods without hard sources (``n_hard``, ``hard_share``, ``fallback``). Average them
        over mixed steps.
        """
        if self._stats is None:
            b, dev = self.y_a.shape[0], self.y_a.device
            zero = torch.zeros((), device=dev)
            n_hard = self._n_hard.float() if self._n_hard is not None else zero
            fired = self._fired.float() if self._fired is not None else zero
            distinct = zero
            if self._has_sources:
                used = torch.zeros(b, device=dev).index_fill_(0, self.source_index, 1.0).sum()
                distinct = used * self._active().float()
            self._stats = {"n_hard": n_hard, "hard_share": n_hard / b, "fallback": fired,
                           "distinct_sources": distinct}
        return self._stats

    def source_counts_by_class(self, num_classes: Optional[int] = None) -> Tensor:
        """Long ``(C,)``: how many targets received a patch from each class this step.

        Zero on unmixed or skipped steps. Built with ``index_add_`` (``bincount`` reads its maximum
        on the host on CUDA), so the trainer can sum it over steps without a sync.
        """
        c = self._classes(num_classes)
        counts = torch.zeros(c, dtype=torch.long, device=self.y_b.device)
        if not self._has_sources:
            return counts
        weight = self._active().long().expand(self.y_b.shape[0])
        return counts.index_add_(0, self.y_b, weight)

    @property
    def unmixed(self) -> Tensor:
        """Bool ``(B,)``: samples whose image and label are unchanged (clean rows of the batch).

        Use it with :meth:`HardMix.observe` (``mask=out.unmixed``) to let the ``cached`` signal
        learn from the clean rows of a mixed step.
        """
        b, dev = self.y_a.shape[0], self.y_a.device
        if not self.mixed:
            return torch.ones(b, dtype=torch.bool, device=dev)
        if not self._has_sources:  # Cutout changes every image
            return torch.zeros(b, dtype=torch.bool, device=dev)
        return (self.lam >= 1.0) | (self.source_index == torch.arange(b, device=dev))

    def _active(self) -> Tensor:
        if self._skipped is None:
            return torch.ones((), dtype=torch.bool, device=self.y_a.device)
        return ~self._skipped

    def _classes(self, num_classes: Optional[int]) -> int:
        c = num_classes if num_classes is not None else self.num_classes
        if c is None:
            raise ValueError("num_classes is needed: pass it here or to HardMix(num_classes=...)")
        return int(c)

    def __repr__(self) -> str:
        return (f"MixOutput(x={tuple(self.x.shape)}, mixed={self.mixed}, "
                f"has_sources={self._has_sources})")


class HardMix:
    """HardMix and its baselines as a callable, drop-in augmentation (like timm's ``Mixup``).

    The augmentation is an :class:`~hardmix.config.AugmentConfig`: pass ``config=`` or any of its
    fields as keywords (``method``, ``alpha``, ``prob``, ``criterion``, ``k``, ``fallback``,
    ``min_hard``, ``history_window``, ``history_min_wrong``, ``signal``, ``bn_mode``, ``box``,
    ``cutout_size``, ``saliency``; defaults and meaning as the ``augment.*`` config fields, see
    ``hardmix train --help``). The method table (:mod:`hardmix.methods`) says which of them a
    method reads. Other arguments:

        num_classes: default for :meth:`MixOutput.source_counts_by_class` and soft targets.
        dataset_size: number of training samples, for the per-sample memory of the ``cached``
            signal and the ``history`` criterion (they also need ``index=`` at call time).
        seed: seeds the host and device generators; None draws one from torch's global RNG.
            Under data-parallel training pass the same seed on every rank.
        generator: a host ``torch.Generator`` to use instead of ``seed``.
        inplace: mix into the input tensor instead of a copy (saves one copy of the batch).
        rank: data-parallel rank that offsets the device seed; None = torch.distributed's or 0.

    Call ``mix(x, y, model=model, index=idx)`` (or ``logits=clean_logits``) every step, then
    ``mix.observe(logits, y, idx, out)`` with the training logits: the library decides what it
    needs (the model only for the ``forward`` signal on mixed steps, the indices only for a
    memory, observations only where they are clean). See :class:`MixOutput`.
    """

    def __init__(self, config: Optional[AugmentConfig] = None, *,
                 num_classes: Optional[int] = None, dataset_size: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 inplace: bool = False, rank: Optional[int] = None, **fields: Any):
        known = {f.name for f in dataclasses.fields(AugmentConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"HardMix got unknown argument(s) {', '.join(unknown)}; the augment "
                            f"fields are {', '.join(sorted(known))}")
        cfg = config if config is not None else AugmentConfig(**fields)
        if config is not None and fields:
            cfg = dataclasses.replace(config, **fields)
        check_fields(cfg, "augment.")
        aug = to_dict(cfg)
        check_augment(aug)
        if "k" in active_fields(aug):
            check_k(cfg.k)  # against the batch at call time
        self.cfg = cfg
        self.num_classes, self.dataset_size, self.inplace = num_classes, dataset_size, inplace
        spec = METHODS[cfg.method]
        self._mixer = MIXERS[spec.mixer]
        # A method that does not read alpha draws no λ: an inert alpha (Cutout's) must not shift
        # the host stream, or changing it would change every later coin and box by chance.
        self._draws_lam = "alpha" in spec.reads
        self._options = MixerOptions(aug=cfg, box=resolved_box(aug) or "batch", inplace=inplace,
                                     workspace=Workspace())
        self._source = SOURCES[spec.source](cfg) if spec.source else None
        self.memory = SampleMemory(dataset_size, MAX_HISTORY) if uses_memory(aug) else None
        self._signal = (SIGNALS[cfg.signal](bn_mode=cfg.bn_mode, memory=self.memory)
                        if spec.hard else None)
        self._host = generator if generator is not None else torch.Generator()
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).numpy()[0])
            self._host.manual_seed(int(seed))
            base = int(seed)
        else:
            base = int(torch.randint(0, 2**62, (1,), generator=generator).numpy()[0])
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = int(rank)
        self._device_seed = (base * 1_000_003 + 7_919 * (self.rank + 1)) % (2**63 - 1)
        self._device_gens: dict[str, torch.Generator] = {}
        self._pending_device_states: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: AugmentConfig, num_classes: Optional[int] = None,
                    dataset_size: Optional[int] = None, seed: Optional[int] = None,
                    **kwargs: Any) -> "HardMix":
        """Build from ``cfg.augment`` (an :class:`~hardmix.config.AugmentConfig`)."""
        return cls(cfg, num_classes=num_classes, dataset_size=dataset_size, seed=seed, **kwargs)

    # ----------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def uses_hardness(self) -> bool:
        """True for hard-source methods (the ones that need ``model``/``logits`` or ``index``)."""
        return self._signal is not None

    def memory_seen(self) -> Optional[Tensor]:
        """0-d tensor: share of the training set the per-sample memory has observed; None
        without a memory."""
        return self.memory.seen_fraction() if self.memory is not None else None

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._device_gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._device_seed)
            state = self._pending_device_states.pop(key, None)
            if state is None:  # saved on another index of this kind (a retry on another GPU)
                same = [k for k in self._pending_device_states
                        if torch.device(k).type == device.type]
                state = self._pending_device_states.pop(same[0]) if len(same) == 1 else None
            if state is not None:  # a CPU <-> CUDA resume has none: the seed starts afresh
                gen.set_state(host_bytes(state))
            self._device_gens[key] = gen
        return gen

    def __call__(self, x: Tensor, y: Tensor, model: Optional[nn.Module] = None,
                 logits: Optional[Tensor] = None, index: Optional[Tensor] = None) -> MixOutput:
        """Mix one batch.

        Args:
            x: images ``(B, C, H, W)``. y: labels ``(B,)`` (long).
            model: the model, for the extra forward of ``signal="forward"`` (hard methods only;
                run only on mixed steps).
            logits: clean logits of ``x`` instead of ``model`` (no extra forward).
            index: dataset indices ``(B,)`` of the samples (``signal="cached"``).
        """
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        u = torch.rand(3, generator=self._host, dtype=torch.float64).numpy()  # coin, box centre
        b, dev = x.shape[0], x.device
        if not (u[0] < self.cfg.prob) or self._mixer is MIXERS["none"]:
            return MixOutput(x, y, y, torch.ones(b, device=dev), torch.arange(b, device=dev),
                             False, self.num_classes)
        gen = self._device_generator(dev)
        lam = beta_host(self.cfg.alpha, self._host) if self._draws_lam else 1.0
        draws = Draws(lam, float(u[1]), float(u[2]), gen)
        if self._source is None:  # Cutout: images change, labels do not
            mixed, _ = self._mixer(x, None, draws, self._options)
            return MixOutput(mixed, y, y, torch.ones(b, device=dev), torch.arange(b, device=dev),
                             True, self.num_classes)
        scores = None
        if self._signal is not None:
            scores = self._signal.scores(x, y, model=model, logits=logits, index=index)
        sel = self._source(b, dev, gen, scores)
        mixed, lam = self._mixer(x, sel.index, draws, self._options)
        if sel.skipped is not None:
            lam = lam.masked_fill(sel.skipped, 1.0)
        return MixOutput(mixed, y, y.index_select(0, sel.index), lam, sel.index, True,
                         self.num_classes, sel.n_hard, sel.fired, sel.skipped, has_sources=True)

    def observe(self, logits: Tensor, y: Tensor, index: Optional[Tensor],
                out: Optional["MixOutput"] = None, mask: Optional[Tensor] = None) -> None:
        """Feed the per-sample memory (``cached`` signal, ``history`` criterion; else a no-op)
        with the training forward's ``logits`` of this step. Call it every step with the step's
        ``out``: rows the step left clean are observations (all rows of an unmixed step); a
        mixed step of the ``forward`` signal has already observed its clean batch. ``mask``
        (bool ``(B,)``) instead of ``out`` says which rows are clean."""
        if self.memory is None or self._signal is None:
            return
        if index is None:
            raise ValueError("the per-sample memory needs index= (the dataset indices)")
        if out is not None:
            if out.mixed and not self._signal.observes_mixed_steps:
                return
            mask = out.unmixed if out.mixed else None
        self.memory.observe(logits, y, index, mask)

    def state_dict(self) -> dict:
        """Generator states (host ByteTensors, device generators' too, keyed by device) and the
        per-sample memory, for checkpoints."""
        devices = {k: g.get_state() for k, g in self._device_gens.items()}
        devices.update({k: s for k, s in self._pending_device_states.items() if k not in devices})
        return {"host_generator": self._host.get_state(), "device_generators": devices,
                "device_seed": self._device_seed,
                "signal": self.memory.state_dict() if self.memory is not None else {}}

    def load_state_dict(self, state: dict, device: Optional[torch.device] = None) -> None:
        """Restore what :meth:`state_dict` saved, wherever it was saved: generator states are
        read on the host (device generators are restored on first use, from the state saved
        for the same device or the one of its kind), the memory goes to ``device`` (default:
        where it is, else where the state is)."""
        self._host.set_state(host_bytes(state["host_generator"]))
        self._device_seed = int(state.get("device_seed", self._device_seed))
        self._device_gens.clear()
        self._pending_device_states = dict(state.get("device_generators", {}))
        if self.memory is not None and state.get("signal"):
            self.memory.load_state_dict(state["signal"], device)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.cfg).items())
        return f"HardMix({fields}, inplace={self.inplace})"
