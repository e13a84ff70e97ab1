"""Validation: every field against its constraints and the rules between fields. Pure: no
disk, no devices, no torch (those are :mod:`hardmix.config.environment`).

A failure is a :class:`~hardmix.errors.ConfigError` naming the field, the value and what is
allowed. Rules between ``augment`` fields come from the method table
(:func:`hardmix.methods.check_augment`) and are applied only to fields that act.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hardmix.config.schema import (ParamSpec, RunConfig, SweepConfig, field_type, from_dict,
                                   one_of, to_dict)
from hardmix.datasets import dataset
from hardmix.errors import ConfigError
from hardmix.methods import METHODS, active_fields, check_augment

#: Integers are stored as int64 Parquet columns.
INT_LIMIT = 2 ** 63 - 1


def validate(cfg: Any) -> None:
    """Check every field and the rules between fields; raise the first ConfigError."""
    check_fields(cfg)
    if isinstance(cfg, RunConfig):
        check_run(cfg)
    elif isinstance(cfg, SweepConfig):
        check_sweep(cfg)


def _check_number(path: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, value, "must be a finite number")
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        raise ConfigError(path, value, f"must be within ±{INT_LIMIT} (a 64-bit integer)")


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Check every field of ``cfg`` against its declared choices, bounds and checks, and that
    every number is finite and fits 64 bits (``prefix`` names the fields)."""
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
        if isinstance(value, list):
            for i, v in enumerate(value):
                _check_number(f"{path}[{i}]", v)
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(path, value, one_of(m["choices"], value))
        if m.get("check"):
            m["check"](value, path)
        if value is None or isinstance(value, (bool, str, list, dict)):
            continue
        _check_number(path, value)
        for key, ok, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                              ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            if m.get(key) is not None and not ok(value, m[key]):
                raise ConfigError(path, value, f"must be {word} {m[key]:g}")


def topk_count(k: float, batch: int) -> int:
    """k as a count: a fraction of the batch when k < 1 (at least one sample)."""
    return max(1, int(round(k * batch))) if k < 1 else int(k)


def check_k(k: float, batch: int | None = None, field: str = "augment.k") -> int | None:
    """Check ``k`` (a fraction < 1 or a whole count, at most ``batch``); its count for ``batch``."""
    if not k > 0:
        raise ConfigError(field, k, "must be > 0: a count (>= 1) or a fraction of the batch")
    if k >= 1 and not float(k).is_integer():
        raise ConfigError(field, k, "must be a fraction < 1 or a whole count")
    if batch is None:
        return None
    if k > batch:
        raise ConfigError(field, k, f"must be <= the batch size ({batch}) or a fraction < 1")
    return topk_count(k, batch)


def check_run(cfg: RunConfig, prefix: str = "") -> None:
    """Rules between the fields of a run (``prefix``: ``run.`` inside a sweep)."""
    d, a, o = cfg.data, cfg.augment, cfg.optim
    aug = to_dict(a)
    check_augment(aug, f"{prefix}augment.")
    active = active_fields(aug)
    if "k" in active:
        check_k(a.k, d.batch_size, f"{prefix}augment.k")
    if "min_hard" in active and a.min_hard > d.batch_size:
        raise ConfigError(f"{prefix}augment.min_hard", a.min_hard,
                          f"must be <= data.batch_size ({d.batch_size})")
    if dataset(d.name).needs_path and not d.path:
        raise ConfigError(f"{prefix}data.path", d.path, f"is required for data.name={d.name}")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        raise ConfigError(f"{prefix}data.val_size", d.val_size, "must be a fraction < 1 or a count")
    if d.subset is not None and d.val_size >= 1 and d.val_size >= d.subset:
        raise ConfigError(f"{prefix}data.val_size", d.val_size,
                          f"must be smaller than data.subset ({d.subset})")
    if sorted(o.milestones) != o.milestones or any(m <= 0 for m in o.milestones):
        raise ConfigError(f"{prefix}optim.milestones", o.milestones,
                          "must be increasing positive epochs")
    from hardmix.optimizers import check_optim
    check_optim(o, f"{prefix}optim.")  # the chosen optimiser's own rules (its fields only)
    if o.warmup_epochs >= o.epochs and o.warmup_epochs > 0:
        raise ConfigError(f"{prefix}optim.warmup_epochs", o.warmup_epochs,
                          f"must be < optim.epochs ({o.epochs})")
    if cfg.output.name is not None:
        check_folder_name(f"{prefix}output.name", cfg.output.name)
    from hardmix.config.schema import LOGGERS
    for i, logger in enumerate(cfg.output.loggers):
        if logger not in LOGGERS or logger == "tensorboard":
            raise ConfigError(f"{prefix}output.loggers[{i}]", logger,
                              "must be wandb or mlflow (TensorBoard is output.tensorboard)")


