"""``HardMix``: HardMix and its baselines as one drop-in, per-batch augmentation.

A method is a (mixer, source) pair from :data:`METHODS`: the mixer decides *how* two images are
combined (:data:`hardmix.mix.MIXERS`), the source rule *which* sample pastes into which
(:data:`hardmix.sources.SOURCES`). HardMix is the CutMix mixer with hard sources.

Randomness and data-parallel training: every call draws four uniforms from a *host* generator
seeded by ``seed`` -- the ``prob`` coin, the batch λ and the batch box centre -- so every rank
agrees on whether to mix (and on the batch box) without any communication, and the extra forward
of ``signal="forward"`` happens on exactly the same steps on every rank. Per-sample draws (source
permutations, per-sample λ and boxes) use a generator on the batch's device, seeded from ``seed``
and the rank (``torch.distributed`` when initialised), so ranks mix differently but reproducibly.
Nothing in a call reads a device value on the host.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hardmix.config import AugmentConfig, check_fields
from hardmix.hardness import SIGNALS
from hardmix.loss import mixed_cross_entropy, mixed_target
from hardmix.mix import MIXERS, Draws, MixerOptions, Workspace, beta_host
from hardmix.sources import SOURCES, HardSource

__all__ = ["HardMix", "MixOutput", "METHODS"]

#: Every method name of ``augment.method`` as (mixer, source); source None = labels unmixed.
METHODS: dict[str, tuple[str, Optional[str]]] = {
    "none": ("none", None),
    "cutout": ("cutout", None),
    "mixup": ("mixup", "random"),
    "cutmix": ("cutmix", "random"),
    "saliencymix": ("saliencymix", "random"),
    "hardmix": ("cutmix", "hard"),
    "hard_mixup": ("mixup", "hard"),
    "hard_saliencymix": ("saliencymix", "hard"),
}

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

    Args (defaults and meaning as the ``augment.*`` config fields of the same name):
        method: none, cutout, mixup, cutmix, saliencymix, hardmix (CutMix with hard sources),
            hard_mixup, hard_saliencymix.
        alpha: λ ~ Beta(α, α). prob: probability that a batch is mixed at all.
        criterion: hard samples are misclassified (paper), topk_loss or low_margin.
        k: size of a top-k hard set: a count (>= 1) or a fraction of the batch (< 1).
        fallback: below ``min_hard`` hard samples: random (plain CutMix), skip, topk_loss.
        min_hard: the fallback applies when fewer samples than this are hard (default 1).
        signal: forward (extra no-grad forward) or cached (per-sample memory, needs
            ``dataset_size`` and ``index=`` at call time). bn_mode: BatchNorm mode of that forward.
        box: batch (one λ and box per batch) or sample (one per sample; Mixup: one λ per sample).
        cutout_size: side of the Cutout square as a fraction of the image side.
        num_classes: default for :meth:`MixOutput.source_counts_by_class` and soft targets.
        dataset_size: number of training samples (``cached`` signal).
        seed: seeds the host and device generators; None draws one from torch's global RNG.
            Under data-parallel training pass the same seed on every rank.
        generator: a host ``torch.Generator`` to use instead of ``seed``.
        inplace: mix into the input tensor instead of a copy (saves one copy of the batch).
        rank: data-parallel rank that offsets the device seed; None = torch.distributed's or 0.

    Call ``mix(x, y, model=model, index=idx)`` or ``mix(x, y, logits=clean_logits)``; see
    :class:`MixOutput` for what comes back.
    """

    def __init__(self, method: str = "hardmix", alpha: float = 1.0, prob: float = 1.0,
                 criterion: str = "misclassified", k: float = 0.25, fallback: str = "random",
                 min_hard: int = 1, signal: str = "forward", bn_mode: str = "eval",
                 box: str = "batch", cutout_size: float = 0.5, num_classes: Optional[int] = None,
                 dataset_size: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, inplace: bool = False,
                 rank: Optional[int] = None):
        cfg = AugmentConfig(method=method, alpha=alpha, prob=prob, criterion=criterion, k=k,
                            fallback=fallback, min_hard=min_hard, signal=signal, bn_mode=bn_mode,
                            box=box, cutout_size=cutout_size)
        check_fields(cfg, "augment.")
        self.cfg = cfg
        self.num_classes, self.dataset_size, self.inplace = num_classes, dataset_size, inplace
        mixer_name, source_name = METHODS[method]
        self._mixer = MIXERS[mixer_name]
        self._options = MixerOptions(alpha=float(alpha), box=box, cutout_size=float(cutout_size),
                                     inplace=inplace, workspace=Workspace())
        if source_name == "hard":
            self._source = HardSource(criterion, k, fallback, min_hard)
            self._signal = SIGNALS[signal](bn_mode=bn_mode, dataset_size=dataset_size)
            if signal == "cached" and prob >= 1.0:
                warnings.warn("signal='cached' learns from clean forwards, but prob=1.0 mixes every "
                              "step: pass mask=out.unmixed to observe() or use prob < 1",
                              stacklevel=2)
        else:
            self._source = SOURCES[source_name]() if source_name else None
            self._signal = None
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
        return cls(**dataclasses.asdict(cfg), num_classes=num_classes, dataset_size=dataset_size,
                   seed=seed, **kwargs)

    # ----------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def uses_hardness(self) -> bool:
        """True for hard-source methods (the ones that need ``model``/``logits`` or ``index``)."""
        return self._signal is not None

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._device_gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._device_seed)
            if key in self._pending_device_states:
                gen.set_state(self._pending_device_states.pop(key))
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
        u = torch.rand(4, generator=self._host, dtype=torch.float64).numpy()
        b, dev = x.shape[0], x.device
        if not (u[0] < self.cfg.prob) or self._mixer is MIXERS["none"]:
            return MixOutput(x, y, y, torch.ones(b, device=dev), torch.arange(b, device=dev),
                             False, self.num_classes)
        lam_host = float(u[1]) if self.cfg.alpha == 1.0 else beta_host(self.cfg.alpha, self._host)
        gen = self._device_generator(dev)
        draws = Draws(lam_host, float(u[2]), float(u[3]), gen)
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
                mask: Optional[Tensor] = None) -> None:
        """Remember per-sample hardness from a *clean* forward (``signal="cached"``; else no-op).

        Call it on steps where ``out.mixed`` is False with the training logits, labels and dataset
        indices; ``mask`` (bool ``(B,)``) restricts the update to clean rows, e.g. ``out.unmixed``.
        """
        if self._signal is not None:
            self._signal.observe(logits, y, index, mask)

    def state_dict(self) -> dict:
        """Generator states and the cached hardness memory, for checkpoints."""
        devices = {k: g.get_state() for k, g in self._device_gens.items()}
        devices.update({k: s for k, s in self._pending_device_states.items() if k not in devices})
        return {"host_generator": self._host.get_state(), "device_generators": devices,
                "device_seed": self._device_seed,
                "signal": self._signal.state_dict() if self._signal is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (device generators are restored on first use)."""
        self._host.set_state(state["host_generator"])
        self._device_seed = int(state.get("device_seed", self._device_seed))
        self._device_gens.clear()
        self._pending_device_states = dict(state.get("device_generators", {}))
        if self._signal is not None and state.get("signal"):
            self._signal.load_state_dict(state["signal"])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.cfg).items())
        return f"HardMix({fields}, inplace={self.inplace})"
