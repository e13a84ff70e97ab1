"""Integers stay integers: every int64 column of the store (seeds, epochs, ``augment.min_hard``,
``epochs_run``, ...) reads as pandas' nullable ``Int64`` — NULL as ``<NA>``, never a float — via
``read_results(...).to_pandas()`` and straight ``pd.read_parquet`` of a sweep folder (before and
after compaction), as ``Int64`` in polars and ``BIGINT`` in DuckDB's documented one-liner."""

from __future__ import annotations

import dataclasses
import glob

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ablations.store import ResultStore, epoch_schema, read_results, trial_schema
from hardmix.config import RunConfig, flatten


def _int_columns(schema: pa.Schema) -> set[str]:
    return {f.name for f in schema if f.type == pa.int64()}


@pytest.fixture()
def sweep(tmp_path) -> str:
    """Trials where int columns are NULL in some rows: ``augment.min_hard`` (inert for CutMix),
    ``epochs_run`` (a running row); epochs where an int metric is absent in one row."""
    store = ResultStore(str(tmp_path / "sw"))
    for i, method in enumerate(("hardmix", "cutmix", "none")):
        cfg = RunConfig(seed=i)
        cfg.augment = dataclasses.replace(cfg.augment, method=method, min_hard=3)
        row = {**flatten(cfg), "trial_id": f"c00{i}-s{i}", "error": "", "status": "running"}
        if i < 2:
            row.update(status="completed", epochs_run=2)
        store.write_trial(row)
        store.write_epochs(row["trial_id"], [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2)])
    return str(tmp_path / "sw")


def _check(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    for df, ints in ((trials, _int_columns(trial_schema())), (epochs, _int_columns(epoch_schema()))):
        assert ints & set(df.columns) == ints
        wrong = {c: str(df[c].dtype) for c in ints if str(df[c].dtype) != "Int64"}
        assert not wrong, wrong
    by_id = trials.set_index("trial_id")
    assert by_id.loc["c000-s0", "augment.min_hard"] == 3  # an integer, not 3.0
    assert by_id.loc["c001-s1", "augment.min_hard"] is pd.NA  # inert for CutMix
    assert by_id.loc["c002-s2", "epochs_run"] is pd.NA and by_id["seed"].tolist() == [0, 1, 2]
    assert str(by_id["optim.nesterov"].dtype) == "boolean"


def _as_written_before(sweep: str) -> None:
    """Every file of ``sweep`` without schema metadata, as earlier versions wrote them."""
    for path in glob.glob(f"{sweep}/*/*/*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata(None), path)


@pytest.mark.parametrize("old_files", [False, True])
def test_read_results_gives_nullable_integers(sweep, old_files):
    if old_files:
        _as_written_before(sweep)
    trials, epochs = read_results(sweep).to_pandas()
    _check(trials.sort_values("trial_id"), epochs)


def _direct(sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.read_parquet(f"{sweep}/trials")
    trials = trials.sort_values("written_at").groupby("trial_id").tail(1)
    return trials.sort_values("trial_id"), pd.read_parquet(f"{sweep}/epochs")


def test_pandas_reads_the_folders_with_nullable_integers(sweep):
    _check(*_direct(sweep))


def test_compaction_gives_files_of_earlier_versions_nullable_integers(sweep):
    _as_written_before(sweep)
    assert str(_direct(sweep)[0]["augment.min_hard"].dtype) == "float64"  # what they read as
    ResultStore(sweep).compact()
    _check(*_direct(sweep))


def test_polars_and_duckdb_read_integers_as_integers(sweep):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    frame = pl.read_parquet(f"{sweep}/trials/*/*.parquet")
    assert {str(frame.schema[c]) for c in ("seed", "augment.min_hard", "epochs_run")} == {"Int64"}
    # The one-liner of docs/results-schema.md (latest row per trial).
    rel = duckdb.sql(f"""
        SELECT * FROM read_parquet('{sweep}/trials/*/*.parquet', hive_partitioning = true)
        QUALIFY row_number() OVER (PARTITION BY sweep, trial_id ORDER BY written_at DESC) = 1""")
    types = dict(zip(rel.columns, map(str, rel.types)))
    assert {types[c] for c in ("seed", "augment.min_hard", "epochs_run")} == {"BIGINT"}
    assert sorted(rel.fetchdf()["sweep"].unique()) == ["sw"]
