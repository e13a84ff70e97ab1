"""The config schema: typed dataclasses for runs and sweeps, with each field's help, default and
constraints, and :func:`from_dict` (a mapping made into them, rejecting unknown keys and wrong
types). No I/O, no rules between fields (:mod:`hardmix.config.rules`), no torch; nothing of the
config package below it.

One name per idea: the dotted path of a field (``augment.alpha``) is its YAML key, its ``--set``
key, its Parquet column and its ``--help`` entry. Fields whose values are registry names
(``augment.method``, ``data.name``, ...) take their choices from the registry itself, so a
registered method or data set is a valid value everywhere at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from hardmix.architectures import ARCHITECTURES, check_model_kwargs, check_model_name
from hardmix.datasets import DATASETS
from hardmix.errors import ConfigError
from hardmix.methods import BOXES, CRITERIA, DEFAULTS, FALLBACKS, METHODS, SALIENCY, SIGNALS
from hardmix.metrics import OUTCOMES
from hardmix.optimizers import OPTIMIZERS, check_betas

STEMS = ("auto", "cifar", "imagenet")
#: The learning-rate schedules, each with the optim fields only it reads (the others ignore them).
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {"multistep": ("milestones", "gamma"),
                                               "cosine": (), "constant": ()}
SCHEDULES = tuple(SCHEDULE_FIELDS)
DEVICES = ("auto", "cpu", "cuda")
#: ``optim.amp``: the numeric precision of training and evaluation (hardmix.train.precision_policy).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BN_MODES = ("eval", "train")
SWEEP_MODES = ("search", "grid")
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
SCHEDULERS = ("none", "asha")
PARAM_TYPES = ("float", "int", "choice")
METRICS = ("val_top1_err", "val_loss", "val_top5_err")
LOGGERS = ("tensorboard", "wandb", "mlflow")
#: history criterion: flags are kept as bits of one byte per sample.
MAX_HISTORY = 8


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Any = None,
        gt: float | None = None, ge: float | None = None, le: float | None = None,
        lt: float | None = None, factory: Any = None,
        check: Optional[Callable[[Any, str], None]] = None,
        legacy: Optional[dict] = None) -> Any:
    """A config field with its help text and the constraints the validator enforces.

    ``choices``: a tuple, or a registry (dict) whose keys are the allowed values, read when
    validating (so entries registered later count). ``check(value, field)``: a custom check
    that raises ConfigError. ``legacy``: values an earlier version of the field took, read as
    their replacement (old configs and checkpoints still load).
    """
    meta = {"help": help, "choices": choices, "gt": gt, "ge": ge, "le": le, "lt": lt,
            "check": check, "legacy": legacy}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Run configuration
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = opt("cifar10", "data set (see the list below)", choices=DATASETS)
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
    pad: int = opt(4, "zero padding of the random crop, pixels", ge=0, le=1024)
    image_size: int = opt(224, "crop size for folder data (CIFAR/npz/digits keep their own size)",
                          gt=0, le=4096)
    workers: int = opt(4, "DataLoader workers for folder data (in-memory data needs none)", ge=0,
                       le=256)
    device_loader: bool = opt(True, "keep in-memory data sets on the device as uint8 and augment "
                              "batches with tensor ops (no DataLoader)")


@dataclass
class ModelConfig:
    name: str = opt("resnet18", "architecture: " + ", ".join(ARCHITECTURES) + ", or "
                    "timm:<name> (any timm model; extra [timm])", check=check_model_name)
    stem: str = opt("auto", "ResNet stem: cifar (3x3 conv, no max-pool), imagenet (7x7 conv + "
                    "max-pool) or auto (by image size); other models have their own", choices=STEMS)
    dropout: float = opt(0.0, "dropout before the classifier (WideResNet: inside blocks)", ge=0, lt=1)
    width: int = opt(64, "base width of smallnet", gt=0, le=4096)
    kwargs: dict[str, Any] = opt(
        help="timm models only: keyword arguments of timm.create_model, e.g. {drop_path_rate: "
             "0.1} (hardmix sets num_classes, in_chans, drop_rate and pretrained itself)",
        factory=dict, check=check_model_kwargs)
    pretrained: bool = opt(False, "timm models only: start from timm's pretrained weights "
                           "(fetched from the Hugging Face Hub or its local cache; the classifier "
                           "is new); refused up front when timm has none or they cannot be fetched")


@dataclass
class OptimConfig:
    name: str = opt("sgd", "optimiser: " + "; ".join(f"{o.name} = {o.description} (reads "
                    f"{', '.join(o.reads)})" for o in OPTIMIZERS.values()), choices=OPTIMIZERS)
    epochs: int = opt(200, "training epochs", gt=0, le=100_000)
    lr: float = opt(0.1, "peak learning rate", gt=0)
    momentum: float = opt(0.9, "sgd only: momentum", ge=0, lt=1)
    nesterov: bool = opt(True, "sgd only: Nesterov momentum")
    betas: list[float] = opt(help="adamw only: the running averages' coefficients (beta1, beta2)",
                             factory=lambda: [0.9, 0.999], check=check_betas)
    eps: float = opt(1e-8, "adamw only: added to the denominator", gt=0, le=1)
    weight_decay: float = opt(5e-4, "weight decay: L2 added to the gradient (sgd), decoupled "
                              "(adamw)", ge=0, le=10)
    schedule: str = opt("multistep", "learning-rate schedule", choices=SCHEDULES)
    milestones: list[int] = opt(help="epochs at which multistep decays the lr",
                                factory=lambda: [60, 120, 160])
    gamma: float = opt(0.2, "multistep decay factor", gt=0, le=1)
    warmup_epochs: int = opt(0, "linear warm-up epochs", ge=0)
    label_smoothing: float = opt(0.0, "label smoothing of the (mixed) cross entropy", ge=0, lt=1)
    amp: str = opt("auto", "numeric precision: auto = bf16 autocast where the device computes "
                   "bf16 natively (CUDA compute capability >= 8.0; CPUs with AVX512-BF16 or AMX), "
                   "fp16 autocast + GradScaler on older CUDA GPUs with tensor cores (7.x), fp32 "
                   "elsewhere; bf16 and fp16 force it (refused where the device lacks it); the "
                   "run row says which ran and why", choices=PRECISIONS,
                   legacy={True: "auto", False: "fp32"})
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
    method: str = opt(DEFAULTS["method"], "mixing method (the method table below says what each reads)",
                      choices=METHODS)
    alpha: float = opt(1.0, "lambda ~ Beta(alpha, alpha)", gt=0, le=1e4)
    prob: float = opt(1.0, "probability that a batch is mixed at all (paper: 1.0; CutMix on "
                      "CIFAR: 0.5)", ge=0, le=1)
    criterion: str = opt(DEFAULTS["criterion"], "hard-sample criterion of hard-source methods",
                         choices=CRITERIA)
    k: float = opt(0.25, "size of a top-k hard set (topk_loss, low_margin, topk_loss fallback): "
                   "a count (>= 1) or a fraction of the batch (< 1)", gt=0)
    fallback: str = opt(DEFAULTS["fallback"], "when a thresholded criterion (misclassified, history) finds "
                        "fewer than min_hard hard samples: random (plain CutMix), skip (no "
                        "mixing this step), topk_loss, or topup (the hard samples plus the "
                        "next-highest-loss ones, min_hard distinct sources)", choices=FALLBACKS)
    min_hard: int = opt(1, "the fallback applies below this many hard samples (thresholded "
                        "criteria only: a top-k set is never short)", ge=1)
    history_window: int = opt(4, "history criterion: the last N observations of each sample",
                              ge=1, le=MAX_HISTORY)
    history_min_wrong: int = opt(2, "history criterion: hard when misclassified in at least M "
                                 "of them (as a rate while fewer than N were seen)", ge=1,
                                 le=MAX_HISTORY)
    signal: str = opt(DEFAULTS["signal"], "hardness from an extra no-grad forward of the clean batch, or "
                      "cached from earlier clean forwards", choices=SIGNALS)
    bn_mode: str = opt("eval", "BatchNorm mode of the extra forward (running stats never change)",
                       choices=BN_MODES)
    box: str = opt(DEFAULTS["box"], "one box (and lambda) per batch or per sample; auto = the method's "
                   "paper: per sample for Cutout, per batch for the others", choices=BOXES)
    cutout_size: float = opt(0.5, "Cutout square side as a fraction of the image side", gt=0, le=1)
    saliency: str = opt(DEFAULTS["saliency"], "SaliencyMix's detector: spectral_residual (torch, "
                        "on the device) or fine_grained (OpenCV, the authors'; extra "
                        "[saliency])", choices=SALIENCY)


@dataclass
class OutputConfig:
    dir: str = opt("runs", "folder (or pyarrow URI for results) that holds run folders")
    name: Optional[str] = opt(None, "run folder name; default: <method>-<model>-s<seed>")
    checkpoint_every: int = opt(10, "save a checkpoint every N epochs (and at the end); 0 = only "
                                "at the end", ge=0)
    tensorboard: bool = opt(True, "write TensorBoard logs into the run folder")
    loggers: list[str] = opt(help="experiment trackers besides the Parquet store: wandb, "
                             "mlflow (extras [wandb], [mlflow]; tensorboard is the switch above)",
                             factory=list)
    image_grid: bool = opt(True, "log a grid of mixed images and their sources at the start")
    progress: bool = opt(True, "progress bars")


@dataclass
class RunConfig:
    seed: int = opt(0, "fixes model init, data order, lambda, boxes and source choices", ge=0,
                    lt=2 ** 62)
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
    """One search dimension. ``when`` makes it conditional beyond the method table: it exists
    only for trials whose other parameters take one of the listed values. Augment fields are
    conditional on their own already: a parameter exists only where it acts."""

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
    reduction_factor: float = opt(3.0, "ASHA reduction factor", gt=1, le=1000)


#: Resource names Ray reserves: CPUs and GPUs have their own fields, the rest Ray sets itself.
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
#: Ray keeps resource quantities in fixed point with this step; a finer request cannot be met.
RESOURCE_STEP = 1e-4


def check_custom_resources(value: Any, path: str) -> None:
    """``resources.custom``: Ray resource names (not the built-in ones) to non-negative, finite
    quantities Ray can represent (steps of 1e-4, at most 1e9)."""
    for name, amount in (value or {}).items():
        if not name.strip() or name in RESERVED_RESOURCES or name.startswith(("node:",
                                                                             "accelerator_type:")):
            raise ConfigError(f"{path}.{name}", amount,
                              "must name a custom Ray resource (not CPU/GPU/memory/"
                              "object_store_memory/node:*/accelerator_type:*: use "
                              "resources.cpus/gpus for those)")
        if not 0 <= amount <= 1e9:  # also false for NaN
            raise ConfigError(f"{path}.{name}", amount, "must be a finite number in [0, 1e9]")
        if amount and round(amount / RESOURCE_STEP) == 0:
            raise ConfigError(f"{path}.{name}", amount,
                              f"must be 0 or >= {RESOURCE_STEP:g} (Ray's resource precision)")


@dataclass
class ResourcesConfig:
    cpus: float = opt(1.0, "CPUs per trial (per worker when workers > 1); also the trial's "
                      "torch threads", gt=0, le=4096)
    gpus: float = opt(0.0, "GPUs per trial worker; fractions pack several trials on one card",
                      ge=0, le=64)
    workers: int = opt(1, "data-parallel Ray Train workers per trial (1 = plain Tune trial)",
                       ge=1, le=4096)
    custom: dict[str, float] = opt(
        help="custom Ray resources per trial (per worker when workers > 1), e.g. {ssd: 1}: the "
             "trial runs only on nodes started with them (`ray start --resources`, a node type's "
             "`resources` in cluster.yaml)", factory=dict, check=check_custom_resources)
    driver: dict[str, float] = opt(
        help="workers > 1 only: custom Ray resources of the trial's driver (the Tune trial that "
             "starts the Ray Train workers and waits for them), e.g. {driver: 1}; it then takes "
             "these instead of 0.5 CPU, so it runs only where they are offered (cluster.yaml and "
             "the KubeRay manifests offer `driver` on the head) and never starts a GPU node for "
             "itself", factory=dict, check=check_custom_resources)


@dataclass
class FollowupConfig:
    top: int = opt(0, "re-run the best N configurations with `seeds` after the search", ge=0,
                   le=1000)
    seeds: list[int] = opt(help="seeds of the follow-up runs", factory=lambda: [1, 2, 3, 4])
    baseline: Optional[str] = opt(None, "also run this method (e.g. cutmix) matched to each "
                                  "follow-up configuration on every field both read (alpha, "
                                  "prob, box, ...), with the same seeds", choices=None)


def _check_outcomes(value: Any, path: str) -> None:
    """``analysis.secondary``: distinct outcome names (:data:`hardmix.metrics.OUTCOMES`)."""
    for name in value or []:
        if name not in OUTCOMES:
            raise ConfigError(path, name, f"must list outcomes of {', '.join(OUTCOMES)}")
    if len(set(value or [])) != len(value or []):
        raise ConfigError(path, value, "must not repeat an outcome")


def _check_family(value: Any, path: str) -> None:
    """``analysis.family``: ``method`` or run fields (dotted, or an augment field's name)."""
    fields = set(flatten(RunConfig()))
    short = {f.rsplit(".", 1)[-1] for f in fields if f.startswith("augment.")}
    for name in value or []:
        if name not in fields | short | {"method"}:
            raise ConfigError(path, name, "must list method or run fields (e.g. augment.prob, "
                              "or prob for an augment field)")


@dataclass
class AnalysisConfig:
    """What the report tests, declared before the sweep runs (``hardmix report`` reads it from
    the saved sweep.yaml; ``--margin`` / ``--family`` override it)."""

    margin: Optional[float] = opt(None, "smallest effect of interest on the primary outcome, in "
                                  "its units (points of error): with it every primary contrast "
                                  "also gets the equivalence test (TOST) and can end "
                                  "'equivalent within ±margin'; null: better / worse / "
                                  "undetermined only", gt=0, le=100)
    primary: str = opt("top1", "the primary family's outcome", choices=OUTCOMES)
    family: list[str] = opt(help="factors whose one-factor contrasts form the primary family "
                            "(e.g. [method]); empty: every one-factor contrast",
                            factory=list, check=_check_family)
    secondary: list[str] = opt(help="outcomes of the secondary families, each over the primary "
                               "family's contrasts and corrected on its own",
                               factory=lambda: ["top5", "nll", "ece"], check=_check_outcomes)
    avoid_seeds: list[int] = opt(help="seeds this sweep must not use (a pilot's, whose results "
                                 "shaped the design); a sweep that lists one is refused",
                                 factory=list)
    until_resolved: bool = opt(False, "grid with arms: run the seeds in `rounds` rounds up to "
                               "`max_seeds` per arm and stop each primary contrast once its "
                               "verdict is resolved (group-sequential design; needs a margin; "
                               "hardmix sweep --until-resolved)")
    max_seeds: int = opt(20, "until_resolved: seeds per arm at most (the last look); beyond "
                         "`seeds`, the smallest unused ones not in avoid_seeds", ge=2, le=10_000)
    rounds: int = opt(4, "until_resolved: looks, equally spaced up to max_seeds (fewer than "
                      "max_seeds)", ge=1, le=100)


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
    num_samples: int = opt(8, "search mode: number of configurations Optuna samples", gt=0,
                           le=100_000)
    sampler: str = opt("tpe", "Optuna sampler", choices=SAMPLERS)
    metric: str = opt("val_top1_err", "validation metric searched and early-stopped on "
                      "(test error is reported, never optimised)", choices=METRICS)
    scheduler: SchedulerConfig = opt(factory=SchedulerConfig)
    resources: ResourcesConfig = opt(factory=ResourcesConfig)
    max_concurrent_trials: int = opt(0, "trials at once; 0 = as many as resources allow", ge=0,
                                     le=100_000)
    max_failures: int = opt(1, "retries of a failing trial before it is recorded as failed", ge=0,
                            le=1000)
    storage: str = opt("sweeps", "local folder or pyarrow URI (s3://, gs://) for results")
    address: Optional[str] = opt(None, "Ray address: null starts a local instance (bound to "
                                 "127.0.0.1); auto or ray://host:port joins a cluster")
    local_cpus: Optional[int] = opt(None, "logical CPUs of the local Ray instance (default: "
                                    "max(4, cores))", gt=0, le=4096)
    followup: FollowupConfig = opt(factory=FollowupConfig)
    report: bool = opt(True, "write `hardmix report` output when the sweep ends")
    analysis: AnalysisConfig = opt(factory=AnalysisConfig)
    run: RunConfig = opt(factory=RunConfig)


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------


def strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


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
                              + did_you_mean(part, names, prefix))
        node = strip_optional(typing.get_type_hints(node)[part])
    return node


