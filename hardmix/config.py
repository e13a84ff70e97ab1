"""Typed configuration for runs and sweeps: YAML presets, ``--set`` overrides, validation.

One name per idea: the dotted path of a field (``augment.alpha``) is its YAML key, its ``--set``
key, its Parquet column and its CLI help entry. Every check happens here, before any work starts,
and a failure is a :class:`ConfigError` naming the field, the value and what is allowed; the CLI
prints that single line and exits with code 2.

Presets are YAML files shipped in ``hardmix/presets``. A preset may name another one as ``base``
and override parts of it, so a sweep preset can inherit a run preset and change a few fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

# Names shared with the registries of the library (tests check they agree).
METHODS = ("none", "cutout", "mixup", "cutmix", "saliencymix", "hardmix", "hard_mixup", "hard_saliencymix")
CRITERIA = ("misclassified", "topk_loss", "low_margin")
FALLBACKS = ("random", "skip", "topk_loss")
SIGNALS = ("forward", "cached")
BN_MODES = ("eval", "train")
BOXES = ("batch", "sample")
DATASETS = ("cifar10", "cifar100", "npz", "folder", "digits", "synthetic")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "wrn28_10", "smallnet")
STEMS = ("auto", "cifar", "imagenet")
SCHEDULES = ("multistep", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
SWEEP_MODES = ("search", "grid")
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
SCHEDULERS = ("none", "asha")
PARAM_TYPES = ("float", "int", "choice")
METRICS = ("val_top1_err", "val_loss", "val_top5_err")

SCHEMA_NOTE = "see `hardmix train --help` for every field"


class ConfigError(ValueError):
    """A bad configuration value: ``field``, the ``value`` given and what is ``allowed``."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} = {value!r}: {allowed}")

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields intact
        return (ConfigError, (self.field, self.value, self.allowed))


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
        gt: float | None = None, ge: float | None = None, le: float | None = None,
        lt: float | None = None, factory: Any = None) -> Any:
    """A config field with its help text and the constraints the validator enforces."""
    meta = {"help": help, "choices": choices, "gt": gt, "ge": ge, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Run configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = opt("cifar10", "data set: cifar10/cifar100 (torchvision folder), npz (arrays file), "
                    "folder (ImageNet-style ImageFolder with train/ and val/), digits (scikit-learn's "
                    "bundled 8x8 digits, offline), synthetic (random images, tests only)", choices=DATASETS)
    path: Optional[str] = opt(None, "torchvision root folder, .npz file or image folder; "
                              "cifar default: ~/.cache/hardmix/data")
    download: bool = opt(False, "download CIFAR into `path` when it is missing")
    subset: Optional[int] = opt(None, "stratified training subset of this many images (before the "
                                "validation split); null = all", gt=0)
    val_size: float = opt(0.1, "held-out validation split carved from the training set: a fraction "
                          "(< 1) or a count (>= 1); sweeps select and stop on it", ge=0)
    batch_size: int = opt(128, "training batch size (per worker under data-parallel training)", gt=0)
    eval_batch_size: int = opt(512, "batch size for validation and test", gt=0)
    crop_flip: bool = opt(True, "standard augmentation: random crop with zero padding + horizontal "
                          "flip (the paper's CIFAR+ columns); false = the plain CIFAR columns")
    pad: int = opt(4, "zero padding of the random crop, pixels", ge=0)
    image_size: int = opt(224, "crop size for folder data (CIFAR/npz/digits keep their own size)", gt=0)
    workers: int = opt(4, "DataLoader workers for folder data (in-memory data needs none)", ge=0)
    device_loader: bool = opt(True, "keep in-memory data sets on the device as uint8 and augment "
                              "batches with tensor ops (no DataLoader)")


@dataclass
class ModelConfig:
    name: str = opt("resnet18", "architecture", choices=MODELS)
    stem: str = opt("auto", "cifar (3x3 conv, no max-pool), imagenet (7x7 conv + max-pool) or auto "
                    "(by image size)", choices=STEMS)
    dropout: float = opt(0.0, "dropout before the classifier (WideResNet: inside blocks)", ge=0, lt=1)
    width: int = opt(64, "base width of smallnet", gt=0)


@dataclass
class OptimConfig:
    epochs: int = opt(200, "training epochs", gt=0)
    lr: float = opt(0.1, "peak learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay", ge=0)
    schedule: str = opt("multistep", "learning-rate schedule", choices=SCHEDULES)
    milestones: list[int] = opt(help="epochs at which multistep decays the lr",
                                factory=lambda: [60, 120, 160])
    gamma: float = opt(0.2, "multistep decay factor", gt=0, le=1)
    warmup_epochs: int = opt(0, "linear warm-up epochs", ge=0)
    label_smoothing: float = opt(0.0, "label smoothing of the (mixed) cross entropy", ge=0, lt=1)
    amp: bool = opt(True, "bf16 autocast where the device computes bf16 natively (CUDA; CPUs "
                    "with AVX512-BF16 or AMX); off elsewhere, with the reason in the run log")
    channels_last: bool = opt(True, "channels_last memory format for the model and the batches "
                              "(CUDA and CPU)")
    grad_clip: Optional[float] = opt(None, "clip the gradient norm to this value", gt=0)


@dataclass
class EvalConfig:
    every: int = opt(1, "validation error every N epochs (always at the last epoch and at the "
                     "epochs an ASHA scheduler decides on)", gt=0)
    test_every: int = opt(1, "test error every N epochs (always at the last epoch; tables use "
                          "the last)", gt=0)


@dataclass
class AugmentConfig:
    method: str = opt("hardmix", "mixing method: none, cutout, mixup, cutmix, saliencymix, hardmix "
                      "(CutMix with hard sources), hard_mixup, hard_saliencymix", choices=METHODS)
    alpha: float = opt(1.0, "lambda ~ Beta(alpha, alpha)", gt=0)
    prob: float = opt(1.0, "probability that a batch is mixed at all (paper: 1.0; CutMix on "
                      "CIFAR: 0.5)", ge=0, le=1)
    criterion: str = opt("misclassified", "hard-sample criterion of hard-source methods",
                         choices=CRITERIA)
    k: float = opt(0.25, "size of a top-k hard set (topk_loss, low_margin, topk_loss fallback): "
                   "a count (>= 1) or a fraction of the batch (< 1)", gt=0)
    fallback: str = opt("random", "when fewer than min_hard samples are hard: random (plain "
                        "CutMix), skip (no mixing this step) or topk_loss", choices=FALLBACKS)
    min_hard: int = opt(1, "the fallback applies below this many hard samples", ge=1)
    signal: str = opt("forward", "hardness from an extra no-grad forward of the clean batch, or "
                      "cached from earlier clean forwards", choices=SIGNALS)
    bn_mode: str = opt("eval", "BatchNorm mode of the extra forward (running stats never change)",
                       choices=BN_MODES)
    box: str = opt("batch", "one box per batch (CutMix, the paper) or one per sample", choices=BOXES)
    cutout_size: float = opt(0.5, "Cutout square side as a fraction of the image side", gt=0, le=1)


@dataclass
class OutputConfig:
    dir: str = opt("runs", "folder (or pyarrow URI for results) that holds run folders")
    name: Optional[str] = opt(None, "run folder name; default: <method>-<model>-s<seed>")
    checkpoint_every: int = opt(10, "save a checkpoint every N epochs (and at the end); 0 = only "
                                "at the end", ge=0)
    tensorboard: bool = opt(True, "write TensorBoard logs into the run folder")
    image_grid: bool = opt(True, "log a grid of mixed images and their sources at the start")
    progress: bool = opt(True, "progress bars")


@dataclass
class RunConfig:
    seed: int = opt(0, "fixes model init, data order, lambda, boxes and source choices", ge=0)
    device: str = opt("auto", "cuda when available under auto", choices=DEVICES)
    description: str = opt("", "free text, kept with the results")
    data: DataConfig = opt(factory=DataConfig)
    model: ModelConfig = opt(factory=ModelConfig)
    optim: OptimConfig = opt(factory=OptimConfig)
    eval: EvalConfig = opt(factory=EvalConfig)
    augment: AugmentConfig = opt(factory=AugmentConfig)
    output: OutputConfig = opt(factory=OutputConfig)


# --------------------------------------------------------------------------------------------
# Sweep configuration
# --------------------------------------------------------------------------------------------


@dataclass
class ParamSpec:
    """One search dimension. ``when`` makes it conditional: it exists only for trials whose other
    parameters take one of the listed values, e.g. ``when: {augment.criterion: [topk_loss]}``."""

    type: str = opt("choice", "float, int or choice", choices=PARAM_TYPES)
    values: Optional[list[Any]] = opt(None, "the values of a choice (and the grid of float/int)")
    low: Optional[float] = opt(None, "lower bound of float/int")
    high: Optional[float] = opt(None, "upper bound of float/int")
    log: bool = opt(False, "sample float/int on a log scale")
    when: dict[str, list[Any]] = opt(help="conditions: parameter -> allowed values", factory=dict)


@dataclass
class SchedulerConfig:
    type: str = opt("none", "early stopping: none or asha (on the validation metric)",
                    choices=SCHEDULERS)
    grace_period: int = opt(1, "ASHA: epochs before a trial may be stopped", gt=0)
    reduction_factor: float = opt(3.0, "ASHA reduction factor", gt=1)


@dataclass
class ResourcesConfig:
    cpus: float = opt(1.0, "CPUs per trial (per worker when workers > 1)", gt=0)
    gpus: float = opt(0.0, "GPUs per trial worker; fractions pack several trials on one card", ge=0)
    workers: int = opt(1, "data-parallel Ray Train workers per trial (1 = plain Tune trial)", ge=1)


@dataclass
class FollowupConfig:
    top: int = opt(0, "re-run the best N configurations with `seeds` after the search", ge=0)
    seeds: list[int] = opt(help="seeds of the follow-up runs", factory=lambda: [1, 2, 3, 4])


@dataclass
class SweepConfig:
    name: str = opt("sweep", "sweep id: the folder under `storage` (no timestamp, so --resume "
                    "finds it)")
    description: str = opt("", "free text")
    mode: str = opt("search", "search (Optuna over `space`) or grid (all combinations x seeds)",
                    choices=SWEEP_MODES)
    space: dict[str, ParamSpec] = opt(help="search space: dotted run field -> ParamSpec",
                                      factory=dict)
    seeds: list[int] = opt(help="seeds: every sampled configuration runs once per seed",
                           factory=lambda: [0])
    arms: list[dict[str, Any]] = opt(
        help="grid mode: a list of configurations run instead of the product of `space`, each "
             "a mapping of dotted run fields to values with optional `seeds` (default `seeds`)",
        factory=list)
    num_samples: int = opt(8, "search mode: number of configurations Optuna samples", gt=0)
    sampler: str = opt("tpe", "Optuna sampler", choices=SAMPLERS)
    metric: str = opt("val_top1_err", "validation metric searched and early-stopped on "
                      "(test error is reported, never optimised)", choices=METRICS)
    scheduler: SchedulerConfig = opt(factory=SchedulerConfig)
    resources: ResourcesConfig = opt(factory=ResourcesConfig)
    max_concurrent_trials: int = opt(0, "trials at once; 0 = as many as resources allow", ge=0)
    max_failures: int = opt(1, "retries of a failing trial before it is recorded as failed", ge=0)
    storage: str = opt("sweeps", "local folder or pyarrow URI (s3://, gs://) for results")
    address: Optional[str] = opt(None, "Ray address: null starts a local instance; auto or "
                                 "ray://host:port joins a cluster")
    local_cpus: Optional[int] = opt(None, "logical CPUs of the local Ray instance (default: "
                                    "max(4, cores))", gt=0)
    followup: FollowupConfig = opt(factory=FollowupConfig)
    report: bool = opt(True, "write `hardmix report` output when the sweep ends")
    run: RunConfig = opt(factory=RunConfig)


# --------------------------------------------------------------------------------------------
# Loading: YAML presets, files, overrides
# --------------------------------------------------------------------------------------------

PRESET_PACKAGE = "hardmix.presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict:
    """The raw mapping of a preset, with its ``base`` chain merged in."""
    names = preset_names()
    if name not in names:
        raise ConfigError("preset", name, _one_of(names, name))
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _resolve_base(yaml.safe_load(text) or {}, seen=(name,))


def read_yaml_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", path, "must be an existing YAML file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", path, f"is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", path, "must hold a mapping of config keys")
    return _resolve_base(raw, seen=(path,))


def _resolve_base(raw: dict, seen: tuple) -> dict:
    base = raw.pop("base", None)
    if base is None:
        return raw
    if base in seen:
        raise ConfigError("base", base, f"forms a cycle through {' -> '.join(seen)}")
    names = preset_names()
    if base not in names:
        raise ConfigError("base", base, _one_of(names, base))
    text = resources.files(PRESET_PACKAGE).joinpath(f"{base}.yaml").read_text()
    return deep_merge(_resolve_base(yaml.safe_load(text) or {}, seen + (base,)), raw)


def preset_kind(raw: dict) -> str:
    """``sweep`` when a mapping describes a sweep (it has sweep-only keys), else ``run``."""
    sweep_only = {f.name for f in dataclasses.fields(SweepConfig)} - {"name", "description"}
    return "sweep" if sweep_only & set(raw) else "run"


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("space", "when"):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str], cls: type | None = None) -> dict:
    """``["augment.alpha=0.5", ...]`` -> nested mapping; values are parsed as YAML scalars.

    With ``cls`` the key is read against the schema, so keys of mapping fields may hold dots:
    ``space.augment.k.high=0.5`` sets ``space["augment.k"]["high"]``.
    """
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", pair, "must look like key=value, e.g. augment.alpha=0.5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = _split_key(cls, key.strip().split(".")) if cls else key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", pair, f"sets both {part} and a field inside it")
        node[parts[-1]] = value
    return out


