"""Resuming a sweep from hardmix's own, non-executable state. No pickle is ever loaded.

A sweep folder holds everything needed to continue it: ``sweep.yaml`` (the resolved config,
read with ``yaml.safe_load``), ``followup.json`` (the follow-up configurations), the Parquet
store (which trials finished, with which parameters and results), ``sweep_state.json`` (how
often the sweep was started and for how long) and every trial's checkpoint (a
``torch.load(weights_only=True)`` file in its run folder, or in its Ray checkpoint folders on
a URI storage). Ray Tune's own experiment state (``tuner.pkl``, the searcher's pickles) is
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
import os
import posixpath
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Optional

from ablations.store import MAIN_PREFIX, parse_trial_id
from hardmix.config import ParamSpec, SweepConfig
from hardmix.errors import ConfigError

STATE_FILE = "sweep_state.json"
#: Statuses of a trial that is not run again on resume.
FINAL = ("completed", "pruned")


@dataclass
class SweepState:
    """Bookkeeping of a sweep across runs of the driver: ``runs`` (how many times it was
    started) and ``wall_seconds`` (driver time of all its runs, kept current by
    :meth:`clock`, so that a driver killed outright still counts)."""

    runs: int = 0
    wall_seconds: float = 0.0

    @classmethod
    def load(cls, sweep_dir: str) -> "SweepState":
        from tune.sweep import _exists, _read_text, join

        path = join(sweep_dir, STATE_FILE)
        if not _exists(path):
            return cls()
        try:
            raw = json.loads(_read_text(path))
            state = cls(runs=int(raw.get("runs", 0)), wall_seconds=float(raw.get("wall_seconds", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError("--resume", path, f"holds an unreadable {STATE_FILE} ({exc})") \
                from None
        if state.runs < 0 or not math.isfinite(state.wall_seconds) or state.wall_seconds < 0:
            raise ConfigError("--resume", path, f"holds an invalid {STATE_FILE}")
        return state

    def save(self, sweep_dir: str) -> None:
        from tune.sweep import _write_text, join

        _write_text(join(sweep_dir, STATE_FILE), json.dumps(asdict(self)))

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


# --------------------------------------------------------------------------------------------
# Checkpoints found in storage
# --------------------------------------------------------------------------------------------


def safe_relpath(relpath: Any, what: str = "checkpoint relpath") -> str:
    """A path read from storage, checked before it is joined: relative, normalised, inside
    its folder (no ``..``, no absolute path, no drive, no NUL)."""
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath or "\\" in relpath:
        raise ValueError(f"{what} {relpath!r} is not a plain relative path")
    norm = posixpath.normpath(relpath)
    if norm.startswith(("/", "..")) or posixpath.isabs(relpath) or ":" in norm.split("/")[0] \
            or any(part == ".." for part in norm.split("/")):
        raise ValueError(f"{what} {relpath!r} leaves its folder")
    return norm


def stored_checkpoint(sweep_dir: str, trial_id: str) -> Optional[str]:
    """The newest Ray checkpoint of ``trial_id`` anywhere in the sweep's Tune folders
    (``tune*/<trial>/checkpoint_*``), copied into a local temporary folder; None if there is
    none. For sweeps whose run folders live in URI storage (with local run folders the run's
    own ``checkpoints/last.pt`` is newer)."""
    import pyarrow.fs as pafs

    from tune.sweep import _fs

    fs, root = _fs(sweep_dir)
    best: tuple[int, str] | None = None
    for phase in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if phase.type != pafs.FileType.Directory or not phase.base_name.startswith("tune"):
            continue
        trial_dir = f"{phase.path}/{trial_id}"
        for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                with fs.open_input_stream(f"{info.path}/hardmix_checkpoint.json") as f:
                    meta = json.loads(f.read().decode())
                epoch = int(meta.get("epoch", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if best is None or epoch > best[0]:
                best = (epoch, info.path)
    if best is None:
        return None
    local = tempfile.mkdtemp(prefix="hardmix-resume-")
    for info in fs.get_file_info(pafs.FileSelector(best[1])):
        if info.type == pafs.FileType.File and "/" not in info.base_name:
            with fs.open_input_stream(info.path) as src, \
                    open(os.path.join(local, info.base_name), "wb") as dst:
                dst.write(src.read())
    return local
