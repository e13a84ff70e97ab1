"""The results store: every trial and every epoch of every run and sweep, as plain Parquet.

This module is the single owner of the results schema. Runs (``hardmix train``) and sweeps
(``tune``) write through :class:`ResultStore` (usually via :class:`StoreCallback`); the analysis
reads through :func:`read_results`; DuckDB, polars and pandas can read the same files directly.

Layout of one sweep (``<sweep_dir>`` is a local folder or a pyarrow URI such as ``s3://b/x``)::

    <sweep_dir>/trials/sweep=<sweep id>/<trial_id>-<uuid>.parquet   one trial row per file
    <sweep_dir>/epochs/sweep=<sweep id>/<trial_id>-<uuid>.parquet   epoch rows of one write

The ``sweep`` column lives in the hive partition folder only (readers such as pandas, polars
and DuckDB add it from the path), and every file carries every known column of its table in the
same order and types (NULL where a value is absent, does not apply to the trial's method, or
was not evaluated that epoch), so a folder reads directly with any of them.

The columns derive from one place each: the run config's fields (:mod:`hardmix.config`, as they
run: :func:`hardmix.config.acts.as_run` NULLs every field that does not act and resolves
``box: auto``),
the run summary and the per-epoch metrics (:mod:`hardmix.metrics`).

Rules that make many writers on many nodes safe without any coordination:

* every write is a new, complete file with a unique name (trial id + uuid4); nothing is ever
  rewritten or appended, so two writers can never clash;
* on a local or network disk the file is written under a hidden temporary name (``.name.tmp``,
  which every Parquet dataset reader skips) and renamed into place, so a killed writer leaves at
  most a hidden temporary file; on object stores (s3://, gs://), where rename is a copy, the file
  is serialised in memory first and sent as one object put, which is all-or-nothing;
* readers deduplicate: the trial row with the latest ``written_at`` wins per (sweep, trial_id),
  the epoch row with the latest ``written_at`` per (sweep, trial_id, epoch). A trial is therefore
  written once as ``running`` when it starts and again with its final status when it ends.

Compaction (:meth:`ResultStore.compact`, ``hardmix compact``) merges the small files into
``compacted-*.parquet`` files of up to :data:`COMPACT_MAX_ROWS` rows, safe while writers run: a
file is deleted only after a published file holds its rows, and a reader whose listed file
vanished lists again (:func:`read_results`); duplicates in between are absorbed by the
deduplication. Compacted rows keep their ``written_at`` and are stored in the current schema.

Reading the folders directly (``pd.read_parquet(<sweep>/trials)``, polars ``read_parquet`` /
``scan_parquet(..., hive_partitioning=True)``, DuckDB ``read_parquet('<sweep>/trials/*/*.parquet',
hive_partitioning = true)``, ``pyarrow.dataset``) works when every file has the same columns,
which holds for files of one hardmix version without extra columns. These readers take the
schema of one file: files of an older version (a ``sweep`` column inside the file, other
columns) make them fail, and extra columns written by a caller are dropped or refused;
``hardmix compact`` rewrites such a folder in the current layout (extras kept), and
``hardmix export`` writes the deduplicated rows as plain files. Direct readers do not
deduplicate: keep the latest ``written_at`` per key (in DuckDB: ``QUALIFY row_number() OVER
(PARTITION BY sweep, trial_id ORDER BY written_at DESC) = 1``).

Schema versions: every row carries the ``schema_version`` it was written with. Files written by an
older known version are migrated when read (see ``MIGRATIONS``); a file with a version this code
does not know stops the reader with an error naming the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hardmix.config import RunConfig, field_type, flatten
from hardmix.errors import ConfigError, ResultsError
from hardmix.config.acts import as_run as _acting
from hardmix.metrics import EPOCH_METRICS, SUMMARY_FIELDS, Callback, applicable

#: Version of the schema this code writes. Bump it (and add a migration) when a column changes.
SCHEMA_VERSION = 3

STATUSES = ("running", "completed", "pruned", "failed")
#: Dedup tie-break when two rows of a trial carry the same ``written_at``: a final status wins.
_STATUS_RANK = {"running": 0, "pruned": 1, "failed": 2, "completed": 3}

TABLES = ("trials", "epochs")

_TS = pa.timestamp("us", tz="UTC")

#: Arrow type of each metric kind (:data:`hardmix.metrics.KINDS`).
KIND_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(),
              "list_int": pa.list_(pa.int64()), "list_float": pa.list_(pa.float64()),
              "list_str": pa.list_(pa.string())}

#: Bookkeeping columns of a trial row around the summary: identity, attempt, provenance and
#: where it ran (Tune trial id, node).
_TRIAL_KEYS = [("sweep", pa.string()), ("trial_id", pa.string())]
_TRIAL_BOOKKEEPING = [("attempt", pa.int64()), ("tune_trial_id", pa.string()),
                      ("node_id", pa.string()), ("hostname", pa.string()),
                      ("versions", pa.string()), ("git_commit", pa.string()),
                      ("schema_version", pa.int64()), ("written_at", _TS)]


def _metric_fields(metrics: Mapping) -> list[tuple[str, pa.DataType]]:
    return [(m.name, KIND_TYPES[m.kind]) for m in metrics.values()]


def trial_fields() -> pa.Schema:
    """Columns of the ``trials`` table before the config columns: keys, the run summary
    (:data:`hardmix.metrics.SUMMARY_FIELDS`), bookkeeping."""
    return pa.schema(_TRIAL_KEYS + _metric_fields(SUMMARY_FIELDS) + _TRIAL_BOOKKEEPING)


def epoch_schema() -> pa.Schema:
    """Columns of the ``epochs`` table: keys, epoch, every registered per-epoch metric
    (:data:`hardmix.metrics.EPOCH_METRICS`, read when called: metrics registered later count)."""
    return pa.schema([("sweep", pa.string()), ("trial_id", pa.string()), ("epoch", pa.int64())]
                     + _metric_fields(EPOCH_METRICS)
                     + [("schema_version", pa.int64()), ("written_at", _TS)])

#: Columns a file must have to be usable at all (per table).
_REQUIRED = {"trials": ("trial_id", "schema_version", "written_at"),
             "epochs": ("trial_id", "epoch", "schema_version", "written_at")}

#: Trial columns whose values are mappings, stored as JSON strings.
_JSON_COLUMNS = ("versions",)

_PY_TO_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _arrow_type(tp: Any) -> pa.DataType:
    if tp in _PY_TO_ARROW:
        return _PY_TO_ARROW[tp]
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        return pa.list_(_PY_TO_ARROW.get(inner, pa.string()))
    return pa.string()  # mappings and anything else are stored as JSON text


@functools.lru_cache(maxsize=1)
def config_schema() -> pa.Schema:
    """Typed config columns, one per leaf field of :class:`RunConfig` (``flatten`` order).

    Derived from the dataclasses, so a field added to ``hardmix.config`` becomes a column
    without touching the store.
    """
    return pa.schema([(name, _arrow_type(field_type(RunConfig, name)))
                      for name in flatten(RunConfig())])


def trial_schema() -> pa.Schema:
    """Known columns of the ``trials`` table: base columns, then config columns.

    The config field ``device`` (requested: auto/cpu/cuda) shares its column with the device the
    run actually used, which wins once the run has reported it.
    """
    base = trial_fields()
    return pa.schema(list(base) + [f for f in config_schema() if f.name not in base.names])


def _known_schema(kind: str) -> pa.Schema:
    return trial_schema() if kind == "trials" else epoch_schema()


#: Columns written into the files: the partition folder carries ``sweep``.
def _file_schema(kind: str) -> pa.Schema:
    schema = _known_schema(kind)
    return schema.remove(schema.get_field_index("sweep"))


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------


def _resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI (s3://, gs://, file://, ...)."""
    path = str(path)
    if filesystem is not None:
        return filesystem, path.rstrip("/")
    if "://" in path:
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ConfigError("path", path, f"is not a usable filesystem URI ({exc})") from None
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _renames_atomically(fs: pafs.FileSystem) -> bool:
    """True on filesystems where rename is an atomic metadata operation (local/posix disks).

    Object stores (S3, GCS) implement rename as copy + delete, so they get one object put.
    """
    if isinstance(fs, pafs.SubTreeFileSystem):
        return _renames_atomically(fs.base_fs)
    return isinstance(fs, pafs.LocalFileSystem)