def field_meta(cls: type, dotted: str) -> dict:
    """The metadata (help, choices, bounds) of a dotted leaf field."""
    parts = dotted.split(".")
    node = cls
    for part in parts[:-1]:
        node = strip_optional(typing.get_type_hints(node)[part])
    return dict(next(f for f in dataclasses.fields(node) if f.name == parts[-1]).metadata)


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
# Mapping -> dataclass (the inverse of to_dict), and the hints of a refusal
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
            raise ConfigError(path, value, "unknown field" + did_you_mean(str(key), names, prefix))
        meta = next(f for f in dataclasses.fields(cls) if f.name == key).metadata
        kwargs[key] = _coerce(hints[key], legacy_value(meta, value), path)
    return cls(**kwargs)


def legacy_value(meta: Mapping[str, Any], value: Any) -> Any:
    """``value``, or its replacement when it is a value an earlier version took (a field's
    ``legacy`` metadata, e.g. ``optim.amp: true`` -> ``auto``); ``True`` never matches ``1``."""
    return next((v for k, v in (meta.get("legacy") or {}).items()
                 if type(k) is type(value) and k == value), value)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path + ".")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):  # seeds=5: seed 5 or five seeds? say which
            example = f"[{value}]" if isinstance(value, (int, float, str)) else "[...]"
            raise ConfigError(path, value, f"must be a list, e.g. {example}")
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
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(path, value, "must be an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(path, value, "must be a number")
        if not math.isfinite(number):
            raise ConfigError(path, value, "must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, value, "must be a string")
    return value


def did_you_mean(key: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(names)}"


def one_of(choices: Any, value: Any) -> str:
    text = f"must be one of {', '.join(map(str, choices))}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return text + (f" (did you mean {close[0]}?)" if close else "")
