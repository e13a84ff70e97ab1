"""The results schema: the columns of the ``trials`` and ``epochs`` tables, trial ids, how a
row becomes a typed one-row table, and the migrations of rows written by older versions.

The columns derive from one place each: the run config's fields (:mod:`hardmix.config`, as they
run: :func:`hardmix.config.acts.as_run` NULLs every field that does not act and resolves
``box: auto``), the run summary and the per-epoch metrics (:mod:`hardmix.metrics`). Every row
carries the ``schema_version`` it was written with; ``MIGRATIONS[v]`` turns a table of version
``v`` into ``v + 1``. See :mod:`ablations.store` for the layout and the rules of the store.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from typing import Any, Callable, Mapping

import pyarrow as pa

from hardmix.config import RunConfig, field_type, flatten
from hardmix.config.acts import as_run as _acting
from hardmix.errors import ConfigError
from hardmix.metrics import EPOCH_METRICS, SUMMARY_FIELDS

#: Version of the schema this code writes. Bump it (and add a migration) when a column changes.
SCHEMA_VERSION = 3


STATUSES = ("running", "completed", "pruned", "failed")


#: Dedup tie-break when two rows of a trial carry the same ``written_at``: a final status wins.
STATUS_RANK = {"running": 0, "pruned": 1, "failed": 2, "completed": 3}


TABLES = ("trials", "epochs")


_TS = pa.timestamp("us", tz="UTC")


#: Arrow type of each metric kind (:data:`hardmix.metrics.KINDS`).
KIND_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(),
              "list_int": pa.list_(pa.int64()), "list_float": pa.list_(pa.float64()),
              "list_str": pa.list_(pa.string())}


#: Bookkeeping columns of a trial row around the summary: identity, attempt, provenance (versions,
#: commit, the data file's content hash) and where it ran (Tune trial id, node).
_TRIAL_KEYS = [("sweep", pa.string()), ("trial_id", pa.string()), ("trial_name", pa.string())]


_TRIAL_BOOKKEEPING = [("attempt", pa.int64()), ("tune_trial_id", pa.string()),
                      ("node_id", pa.string()), ("hostname", pa.string()),
                      ("versions", pa.string()), ("git_commit", pa.string()),
                      # Files written before it was recorded read it as NULL (no migration).
                      ("data_sha256", pa.string()),
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
REQUIRED_COLUMNS = {"trials": ("trial_id", "schema_version", "written_at"),
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


def known_schema(kind: str) -> pa.Schema:
    return trial_schema() if kind == "trials" else epoch_schema()


#: Columns written into the files: the partition folder carries ``sweep``.
def file_schema(kind: str) -> pa.Schema:
    schema = known_schema(kind)
    return schema.remove(schema.get_field_index("sweep"))


# --------------------------------------------------------------------------------------------
# Trial ids
# --------------------------------------------------------------------------------------------


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


_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


def file_stem(trial_id: str) -> str:
    # Readers skip names starting with "." or "_" (temporary files), so a real file never may.
    stem = _SAFE.sub("_", trial_id).lstrip("._")[:120]
    return stem or "trial"


def check_trial_id(trial_id: Any) -> str:
    if not isinstance(trial_id, str) or not trial_id.strip():
        raise ConfigError("trial_id", trial_id, "must be a non-empty string")
    return trial_id


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """numpy / torch scalars and arrays -> Python values pyarrow accepts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _column(name: str, value: Any, tp: pa.DataType | None) -> pa.Array:
    value = plain(value)
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


def row_table(row: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """One-row table: every known column (null where absent) in schema order, then extras."""
    names = list(schema.names) + sorted(k for k in row if k not in schema.names)
    arrays = [_column(n, row.get(n), schema.field(n).type if n in schema.names else None)
              for n in names]
    return with_pandas_types(pa.table(dict(zip(names, arrays))))


#: pandas dtypes of the Arrow types whose NumPy form would lose a NULL (int64 -> float64).
NULLABLE = {pa.int64(): "Int64", pa.bool_(): "boolean"}


def with_pandas_types(table: pa.Table) -> pa.Table:
    """``table`` with pandas metadata naming the nullable dtypes of its integer and boolean
    columns, so that ``pd.read_parquet`` of a file or folder reads integers as ``Int64`` (NULL
    as ``<NA>``), never as floats. Other readers ignore it."""
    cols = [{"name": f.name, "field_name": f.name, "pandas_type": str(f.type),
             "numpy_type": NULLABLE[f.type], "metadata": None}
            for f in table.schema if f.type in NULLABLE]
    meta = {"index_columns": [], "column_indexes": [], "columns": cols,
            "creator": {"library": "hardmix"}, "pandas_version": "2.0.0"}
    return table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})


def as_run(row: dict) -> dict:
    """A trial row's config columns as they run: every field that does not act NULL (inert
    ``augment.*`` fields, another optimiser's or model's fields, ...), ``box: auto`` resolved
    (:func:`hardmix.config.acts.as_run`)."""
    return _acting(row)


def concat(tables: list[pa.Table]) -> pa.Table:
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


def ordered(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Known columns first in schema order (added as nulls when absent), then extras by name."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    extras = sorted(n for n in table.column_names if n not in schema.names)
    return table.select(list(schema.names) + extras)


# --------------------------------------------------------------------------------------------
# Migrations
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