_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]")

#: Trial ids of a sweep: ``c007-s1`` is configuration 7 of its main phase (a grid point or a
#: searched configuration) with seed 1; ``f001-s3`` the second follow-up configuration of a
#: search with seed 3. The report tells a search's exploration from its follow-up by them.
MAIN_PREFIX, FOLLOWUP_PREFIX = "c", "f"
_TRIAL_ID = re.compile(r"^(?P<prefix>[a-z])(?P<index>\d{3,})-s(?P<seed>\d+)$")


def trial_name(prefix: str, index: int, seed: int) -> str:
    return f"{prefix}{index:03d}-s{seed}"


def parse_trial_id(trial_id: str) -> tuple[str, int, int] | None:
    """``c007-s1`` -> ``("c", 7, 1)``; None for other names (runs written by hand)."""
    m = _TRIAL_ID.match(str(trial_id))
    return (m["prefix"], int(m["index"]), int(m["seed"])) if m else None


def _file_stem(trial_id: str) -> str:
    # Readers skip names starting with "." or "_" (temporary files), so a real file never may.
    stem = _SAFE.sub("_", trial_id).lstrip("._")[:120]
    return stem or "trial"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

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


def _plain(value: Any) -> Any:
    """numpy / torch scalars and arrays -> Python values pyarrow accepts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _column(name: str, value: Any, tp: pa.DataType | None) -> pa.Array:
    value = _plain(value)
    if name in _JSON_COLUMNS and isinstance(value, Mapping):
        value = json.dumps(value, sort_keys=True)
    if tp is None:
        if isinstance(value, Mapping):
            value = json.dumps(value, sort_keys=True, default=str)
        return pa.array([value])
    if pa.types.is_string(tp) and value is not None and not isinstance(value, str):
        value = json.dumps(value, default=str) if isinstance(value, (list, Mapping)) else str(value)
    try:
        return pa.array([value], type=tp)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise ConfigError(name, value, f"must fit the results column type {tp} ({exc})") from None


def _row_table(row: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """One-row table: every known column (null where absent) in schema order, then extras."""
    names = list(schema.names) + sorted(k for k in row if k not in schema.names)
    arrays = [_column(n, row.get(n), schema.field(n).type if n in schema.names else None)
              for n in names]
    return with_pandas_types(pa.table(dict(zip(names, arrays))))


#: pandas dtypes of the Arrow types whose NumPy form would lose a NULL (int64 -> float64).
_NULLABLE = {pa.int64(): "Int64", pa.bool_(): "boolean"}


def with_pandas_types(table: pa.Table) -> pa.Table:
    """``table`` with pandas metadata naming the nullable dtypes of its integer and boolean
    columns, so that ``pd.read_parquet`` of a file or folder reads integers as ``Int64`` (NULL
    as ``<NA>``), never as floats. Other readers ignore it."""
    cols = [{"name": f.name, "field_name": f.name, "pandas_type": str(f.type),
             "numpy_type": _NULLABLE[f.type], "metadata": None}
            for f in table.schema if f.type in _NULLABLE]
    meta = {"index_columns": [], "column_indexes": [], "columns": cols,
            "creator": {"library": "hardmix"}, "pandas_version": "2.0.0"}
    return table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})


class ResultStore:
    """Writes trial and epoch rows of one sweep as Parquet files; see the module docstring.

    ``sweep_dir`` is a local folder or a URI (``s3://bucket/sweeps/name``, ``gs://...``,
    ``file:///...``); the sweep id is its last path component. ``filesystem`` overrides the
    filesystem the URI would pick (tests, custom credentials).
    """

    def __init__(self, sweep_dir: str, filesystem: pafs.FileSystem | None = None):
        self.uri = str(sweep_dir)
        self.fs, self.root = _resolve(self.uri, filesystem)
        self.sweep = self.root.rstrip("/").rsplit("/", 1)[-1]
        if not self.sweep or self.sweep.startswith((".", "_")):
            raise ConfigError("sweep folder", self.uri,
                              "must end in a plain name (not starting with '.' or '_')")
        self.atomic_rename = _renames_atomically(self.fs)
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
        trial_id = _check_trial_id(row.get("trial_id"))
        status = row.get("status")
        if status not in STATUSES:
            raise ConfigError("status", status, f"must be one of {', '.join(STATUSES)}")
        row.update(schema_version=SCHEMA_VERSION, written_at=_now())
        return self._write("trials", trial_id, _row_table(row, _file_schema("trials")))

    def write_epochs(self, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """Write epoch rows of one trial (one new file); a later row per (trial_id, epoch) wins."""
        trial_id = _check_trial_id(trial_id)
        if not rows:
            return None
        stamp = _now()
        tables = []
        for r in rows:
            r = dict(r)
            if not isinstance(_plain(r.get("epoch")), int) or isinstance(r.get("epoch"), bool):
                raise ConfigError("epoch", r.get("epoch"), "every epoch row needs an integer epoch")
            r.pop("sweep", None)
            r.update(trial_id=trial_id, schema_version=SCHEMA_VERSION, written_at=stamp)
            tables.append(_row_table(r, _file_schema("epochs")))
        table = _concat(tables)
        return self._write("epochs", trial_id, table)

    def _write(self, table_name: str, trial_id: str, table: pa.Table) -> str:
        folder = self.folder(table_name)
        final = self._publish(folder, f"{_file_stem(trial_id)}-{uuid.uuid4().hex}.parquet", table)
        if self.atomic_rename:
            self._clean_stale(folder)
        return final

    def _publish(self, folder: str, name: str, table: pa.Table) -> str:
        """Write ``table`` as ``folder/name`` so that readers see all of it or nothing: a
        hidden temporary file fsynced and renamed into place on local disks, one object put
        on object stores. Returns the file's path."""
        final = f"{folder}/{name}"
        if self.atomic_rename:
            self.fs.create_dir(folder, recursive=True)
            tmp = f"{folder}/.{name}.tmp"
            local = _local_path(self.fs, tmp)
            try:
                if local is not None:  # durable before it is published: fsync, then rename
                    with open(local, "wb") as f:
                        pq.write_table(table, f)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    pq.write_table(table, tmp, filesystem=self.fs)
                self.fs.move(tmp, final)
                if local is not None:
                    _fsync_dir(os.path.dirname(local))
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except (OSError, FileNotFoundError):
                    pass
                raise
        else:
            # Serialise fully first: closing a half-written stream would upload a partial object.
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            data = sink.getvalue()
            with self.fs.open_output_stream(final) as out:
                out.write(data)
        return final

    def compact(self, max_rows: int | None = None) -> "Compaction":
        """Merge this sweep's small files into a few large ones; see :func:`compact_table`.
        Safe while writers (and readers, and other compactions) run; never loses a row."""
        max_rows = COMPACT_MAX_ROWS if max_rows is None else max_rows
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise ConfigError("max_rows", max_rows, "must be a whole number >= 1")
        return Compaction({kind: compact_table(self, kind, max_rows) for kind in TABLES})

    def latest_trials(self) -> pa.Table:
        """The latest row of every trial of this sweep (unreadable files left out)."""
        tables, _, _ = _read_table_files(self.fs, [self.root], "trials")
        schema = _known_schema("trials")
        table = _ordered(_concat(tables), schema) if tables else schema.empty_table()
        return _dedup(table, ["sweep", "trial_id"])

    def _clean_stale(self, folder: str) -> None:
        """Remove temporary files that killed writers left behind (older than
        :data:`STALE_TMP_SECONDS`: a live writer's file is seconds old). Once per folder per
        store object."""
        if folder in self._cleaned:
            return
        self._cleaned.add(folder)
        now = time.time()
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder))
        except (OSError, FileNotFoundError):
            return
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.File or not (name.startswith(".") and
                                                       name.endswith(".tmp")):
                continue
            mtime = info.mtime.timestamp() if info.mtime is not None else now
            if now - mtime > STALE_TMP_SECONDS:
                try:
                    self.fs.delete_file(info.path)
                except (OSError, FileNotFoundError):
                    pass


