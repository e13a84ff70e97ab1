"""ablations.store: atomic unique files, typed columns, dedup, migrations, corrupt files,
concurrent writers, object-store writes, StoreCallback, and plain-Parquet readers."""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ablations import writer as writer_mod
from ablations.store import (SCHEMA_VERSION, ResultsError, ResultStore, StoreCallback,
                             read_results)
from hardmix.config import ConfigError, HardmixError, RunConfig, flatten
from results_fixtures import config, write_run


def _files(root: Path, table: str) -> list[Path]:
    return sorted((root / table).rglob("*.parquet"))


def test_layout_unique_names_and_typed_columns(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    for _ in range(3):  # the same trial written three times: three files, none overwritten
        st.write_trial({**config(augment__alpha=0.5), "trial_id": "t0", "status": "running"})
    files = _files(tmp_path / "sw", "trials")
    assert len(files) == 3 and len({f.name for f in files}) == 3
    assert all(f.parent.name == "sweep=sw" and f.name.startswith("t0-") for f in files)
    assert not any(f.name.startswith("part-") for f in files)

    t = read_results(str(tmp_path / "sw")).trials
    assert t.num_rows == 1
    schema = t.schema
    assert schema.field("augment.alpha").type == pa.float64()
    assert schema.field("seed").type == pa.int64()
    assert schema.field("augment.method").type == pa.string()
    assert schema.field("data.crop_flip").type == pa.bool_()
    assert schema.field("optim.milestones").type == pa.list_(pa.int64())
    assert schema.field("written_at").type == pa.timestamp("us", tz="UTC")
    assert t.column("schema_version").to_pylist() == [SCHEMA_VERSION]
    assert t.column("sweep").to_pylist() == ["sw"]
    for name in flatten(RunConfig()):
        assert name in schema.names


def test_latest_write_wins_per_trial_and_per_epoch(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "a", "status": "running"})
    st.write_epochs("a", [{"epoch": 1, "test_top1_err": 50.0}, {"epoch": 2, "test_top1_err": 40.0}])
    st.write_epochs("a", [{"epoch": 2, "test_top1_err": 35.0}])  # a retry re-ran epoch 2
    st.write_trial({"trial_id": "a", "status": "completed", "final_top1_err": 35.0})
    st.write_trial({"trial_id": "b", "status": "running"})
    res = read_results(str(tmp_path / "sw"))
    trials, epochs = res.to_pandas()
    assert trials.set_index("trial_id")["status"].to_dict() == {"a": "completed", "b": "running"}
    assert epochs.set_index("epoch")["test_top1_err"].to_dict() == {1: 50.0, 2: 35.0}
    assert res.rows_read == {"trials": 3, "epochs": 3}


def test_equal_timestamps_prefer_the_final_status(tmp_path, monkeypatch):
    st = ResultStore(str(tmp_path / "sw"))
    from datetime import datetime, timezone
    stamp = datetime(2030, 1, 1, tzinfo=timezone.utc)
    monkeypatch.setattr(writer_mod, "_now", lambda: stamp)
    st.write_trial({"trial_id": "a", "status": "completed", "final_top1_err": 1.0})
    st.write_trial({"trial_id": "a", "status": "running"})
    assert read_results(str(tmp_path / "sw")).trials.column("status").to_pylist() == ["completed"]


def test_columns_added_later_do_not_vanish(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "a", "status": "completed"})
    st.write_trial({"trial_id": "b", "status": "completed", "tune_trial_name": "fn_b_00001",
                    "attempt": 2})
    t = read_results(str(tmp_path / "sw")).trials.to_pandas().set_index("trial_id")
    assert t.loc["b", "tune_trial_name"] == "fn_b_00001"
    assert pd.isna(t.loc["a", "tune_trial_name"])
    assert t.loc["b", "attempt"] == 2


def test_killed_writer_leaves_nothing_readers_choke_on(tmp_path, monkeypatch):
    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "ok", "status": "completed"})
    folder = Path(st.folder("trials"))
    # What a writer killed mid-write leaves: a hidden temporary file with half a Parquet file.
    (folder / ".x-123.parquet.tmp").write_bytes(b"PAR1\x00\x01")
    (folder / "_partial.parquet").write_bytes(b"PAR1")

    def dies(table, where, **kw):
        where.write(b"PAR1 half")  # the open temporary file
        raise KeyboardInterrupt  # the writer is interrupted between write and rename

    monkeypatch.setattr(pq, "write_table", dies)
    with pytest.raises(KeyboardInterrupt):
        st.write_trial({"trial_id": "dead", "status": "running"})
    monkeypatch.undo()
    visible = [p.name for p in folder.iterdir() if not p.name.startswith((".", "_"))]
    assert len(visible) == 1  # the interrupted write left no visible file
    res = read_results(str(tmp_path / "sw"))
    assert res.trials.column("trial_id").to_pylist() == ["ok"] and res.skipped == []