def _split_key(cls: Any, parts: list[str]) -> list[str]:
    """Group dotted key parts by the schema: a mapping field's key keeps its dots."""
    if not parts or not dataclasses.is_dataclass(cls):
        return parts
    names = {f.name for f in dataclasses.fields(cls)}
    if parts[0] not in names:
        return parts
    tp = typing.get_type_hints(cls)[parts[0]]
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    rest = parts[1:]
    if typing.get_origin(tp) is dict and rest:
        inner = typing.get_args(tp)[1]
        inner_names = ({f.name for f in dataclasses.fields(inner)}
                       if dataclasses.is_dataclass(inner) else set())
        for cut in range(len(rest) - 1, 0, -1):  # the longest key whose remainder is a field
            if rest[cut] in inner_names:
                return [parts[0], ".".join(rest[:cut])] + _split_key(inner, rest[cut:])
        return [parts[0], ".".join(rest)]
    return [parts[0]] + _split_key(tp, rest)


def load_config(cls: type, preset: str | None = None, file: str | None = None,
                overrides: list[str] | None = None) -> Any:
    """Build and validate a ``RunConfig`` or ``SweepConfig`` from preset < file < overrides.

    A sweep preset given to a run takes its ``run`` section, so ``hardmix train --preset
    quickstart`` trains the base run of the quickstart sweep.
    """
    raw: dict = {}
    for layer in (read_preset(preset) if preset else None,
                  read_yaml_file(file) if file else None,
                  parse_overrides(overrides or [], cls)):
        if layer:
            if cls is RunConfig and preset_kind(layer) == "sweep":
                layer = layer.get("run", {})
            raw = deep_merge(raw, layer)
    raw.pop("kind", None)
    cfg = from_dict(cls, raw)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Mapping <-> dataclass
