"""The sweep's search space: an Optuna define-by-run function and the grid, from ``cfg.space``.

A parameter *exists only where it means something*. For ``augment.*`` fields the method table
says where that is (:func:`hardmix.methods.active_fields`): ``augment.k`` only for a top-k
criterion or the ``topk_loss`` fallback, ``augment.fallback`` and ``augment.min_hard`` only for a
thresholded criterion, ``augment.bn_mode`` only for the forward signal, everything hard-sample
only for hard-source methods. Other fields follow their registries (:mod:`hardmix.config.acts`):
``model.width`` only for smallnet, ``model.stem`` only for a ResNet, ``optim.milestones`` only
for the multistep schedule. The switches (method, criterion, fallback, signal, model, data set,
schedule) are decided first, and a parameter that would exist in no trial is refused. A
:class:`~hardmix.config.ParamSpec` may add ``when`` conditions of its own (``{other parameter:
[allowed values]}``, all of which must hold). Where a parameter does not
exist, Optuna is never asked for it, the grid does not branch on it, and the trial's run config
keeps the field's fixed value. This is what keeps the importance analysis honest: a parameter
that cannot act is never recorded as if it had.

Seeds are not part of the space: every configuration runs once per seed (``cfg.seeds``), in both
modes, so seed-to-seed noise can be measured instead of being searched over. A grid may instead
list its configurations as ``arms``, each with its own seeds (5 seeds for the main comparison,
3 for each ablation, say).

Nothing here imports Ray; the functions are pure and unit-tested on their own.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping

from hardmix.config import (ConfigError, ParamSpec, RunConfig, SweepConfig, flatten,
                            validate, with_overrides)
from hardmix.config.acts import CONDITIONAL, SWITCH_COLUMNS, field_acts
from hardmix.methods import FALLBACKS

#: The space a search explores when the config names none: the axes this platform exists for.
#: α; the hard-sample criterion (the paper's ``misclassified``, the ``history`` of it, or the
#: ``topk_loss`` set with its k); the fallback when too few samples are hard, which exists only
#: for the thresholded criteria (the method table decides; no ``when`` needed).
DEFAULT_SPACE: dict[str, dict] = {
    "augment.alpha": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
    "augment.criterion": {"type": "choice", "values": ["misclassified", "history", "topk_loss"]},
    "augment.k": {"type": "float", "low": 0.05, "high": 0.5},
    "augment.fallback": {"type": "choice", "values": list(FALLBACKS)},  # every policy
}

_SCALARS = (str, int, float, bool, type(None))


def default_space() -> dict[str, ParamSpec]:
    """:data:`DEFAULT_SPACE` as ParamSpecs (fresh objects each call)."""
    return {name: ParamSpec(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()})
            for name, spec in DEFAULT_SPACE.items()}


def with_default_space(cfg: SweepConfig) -> SweepConfig:
    """A search that names no space explores :data:`DEFAULT_SPACE` (re-validated). A grid with
    no space is the base run once per seed."""
    if cfg.space or cfg.mode != "search":
        return cfg
    cfg.space = default_space()
    validate(cfg)
    return cfg


def param_order(space: Mapping[str, ParamSpec]) -> list[str]:
    """Parameters ordered so that every condition is decided before the parameter it guards.

    Raises ConfigError on a cycle of ``when`` conditions (a parameter that exists only if it
    exists).
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(path[path.index(name):] + (name,))
            raise ConfigError(f"space.{name}.when", cycle, "conditions must not form a cycle")
        state[name] = 1
        for other in space[name].when:
            if other in space:
                visit(other, path + (name,))
        state[name] = 2
        order.append(name)

    # The switches first (what acts depends on them), then declaration order.
    for name in [n for n in SWITCH_COLUMNS if n in space] + list(space):
        visit(name, ())
    return order


def check_space(cfg: SweepConfig) -> None:
    """Checks the space beyond field validation: acyclic conditions, conditions that can hold.

    A condition on another *parameter* must name values that parameter can take; a condition on
    a *fixed* run field must allow that field's value, or the parameter could never exist.
    Grid mode additionally checks that every combination gives a valid run config.
    """
    order = param_order(cfg.space)
    fixed = flatten(cfg.run)
    for name in order:
        spec = cfg.space[name]
        for other, allowed in spec.when.items():
            where = f"space.{name}.when.{other}"
            if other in cfg.space:
                ospec = cfg.space[other]
                if ospec.values is not None:
                    possible = [v for v in allowed if v in ospec.values]
                    if not possible:
                        raise ConfigError(where, allowed,
                                          f"none of these is a value of {other} "
                                          f"({', '.join(map(str, ospec.values))})")
            elif fixed.get(other) not in allowed:
                raise ConfigError(where, allowed,
                                  f"{other} is fixed at {fixed.get(other)!r} (not searched), so "
                                  f"{name} would never exist; add {other} to the space or "
                                  "drop the condition")
    if not cfg.arms:
        _check_every_param_acts(cfg, order, fixed)
    if cfg.mode == "grid":
        for params, seed in grid_trials(cfg):
            trial_config(cfg.run, params, seed)