def test_corrupt_file_raises_naming_it_or_is_skipped(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "ok", "status": "completed"})
    bad = Path(st.folder("trials")) / "broken-1.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ResultsError) as info:
        read_results(str(tmp_path / "sw"))
    assert str(bad) in str(info.value) and isinstance(info.value, HardmixError)
    res = read_results(str(tmp_path / "sw"), on_corrupt="skip")
    assert res.trials.column("trial_id").to_pylist() == ["ok"]
    assert [f for f, _ in res.skipped] == [str(bad)]
    assert "not a readable Parquet file" in res.skipped[0][1]


def test_file_without_required_columns_is_corrupt(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "ok", "status": "completed"})
    other = Path(st.folder("trials")) / "foreign-1.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(ResultsError, match="lacks the column"):
        read_results(str(tmp_path / "sw"))


def test_unknown_schema_version_is_an_error_naming_the_file(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    path = st.write_trial({"trial_id": "new", "status": "completed"})
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index("schema_version"), "schema_version",
                             pa.array([SCHEMA_VERSION + 7], pa.int64()))
    pq.write_table(table, path)
    for mode in ("raise", "skip"):  # rows it cannot interpret are never silently dropped
        with pytest.raises(ResultsError, match=f"schema_version {SCHEMA_VERSION + 7}") as info:
            read_results(str(tmp_path / "sw"), on_corrupt=mode)
        assert path in str(info.value)


def _write_v1(folder: Path, table: str, rows: dict) -> None:
    """A file as schema version 1 wrote it: no `attempt` (trials), no `mixed_rate` (epochs)."""
    from datetime import datetime, timezone
    n = len(next(iter(rows.values())))
    data = {**rows, "schema_version": pa.array([1] * n, pa.int64()),
            "written_at": pa.array([datetime(2025, 1, 1, tzinfo=timezone.utc)] * n,
                                   pa.timestamp("us", tz="UTC"))}
    (folder / table / "sweep=sw").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), folder / table / "sweep=sw" / f"old-{table}.parquet")


def test_mixed_schema_versions_read_together(tmp_path):
    root = tmp_path / "sw"
    _write_v1(root, "trials", {"sweep": ["sw"], "trial_id": ["old"], "status": ["completed"],
                               "final_top1_err": [4.0], "augment.alpha": [1.0], "seed": [0]})
    _write_v1(root, "epochs", {"sweep": ["sw"], "trial_id": ["old"], "epoch": [1],
                               "test_top1_err": [4.0]})
    st = ResultStore(str(root))
    st.write_trial({**config(augment__alpha=0.5, seed=1), "trial_id": "new", "status": "completed",
                    "attempt": 3, "final_top1_err": 3.0})
    st.write_epochs("new", [{"epoch": 1, "test_top1_err": 3.0, "mixed_rate": 0.5}])
    trials, epochs = read_results(str(root)).to_pandas()
    t = trials.set_index("trial_id")
    assert t.loc["old", "attempt"] == 1 and t.loc["new", "attempt"] == 3  # migrated: v1 ran once
    assert t.loc["old", "schema_version"] == 1 and t.loc["new", "schema_version"] == SCHEMA_VERSION
    assert t.loc["old", "augment.alpha"] == 1.0 and t.loc["new", "augment.alpha"] == 0.5
    e = epochs.set_index("trial_id")
    assert math.isnan(e.loc["old", "mixed_rate"]) and e.loc["new", "mixed_rate"] == 0.5


def _concurrent_writer(args):
    root, worker, n = args
    st = ResultStore(root)
    for i in range(n):
        tid = f"w{worker}-t{i}"
        st.write_trial({"trial_id": tid, "status": "running", "seed": i})
        for e in (1, 2, 3):
            st.write_epochs(tid, [{"epoch": e, "test_top1_err": 100.0 * worker + i + e}])
        st.write_trial({"trial_id": tid, "status": "completed", "seed": i,
                        "final_top1_err": 100.0 * worker + i})
    return worker


