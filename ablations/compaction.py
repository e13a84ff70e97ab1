"""Compaction: a sweep's many small files merged into ``compacted-*.parquet`` files of up to
:data:`COMPACT_MAX_ROWS` rows, safe while writers, readers and other compactions run: a file is
deleted only after a published file (written atomically, :mod:`ablations.storage`) holds its
rows; duplicates in between are absorbed by the readers' deduplication. Compacted rows keep
their ``written_at`` and are stored in the current schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ablations import storage
from ablations.reader import VANISHED, latest_trials, list_files, load_files, null_inapplicable
from ablations.schema import SCHEMA_VERSION, TABLES, concat, known_schema, ordered, with_pandas_types
from hardmix.errors import ConfigError, ResultsError


class Folder(Protocol):
    """What compaction needs of a store (:class:`ablations.store.ResultStore`): its
    filesystem and the sweep folder inside it."""

    fs: pafs.FileSystem
    root: str


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


def compact(store: Folder, max_rows: int | None = None) -> Compaction:
    """Merge the sweep's small files into a few large ones, table by table; see
    :func:`compact_table`. Safe while writers (and readers, and other compactions) run; never
    loses a row."""
    max_rows = COMPACT_MAX_ROWS if max_rows is None else max_rows
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ConfigError("max_rows", max_rows, "must be a whole number >= 1")
    return Compaction({kind: compact_table(store, kind, max_rows) for kind in TABLES})


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
    table = ordered(concat(tables), known_schema(kind))
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


def compact_table(store: Folder, kind: str, max_rows: int = COMPACT_MAX_ROWS
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
    trials = latest_trials(store.fs, store.root) if kind == "epochs" else None
    files = list_files(store.fs, store.root, kind)
    out.files_before = len(files)
    small = []
    for path, sweep in files:
        if sweep is None:
            out.left_alone.append((path, "not inside a sweep=<id> partition folder"))
        elif not _is_complete(store.fs, path, max_rows):
            small.append((path, sweep))
    # One group per partition folder: the compacted file goes where its rows were.
    groups: dict[str, list[tuple[str, pa.Table]]] = {}
    for (path, sweep), item in zip(small, load_files(store.fs, small, kind)):
        if item is VANISHED:
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
    out.files_after = len(list_files(store.fs, store.root, kind))
    return out


def _is_complete(fs: pafs.FileSystem, path: str, max_rows: int) -> bool:
    """A compacted file already holding ``max_rows`` rows (only compactions write big files,
    so only their files' footers are read)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(COMPACTED_PREFIX) and (_num_rows(fs, path) or 0) >= max_rows


def _compact_partition(store: Folder, kind: str, folder: str,
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
        path = storage.write_parquet(store.fs, folder, name, chunk)
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