#: More switch combinations than this and the "acts somewhere" check is left to the report.
_MAX_COMBINATIONS = 10_000


def _check_every_param_acts(cfg: SweepConfig, order: list[str], fixed: Mapping[str, Any]) -> None:
    """A parameter that exists in no trial (``augment.k`` with ``misclassified`` and the
    ``random`` fallback fixed, ``model.width`` of a ResNet) would make the sweep search or split
    on a value that never acts: refused. Walks the choices as :func:`grid_points` does; a range
    parameter takes one value (ranges decide no switch)."""
    seen: set[str] = set()
    one_value = lambda spec: spec.values if spec.values is not None else [spec.low]  # noqa: E731
    for count, point in enumerate(_combinations(cfg.space, order, fixed, one_value)):
        if count >= _MAX_COMBINATIONS:
            return
        seen.update(point)
    missing = [name for name in order if name not in seen]
    if not missing:
        return
    name, spec = missing[0], cfg.space[missing[0]]
    group = name.split(".")[0]
    # The fixed switches of its group that act themselves (a CutMix run's signal does not).
    held = ", ".join(f"{c}={fixed.get(c)}" for c in SWITCH_COLUMNS
                     if c.split(".")[0] == group and c in fixed and c not in cfg.space
                     and field_acts(c, fixed))
    searched = any(c in cfg.space and c != name for c in SWITCH_COLUMNS)
    default = (" (a parameter of the default search space)"
               if set(cfg.space) == set(DEFAULT_SPACE) else "")
    raise ConfigError(f"space.{name}",
                      spec.values if spec.values is not None else [spec.low, spec.high],
                      f"acts in no trial of this sweep{default}: nothing reads it"
                      + (f" with {held} fixed" if held else "")
                      + (", whatever the other searched switches take" if searched else "")
                      + " (hardmix train --help says which fields each method, model and "
                        "schedule reads); drop it or search the switch it needs")


def _active(name: str, spec: ParamSpec, values: Mapping[str, Any], fixed: Mapping[str, Any],
            space: Mapping[str, ParamSpec]) -> bool:
    """Whether the parameter exists for the values decided so far: it acts
    (:func:`hardmix.config.acts.field_acts`, with the switches decided first) and every
    ``when`` holds."""
    for other, allowed in spec.when.items():
        if other in space:
            if other not in values or values[other] not in allowed:
                return False
        elif fixed.get(other) not in allowed:
            return False
    return field_acts(name, {**fixed, **values})