def test_concurrent_writers_every_row_read_back_once(tmp_path):
    root = str(tmp_path / "sw")
    workers, n = 4, 6
    # spawn, not fork: the test process may hold Ray's threads (a forked child can deadlock)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        assert sorted(pool.map(_concurrent_writer, [(root, w, n) for w in range(workers)])) == \
            list(range(workers))
    res = read_results(root)
    trials, epochs = res.to_pandas()
    assert res.rows_read == {"trials": 2 * workers * n, "epochs": 3 * workers * n}
    expected = {f"w{w}-t{i}": 100.0 * w + i for w in range(workers) for i in range(n)}
    assert len(trials) == len(expected) and trials["trial_id"].is_unique
    assert dict(zip(trials["trial_id"], trials["final_top1_err"])) == expected
    assert set(trials["status"]) == {"completed"}
    assert len(epochs) == 3 * len(expected)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for tid, e, err in zip(epochs["trial_id"], epochs["epoch"], epochs["test_top1_err"]):
        assert err == expected[tid] + e


def test_object_store_writes_one_put_and_never_renames(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = fsspec.filesystem("memory")
    moves: list = []

    class NoRename(FSSpecHandler):
        def move(self, src, dest):  # an object store copies on rename: the store must not use it
            moves.append((src, dest))
            raise AssertionError("rename used on an object store")

    fs = PyFileSystem(NoRename(mem))
    st = ResultStore("/bucket/sweeps/obj", filesystem=fs)
    assert not st.atomic_rename
    st.write_trial({"trial_id": "a", "status": "completed", "final_top1_err": 2.5})
    st.write_epochs("a", [{"epoch": 1, "test_top1_err": 2.5}])
    assert moves == []
    names = mem.find("/bucket/sweeps/obj")
    assert len(names) == 2 and all("/sweep=obj/a-" in n and n.endswith(".parquet") for n in names)
    res = read_results("/bucket/sweeps/obj", filesystem=fs)
    assert res.trials.column("final_top1_err").to_pylist() == [2.5]
    assert res.epochs.num_rows == 1


def test_local_store_uses_rename_and_file_uri(tmp_path):
    st = ResultStore(f"file://{tmp_path}/uri-sweep")
    assert st.atomic_rename and st.sweep == "uri-sweep"
    st.write_trial({"trial_id": "a", "status": "completed"})
    assert read_results(f"file://{tmp_path}/uri-sweep").trials.num_rows == 1
    assert read_results(str(tmp_path / "uri-sweep")).trials.num_rows == 1


def test_folder_of_sweeps_and_odd_trial_ids(tmp_path):
    for sweep in ("s1", "s2"):
        st = ResultStore(str(tmp_path / sweep))
        st.write_trial({"trial_id": "same/id ../x", "status": "completed"})
        st.write_trial({"trial_id": "_hidden?", "status": "completed"})
    res = read_results(str(tmp_path))
    t = res.trials.to_pandas()
    assert sorted(zip(t["sweep"], t["trial_id"])) == sorted(
        (s, i) for s in ("s1", "s2") for i in ("same/id ../x", "_hidden?"))
    assert res.sweeps == ["s1", "s2"]
    for f in _files(tmp_path / "s1", "trials"):  # names stay inside the folder, never hidden
        assert f.parent.name == "sweep=s1" and not f.name.startswith((".", "_"))


def test_missing_or_non_sweep_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_results(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no results"):
        read_results(str(tmp_path / "empty"))


def test_bad_rows_are_refused_before_writing(tmp_path):
    st = ResultStore(str(tmp_path / "sw"))
    with pytest.raises(ConfigError, match="status"):
        st.write_trial({"trial_id": "a", "status": "done"})
    with pytest.raises(ConfigError, match="trial_id"):
        st.write_trial({"status": "running"})
    with pytest.raises(ConfigError, match="augment.alpha"):
        st.write_trial({"trial_id": "a", "status": "running", "augment.alpha": "big"})
    with pytest.raises(ConfigError, match="epoch"):
        st.write_epochs("a", [{"test_top1_err": 1.0}])
    assert not (tmp_path / "sw" / "trials").exists() or not _files(tmp_path / "sw", "trials")


METRICS = dict(train_loss=1.0, val_loss=1.1, val_top1_err=30.0, val_top5_err=5.0, test_loss=1.2,
               test_top1_err=31.0, test_top5_err=6.0, lr=0.1, images_per_s=900.0,
               epoch_seconds=2.0, hard_share=0.25, fallback_rate=0.0, mixed_rate=1.0,
               distinct_sources=12.0, source_class_counts=[3, 0, 5])


def test_store_callback_records_a_run_as_it_goes(tmp_path):
    cfg = RunConfig()
    cfg.augment.alpha = 0.5
    root = str(tmp_path / "sw")
    cb = StoreCallback(ResultStore(root), "trial-7", cfg,
                       extra={"attempt": 2, "versions": {"ray": "2.60"}, "tune_trial": "x_7"})
    try:
        from hardmix.metrics import Callback
    except ImportError:
        Callback = None
    if Callback is not None:
        assert isinstance(cb, Callback)
    cb.on_run_start(cfg, {"device": "cpu", "versions": {"torch": "2.14"}, "git_commit": "deadbee",
                          "rank": 0})
    t = read_results(root).trials.to_pylist()[0]
    assert t["status"] == "running" and t["attempt"] == 2 and t["augment.alpha"] == 0.5
    cb.on_epoch_end({"epoch": 1, **METRICS}, None)
    assert read_results(root).epochs.num_rows == 1  # written when the epoch ended
    cb.on_epoch_end({"epoch": 2, **METRICS, "test_top1_err": 29.0}, "ckpt.pt")
    summary = dict(status="completed", error="", epochs_run=2, wall_seconds=4.5, device="cpu",
                   final_top1_err=29.0, final_top5_err=6.0,
                   final_val_top1_err=30.0, best_val_top1_err=29.5)
    cb.on_run_end(summary)
    trials, epochs = read_results(root).to_pandas()
    t = trials.iloc[0]
    assert len(trials) == 1 and t["status"] == "completed" and t["final_top1_err"] == 29.0
    assert t["tune_trial"] == "x_7" and t["git_commit"] == "deadbee" and t["device"] == "cpu"
    import json
    assert json.loads(t["versions"]) == {"torch": "2.14", "ray": "2.60"}
    assert list(epochs["epoch"]) == [1, 2] and list(epochs["source_class_counts"][0]) == [3, 0, 5]


def test_store_callback_on_other_ranks_writes_nothing(tmp_path):
    root = tmp_path / "sw"
    cb = StoreCallback(ResultStore(str(root)), "t", RunConfig(), {})
    cb.on_run_start(RunConfig(), {"rank": 1})
    cb.on_epoch_end({"epoch": 1, **METRICS}, None)
    cb.on_run_end({"status": "completed"})
    assert not root.exists() or not list(root.rglob("*.parquet"))


def test_store_callback_records_a_failure(tmp_path):
    root = str(tmp_path / "sw")
    cb = StoreCallback(ResultStore(root), "t", RunConfig(), {})
    cb.on_run_start(RunConfig(), {})
    cb.on_epoch_end({"epoch": 1, **METRICS}, None)
    cb.record_failure("RuntimeError: loss is NaN")
    t = read_results(root).trials.to_pylist()[0]
    assert t["status"] == "failed" and "NaN" in t["error"] and t["epochs_run"] == 1


def _sweep_with_runs(root: Path) -> ResultStore:
    st = ResultStore(str(root))
    for i, (m, err) in enumerate([("cutmix", 4.0), ("hardmix", 3.5), ("hardmix", 3.7)]):
        write_run(st, f"t{i}", config(augment__method=m, seed=i, optim__epochs=2), top1=err)
    st.write_trial({**config(), "trial_id": "t9", "status": "completed", "new_col": 1.5})
    return st


def test_duckdb_reads_the_raw_files(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _sweep_with_runs(tmp_path / "sw")
    glob = f"{tmp_path}/sw/trials/*/*.parquet"
    rows = duckdb.sql(f"""
        SELECT trial_id, status, "augment.method", new_col FROM read_parquet('{glob}',
            union_by_name = true, hive_partitioning = true)
        QUALIFY row_number() OVER (PARTITION BY sweep, trial_id ORDER BY written_at DESC) = 1
        ORDER BY trial_id""").fetchall()
    assert [r[:3] for r in rows] == [("t0", "completed", "cutmix"), ("t1", "completed", "hardmix"),
                                     ("t2", "completed", "hardmix"), ("t9", "completed", "hardmix")]
    assert rows[-1][3] == 1.5 and rows[0][3] is None


def test_polars_reads_the_raw_files(tmp_path):
    pl = pytest.importorskip("polars")
    _sweep_with_runs(tmp_path / "sw")
    files = sorted(str(p) for p in (tmp_path / "sw" / "trials").rglob("*.parquet"))
    df = pl.concat([pl.read_parquet(f, hive_partitioning=True) for f in files],
                   how="diagonal_relaxed")
    latest = df.sort("written_at").group_by(["sweep", "trial_id"]).last().sort("trial_id")
    assert latest["trial_id"].to_list() == ["t0", "t1", "t2", "t9"]
    assert latest["final_top1_err"].to_list()[:3] == [4.0, 3.5, 3.7]
    ep = pl.concat([pl.read_parquet(str(p), hive_partitioning=True)
                    for p in (tmp_path / "sw" / "epochs").rglob("*.parquet")],
                   how="diagonal_relaxed")
    assert ep.height == 6 and "source_class_counts" in ep.columns