#: A writer's temporary file older than this belongs to a killed writer.
STALE_TMP_SECONDS = 600.0


def _local_path(fs: pafs.FileSystem, path: str) -> str | None:
    """The OS path of ``path`` on a local filesystem (None elsewhere)."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        inner = _local_path(fs.base_fs, fs.base_path.rstrip("/") + "/" + path.lstrip("/"))
        return inner
    return path if isinstance(fs, pafs.LocalFileSystem) else None


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def as_run(row: dict) -> dict:
    """A trial row's config columns as they run: every field that does not act NULL (inert
    ``augment.*`` fields, another optimiser's or model's fields, ...), ``box: auto`` resolved
    (:func:`hardmix.config.acts.as_run`)."""
    return _acting(row)


def _check_trial_id(trial_id: Any) -> str:
    if not isinstance(trial_id, str) or not trial_id.strip():
        raise ConfigError("trial_id", trial_id, "must be a non-empty string")
    return trial_id


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
        self.trial_id = _check_trial_id(trial_id)
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

    def on_epoch_end(self, metrics: dict, checkpoint: str | None = None) -> None:
        if not self.active:
            return
        self.epochs_run = max(self.epochs_run, int(_plain(metrics.get("epoch", 0)) or 0))
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _v1_to_v2(table: pa.Table, kind: str) -> pa.Table:
    """v1 (the first draft of the schema) had no retries and no mixed-batch rate.

    trials: ``attempt`` did not exist; every v1 trial ran once, so it is attempt 1.
    epochs: ``mixed_rate`` did not exist; it is unknown (null).
    """
    if kind == "trials" and "attempt" not in table.column_names:
        table = table.append_column("attempt", pa.array([1] * table.num_rows, pa.int64()))
    if kind == "epochs" and "mixed_rate" not in table.column_names:
        table = table.append_column("mixed_rate", pa.nulls(table.num_rows, pa.float64()))
    return table


def _v2_to_v3(table: pa.Table, kind: str) -> pa.Table:
    """v2 stored the minimum *test* error over epochs (``best_top1_err``, ``best_top5_err``),
    a number selected on the test set: v3 drops it. v2 wrote every config value, acting or not;
    v3 writes inert ``augment.*`` fields as NULL and ``box: auto`` resolved (applied here)."""
    if kind != "trials":
        return table
    for name in ("best_top1_err", "best_top5_err"):
        if name in table.column_names:
            table = table.drop_columns([name])
    aug_cols = [c for c in table.column_names if c.startswith("augment.")]
    if "augment.method" not in aug_cols or table.num_rows == 0:
        return table
    rows = table.select(aug_cols).to_pylist()
    fixed = [as_run(dict(r)) for r in rows]
    for c in aug_cols:
        i = table.column_names.index(c)
        typ = table.schema.field(i).type
        table = table.set_column(i, c, pa.array([r[c] for r in fixed],
                                                type=None if pa.types.is_null(typ) else typ))
    return table


#: ``MIGRATIONS[v]`` turns a table written by version ``v`` into version ``v + 1``.
MIGRATIONS: dict[int, Callable[[pa.Table, str], pa.Table]] = {1: _v1_to_v2, 2: _v2_to_v3}
KNOWN_VERSIONS = tuple(sorted(set(MIGRATIONS) | {SCHEMA_VERSION}))


@dataclass
class Results:
    """Deduplicated results of one sweep or a folder of sweeps.

    ``trials`` / ``epochs``: pyarrow Tables (latest row per trial / per trial and epoch).
    ``skipped``: ``(file, reason)`` of files left out (only with ``on_corrupt="skip"``).
    ``files``: how many files were read. ``rows_read``: rows before deduplication, per table.
    """

    trials: pa.Table
    epochs: pa.Table
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    rows_read: dict[str, int] = field(default_factory=dict)
    sweeps: list[str] = field(default_factory=list)

    def to_pandas(self):
        """``(trials_df, epochs_df)`` as pandas DataFrames; integer and boolean columns in
        pandas' nullable dtypes (``Int64``, ``boolean``: NULL is ``<NA>``, never a float)."""
        import pandas as pd

        types = {k: pd.api.types.pandas_dtype(v) for k, v in _NULLABLE.items()}
        return (self.trials.to_pandas(types_mapper=types.get),
                self.epochs.to_pandas(types_mapper=types.get))


