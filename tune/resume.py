"""Resuming a sweep from hardmix's own, non-executable state. No pickle is ever loaded.

A sweep folder holds everything needed to continue it: ``sweep.yaml`` (the resolved config,
read with ``yaml.safe_load``), ``followup.json`` (the follow-up configurations), the Parquet
store (which trials finished, with which parameters and results), ``sweep_state.json`` (how
often the sweep was started and for how long) and every trial's checkpoint (a
``torch.load(weights_only=True)`` file in its run folder, or in its Ray checkpoint folders on
a URI storage: :func:`tune.checkpoints.stored_checkpoint`). Ray Tune's own experiment state (``tuner.pkl``, the searcher's pickles) is
never read: anyone who can write the sweep folder could otherwise run code on the driver.

On ``--resume`` a grid runs the cells the store has no final row for; a search first finishes
the seeds of configurations it had started, then tells a fresh Optuna study the results of
the finished configurations and asks for the rest. Trials that were running continue from
their newest checkpoint; trials that finished (completed or pruned) never run again; failed
ones are retried.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from ablations import storage
from ablations.store import MAIN_PREFIX, parse_trial_id
from hardmix.config import (ParamSpec, SweepConfig, deep_merge, flatten, from_dict,
                            parse_overrides, validate)
from hardmix.errors import ConfigError
from tune.plan import SWEEP_FILE

STATE_FILE = "sweep_state.json"
#: Statuses of a trial that is not run again on resume.
FINAL = ("completed", "pruned")


# --------------------------------------------------------------------------------------------
# The saved config
# --------------------------------------------------------------------------------------------


def resumed_config(folder: str, given: str, overrides: list[str]) -> SweepConfig:
    """The config of the sweep in ``folder`` (``given``: what ``--resume`` said, for errors):
    its saved ``sweep.yaml``, with ``overrides`` on top (e.g. a new ``address``), checked to
    continue the same sweep (:func:`check_resume_changes`)."""
    saved = storage.join(folder, SWEEP_FILE)
    if not storage.exists(saved):
        raise ConfigError("--resume", given or folder,
                          f"is not a sweep folder (no {SWEEP_FILE} in {folder})")
    import yaml

    try:
        raw = yaml.safe_load(storage.read_text(saved)) or {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("--resume", saved, f"is not a readable {SWEEP_FILE} "
                                             f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict):
        raise ConfigError("--resume", saved, f"is not a sweep config ({SWEEP_FILE} must hold a "
                                             "mapping)")
    storage_root, name = storage.split(folder)
    raw.update(storage=storage_root, name=name)  # the folder being resumed wins
    try:
        saved_cfg = from_dict(SweepConfig, raw)
        validate(saved_cfg)
    except ConfigError as exc:
        raise ConfigError("--resume", saved, f"holds an invalid sweep config ({exc})") from None
    cfg = from_dict(SweepConfig, deep_merge(raw, parse_overrides(overrides, SweepConfig)))
    validate(cfg)
    check_resume_changes(saved_cfg, cfg)
    return cfg


#: Sweep fields a resume may change: how and where it runs, not which trials it has.
RESUMABLE = ("address", "local_cpus", "max_concurrent_trials", "max_failures", "report",
             "storage", "name", "description")


def check_resume_changes(saved: SweepConfig, new: SweepConfig) -> None:
    """A resume continues the saved sweep. It may change how it runs (address, concurrency,
    retries, report) and, in a grid, add seeds (their trials run as part of the sweep);
    anything else would silently mix two sweeps: one line, nothing started."""
    before, after = flatten(saved), flatten(new)
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key.split(".")[0] in RESUMABLE:
            continue
        if key == "seeds" and new.mode == "grid" and not new.arms \
                and set(before["seeds"]) <= set(after["seeds"]):
            continue  # added seeds: new cells of the grid
        raise ConfigError(key, after.get(key),
                          f"cannot change on --resume (the sweep was started with "
                          f"{before.get(key)!r}); start a new sweep with --set name=... "
                          + ("or add seeds to a grid without arms" if key == "seeds" else ""))


@dataclass
class SweepState:
    """Bookkeeping of a sweep across runs of the driver: ``runs`` (how many times it was
    started) and ``wall_seconds`` (driver time of all its runs, kept current by
    :meth:`clock`, so that a driver killed outright still counts)."""

    runs: int = 0
    wall_seconds: float = 0.0

    @classmethod
    def load(cls, sweep_dir: str) -> "SweepState":
        path = storage.join(sweep_dir, STATE_FILE)
        if not storage.exists(path):
            return cls()
        try:
            raw = json.loads(storage.read_text(path))
            state = cls(runs=int(raw.get("runs", 0)), wall_seconds=float(raw.get("wall_seconds", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError("--resume", path, f"holds an unreadable {STATE_FILE} ({exc})") \
                from None
        if state.runs < 0 or not math.isfinite(state.wall_seconds) or state.wall_seconds < 0:
            raise ConfigError("--resume", path, f"holds an invalid {STATE_FILE}")
        return state

    def save(self, sweep_dir: str) -> None:
        storage.write_text(storage.join(sweep_dir, STATE_FILE), json.dumps(asdict(self)))

    @contextmanager
    def clock(self, sweep_dir: str, every: float = 60.0) -> Iterator[None]:
        """Counts the time inside the block into ``wall_seconds``, saved every ``every``
        seconds and at the end: a driver lost to SIGKILL or a dead machine loses at most
        ``every`` seconds of the sweep's time instead of its whole run."""
        base, t0 = self.wall_seconds, time.time()
        stop = threading.Event()

        def tick() -> None:
            warned = False
            while not stop.wait(every):
                self.wall_seconds = base + time.time() - t0
                try:
                    self.save(sweep_dir)
                except OSError as exc:  # the final save raises; say it once meanwhile
                    if not warned:
                        print(f"hardmix sweep: cannot update {STATE_FILE}: {exc}",
                              file=sys.stderr)
                        warned = True

        thread = threading.Thread(target=tick, name="hardmix-sweep-clock", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.wall_seconds = base + time.time() - t0
            self.save(sweep_dir)


def trial_rows(sweep_dir: str) -> dict[str, dict]:
    """The latest trial row of every trial in the store (empty when nothing was written)."""
    from ablations.store import read_results

    try:
        res = read_results(sweep_dir, on_corrupt="skip")
    except ConfigError:  # no trials/ yet
        return {}
    return {r["trial_id"]: r for r in res.trials.to_pylist()}


def finished(rows: Mapping[str, Mapping]) -> set[str]:
    return {t for t, r in rows.items() if r.get("status") in FINAL}


def stored_params(row: Mapping[str, Any], space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The parameters a search trial was given, read back from its row: the space's fields
    that have a value (a NULL field did not exist for that trial)."""
    out = {}
    for name in space:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[name] = value
    return out


def stored_configurations(rows: Mapping[str, Mapping], space: Mapping[str, ParamSpec],
                          prefix: str = MAIN_PREFIX) -> dict[int, dict]:
    """Search configurations found in the store: index -> ``{"params", "rows": {seed: row}}``."""
    out: dict[int, dict] = {}
    for trial_id, row in rows.items():
        parsed = parse_trial_id(trial_id)
        if parsed is None or parsed[0] != prefix:
            continue
        _, index, seed = parsed
        entry = out.setdefault(index, {"params": stored_params(row, space), "rows": {}})
        entry["rows"][seed] = row
    return dict(sorted(out.items()))


def warm_study(cfg: SweepConfig, configs: Mapping[int, dict], metric_of) -> tuple[Any, str]:
    """An Optuna storage holding one COMPLETE trial per finished configuration (value: the
    mean over its seeds of ``metric_of(row)``), for a fresh ``OptunaSearch`` to load.
    Returns ``(storage, study_name)``."""
    import optuna

    from tune.space import ConditionalSpace

    storage = optuna.storages.InMemoryStorage()
    name = f"hardmix-{cfg.name}"
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    space = ConditionalSpace(cfg.space, cfg.run)
    for entry in configs.values():
        values = [metric_of(r) for r in entry["rows"].values()]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if len(entry["rows"]) < len(cfg.seeds) or not values:
            continue
        params = space.encode(entry["params"])
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=space.distributions(params),
            value=float(sum(values) / len(values))))
    return storage, name
