"""The deduplicating reader: both tables of a sweep folder (or a folder of sweeps), local or URI,
each file checked, migrated to the current schema and cast to its types; the latest row per
trial (and per trial and epoch) kept. Safe while writers and compactions run: a listed file
that vanished was merged into a published one, so the reader lists again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ablations import storage
from ablations.schema import (KNOWN_VERSIONS, MIGRATIONS, NULLABLE, REQUIRED_COLUMNS,
                              SCHEMA_VERSION, STATUS_RANK, TABLES, concat, known_schema,
                              ordered)
from hardmix.errors import ConfigError, ResultsError
from hardmix.metrics import EPOCH_METRICS, applicable

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

        types = {k: pd.api.types.pandas_dtype(v) for k, v in NULLABLE.items()}
        return (self.trials.to_pandas(types_mapper=types.get),
                self.epochs.to_pandas(types_mapper=types.get))


def sweep_roots(path: str, filesystem: pafs.FileSystem | None = None
                ) -> tuple[pafs.FileSystem, list[str]]:
    """The sweep folders at ``path``: itself when it holds trials/ or epochs/, else its children
    that do. Raises ConfigError when the path does not exist or holds no sweep."""
    fs, root = storage.resolve(path, filesystem)
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


def list_files(fs: pafs.FileSystem, sweep_root: str, kind: str) -> list[tuple[str, str | None]]:
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


def read_file(fs: pafs.FileSystem, path: str, sweep: str | None, kind: str) -> pa.Table:
    """One file, checked, migrated to the current schema and cast to the known column types."""
    try:
        # ParquetFile on an open file: several times less overhead than pq.read_table, which
        # builds a whole dataset per call (sweeps hold thousands of small files).
        with fs.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultsError(path, f"is not a readable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in table.column_names]
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
    return _cast_known(table, known_schema(kind), path)


def dedup(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the latest row (by written_at, then final status) per key."""
    if table.num_rows == 0:
        return table
    import numpy as np

    cols = keys + ["written_at"] + (["status"] if "status" in table.column_names else [])
    df = table.select(cols).to_pandas()
    df["_rank"] = df["status"].map(STATUS_RANK).fillna(-1) if "status" in df else 0
    df["_row"] = np.arange(len(df))
    df = df.sort_values(keys + ["written_at", "_rank", "_row"], kind="stable")
    keep = df.drop_duplicates(keys, keep="last").sort_values(keys)["_row"].to_numpy()
    return table.take(pa.array(keep))


class Vanished:
    """A listed file that was gone when it was read (a compaction replaced it)."""


VANISHED = Vanished()


#: How often a reader lists a table again when listed files vanish under it (a compaction
#: running at the same time); each round reads only the files it has not read yet.
_MAX_RELISTS = 20


def load_files(fs: pafs.FileSystem, files: list[tuple[str, str | None]], kind: str
                ) -> list[pa.Table | ResultsError | Vanished]:
    """Read files in parallel: a table, the ResultsError of an unusable file, or
    ``VANISHED`` for a file deleted between listing and reading."""
    def load(item: tuple[str, str | None]) -> pa.Table | ResultsError | Vanished:
        try:
            return read_file(fs, item[0], item[1], kind)
        except ResultsError as exc:
            try:
                gone = fs.get_file_info(item[0]).type == pafs.FileType.NotFound
            except OSError:
                gone = False
            return VANISHED if gone else exc

    if not files:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        return list(pool.map(load, files))


def read_table_files(fs: pafs.FileSystem, roots: list[str], kind: str
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
        files = [(f, s) for root in roots for f, s in list_files(fs, root, kind) if f not in done]
        vanished = False
        for (f, _), item in zip(files, load_files(fs, files, kind)):
            if item is VANISHED:
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


def latest_trials(fs: pafs.FileSystem, root: str) -> pa.Table:
    """The latest row of every trial of the sweep at ``root`` (unreadable files left out)."""
    tables, _, _ = read_table_files(fs, [root], "trials")
    schema = known_schema("trials")
    table = ordered(concat(tables), schema) if tables else schema.empty_table()
    return dedup(table, ["sweep", "trial_id"])


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
        tables, problems, n = read_table_files(fs, roots, kind)
        n_files += n
        for item in problems:
            if on_corrupt == "raise" or item.reason == "version":
                raise item
            skipped.append((item.file, item.problem))
        schema = known_schema(kind)
        table = concat(tables) if tables else schema.empty_table()
        rows_read[kind] = table.num_rows
        table = ordered(table, schema)
        keys = ["sweep", "trial_id"] + (["epoch"] if kind == "epochs" else [])
        out[kind] = dedup(table, keys)
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