def sweep_roots(path: str, filesystem: pafs.FileSystem | None = None
                ) -> tuple[pafs.FileSystem, list[str]]:
    """The sweep folders at ``path``: itself when it holds trials/ or epochs/, else its children
    that do. Raises ConfigError when the path does not exist or holds no sweep."""
    fs, root = _resolve(path, filesystem)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError("path", str(path), "does not exist (expected a sweep folder or URI)")
    if info.type != pafs.FileType.Directory:
        raise ConfigError("path", str(path), "must be a sweep folder (with trials/ inside) or a "
                                             "folder of sweeps")

    def is_sweep(folder: str) -> bool:
        return any(fs.get_file_info(f"{folder}/{t}").type == pafs.FileType.Directory
                   for t in TABLES)

    if is_sweep(root):
        return fs, [root]
    children = [i.path for i in fs.get_file_info(pafs.FileSelector(root))
                if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))]
    found = sorted(c for c in children if is_sweep(c))
    if not found:
        raise ConfigError("path", str(path), "holds no results (no trials/ or epochs/ folder in it "
                                             "or in its sub-folders)")
    return fs, found


def _list_files(fs: pafs.FileSystem, sweep_root: str, kind: str) -> list[tuple[str, str | None]]:
    """``(path, sweep from the partition folder)`` of the readable data files of one table."""
    base = f"{sweep_root}/{kind}"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        rel = info.path[len(base):].strip("/").split("/")
        # Hidden or underscore names are temporary files of a writer (maybe killed): skip them.
        if any(part.startswith((".", "_")) for part in rel):
            continue
        sweep = next((unquote(p.split("=", 1)[1]) for p in rel[:-1] if p.startswith("sweep=")),
                     None)
        out.append((info.path, sweep))
    return sorted(out)