# --------------------------------------------------------------------------------------------


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Turn a mapping into dataclass ``cls``, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", raw, "must be a mapping of fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(path, value, "unknown field" + _did_you_mean(key, names, prefix))
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path + ".")
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "must be a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "must be a mapping")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, value, "must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, value, "must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, value, "must be a string")
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested mapping (YAML-ready) of a config."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"augment.alpha": 1.0, ...}``: one entry per leaf field, the store's config columns."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def field_type(cls: type, dotted: str) -> Any:
    """The declared type of a dotted field of ``cls``; raises ConfigError when there is none."""
    node = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            prefix = ".".join(parts[:i]) + ("." if i else "")
            raise ConfigError(dotted, None, "is not a config field"
                              + _did_you_mean(part, names, prefix))
        node = typing.get_type_hints(node)[part]
        if typing.get_origin(node) in (Union, types.UnionType):
            node = [a for a in typing.get_args(node) if a is not type(None)][0]
    return node


def with_overrides(cfg: Any, values: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with dotted fields replaced (and validated), e.g. a sweep trial."""
    raw = to_dict(cfg)
    for dotted, value in values.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    new = from_dict(type(cfg), raw)
    validate(new)
    return new


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted name, default, help)`` rows for ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_fields(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" {{{', '.join(f.metadata['choices'])}}}"
        rows.append((f"{prefix}{f.name}", repr(default) if default != {} else "{}", text))
    return rows


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate(cfg: Any) -> None:
    """Check every field and the rules between fields; raise the first ConfigError."""
    check_fields(cfg)
    if isinstance(cfg, RunConfig):
        _check_run(cfg)
    elif isinstance(cfg, SweepConfig):
        _check_sweep(cfg)


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` against its declared choices and bounds (``prefix`` names it)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, path + ".")
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    check_fields(v, f"{path}.{k}.")
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(path, value, _one_of(m["choices"], value))
        if value is None or isinstance(value, (bool, str, list, dict)):
            continue
        for key, ok, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                              ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            if m.get(key) is not None and not ok(value, m[key]):
                raise ConfigError(path, value, f"must be {word} {m[key]:g}")


def topk_count(k: float, batch: int) -> int:
    """k as a count: a fraction of the batch when k < 1 (at least one sample)."""
    return max(1, int(round(k * batch))) if k < 1 else int(k)


def uses_k(criterion: str, fallback: str) -> bool:
    """Whether ``augment.k`` sizes a hard set: a top-k criterion or the ``topk_loss`` fallback."""
    return criterion in ("topk_loss", "low_margin") or fallback == "topk_loss"


def check_k(k: float, batch: int | None = None, field: str = "augment.k") -> int | None:
    """Check ``k`` (a fraction < 1 or a whole count, at most ``batch``); its count for ``batch``."""
    if k <= 0:
        raise ConfigError(field, k, "must be > 0: a count (>= 1) or a fraction of the batch")
    if k >= 1 and not float(k).is_integer():
        raise ConfigError(field, k, "must be a fraction < 1 or a whole count")
    if batch is None:
        return None
    if k > batch:
        raise ConfigError(field, k, f"must be <= the batch size ({batch}) or a fraction < 1")
    return topk_count(k, batch)


def _check_run(cfg: RunConfig, prefix: str = "") -> None:
    d, a, o = cfg.data, cfg.augment, cfg.optim
    if uses_k(a.criterion, a.fallback):
        check_k(a.k, d.batch_size, f"{prefix}augment.k")
    if a.min_hard > d.batch_size:
        raise ConfigError(f"{prefix}augment.min_hard", a.min_hard,
                          f"must be <= data.batch_size ({d.batch_size})")
    if d.name in ("npz", "folder") and not d.path:
        raise ConfigError(f"{prefix}data.path", d.path, f"is required for data.name={d.name}")
    if d.path and d.name in ("npz", "folder", "cifar10", "cifar100"):
        p = Path(os.path.expanduser(d.path))
        if d.name == "npz" and not p.is_file():
            raise ConfigError(f"{prefix}data.path", d.path, "must be an existing .npz file")
        if d.name == "folder" and not p.is_dir():
            raise ConfigError(f"{prefix}data.path", d.path, "must be an existing image folder")
        if d.name.startswith("cifar") and not d.download and not p.exists():
            raise ConfigError(f"{prefix}data.path", d.path,
                              "must exist (or set data.download=true to fetch CIFAR)")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        raise ConfigError(f"{prefix}data.val_size", d.val_size, "must be a fraction < 1 or a count")
    if d.subset is not None and d.val_size >= 1 and d.val_size >= d.subset:
        raise ConfigError(f"{prefix}data.val_size", d.val_size,
                          f"must be smaller than data.subset ({d.subset})")
    if sorted(o.milestones) != o.milestones or any(m <= 0 for m in o.milestones):
        raise ConfigError(f"{prefix}optim.milestones", o.milestones,
                          "must be increasing positive epochs")
    if o.nesterov and o.momentum == 0:
        raise ConfigError(f"{prefix}optim.nesterov", o.nesterov,
                          "needs optim.momentum > 0 (or set optim.nesterov=false)")
    if o.warmup_epochs >= o.epochs and o.warmup_epochs > 0:
        raise ConfigError(f"{prefix}optim.warmup_epochs", o.warmup_epochs,
                          f"must be < optim.epochs ({o.epochs})")
    if not prefix:
        _check_writable(f"{prefix}output.dir", cfg.output.dir)


def _check_writable(name: str, target: str) -> None:
    if "://" in target:
        return  # remote filesystems are checked by the store when it opens them
    p = Path(os.path.expanduser(target))
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(name, target, f"must be a writable folder ({probe} is a file)")
    try:  # a real write: permission bits say nothing for root or read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(name, target, f"must be a writable folder ({exc.strerror})") from None


def _check_sweep(cfg: SweepConfig) -> None:
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError("name", cfg.name, "must be a plain folder name")
    if not cfg.seeds:
        raise ConfigError("seeds", cfg.seeds, "must list at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError("seeds", cfg.seeds, "must not repeat a seed")
    _check_run(cfg.run, prefix="run.")  # the base run first: its errors are the clearest
    _check_arms(cfg)
    for name, spec in cfg.space.items():
        path = f"space.{name}"
        if name == "seed":
            raise ConfigError(path, name, "seeds are a factor of their own: use `seeds`")
        field_type(RunConfig, name)  # raises for a name that is not a run field
        if spec.type == "choice":
            if not spec.values:
                raise ConfigError(f"{path}.values", spec.values, "a choice needs values")
        elif spec.values is None:
            if spec.low is None or spec.high is None or not spec.low < spec.high:
                raise ConfigError(path, {"low": spec.low, "high": spec.high},
                                  "float/int needs low < high (or a list of values)")
            if spec.log and spec.low <= 0:
                raise ConfigError(f"{path}.low", spec.low, "must be > 0 on a log scale")
        if cfg.mode == "grid" and spec.values is None:
            raise ConfigError(f"{path}.values", None, "grid mode needs explicit values")
        for other, allowed in spec.when.items():
            if other not in cfg.space:
                field_type(RunConfig, other)  # a fixed run field is fine; an unknown name is not
            if not isinstance(allowed, list) or not allowed:
                raise ConfigError(f"{path}.when.{other}", allowed, "must list allowed values")
        for value in _spec_extremes(spec):
            try:
                with_overrides(cfg.run, {name: value})
            except ConfigError as exc:
                raise ConfigError(path, value, f"gives an invalid run: {exc}") from None
    _check_writable("storage", cfg.storage)
    if cfg.address and not (cfg.address == "auto" or cfg.address.startswith("ray://")
                            or ":" in cfg.address):
        raise ConfigError("address", cfg.address, "must be auto, ray://host:port or host:port")
    if cfg.resources.workers > 1 and cfg.resources.cpus < 1:
        raise ConfigError("resources.cpus", cfg.resources.cpus, "must be >= 1 with workers > 1")
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > cfg.run.optim.epochs:
        raise ConfigError("scheduler.grace_period", cfg.scheduler.grace_period,
                          f"must be <= run.optim.epochs ({cfg.run.optim.epochs})")


def _check_arms(cfg: SweepConfig) -> None:
    """Arms: grid mode only, instead of a space; run fields with valid values; own seeds."""
    if not cfg.arms:
        return
    if cfg.mode != "grid":
        raise ConfigError("arms", f"{len(cfg.arms)} arms", "arms need mode=grid (a search "
                          "explores `space`)")
    if cfg.space:
        raise ConfigError("space", list(cfg.space), "a sweep with arms has no space: put each "
                          "combination in an arm")
    seen: dict[str, int] = {}
    for i, arm in enumerate(cfg.arms):
        path = f"arms[{i}]"
        if not isinstance(arm, dict) or not arm:
            raise ConfigError(path, arm, "must be a non-empty mapping of run fields to values")
        params = {k: v for k, v in arm.items() if k != "seeds"}
        if "seeds" in arm:
            seeds = arm["seeds"]
            if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds)):
                raise ConfigError(f"{path}.seeds", seeds, "must list distinct integer seeds")
        for name in params:
            if name == "seed":
                raise ConfigError(f"{path}.seed", params[name], "give an arm its seeds with "
                                  "`seeds: [...]`")
            try:
                field_type(RunConfig, name)
            except ConfigError as exc:
                raise ConfigError(f"{path}.{name}", params[name], exc.allowed) from None
        try:
            with_overrides(cfg.run, params)
        except ConfigError as exc:  # named by the arm's field, not the run's
            raise ConfigError(f"{path}.{exc.field}", exc.value, exc.allowed) from None
        key = repr(sorted(params.items()))
        if key in seen:
            raise ConfigError(path, params, f"repeats arms[{seen[key]}] (give it more seeds "
                              "instead)")
        seen[key] = i


def _spec_extremes(spec: ParamSpec) -> list[Any]:
    if spec.values is not None:
        return list(spec.values)
    return [spec.low, spec.high] if spec.type == "float" else [int(spec.low), int(spec.high)]


def _did_you_mean(key: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(names)}"


def _one_of(choices: Any, value: Any) -> str:
    text = f"must be one of {', '.join(map(str, choices))}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return text + (f" (did you mean {close[0]}?)" if close else "")


def fail(exc: ConfigError, stream=None) -> int:
    """Print a config error as its one line; the exit code the CLI returns."""
    print(f"hardmix: error: {exc}", file=stream or sys.stderr)
    return 2
