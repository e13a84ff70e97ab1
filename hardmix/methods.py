"""The method table: every augmentation method and every switch of HardMix, with the config
fields each one reads. The one place that says which ``augment.*`` field acts for which setting.

Everything that needs to know derives it from here: config validation (which fields to check),
``--help``, the library's dispatch (:class:`hardmix.HardMix`), the Parquet rows (a field that does
not act is NULL), the report's relevance rules (an inert field never splits a variant), the
sweep space's conditions (a parameter exists only where it acts) and the dry-run cost. Nothing
here imports torch.

A method is a *mixer* (how two images combine: :data:`hardmix.mix.MIXERS`) and a *source rule*
(which sample pastes into which: ``None`` keeps the labels, ``random`` is a permutation of the
batch, ``hard`` draws sources from the batch's hard samples). Adding a method is one
:func:`register_method` entry plus its mixing function.

Hard-source methods read the hard-sample ``criterion`` and the hardness ``signal``; a
*thresholded* criterion (``misclassified``, ``history``) can leave a batch with too few hard
samples, so only those read ``fallback`` and ``min_hard``. A top-k criterion always selects k
samples: ``fallback`` and ``min_hard`` are inert for it, in selection, validation and the
report alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from hardmix.errors import ConfigError

__all__ = ["MethodSpec", "Switch", "METHODS", "CRITERIA", "FALLBACKS", "SIGNALS", "SALIENCY",
           "SWITCHES", "BOXES", "DEFAULTS", "register_method", "active_fields", "effective_augment",
           "check_augment", "uses_memory", "extra_forwards", "resolved_box", "describe_methods"]

#: Box modes: one λ and box per batch, or one per sample; ``auto`` = the method's paper.
BOXES = ("auto", "batch", "sample")


@dataclass(frozen=True)
class MethodSpec:
    """One value of ``augment.method``.

    ``mixer``: key of :data:`hardmix.mix.MIXERS`. ``source``: ``None`` (labels unmixed),
    ``"random"`` or ``"hard"``. ``reads``: the ``augment`` fields the mixer itself reads.
    ``box``: the box mode its paper uses (what ``box: auto`` means). ``summary``: one line for
    ``--help``.
    """

    name: str
    mixer: str
    source: Optional[str]
    reads: tuple[str, ...]
    box: str = "batch"
    summary: str = ""

    @property
    def hard(self) -> bool:
        return self.source == "hard"


@dataclass(frozen=True)
class Switch:
    """One value of a switch (criterion, fallback, signal, saliency) and the fields it reads.
    ``thresholded`` (criteria): the hard set can be too small, so the fallback applies."""

    name: str
    reads: tuple[str, ...] = ()
    summary: str = ""
    thresholded: bool = False


_MIX = ("alpha", "prob", "box")

METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the table (its mixer must be registered in ``hardmix.mix.MIXERS``)."""
    METHODS[spec.name] = spec
    return spec


for _spec in (
    MethodSpec("none", "none", None, (), "", "no mixing"),
    MethodSpec("cutout", "cutout", None, ("prob", "box", "cutout_size"), "sample",
               "Cutout (DeVries & Taylor, 2017): a zeroed square, one per image"),
    MethodSpec("mixup", "mixup", "random", _MIX, "batch",
               "Mixup (Zhang et al., 2018): blend with a random partner"),
    MethodSpec("cutmix", "cutmix", "random", _MIX, "batch",
               "CutMix (Yun et al., 2019): a box from a random partner, one per batch"),
    MethodSpec("saliencymix", "saliencymix", "random", _MIX + ("saliency",), "batch",
               "SaliencyMix (Uddin et al., 2021): the box at the partner's most salient pixel"),
    MethodSpec("hardmix", "cutmix", "hard", _MIX, "batch",
               "HardMix (Uddin et al., 2024): CutMix with sources from the hard samples"),
    MethodSpec("hard_mixup", "mixup", "hard", _MIX, "batch", "Mixup with hard sources"),
    MethodSpec("hard_saliencymix", "saliencymix", "hard", _MIX + ("saliency",), "batch",
               "SaliencyMix with hard sources"),
):
    register_method(_spec)

#: ``augment.criterion``: which samples of a batch are hard.
CRITERIA: dict[str, Switch] = {s.name: s for s in (
    Switch("misclassified", (), "the model's top-1 prediction is wrong (Algorithm 1)", True),
    Switch("history", ("history_window", "history_min_wrong"),
           "frequently misclassified: wrong in at least history_min_wrong of the last "
           "history_window observations of that sample (the abstract's wording)", True),
    Switch("topk_loss", ("k",), "the k highest-loss samples (never empty)"),
    Switch("low_margin", ("k",), "the k samples with the smallest true-class margin (never "
                                 "empty)"),
)}

#: ``augment.fallback``: what a thresholded criterion does with fewer than ``min_hard`` hard
#: samples.
FALLBACKS: dict[str, Switch] = {s.name: s for s in (
    Switch("random", (), "plain CutMix from the whole batch"),
    Switch("skip", (), "no mixing this step"),
    Switch("topk_loss", ("k",), "the top-k loss set stands in for the hard set"),
    Switch("topup", (), "keep every hard sample and top the set up with the next-highest-loss "
                        "samples to min_hard distinct sources"),
)}

#: ``augment.signal``: where hardness comes from.
SIGNALS: dict[str, Switch] = {s.name: s for s in (
    Switch("forward", ("bn_mode",), "an extra no-grad forward of the clean batch"),
    Switch("cached", (), "per-sample memory of earlier clean forwards (no extra compute; "
                         "needs prob < 1)"),
)}