#: Longest folder name (in UTF-8 bytes) a run or sweep may take: file systems allow 255 per
#: path component, and the name is the stem of longer ones (``<name>-2``, ``<name>.yaml.tmp``).
MAX_FOLDER_NAME = 100


def check_folder_name(path: str, name: str) -> None:
    """A name that becomes one folder: not empty, no separator, not hidden, not too long."""
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise ConfigError(path, name, "must be a plain folder name")
    if len(name.encode()) > MAX_FOLDER_NAME:
        raise ConfigError(path, name[:40] + "...", f"must be at most {MAX_FOLDER_NAME} bytes "
                                                   f"(got {len(name.encode())}): it names a folder")


def with_overrides(cfg: Any, values: dict[str, Any], rules: bool = True) -> Any:
    """A copy of ``cfg`` with dotted fields replaced and validated (``rules=False``: the fields'
    own types and bounds only, not the rules between fields), e.g. a sweep trial."""
    raw = to_dict(cfg)
    for dotted, value in values.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    new = from_dict(type(cfg), raw)
    if rules:
        validate(new)
    else:
        check_fields(new)
    return new


def check_sweep(cfg: SweepConfig) -> None:
    """Rules of a sweep: name, seeds, the base run, arms, the space."""
    check_folder_name("name", cfg.name)
    if not cfg.seeds:
        raise ConfigError("seeds", cfg.seeds, "must list at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError("seeds", cfg.seeds, "must not repeat a seed")
    for path, seeds in (("seeds", cfg.seeds), ("followup.seeds", cfg.followup.seeds)):
        bad = [s for s in seeds if s < 0]
        if bad:
            raise ConfigError(path, seeds, f"must be >= 0 (got {bad[0]})")
    check_run(cfg.run, prefix="run.")  # the base run first: its errors are the clearest
    _check_arms(cfg)
    avoid = set(cfg.analysis.avoid_seeds)
    followup = [("followup.seeds", cfg.followup.seeds)] if cfg.followup.top else []
    for path, seeds in [("seeds", cfg.seeds)] + followup + [
            (f"arms[{i}].seeds", a.get("seeds") or []) for i, a in enumerate(cfg.arms)]:
        if avoid & set(seeds):
            raise ConfigError(path, sorted(avoid & set(seeds)), "must avoid analysis.avoid_seeds "
                              f"({', '.join(map(str, sorted(avoid)))})")
    if cfg.analysis.until_resolved:
        _check_until_resolved(cfg)
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
        if spec.values is not None and len({repr(v) for v in spec.values}) != len(spec.values):
            raise ConfigError(f"{path}.values", spec.values, "must not repeat a value")
        if cfg.mode == "grid" and spec.values is None:
            raise ConfigError(f"{path}.values", None, "grid mode needs explicit values")
        for other, allowed in spec.when.items():
            if other not in cfg.space:
                field_type(RunConfig, other)  # a fixed run field is fine; an unknown name is not
            if not isinstance(allowed, list) or not allowed:
                raise ConfigError(f"{path}.when.{other}", allowed, "must list allowed values")
        for value in _spec_extremes(spec):
            try:  # each value on its own: rules between fields are checked per trial
                with_overrides(cfg.run, {name: value}, rules=False)
            except ConfigError as exc:
                raise ConfigError(path, value, f"gives an invalid run: {exc}") from None
    if cfg.address and not (cfg.address == "auto" or cfg.address.startswith("ray://")
                            or ":" in cfg.address):
        raise ConfigError("address", cfg.address, "must be auto, ray://host:port or host:port")
    if cfg.resources.workers > 1 and cfg.resources.cpus < 1:
        raise ConfigError("resources.cpus", cfg.resources.cpus, "must be >= 1 with workers > 1")
    if cfg.resources.workers > 1 and 0 < cfg.resources.gpus < 1:
        raise ConfigError("resources.gpus", cfg.resources.gpus,
                          "must be 0 (gloo on CPUs) or >= 1 with resources.workers > 1: NCCL "
                          "needs a GPU of its own per rank, and a fraction would put two ranks "
                          "of one trial on one GPU")
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > cfg.run.optim.epochs:
        raise ConfigError("scheduler.grace_period", cfg.scheduler.grace_period,
                          f"must be <= run.optim.epochs ({cfg.run.optim.epochs})")
    if cfg.followup.baseline is not None and cfg.followup.baseline not in METHODS:
        raise ConfigError("followup.baseline", cfg.followup.baseline,
                          f"must be one of {', '.join(METHODS)}")
    if cfg.mode == "search" and cfg.arms:
        raise ConfigError("arms", f"{len(cfg.arms)} arms", "arms need mode=grid (a search "
                          "explores `space`)")


def until_resolved_looks(max_seeds: int, rounds: int) -> tuple[int, ...]:
    """The looks of an until-resolved sweep: seeds per arm after each of ``rounds`` equal
    rounds up to ``max_seeds`` (rounded up), e.g. 20 seeds in 4 rounds: 5, 10, 15, 20."""
    return tuple(-(-max_seeds * k // rounds) for k in range(1, rounds + 1))


def _check_until_resolved(cfg: SweepConfig) -> None:
    """``analysis.until_resolved`` (tune.rounds): a grid whose arms share their seeds (paired),
    a margin, and looks that fit the seed budget. The primary contrasts among the arms are
    checked by the sweep's plan (tune.rounds.plan_of), before Ray starts."""
    a = cfg.analysis
    if cfg.mode != "grid":
        raise ConfigError("mode", cfg.mode, "analysis.until_resolved needs mode=grid: arms "
                          "compared seed by seed (a search explores `space`)")
    if a.margin is None:
        raise ConfigError("analysis.margin", None, "analysis.until_resolved needs a margin "
                          "(points of the primary outcome): a contrast may then also stop as "
                          "equivalent within ±margin")
    for i, arm in enumerate(cfg.arms):
        if "seeds" in arm:
            raise ConfigError(f"arms[{i}].seeds", arm["seeds"], "analysis.until_resolved gives "
                              "every arm the same seeds, in rounds (paired by seed): drop the "
                              "arm's own seeds")
    if a.rounds >= a.max_seeds:
        raise ConfigError("analysis.rounds", a.rounds, f"must be < analysis.max_seeds "
                          f"({a.max_seeds}): the first look needs 2 seeds per arm and every "
                          "later one more")
    if len(cfg.seeds) > a.max_seeds:
        raise ConfigError("seeds", cfg.seeds, f"lists more seeds than analysis.max_seeds "
                          f"({a.max_seeds}), the budget per arm of analysis.until_resolved")


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
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                               for v in seeds)):
                raise ConfigError(f"{path}.seeds", seeds, "must list distinct integer seeds "
                                                          ">= 0")
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
            field = exc.field[4:] if exc.field.startswith("run.") else exc.field
            raise ConfigError(f"{path}.{field}", exc.value, exc.allowed) from None
        key = repr(sorted(params.items()))
        if key in seen:
            raise ConfigError(path, params, f"repeats arms[{seen[key]}] (give it more seeds "
                              "instead)")
        seen[key] = i


def _spec_extremes(spec: ParamSpec) -> list[Any]:
    if spec.values is not None:
        return list(spec.values)
    return [spec.low, spec.high] if spec.type == "float" else [int(spec.low), int(spec.high)]