def _cast_known(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    for i, name in enumerate(table.column_names):
        if name not in schema.names:
            continue
        want = schema.field(name).type
        have = table.schema.field(i).type
        if have != want:
            try:
                table = table.set_column(i, name, table.column(i).cast(want))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise ResultsError(path, f"column {name} has type {have}, expected {want}") from None
    return table


def _read_file(fs: pafs.FileSystem, path: str, sweep: str | None, kind: str) -> pa.Table:
    """One file, checked, migrated to the current schema and cast to the known column types."""
    try:
        # ParquetFile on an open file: several times less overhead than pq.read_table, which
        # builds a whole dataset per call (sweeps hold thousands of small files).
        with fs.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultsError(path, f"is not a readable Parquet file ({exc})") from None
    missing = [c for c in _REQUIRED[kind] if c not in table.column_names]
    if missing:
        raise ResultsError(path, f"lacks the column(s) {', '.join(missing)} of a {kind} file")
    versions = set(table.column("schema_version").to_pylist())
    unknown = [v for v in versions if v not in KNOWN_VERSIONS]
    if unknown:
        raise ResultsError(path, f"has schema_version {unknown[0]}; this hardmix reads versions "
                                 f"{', '.join(map(str, KNOWN_VERSIONS))} (upgrade hardmix to read "
                                 "it)", reason="version")
    for version in range(min(versions), SCHEMA_VERSION):
        table = MIGRATIONS[version](table, kind)
    if "sweep" not in table.column_names:
        table = table.append_column("sweep", pa.array([sweep] * table.num_rows, pa.string()))
    return _cast_known(table, _known_schema(kind), path)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate with permissive schema unification (columns added later never vanish)."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # An extra (non-schema) column written with different types by different writers:
        # fall back to text for that column rather than refusing the whole sweep.
        types: dict[str, set] = {}
        for t in tables:
            for f in t.schema:
                if not pa.types.is_null(f.type):
                    types.setdefault(f.name, set()).add(f.type)
        clash = {n for n, ts in types.items() if len(ts) > 1}
        fixed = []
        for t in tables:
            for n in clash & set(t.column_names):
                i = t.column_names.index(n)
                text = [None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                        for v in t.column(i).to_pylist()]
                t = t.set_column(i, n, pa.array(text, pa.string()))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


def _ordered(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Known columns first in schema order (added as nulls when absent), then extras by name."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    extras = sorted(n for n in table.column_names if n not in schema.names)
    return table.select(list(schema.names) + extras)


def _dedup(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the latest row (by written_at, then final status) per key."""
    if table.num_rows == 0:
        return table
    import numpy as np

    cols = keys + ["written_at"] + (["status"] if "status" in table.column_names else [])
    df = table.select(cols).to_pandas()
    df["_rank"] = df["status"].map(_STATUS_RANK).fillna(-1) if "status" in df else 0
    df["_row"] = np.arange(len(df))
    df = df.sort_values(keys + ["written_at", "_rank", "_row"], kind="stable")
    keep = df.drop_duplicates(keys, keep="last").sort_values(keys)["_row"].to_numpy()
    return table.take(pa.array(keep))



class _Vanished:
    """A listed file that was gone when it was read (a compaction replaced it)."""


_VANISHED = _Vanished()
#: How often a reader lists a table again when listed files vanish under it (a compaction
#: running at the same time); each round reads only the files it has not read yet.
_MAX_RELISTS = 20


def _load_files(fs: pafs.FileSystem, files: list[tuple[str, str | None]], kind: str
                ) -> list[pa.Table | ResultsError | _Vanished]:
    """Read files in parallel: a table, the ResultsError of an unusable file, or
    ``_VANISHED`` for a file deleted between listing and reading."""
    def load(item: tuple[str, str | None]) -> pa.Table | ResultsError | _Vanished:
        try:
            return _read_file(fs, item[0], item[1], kind)
        except ResultsError as exc:
            try:
                gone = fs.get_file_info(item[0]).type == pafs.FileType.NotFound
            except OSError:
                gone = False
            return _VANISHED if gone else exc

    if not files:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        return list(pool.map(load, files))


def _read_table_files(fs: pafs.FileSystem, roots: list[str], kind: str
                      ) -> tuple[list[pa.Table], list[ResultsError], int]:
    """Every row of one table: ``(tables, unusable files, files read)``.

    Safe against a concurrent :meth:`ResultStore.compact`: it deletes a file only after
    publishing a file that holds its rows, so when a listed file has vanished, listing again
    finds that replacement. Rows read twice (before and after a compaction) are harmless: the
    readers' deduplication keeps one.
    """
    done: set[str] = set()
    tables: list[pa.Table] = []
    problems: list[ResultsError] = []
    for _ in range(_MAX_RELISTS):
        files = [(f, s) for root in roots for f, s in _list_files(fs, root, kind) if f not in done]
        vanished = False
        for (f, _), item in zip(files, _load_files(fs, files, kind)):
            if item is _VANISHED:
                vanished = True
                continue
            done.add(f)
            if isinstance(item, ResultsError):
                problems.append(item)
            else:
                tables.append(item)
        if not vanished:
            return tables, problems, len(done)
    raise ResultsError(roots[0], f"{kind} files kept vanishing while being read "
                                 f"({_MAX_RELISTS} listings); read again later")


def read_results(path: str, on_corrupt: str = "raise",
                 filesystem: pafs.FileSystem | None = None) -> Results:
    """Both tables of a sweep folder (or a folder of sweeps), local or URI, deduplicated.

    ``on_corrupt``: ``"raise"`` (default) stops with a :class:`ResultsError` naming the first
    unreadable file; ``"skip"`` leaves such files out and lists them in ``Results.skipped`` with
    the reason. A file with an unknown ``schema_version`` always raises: its rows cannot be
    interpreted, and silently dropping them would bias every table.
    """
    if on_corrupt not in ("raise", "skip"):
        raise ConfigError("on_corrupt", on_corrupt, "must be raise or skip")
    fs, roots = sweep_roots(path, filesystem)
    out: dict[str, pa.Table] = {}
    skipped: list[tuple[str, str]] = []
    rows_read: dict[str, int] = {}
    n_files = 0
    for kind in TABLES:
        tables, problems, n = _read_table_files(fs, roots, kind)
        n_files += n
        for item in problems:
            if on_corrupt == "raise" or item.reason == "version":
                raise item
            skipped.append((item.file, item.problem))
        schema = _known_schema(kind)
        table = _concat(tables) if tables else schema.empty_table()
        rows_read[kind] = table.num_rows
        table = _ordered(table, schema)
        keys = ["sweep", "trial_id"] + (["epoch"] if kind == "epochs" else [])
        out[kind] = _dedup(table, keys)
    out["epochs"] = null_inapplicable(out["trials"], out["epochs"])
    sweeps = sorted(set(out["trials"].column("sweep").to_pylist())
                    | set(out["epochs"].column("sweep").to_pylist()))
    return Results(out["trials"], out["epochs"], skipped, n_files, rows_read, sweeps)


def null_inapplicable(trials: pa.Table, epochs: pa.Table) -> pa.Table:
    """Epoch metrics that do not apply to their trial's method as NULL (files written before
    the rule, e.g. ``hard_share = 0`` of a CutMix trial)."""
    metrics = [m for m in EPOCH_METRICS.values() if m.applies is not None
               and m.name in epochs.column_names]
    aug_cols = [c for c in trials.column_names if c.startswith("augment.")]
    if not metrics or epochs.num_rows == 0 or "augment.method" not in aug_cols:
        return epochs
    augs = {(r["sweep"], r["trial_id"]): {k[len("augment."):]: v for k, v in r.items()
                                          if k.startswith("augment.")}
            for r in trials.select(["sweep", "trial_id"] + aug_cols).to_pylist()}
    keys = list(zip(epochs.column("sweep").to_pylist(), epochs.column("trial_id").to_pylist()))
    for m in metrics:
        keep = {k: applicable(m, a) for k, a in augs.items()}
        mask = pa.array([not keep.get(k, True) for k in keys])
        if not any(mask.to_pylist()):
            continue
        i = epochs.column_names.index(m.name)
        col = epochs.column(i)
        nulls = pa.nulls(len(col), col.type)
        epochs = epochs.set_column(i, m.name, pa.compute.if_else(mask, nulls, col))
    return epochs


# --------------------------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------------------------

#: Rows per compacted file; files this large are complete and left alone by later compactions.
COMPACT_MAX_ROWS = 500_000
#: Name prefix of compacted files.
COMPACTED_PREFIX = "compacted-"


@dataclass
class TableCompaction:
    """What compacting one table did. ``files_before``: data files listed at the start;
    ``merged``: files whose rows went into ``written`` new files (and were then deleted);
    ``files_after``: data files listed at the end (writers may have added some meanwhile);
    ``rows``: rows in the new files; ``copies_dropped``: exact copies of a row left by an
    interrupted compaction; ``left_alone``: ``(file, reason)`` of files not touched."""

    files_before: int = 0
    merged: int = 0
    written: int = 0
    files_after: int = 0
    rows: int = 0
    copies_dropped: int = 0
    left_alone: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Compaction:
    """What :meth:`ResultStore.compact` did, per table (``trials``, ``epochs``)."""

    tables: dict[str, TableCompaction]

    def lines(self) -> list[str]:
        """One line per table for the console."""
        out = []
        for kind, t in self.tables.items():
            text = (f"{kind}: {t.files_before:,} files -> {t.files_after:,} "
                    f"({t.merged:,} merged into {t.written:,}, {t.rows:,} rows")
            if t.copies_dropped:
                text += f", {t.copies_dropped:,} duplicate copies dropped"
            text += ")"
            if t.left_alone:
                text += f"; {len(t.left_alone)} unreadable file(s) left alone: {t.left_alone[0][0]}"
            out.append(text)
        return out


def _drop_copies(table: pa.Table, keys: list[str]) -> tuple[pa.Table, int]:
    """``table`` without rows that are exact copies of another row, and how many went.

    Copies arise when a compaction dies between publishing its file and deleting the sources,
    or when two compactions merge the same file. Only rows equal in every column count: two
    different rows with the same key and time stamp both stay.
    """
    import numpy as np

    cols = keys + ["written_at"]
    df = table.select(cols).to_pandas()
    candidates = np.flatnonzero(df.duplicated(cols, keep=False).to_numpy())
    if len(candidates) == 0:
        return table, 0
    seen: set[str] = set()
    drop: set[int] = set()
    for i, row in zip(candidates.tolist(), table.take(pa.array(candidates)).to_pylist()):
        signature = json.dumps(row, sort_keys=True, default=str)
        if signature in seen:
            drop.add(i)
        seen.add(signature)
    keep = [i for i in range(table.num_rows) if i not in drop]
    return table.take(pa.array(keep, pa.int64())), len(drop)


def _compacted_rows(tables: list[pa.Table], kind: str, trials: pa.Table | None = None
                    ) -> tuple[pa.Table, int]:
    """The rows of one partition as a compacted file holds them: every known column in the
    current schema's order and types (then extra columns by name), exact copies dropped,
    epoch metrics that do not apply to the trial's method NULL (``trials``: the latest trial
    rows; old files stored e.g. ``hard_share = 0`` for CutMix, which every reader of
    :func:`read_results` already sees as NULL), sorted by trial, epoch and time, without the
    ``sweep`` column (the folder carries it)."""
    keys = ["sweep", "trial_id"] + (["epoch"] if kind == "epochs" else [])
    table = _ordered(_concat(tables), _known_schema(kind))
    table, dropped = _drop_copies(table, keys)
    if kind == "epochs" and trials is not None:
        table = null_inapplicable(trials, table)
    table = table.sort_by([(k, "ascending") for k in keys[1:] + ["written_at"]])
    table = table.drop_columns(["sweep"])
    # Migrated rows are rows of the current schema now: mixing versions in one file would make
    # the reader migrate all of them again.
    i = table.column_names.index("schema_version")
    table = table.set_column(i, "schema_version",
                             pa.array([SCHEMA_VERSION] * table.num_rows, pa.int64()))
    return with_pandas_types(table), dropped


def _num_rows(fs: pafs.FileSystem, path: str) -> int | None:
    """Rows of a Parquet file from its footer (None when unreadable)."""
    try:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError, ValueError):
        return None


def _raw_schema(fs: pafs.FileSystem, path: str) -> pa.Schema | None:
    try:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except (pa.ArrowException, OSError, ValueError):
        return None


def _delete_merged(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file whose rows are in a published compacted file (gone already: another
    compaction merged it too)."""
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise ResultsError(path, f"merged but could not be deleted ({exc}); its rows are "
                                     "also in the compacted file") from None


def compact_table(store: ResultStore, kind: str, max_rows: int = COMPACT_MAX_ROWS
                  ) -> TableCompaction:
    """Merge the small files of one table of ``store``'s sweep into files of up to
    ``max_rows`` rows, one sweep partition at a time. Never loses a row, with writers,
    readers and other compactions running at the same time:

    1. list the data files (files published later are not touched) and read them; a file that
       vanished meanwhile was merged by another compaction, an unreadable one is left alone;
    2. publish the merged rows atomically (the same temporary-file + rename, or one object
       put, as every write) and check the published files' row counts;
    3. only then delete the merged files.

    A reader listing between 2 and 3 sees some rows twice, which deduplication absorbs; a
    reader whose listed file vanishes lists again and finds the published file
    (:func:`read_results`). A compaction killed between 2 and 3 leaves copies that the next
    compaction drops. Rows keep their ``written_at``, so which row wins never changes; rows
    written by an older schema version are stored migrated, as the current version.
    Files of ``max_rows`` rows or more are complete and stay as they are.
    """
    out = TableCompaction()
    trials = store.latest_trials() if kind == "epochs" else None
    files = _list_files(store.fs, store.root, kind)
    out.files_before = len(files)
    small = []
    for path, sweep in files:
        if sweep is None:
            out.left_alone.append((path, "not inside a sweep=<id> partition folder"))
        elif not _is_complete(store.fs, path, max_rows):
            small.append((path, sweep))
    # One group per partition folder: the compacted file goes where its rows were.
    groups: dict[str, list[tuple[str, pa.Table]]] = {}
    for (path, sweep), item in zip(small, _load_files(store.fs, small, kind)):
        if item is _VANISHED:
            continue
        if isinstance(item, ResultsError):
            out.left_alone.append((path, item.problem))
            continue
        inside = set(item.column("sweep").to_pylist())
        if inside - {sweep}:  # an old file whose own sweep column disagrees with its folder
            out.left_alone.append((path, f"its sweep column {sorted(inside)} differs from its "
                                         f"folder sweep={sweep}"))
            continue
        groups.setdefault(path.rsplit("/", 1)[0], []).append((path, item))
    for folder, members in sorted(groups.items()):
        _compact_partition(store, kind, folder, members, max_rows, out, trials)
    out.files_after = len(_list_files(store.fs, store.root, kind))
    return out


def _is_complete(fs: pafs.FileSystem, path: str, max_rows: int) -> bool:
    """A compacted file already holding ``max_rows`` rows (only compactions write big files,
    so only their files' footers are read)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(COMPACTED_PREFIX) and (_num_rows(fs, path) or 0) >= max_rows


def _compact_partition(store: ResultStore, kind: str, folder: str,
                       members: list[tuple[str, pa.Table]], max_rows: int,
                       out: TableCompaction, trials: pa.Table | None = None) -> None:
    """Publish the rows of one partition folder's files as compacted files, then delete
    those files."""
    table, dropped = _compacted_rows([t for _, t in members], kind, trials)
    if len(members) == 1 and not dropped and table.schema.equals(
            _raw_schema(store.fs, members[0][0]) or pa.schema([])):
        return  # one file already in the current layout: nothing to merge
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    published = []
    for start in range(0, max(table.num_rows, 1), max_rows):
        chunk = table.slice(start, max_rows)
        if chunk.num_rows == 0:
            break
        name = f"{COMPACTED_PREFIX}{stamp}-{uuid.uuid4().hex}.parquet"
        path = store._publish(folder, name, chunk)
        if _num_rows(store.fs, path) != chunk.num_rows:  # never delete what is not safely there
            raise ResultsError(path, f"compacted file does not read back {chunk.num_rows} "
                                     "rows; the merged files were kept")
        published.append(path)
    for path, _ in members:
        _delete_merged(store.fs, path)
    out.merged += len(members)
    out.written += len(published)
    out.rows += table.num_rows
    out.copies_dropped += dropped


__all__ = ["SCHEMA_VERSION", "STATUSES", "KNOWN_VERSIONS", "as_run", "null_inapplicable",
           "MIGRATIONS", "ResultStore", "StoreCallback", "Results", "ResultsError", "read_results",
           "sweep_roots", "config_schema", "trial_schema", "epoch_schema", "Compaction",
           "TableCompaction", "compact_table", "COMPACT_MAX_ROWS"]