def _encode(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: lists/mappings travel as JSON text."""
    return value if isinstance(value, _SCALARS) else "json:" + json.dumps(value, sort_keys=True)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


class ConditionalSpace:
    """Optuna define-by-run space: ``space(trial)`` asks Optuna only for active parameters.

    A plain picklable object (Tune saves the searcher, and with it this space, for ``--resume``).
    Call :meth:`params` on the suggested values to get the run-config overrides.
    """

    def __init__(self, space: Mapping[str, ParamSpec], run: RunConfig):
        self.space = dict(space)
        self.order = param_order(self.space)
        self.fixed = flatten(run)

    def __call__(self, trial: Any) -> None:
        values: dict[str, Any] = {}
        for name in self.order:
            spec = self.space[name]
            if not _active(name, spec, values, self.fixed, self.space):
                continue
            values[name] = _decode(self._suggest(trial, name, spec))

    @staticmethod
    def _suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
        if spec.values is not None:
            return trial.suggest_categorical(name, [_encode(v) for v in spec.values])
        if spec.type == "int":
            return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        return trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)

    @staticmethod
    def params(suggested: Mapping[str, Any]) -> dict[str, Any]:
        """Run-config overrides from what Optuna suggested (JSON-encoded choices decoded)."""
        return {k: _decode(v) for k, v in suggested.items()}

    def encode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run-config overrides as Optuna stores them (the inverse of :meth:`params`)."""
        return {k: (_encode(v) if self.space[k].values is not None else v)
                for k, v in params.items() if k in self.space}

    def distributions(self, encoded: Mapping[str, Any]) -> dict[str, Any]:
        """The Optuna distribution of each parameter in ``encoded`` (to add finished trials to
        a study by hand, e.g. when a sweep resumes)."""
        import optuna.distributions as od

        out = {}
        for name in encoded:
            spec = self.space[name]
            if spec.values is not None:
                out[name] = od.CategoricalDistribution([_encode(v) for v in spec.values])
            elif spec.type == "int":
                out[name] = od.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
            else:
                out[name] = od.FloatDistribution(float(spec.low), float(spec.high), log=spec.log)
        return out


def grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every valid combination of the space (without seeds), conditional parameters included
    only where their conditions hold, in a stable order (declaration order, values in order).
    With ``arms``, the arms themselves (their ``seeds`` left out), in the config's order."""
    if cfg.arms:
        return [{k: v for k, v in arm.items() if k != "seeds"} for arm in cfg.arms]
    order = param_order(cfg.space)
    fixed = flatten(cfg.run)
    points = list(_combinations(cfg.space, order, fixed, _grid_values))
    # Report in declaration order of the config (readable dry-run tables).
    names = list(cfg.space)
    return [{n: p[n] for n in names if n in p} for p in points]


def _combinations(space: Mapping[str, ParamSpec], order: list[str], fixed: Mapping[str, Any],
                  values_of: Any) -> Iterator[dict[str, Any]]:
    """Every combination of ``values_of(spec)`` over the parameters in ``order``, each
    parameter present only where it exists (:func:`_active`), depth first."""
    values: dict[str, Any] = {}

    def branch(i: int) -> Iterator[dict[str, Any]]:
        if i == len(order):
            yield dict(values)
            return
        name = order[i]
        spec = space[name]
        if not _active(name, spec, values, fixed, space):
            yield from branch(i + 1)
            return
        for v in values_of(spec):
            values[name] = v
            yield from branch(i + 1)
        del values[name]

    return branch(0)


def point_seeds(cfg: SweepConfig) -> list[list[int]]:
    """The seeds of every grid point: an arm's own ``seeds``, else the sweep's."""
    if cfg.arms:
        return [list(arm.get("seeds") or cfg.seeds) for arm in cfg.arms]
    return [list(cfg.seeds) for _ in grid_points(cfg)]


def seed_major(points: list[dict[str, Any]], seeds: list[list[int]]
               ) -> list[tuple[dict[str, Any], int]]:
    """``(point, seed)`` of every trial, seed-major: every configuration's first seed, then
    every configuration's second, ... so that a sweep stopped half-way has balanced
    comparisons (n seeds of everything) rather than some configurations finished and others
    not started."""
    out = []
    for rank in range(max((len(s) for s in seeds), default=0)):
        out += [(p, s[rank]) for p, s in zip(points, seeds) if rank < len(s)]
    return out


def grid_trials(cfg: SweepConfig) -> list[tuple[dict[str, Any], int]]:
    """Every trial of a grid sweep as ``(point, seed)``, in the order they are run."""
    return seed_major(grid_points(cfg), point_seeds(cfg))


def num_trials(cfg: SweepConfig) -> int:
    """Trials of the sweep's main phase (configurations x their seeds)."""
    return len(grid_trials(cfg)) if cfg.mode == "grid" else cfg.num_samples * len(cfg.seeds)


def _grid_values(spec: ParamSpec) -> list[Any]:
    if spec.values is None:  # validation rejects this in grid mode; kept for direct callers
        raise ConfigError("space", spec, "grid mode needs explicit values")
    return list(spec.values)


def trial_config(run: RunConfig, params: Mapping[str, Any], seed: int) -> RunConfig:
    """The run config of one trial: the sweep's run with the trial's parameters and seed."""
    return with_overrides(run, {**params, "seed": int(seed)})


def describe_param(name: str, spec: ParamSpec) -> str:
    """One readable line for ``--dry-run``."""
    if spec.values is not None:
        dom = "{" + ", ".join(map(str, spec.values)) + "}"
    else:
        dom = f"[{spec.low:g}, {spec.high:g}]" + (" log" if spec.log else "")
        dom = f"{spec.type} {dom}"
    cond = ""
    if spec.when:
        cond = "  only when " + " and ".join(
            f"{k} in {{{', '.join(map(str, v))}}}" for k, v in spec.when.items())
    if name.startswith("augment.") and name != "augment.method":
        cond += "  (only where it acts: the method table)"
    elif name in CONDITIONAL:
        cond += "  (only where it acts)"
    return f"{name} {dom}{cond}"