#: ``augment.saliency``: the saliency detector of SaliencyMix.
SALIENCY: dict[str, Switch] = {s.name: s for s in (
    Switch("spectral_residual", (), "spectral residual (Hou & Zhang, 2007) in torch, on the "
                                    "device"),
    Switch("fine_grained", (), "OpenCV's StaticSaliencyFineGrained, the SaliencyMix authors' "
                               "detector (extra [saliency]; on the host, box=batch only)"),
)}

#: The switches: the fields that decide which other fields act. A conditional sweep space
#: decides them before anything else.
SWITCHES = ("method", "criterion", "fallback", "signal")
_TABLES = {"method": METHODS, "criterion": CRITERIA, "fallback": FALLBACKS, "signal": SIGNALS,
           "saliency": SALIENCY}


#: The paper's setting of each switch: the ``augment.*`` defaults (the schema reads them here),
#: and what a mapping that leaves a switch out means.
DEFAULTS = {"method": "hardmix", "criterion": "misclassified", "fallback": "random",
            "signal": "forward", "saliency": "spectral_residual", "box": "auto"}


def _get(aug: Mapping[str, Any], name: str) -> Any:
    table = _TABLES[name]
    value = aug.get(name, DEFAULTS[name])
    if value not in table:
        raise ConfigError(f"augment.{name}", value, f"must be one of {', '.join(table)}")
    return table[value]


def active_fields(aug: Mapping[str, Any]) -> frozenset[str]:
    """The ``augment`` fields (without the prefix) that act for the setting ``aug`` (a mapping
    of augment fields; only the switches are read)."""
    method: MethodSpec = _get(aug, "method")
    out = {"method", *method.reads}
    if method.hard:
        crit: Switch = _get(aug, "criterion")
        out |= {"criterion", "signal", *crit.reads, *_get(aug, "signal").reads}
        if crit.thresholded:
            out |= {"fallback", "min_hard", *_get(aug, "fallback").reads}
    return frozenset(out)


def resolved_box(aug: Mapping[str, Any]) -> Optional[str]:
    """The box mode that runs: ``augment.box``, with ``auto`` as the method's paper; None when
    the method reads no box."""
    method: MethodSpec = _get(aug, "method")
    if "box" not in method.reads:
        return None
    box = aug.get("box", DEFAULTS["box"])
    return method.box if box == "auto" else box


def effective_augment(aug: Mapping[str, Any]) -> dict[str, Any]:
    """``aug`` as it runs: inert fields None (NULL in Parquet), ``box: auto`` resolved."""
    active = active_fields(aug)
    out = {k: (v if k in active else None) for k, v in aug.items()}
    if "box" in active:
        out["box"] = resolved_box(aug)
    return out


def uses_memory(aug: Mapping[str, Any]) -> bool:
    """Whether the setting keeps a per-sample memory keyed by dataset index (the ``cached``
    signal or the ``history`` criterion): it needs ``dataset_size`` and ``index=``."""
    active = active_fields(aug)
    return "signal" in active and (aug.get("signal") == "cached"
                                   or aug.get("criterion") == "history")


def extra_forwards(aug: Mapping[str, Any]) -> int:
    """Extra forward passes per mixed step (the ``forward`` signal's clean forward)."""
    active = active_fields(aug)
    return int("signal" in active and aug.get("signal") == "forward")


def check_augment(aug: Mapping[str, Any], prefix: str = "augment.") -> None:
    """Rules between augment fields that cannot mean anything otherwise (raises ConfigError).

    Only fields that act are checked: a sweep's base run may carry values an arm makes inert.
    """
    active = active_fields(aug)
    for name in ("criterion", "fallback", "signal", "saliency"):
        if name in active:
            _get(aug, name)
    if "signal" in active and aug.get("signal") == "cached" and float(aug.get("prob", 1)) >= 1:
        raise ConfigError(f"{prefix}signal", "cached",
                          "needs augment.prob < 1: the cached memory learns from clean batches "
                          "and prob=1 mixes every batch, so every sample would stay unseen "
                          "(= hard) and HardMix would be plain CutMix; use signal=forward")
    if "history_min_wrong" in active and aug.get("history_min_wrong", 1) > aug.get(
            "history_window", 1):
        raise ConfigError(f"{prefix}history_min_wrong", aug.get("history_min_wrong"),
                          f"must be <= augment.history_window ({aug.get('history_window')})")
    if "saliency" in active and aug.get("saliency") == "fine_grained" and \
            resolved_box(aug) == "sample":
        raise ConfigError(f"{prefix}saliency", "fine_grained",
                          "runs OpenCV on the host one image at a time: use box=batch (as the "
                          "SaliencyMix authors do) or saliency=spectral_residual for "
                          "per-sample boxes")


def describe_methods() -> str:
    """The method table as text for ``--help``: each method and the fields it reads."""
    lines = ["Methods (augment.method) and the augment fields each reads (box: auto = the "
             "paper's):"]
    for m in METHODS.values():
        reads = list(m.reads) + (["criterion", "signal", "..."] if m.hard else [])
        box = f"; paper box: {m.box}" if "box" in m.reads else ""
        lines.append(f"  {m.name:<17} {m.summary}. Reads: {', '.join(reads) or 'nothing'}{box}")
    for title, field_name, table in (("Criteria", "criterion", CRITERIA),
                                     ("Fallbacks", "fallback", FALLBACKS),
                                     ("Signals", "signal", SIGNALS),
                                     ("Saliency", "saliency", SALIENCY)):
        lines.append(f"{title} (augment.{field_name}):")
        for s in table.values():
            extra = [*s.reads] + (["fallback", "min_hard"] if s.thresholded else [])
            reads = f" Reads: {', '.join(extra)}." if extra else ""
            lines.append(f"  {s.name:<17} {s.summary}.{reads}")
    return "\n".join(lines)
