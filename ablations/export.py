"""``hardmix export`` and ``hardmix compact``: a sweep's results as a few files to share, and a
sweep folder with few files.

Export writes the deduplicated latest rows (:func:`ablations.store.read_results`: one row per
trial, one per trial and epoch, NULL where a field or metric does not apply) with ``sweep`` as
an ordinary column, in one of three shapes chosen by ``--out``:

* ``DIR`` (any name without a suffix below): ``DIR/trials.parquet`` and ``DIR/epochs.parquet``;
* ``NAME.parquet``: ``NAME.trials.parquet`` and ``NAME.epochs.parquet`` next to each other;
* ``NAME.duckdb``: one DuckDB database file with the tables ``trials`` and ``epochs`` (needs the
  optional package duckdb).

Every file is written under a hidden temporary name, fsynced, and renamed into place at the end
(:mod:`ablations.storage`), so an export that fails leaves nothing behind; existing files are
replaced only with ``force``.

Compaction (:meth:`ablations.store.ResultStore.compact`) merges the store's many small files
into a few, in place, without losing a row and safely while the sweep runs.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ablations import storage
from ablations.store import (SCHEMA_VERSION, TABLES, Compaction, ResultStore, read_results,
                             sweep_roots)
from hardmix.config.environment import check_writable
from hardmix.errors import ConfigError

FORMATS = ("folder", "parquet", "duckdb")


@dataclass
class Export:
    """What an export wrote: ``files`` (path -> bytes), rows per table, the sweeps in it."""

    format: str
    files: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    sweeps: list[str] = field(default_factory=list)
    source_files: int = 0


def export_format(out: str) -> str:
    """``duckdb``, ``parquet`` (one file per table next to each other) or ``folder``."""
    suffix = Path(out).suffix.lower()
    if suffix == ".duckdb":
        return "duckdb"
    if suffix == ".parquet":
        return "parquet"
    return "folder"


def export_targets(out: str) -> dict[str, Path]:
    """Where each table goes (``{"trials": path, "epochs": path}``); a DuckDB bundle is one
    file for both (``{"duckdb": path}``)."""
    path = Path(os.path.expanduser(out))
    kind = export_format(out)
    if kind == "duckdb":
        return {"duckdb": path}
    if kind == "parquet":
        return {t: path.with_name(f"{path.stem}.{t}.parquet") for t in TABLES}
    return {t: path / f"{t}.parquet" for t in TABLES}


def check_export(out: str, force: bool = False) -> dict[str, Path]:
    """Every check on ``--out`` before anything is read or written; the targets."""
    if not out or storage.is_uri(out):
        raise ConfigError("--out", out, "must be a local file or folder (export to a local path, "
                                        "then copy it where it is needed)")
    targets = export_targets(out)
    if export_format(out) == "duckdb":
        try:
            import duckdb  # noqa: F401
        except ImportError:
            raise ConfigError("--out", out, "a .duckdb bundle needs the optional package duckdb "
                                            "(pip install duckdb), or export to a folder or "
                                            ".parquet files") from None
    else:
        folder = Path(os.path.expanduser(out))
        if export_format(out) == "folder" and folder.exists() and not folder.is_dir():
            raise ConfigError("--out", out, "is a file: give a folder, NAME.parquet or "
                                            "NAME.duckdb")
    for target in targets.values():
        if target.is_dir():
            raise ConfigError("--out", out, f"{target} is a folder")
        if target.exists() and not force:
            raise ConfigError("--out", out, f"{target} exists (pass --force to replace it)")
    parent = next(iter(targets.values())).parent
    try:
        check_writable("--out", str(parent))
    except ConfigError as exc:  # name the value the user gave, not its parent folder
        raise ConfigError("--out", out, exc.allowed) from None
    return targets


def _with_metadata(table: pa.Table, source: str, sweeps: list[str]) -> pa.Table:
    """The table with a note of where and when it was exported (Parquet key-value metadata)."""
    note = {"source": source, "sweeps": sweeps, "schema_version": SCHEMA_VERSION,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          b"hardmix.export": json.dumps(note).encode()})


def _tmp(path: Path) -> Path:
    return path.with_name(storage.temporary_name(path.name))


def _write_parquet(tables: dict[str, pa.Table], targets: dict[str, Path]) -> None:
    written: list[tuple[Path, Path]] = []
    try:
        for name, table in tables.items():
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp(target)
            written.append((tmp, target))
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                storage.fsync_file(f)
        for tmp, target in written:  # publish only once every table is written
            os.replace(tmp, target)
            storage.fsync_dir(str(target.parent))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise


def _write_duckdb(tables: dict[str, pa.Table], target: Path) -> None:
    import duckdb

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(target)
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            for name, table in tables.items():
                con.register("_incoming", table)
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _incoming')
                con.unregister("_incoming")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
        storage.fsync_dir(str(target.parent))
    except BaseException:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise


def export_results(path: str, out: str, force: bool = False) -> Export:
    """Write the deduplicated latest rows of the sweep (or folder of sweeps) at ``path`` to
    ``out``; see the module docstring. Raises ConfigError before writing anything when the
    sweep is missing or ``out`` cannot be written."""
    targets = check_export(out, force)
    results = read_results(path)
    tables = {name: _with_metadata(getattr(results, name), str(path), results.sweeps)
              for name in TABLES}
    kind = export_format(out)
    if kind == "duckdb":
        _write_duckdb(tables, targets["duckdb"])
    else:
        _write_parquet(tables, targets)
    return Export(kind, {str(p): p.stat().st_size for p in targets.values()},
                  {name: t.num_rows for name, t in tables.items()}, results.sweeps,
                  results.files)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def export_from_cli(path: str, out: str, force: bool = False) -> int:
    """``hardmix export``: prints what it wrote; exit 0. Bad input raises ConfigError."""
    done = export_results(path, out, force)
    print(f"exported {done.rows['trials']:,} trials and {done.rows['epochs']:,} epoch rows of "
          f"{', '.join(done.sweeps) or 'no sweep'} (from {done.source_files:,} files):")
    for file, size in done.files.items():
        print(f"  {file}  {_size(size)}")
    return 0


def compact_sweeps(path: str, max_rows: int | None = None) -> dict[str, Compaction]:
    """Compact every sweep at ``path`` (a sweep folder or a folder of sweeps)."""
    fs, roots = sweep_roots(path)
    if not storage.is_uri(path):
        for root in roots:
            check_writable("path", root)
    return {root: ResultStore(root, filesystem=fs).compact(max_rows) for root in roots}


def compact_from_cli(path: str, max_rows: int | None = None) -> int:
    """``hardmix compact``: one line per sweep and table; exit 0."""
    for root, done in compact_sweeps(path, max_rows).items():
        print(f"{root}:")
        for line in done.lines():
            print(f"  {line}")
    return 0
