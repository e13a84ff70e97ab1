"""The multi-writer atomic writer: :class:`ResultStore` writes the trial and epoch rows of one
sweep, each write a new, complete file with a unique name (trial id + uuid4), published
atomically (:mod:`ablations.storage`), so many writers on many nodes never clash and never need
to coordinate; :class:`StoreCallback` records one training run through it.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from ablations import compaction, storage
from ablations.reader import latest_trials
from ablations.schema import (SCHEMA_VERSION, STATUSES, as_run, check_trial_id, concat,
                              file_schema, file_stem, plain, row_table)
from ablations.storage import STALE_TMP_SECONDS
from hardmix.config import RunConfig, flatten
from hardmix.errors import ConfigError
from hardmix.metrics import SUMMARY_FIELDS, Callback

_clock_lock = threading.Lock()


_last_stamp = datetime.min.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    """UTC now, strictly increasing within this process (later writes of a trial must win)."""
    global _last_stamp
    with _clock_lock:
        stamp = datetime.now(timezone.utc)
        if stamp <= _last_stamp:
            stamp = _last_stamp + timedelta(microseconds=1)
        _last_stamp = stamp
        return stamp


class ResultStore:
    """Writes trial and epoch rows of one sweep as Parquet files; see the module docstring.

    ``sweep_dir`` is a local folder or a URI (``s3://bucket/sweeps/name``, ``gs://...``,
    ``file:///...``); the sweep id is its last path component. ``filesystem`` overrides the
    filesystem the URI would pick (tests, custom credentials).
    """

    def __init__(self, sweep_dir: str, filesystem: pafs.FileSystem | None = None):
        self.uri = str(sweep_dir)
        self.fs, self.root = storage.resolve(self.uri, filesystem)
        self.sweep = self.root.rstrip("/").rsplit("/", 1)[-1]
        if not self.sweep or self.sweep.startswith((".", "_")):
            raise ConfigError("sweep folder", self.uri,
                              "must end in a plain name (not starting with '.' or '_')")
        self.atomic_rename = storage.renames_atomically(self.fs)
        self._cleaned: set[str] = set()

    def __repr__(self) -> str:
        return f"ResultStore({self.uri!r})"

    def folder(self, table: str) -> str:
        """The partition folder a table's files go to."""
        return f"{self.root}/{table}/sweep={self.sweep}"

    def write_trial(self, row: Mapping[str, Any]) -> str:
        """Write one trial row (one new file). A later write of the same trial_id supersedes it.

        ``row`` holds any of the ``trials`` columns (absent ones are null), the config columns
        by dotted name and any extra sweep-level columns. ``sweep``, ``schema_version`` and
        ``written_at`` are filled in. Returns the file's path.
        """
        row = as_run(dict(row))
        row.pop("sweep", None)
        trial_id = check_trial_id(row.get("trial_id"))
        status = row.get("status")
        if status not in STATUSES:
            raise ConfigError("status", status, f"must be one of {', '.join(STATUSES)}")
        row.update(schema_version=SCHEMA_VERSION, written_at=_now())
        return self._write("trials", trial_id, row_table(row, file_schema("trials")))

    def write_epochs(self, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """Write epoch rows of one trial (one new file); a later row per (trial_id, epoch) wins."""
        trial_id = check_trial_id(trial_id)
        if not rows:
            return None
        stamp = _now()
        tables = []
        for r in rows:
            r = dict(r)
            if not isinstance(plain(r.get("epoch")), int) or isinstance(r.get("epoch"), bool):
                raise ConfigError("epoch", r.get("epoch"), "every epoch row needs an integer epoch")
            r.pop("sweep", None)
            r.update(trial_id=trial_id, schema_version=SCHEMA_VERSION, written_at=stamp)
            tables.append(row_table(r, file_schema("epochs")))
        table = concat(tables)
        return self._write("epochs", trial_id, table)

    def _write(self, table_name: str, trial_id: str, table: pa.Table) -> str:
        """Publish ``table`` as a new file of the table's partition folder, atomically (a
        hidden temporary file fsynced and renamed into place on disks, one object put on
        object stores: :func:`ablations.storage.publish`). Returns the file's path."""
        folder = self.folder(table_name)
        name = f"{file_stem(trial_id)}-{uuid.uuid4().hex}.parquet"
        final = storage.write_parquet(self.fs, folder, name, table)
        if self.atomic_rename and folder not in self._cleaned:
            # Temporary files killed writers left (older than STALE_TMP_SECONDS: a live
            # writer's file is seconds old); once per folder per store object.
            self._cleaned.add(folder)
            storage.remove_stale_temporaries(self.fs, folder, STALE_TMP_SECONDS)
        return final

    def compact(self, max_rows: int | None = None) -> compaction.Compaction:
        """Merge this sweep's small files into a few large ones; see
        :func:`ablations.compaction.compact_table`. Safe while writers (and readers, and other
        compactions) run; never loses a row."""
        return compaction.compact(self, max_rows)

    def latest_trials(self) -> pa.Table:
        """The latest row of every trial of this sweep (unreadable files left out)."""
        return latest_trials(self.fs, self.root)


# --------------------------------------------------------------------------------------------
# The training-loop callback
# --------------------------------------------------------------------------------------------


class StoreCallback(Callback):
    """A :class:`hardmix.train.Callback` that records one run in a :class:`ResultStore`.

    ``on_run_start`` writes the trial row with status ``running``; ``on_epoch_end`` writes each
    epoch row as soon as the epoch ends (a dead driver loses nothing already reported);
    ``on_run_end`` writes the final trial row with the summary. ``extra`` holds sweep-level
    columns added to every trial row (``attempt``, ``versions``, ``git_commit``, a Tune trial
    name, ...); its ``versions`` mapping is merged into the run's. Only rank 0 writes.
    """

    def __init__(self, store: ResultStore, trial_id: str, cfg: RunConfig | None = None,
                 extra: Mapping[str, Any] | None = None):
        self.store = store
        self.trial_id = check_trial_id(trial_id)
        self.cfg = cfg
        self.extra = dict(extra or {})
        self.info: dict = {}
        self.epochs_run = 0
        self.active = True

    def _base_row(self) -> dict:
        row: dict[str, Any] = {}
        if self.cfg is not None:
            row.update(flatten(self.cfg))
        versions = dict(self.info.get("versions") or {})
        extra = dict(self.extra)
        if isinstance(extra.get("versions"), Mapping):
            versions.update(extra.pop("versions"))
        row.update(device=self.info.get("device") or row.get("device"),
                   git_commit=self.info.get("git_commit"), versions=versions or None, attempt=1,
                   data_sha256=self.info.get("data_sha256"),
                   threads=self.info.get("threads"), precision=self.info.get("precision"),
                   classes=self.info.get("classes"), hostname=self.info.get("hostname"))
        row.update(extra)
        row["trial_id"] = self.trial_id
        return row

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        self.cfg = cfg if cfg is not None else self.cfg
        self.info = dict(info or {})
        self.active = int(self.info.get("rank", 0) or 0) == 0
        if self.active:
            self.store.write_trial({**self._base_row(), "status": "running", "error": ""})
            resumed = self.info.get("resumed_metrics")
            if resumed:  # idempotent: the reader keeps one row per (trial, epoch)
                self.on_epoch_end(resumed)

    def on_epoch_end(self, metrics: dict, checkpoint: str | None = None) -> None:
        if not self.active:
            return
        self.epochs_run = max(self.epochs_run, int(plain(metrics.get("epoch", 0)) or 0))
        self.store.write_epochs(self.trial_id, [metrics])

    def on_run_end(self, summary: dict) -> None:
        if not self.active:
            return
        row = self._base_row()
        row.update({k: v for k, v in summary.items() if k in SUMMARY_FIELDS and v is not None})
        row.setdefault("epochs_run", self.epochs_run)
        row["error"] = row.get("error") or ""
        self.store.write_trial(row)

    def record_failure(self, error: str) -> None:
        """Write a ``failed`` trial row when the run died without reaching ``on_run_end``."""
        if self.active:
            self.store.write_trial({**self._base_row(), "status": "failed", "error": str(error),
                                    "epochs_run": self.epochs_run})
