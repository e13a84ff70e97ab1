"""The researcher's toolbox (issue 16): the store's folders read directly by pandas, polars,
DuckDB and pyarrow; export and compaction (under concurrent writers); W&B and MLflow for runs and
sweeps (offline); timm models; TensorBoard HParams of a sweep; sweep progress and its ETA.

Results come from the real code paths: ``hardmix.train.train`` runs on synthetic data with the
CLI's writers (:func:`hardmix.commands.run_callbacks`), and one tiny Ray sweep (module fixture
``ray_sweep``) that several tests read.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing as mp
import struct
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ablations import compaction as compaction_mod
from ablations import reader as reader_mod
from ablations.store import SCHEMA_VERSION, ResultStore, read_results
from hardmix.cli import main
from hardmix.config import RunConfig, SweepConfig, load_config
from test_store import _concurrent_writer  # the writer process of both concurrency tests

TINY = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
        "optim.epochs=2", "output.progress=false", "optim.lr=0.05", "device=cpu",
        "output.image_grid=false"]
#: TINY for a timm model: smallnet's width is a field a timm model does not read (refused).
TIMM_TINY = [o for o in TINY if not o.startswith("model.width=")]
METHODS = ("none", "cutmix", "hardmix")


def _train(root: Path, sweep: str, trial_id: str, *overrides: str) -> dict:
    """One run as ``hardmix train`` writes it (store, TensorBoard, trackers), into sweep
    ``root/sweep``."""
    from hardmix.commands import run_callbacks
    from hardmix.train import train

    timm = any(o.startswith("model.name=timm:") for o in overrides)
    cfg = load_config(RunConfig, None, None, (TIMM_TINY if timm else TINY)
                      + [f"output.dir={root}/runs", *overrides])
    return train(cfg, run_callbacks(cfg, str(root / sweep), trial_id), root / "runs" / trial_id)


@pytest.fixture(scope="module")
def runs_sweep(tmp_path_factory) -> Path:
    """Three 2-epoch runs (none, CutMix, HardMix) written into one sweep folder."""
    root = tmp_path_factory.mktemp("runs")
    for seed, method in enumerate(METHODS):
        assert _train(root, "sw", f"{method}-s{seed}", f"augment.method={method}",
                      f"seed={seed}")["status"] == "completed"
    return root / "sw"


# --------------------------------------------------------------------------------------------
# 1. The folders read directly
# --------------------------------------------------------------------------------------------


def direct_reads(sweep: Path) -> dict[str, dict]:
    """Each reader's latest rows per trial / per (trial, epoch), deduplicated by the reader
    itself: ``{reader: {"trials": [dict], "epochs": [dict]}}``, sorted by key."""
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as ds

    keys = {"trials": ["sweep", "trial_id"], "epochs": ["sweep", "trial_id", "epoch"]}
    out: dict[str, dict] = {}
    for table, key in keys.items():
        folder = str(sweep / table)
        frames = {
            "pandas": pd.read_parquet(folder),
            "polars": pl.read_parquet(folder, hive_partitioning=True).to_pandas(),
            "polars_scan": pl.scan_parquet(folder, hive_partitioning=True).collect().to_pandas(),
            "pyarrow": ds.dataset(folder, format="parquet", partitioning="hive").to_table()
                         .to_pandas(),
        }
        for name, df in frames.items():
            df = df.assign(sweep=df["sweep"].astype(str))
            latest = (df.sort_values("written_at").groupby(key, observed=True).tail(1)
                      .sort_values(key))
            out.setdefault(name, {})[table] = latest.to_dict("records")
        rel = duckdb.sql(f"""
            SELECT * FROM read_parquet('{folder}/*/*.parquet', hive_partitioning = true)
            QUALIFY row_number() OVER (PARTITION BY {', '.join(key)}
                                       ORDER BY written_at DESC) = 1
            ORDER BY {', '.join(key)}""")
        out.setdefault("duckdb", {})[table] = rel.df().to_dict("records")
    return out


def _isnull(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def check_direct_reads(sweep: Path, n_trials: int, n_epochs: int) -> dict:
    """All four readers (five ways) agree with read_results on counts, and NULL where a field
    or metric does not apply: a ``none`` trial's criterion, a CutMix trial's hard share."""
    res = read_results(str(sweep))
    assert (res.trials.num_rows, res.epochs.num_rows) == (n_trials, n_epochs)
    methods = dict(zip(res.trials.column("trial_id").to_pylist(),
                       res.trials.column("augment.method").to_pylist()))
    reads = direct_reads(sweep)
    assert set(reads) == {"pandas", "polars", "polars_scan", "pyarrow", "duckdb"}
    for name, tables in reads.items():
        trials, epochs = tables["trials"], tables["epochs"]
        assert len(trials) == n_trials and len(epochs) == n_epochs, name
        assert {t["sweep"] for t in trials} == {sweep.name}, name
        assert {t["trial_id"]: t["augment.method"] for t in trials} == methods, name
        for t in trials:
            assert t["status"] == "completed", name
            if t["augment.method"] == "none":
                assert _isnull(t["augment.criterion"]) and _isnull(t["augment.alpha"]), name
            if t["augment.method"] == "hardmix":
                assert t["augment.criterion"] == "misclassified", name
        for e in epochs:
            method = methods[e["trial_id"]]
            assert _isnull(e["hard_share"]) == (method != "hardmix"), (name, e["trial_id"])
            assert _isnull(e["mixed_rate"]) == (method == "none"), (name, e["trial_id"])
            assert 0 <= e["test_top1_err"] <= 100
    return reads


def test_four_readers_read_a_fresh_sweep_directly(runs_sweep):
    files = list(runs_sweep.rglob("*.parquet"))
    assert len(files) == 12  # 2 trial rows (running, final) + 2 epoch files per run
    check_direct_reads(runs_sweep, n_trials=3, n_epochs=6)
    schemas = {tuple(pq.read_schema(f).names) for f in (runs_sweep / "trials").rglob("*.parquet")}
    assert len(schemas) == 1 and "sweep" not in next(iter(schemas))  # one layout, no sweep column


def _legacy_sweep(root: Path) -> Path:
    """A sweep as hardmix wrote it before schema version 3: ``sweep`` inside the files (as well
    as in the folder), a test-selected column since dropped, a column whose only value is NULL
    typed ``null``, fewer config columns, CutMix's ``hard_share`` stored as 0.0; then a file of
    today's writer for a new trial."""
    stamp = datetime(2025, 6, 1, tzinfo=timezone.utc)
    sweep = root / "old"
    for table in ("trials", "epochs"):
        (sweep / table / "sweep=old").mkdir(parents=True)
    for i, method in enumerate(("cutmix", "hardmix")):
        for status in ("running", "completed"):
            pq.write_table(pa.table({
                "sweep": ["old"], "trial_id": [f"t{i}"], "status": [status],
                "final_top1_err": [10.0 + i if status == "completed" else None],
                "best_top1_err": [9.0], "precision": pa.nulls(1), "attempt": [1],
                "augment.method": [method], "augment.criterion": ["misclassified"],
                "augment.alpha": [1.0], "seed": [i], "schema_version": [2],
                "written_at": pa.array([stamp.replace(minute=2 * i + (status == "completed"))],
                                       pa.timestamp("us", tz="UTC"))}),
                sweep / "trials" / "sweep=old" / f"t{i}-{status}.parquet")
        pq.write_table(pa.table({
            "sweep": ["old"], "trial_id": [f"t{i}"], "epoch": [1], "test_top1_err": [12.0],
            "hard_share": [0.0 if method == "cutmix" else 0.4], "mixed_rate": [1.0],
            "schema_version": [2], "written_at": pa.array([stamp], pa.timestamp("us", tz="UTC"))}),
            sweep / "epochs" / "sweep=old" / f"t{i}-e1.parquet")
    from results_fixtures import config, write_run
    write_run(ResultStore(str(sweep)), "t2", config(augment__method="none", optim__epochs=1),
              top1=11.0)
    return sweep


def test_compaction_makes_an_old_sweep_readable_by_every_reader(tmp_path):
    pd = pytest.importorskip("pandas")
    sweep = _legacy_sweep(tmp_path)
    with pytest.raises((pa.ArrowTypeError, pa.ArrowInvalid)):  # what breaks today
        pd.read_parquet(sweep / "trials")
    before = read_results(str(sweep))

    done = ResultStore(str(sweep)).compact()
    t, e = done.tables["trials"], done.tables["epochs"]
    assert (t.files_before, t.files_after, t.rows) == (6, 1, 6)
    assert (e.files_before, e.files_after, e.rows) == (3, 1, 3)
    after = read_results(str(sweep))
    for table in ("trials", "epochs"):  # the same rows, now in today's schema
        old = getattr(before, table).drop_columns(["schema_version"])
        assert getattr(after, table).drop_columns(["schema_version"]).equals(old), table
    assert after.rows_read == before.rows_read == {"trials": 6, "epochs": 3}
    assert set(after.trials.column("schema_version").to_pylist()) == {SCHEMA_VERSION}
    reads = check_direct_reads(sweep, n_trials=3, n_epochs=3)
    cutmix = [r for r in reads["pandas"]["trials"] if r["trial_id"] == "t0"][0]
    assert _isnull(cutmix["augment.criterion"]) and "best_top1_err" not in cutmix


# --------------------------------------------------------------------------------------------
# 2. Export
# --------------------------------------------------------------------------------------------


def _cli(*argv: str, capsys) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_writes_the_deduplicated_rows_in_three_shapes(runs_sweep, tmp_path, capsys):
    duckdb = pytest.importorskip("duckdb")
    res = read_results(str(runs_sweep))
    rc, out, _ = _cli("export", str(runs_sweep), "--out", str(tmp_path / "dir"), capsys=capsys)
    assert rc == 0 and "exported 3 trials and 6 epoch rows of sw" in out
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["epochs.parquet",
                                                                      "trials.parquet"]
    for table in ("trials", "epochs"):
        got = pq.read_table(tmp_path / "dir" / f"{table}.parquet")
        assert got.equals(getattr(res, table)), table  # sweep as a plain column, same rows
        note = json.loads(got.schema.metadata[b"hardmix.export"])
        assert note["sweeps"] == ["sw"] and note["schema_version"] == SCHEMA_VERSION

    assert _cli("export", str(runs_sweep), "--out", str(tmp_path / "b.parquet"),
                capsys=capsys)[0] == 0
    assert pq.read_table(tmp_path / "b.trials.parquet").equals(res.trials)
    assert pq.read_table(tmp_path / "b.epochs.parquet").equals(res.epochs)
    assert not (tmp_path / "b.parquet").exists()

    assert _cli("export", str(runs_sweep), "--out", str(tmp_path / "b.duckdb"),
                capsys=capsys)[0] == 0
    con = duckdb.connect(str(tmp_path / "b.duckdb"), read_only=True)
    rows = dict(con.sql('SELECT "augment.method", count(*) FROM trials GROUP BY 1').fetchall())
    assert rows == {m: 1 for m in METHODS}
    shares = dict(con.sql('SELECT t."augment.method", count(e.hard_share) FROM epochs e '
                          'JOIN trials t USING (sweep, trial_id) GROUP BY 1').fetchall())
    assert shares == {"none": 0, "cutmix": 0, "hardmix": 2}  # NULL where it does not apply
    con.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_export_and_compact_refuse_bad_input_with_one_line(runs_sweep, tmp_path, capsys,
                                                           monkeypatch):
    def refused(*argv: str, field: str) -> None:
        rc, out, err = _cli(*argv, capsys=capsys)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith(f"hardmix: error: {field} = "), err

    out = tmp_path / "out"
    out.mkdir()
    refused("export", str(tmp_path / "missing"), "--out", str(out / "x"), field="path")
    (tmp_path / "file").write_text("not a folder")
    refused("export", str(runs_sweep), "--out", str(tmp_path / "file" / "x.parquet"),
            field="--out")
    refused("export", str(runs_sweep), "--out", str(tmp_path / "file"), field="--out")
    refused("export", str(runs_sweep), "--out", "s3://bucket/x.parquet", field="--out")
    (out / "old.trials.parquet").write_text("keep me")
    refused("export", str(runs_sweep), "--out", str(out / "old.parquet"), field="--out")
    assert (out / "old.trials.parquet").read_text() == "keep me"
    monkeypatch.setitem(__import__("sys").modules, "duckdb", None)  # duckdb not installed
    refused("export", str(runs_sweep), "--out", str(out / "x.duckdb"), field="--out")
    assert sorted(p.name for p in out.iterdir()) == ["old.trials.parquet"]  # nothing written
    refused("compact", str(tmp_path / "missing"), field="path")
    refused("compact", str(runs_sweep), "--max-rows", "0", field="--max-rows")
    assert _cli("export", str(runs_sweep), "--out", str(out / "old.parquet"), "--force",
                capsys=capsys)[0] == 0
    assert pq.read_table(out / "old.trials.parquet").num_rows == 3


# --------------------------------------------------------------------------------------------
# 2. Compaction
# --------------------------------------------------------------------------------------------


def _write_trials(root: str, prefix: str, n: int, epochs: int = 3) -> None:
    st = ResultStore(root)
    for i in range(n):
        tid = f"{prefix}{i}"
        st.write_trial({"trial_id": tid, "status": "running", "seed": i})
        for e in range(1, epochs + 1):
            st.write_epochs(tid, [{"epoch": e, "test_top1_err": 10.0 * i + e}])
        st.write_trial({"trial_id": tid, "status": "completed", "seed": i,
                        "final_top1_err": 10.0 * i + epochs})


def _visible(root: Path, table: str) -> list[Path]:
    return sorted(p for p in (root / table).rglob("*.parquet") if not p.name.startswith("."))


def test_compaction_keeps_every_row_and_later_writes_still_win(tmp_path, capsys):
    root = tmp_path / "sw"
    _write_trials(str(root), "t", 4)
    before = read_results(str(root))
    rc, out, _ = _cli("compact", str(root), capsys=capsys)
    assert rc == 0 and "trials: 8 files -> 1 (8 merged into 1, 8 rows)" in out
    assert "epochs: 12 files -> 1 (12 merged into 1, 12 rows)" in out
    after = read_results(str(root))
    assert after.trials.equals(before.trials) and after.epochs.equals(before.epochs)
    assert after.rows_read == {"trials": 8, "epochs": 12} and after.files == 2

    st = ResultStore(str(root))  # a retried trial writes again after the compaction
    st.write_trial({"trial_id": "t1", "status": "failed", "error": "node lost", "seed": 1})
    st.write_epochs("t1", [{"epoch": 3, "test_top1_err": 99.0}])
    assert read_results(str(root)).trials.to_pandas().set_index("trial_id").loc[
        "t1", "status"] == "failed"
    again = st.compact()  # the compacted file and the new one merge: still one per table
    assert [again.tables[t].files_after for t in ("trials", "epochs")] == [1, 1]
    res = read_results(str(root))
    trials, epochs = res.to_pandas()
    assert trials.set_index("trial_id")["status"].to_dict() == {
        "t0": "completed", "t1": "failed", "t2": "completed", "t3": "completed"}
    assert epochs.set_index(["trial_id", "epoch"]).loc[("t1", 3), "test_top1_err"] == 99.0
    assert res.rows_read == {"trials": 9, "epochs": 13}
    assert st.compact().tables["trials"].written == 0  # nothing left to merge


def test_compaction_respects_max_rows_and_leaves_full_files(tmp_path):
    root = tmp_path / "sw"
    _write_trials(str(root), "t", 5, epochs=2)  # 10 trial rows, 10 epoch rows
    st = ResultStore(str(root))
    done = st.compact(max_rows=4)
    assert [done.tables[t].written for t in ("trials", "epochs")] == [3, 3]
    sizes = sorted(pq.ParquetFile(p).metadata.num_rows for p in _visible(root, "epochs"))
    assert sizes == [2, 4, 4]
    again = st.compact(max_rows=4)  # full files stay; the lone small one has nothing to join
    assert again.tables["epochs"].written == 0 and len(_visible(root, "epochs")) == 3
    assert read_results(str(root)).rows_read == {"trials": 10, "epochs": 10}


def test_compaction_killed_before_or_after_publishing_loses_nothing(tmp_path, monkeypatch):
    root = tmp_path / "sw"
    _write_trials(str(root), "t", 3)
    want = read_results(str(root))
    st = ResultStore(str(root))

    real_write = pq.write_table

    def dies_writing(table, where, **kw):
        raise KeyboardInterrupt  # killed while writing the compacted file

    monkeypatch.setattr(pq, "write_table", dies_writing)
    with pytest.raises(KeyboardInterrupt):
        st.compact()
    monkeypatch.setattr(pq, "write_table", real_write)
    assert len(_visible(root, "trials")) == 6  # sources untouched, no visible partial file
    assert read_results(str(root)).trials.equals(want.trials)

    deleted = []
    real_delete = compaction_mod._delete_merged

    def dies_deleting(fs, path):
        if deleted:
            raise KeyboardInterrupt  # killed after publishing, one source deleted
        deleted.append(path)
        real_delete(fs, path)

    monkeypatch.setattr(compaction_mod, "_delete_merged", dies_deleting)
    with pytest.raises(KeyboardInterrupt):
        st.compact()
    monkeypatch.undo()
    mid = read_results(str(root))  # rows twice (sources + compacted file), deduplicated
    assert mid.rows_read["trials"] == 6 + 5 and mid.trials.equals(want.trials)
    done = ResultStore(str(root)).compact()
    assert done.tables["trials"].copies_dropped == 5
    after = read_results(str(root))
    assert after.rows_read == {"trials": 6, "epochs": 9}
    assert after.trials.equals(want.trials) and after.epochs.equals(want.epochs)


def test_reader_lists_again_when_a_compaction_removes_files_under_it(tmp_path, monkeypatch):
    root = tmp_path / "sw"
    _write_trials(str(root), "t", 3)
    real_read = reader_mod.read_file
    calls = []

    def read_then_compact(fs, path, sweep, kind):
        if not calls:  # the reader has listed every file; a compaction runs now
            calls.append(path)
            ResultStore(str(root)).compact()
        return real_read(fs, path, sweep, kind)

    monkeypatch.setattr(reader_mod, "read_file", read_then_compact)
    res = read_results(str(root))
    assert calls and res.trials.num_rows == 3 and res.epochs.num_rows == 9
    assert set(res.trials.column("status").to_pylist()) == {"completed"}


def _compactor(root, stop, merged) -> None:
    st = ResultStore(root)
    while not stop.is_set():
        done = st.compact()
        with merged.get_lock():
            merged.value += sum(t.merged for t in done.tables.values())


@pytest.mark.timeout(300)
def test_concurrent_writers_readers_and_compactions_never_lose_a_row(tmp_path):
    """Writers, two compactors and a reader at once: every read sees every row already read
    before (nothing vanishes, a trial's status never goes back), and at the end every row is
    there exactly once."""
    root = str(tmp_path / "sw")
    workers, n = 3, 5
    # spawn, not fork: the test process may hold Ray's threads (a forked child can deadlock)
    ctx = mp.get_context("spawn")
    stop, merged = ctx.Event(), ctx.Value("i", 0)
    compactors = [ctx.Process(target=_compactor, args=(root, stop, merged)) for _ in range(2)]
    ResultStore(root).write_trial({"trial_id": "first", "status": "completed"})
    for p in compactors:
        p.start()
    seen_epochs: set = set()
    seen_done: set = set()
    reads = 0
    try:
        with ctx.Pool(workers) as pool:
            job = pool.map_async(_concurrent_writer, [(root, w, n) for w in range(workers)])
            while not job.ready() or reads < 3:
                res = read_results(root)
                epochs = set(zip(res.epochs.column("trial_id").to_pylist(),
                                 res.epochs.column("epoch").to_pylist()))
                done = {t for t, s in zip(res.trials.column("trial_id").to_pylist(),
                                          res.trials.column("status").to_pylist())
                        if s == "completed"}
                assert seen_epochs <= epochs and seen_done <= done
                seen_epochs, seen_done = epochs, done
                reads += 1
            assert sorted(job.get()) == list(range(workers))
    finally:
        stop.set()
        for p in compactors:
            p.join(60)
    assert [p.exitcode for p in compactors] == [0, 0]  # no compaction tripped over another
    assert merged.value > 0 and reads >= 3

    ResultStore(root).compact()
    res = read_results(root)
    total = workers * n
    assert res.rows_read == {"trials": 2 * total + 1, "epochs": 3 * total}
    assert len(_visible(Path(root), "trials")) == len(_visible(Path(root), "epochs")) == 1
    trials, epochs = res.to_pandas()
    expected = {f"w{w}-t{i}": 100.0 * w + i for w in range(workers) for i in range(n)}
    got = trials[trials.trial_id != "first"]
    assert dict(zip(got.trial_id, got.final_top1_err)) == expected
    assert set(got.status) == {"completed"} and len(epochs) == 3 * total
    for tid, e, err in zip(epochs.trial_id, epochs.epoch, epochs.test_top1_err):
        assert err == expected[tid] + e


# --------------------------------------------------------------------------------------------
# 3. Trackers (offline) -- hardmix train
# --------------------------------------------------------------------------------------------


def wandb_runs(folder: Path) -> dict[str, dict]:
    """W&B offline runs under ``folder``, read from their transaction logs with wandb's own
    record protobuf (an offline run has no server to ask): ``{name: {"config", "history"}}``.
    The log is LevelDB-style: a 7-byte header, then 32 KiB blocks of records (CRC32, length,
    type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = {}
    for path in glob.glob(str(folder / "**" / "offline-run-*" / "run-*.wandb"), recursive=True):
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B"
        pos, block, chunk = 7, 32768, b""
        run = {"config": {}, "history": []}
        name = None
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if size == 0 and kind == 0:
                pos += left
                continue
            chunk += data[pos + 7:pos + 7 + size]
            pos += 7 + size
            if kind not in (1, 4):
                continue
            record = pb.Record.FromString(chunk)
            chunk = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                name = record.run.display_name
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.run.config.update})
            elif which == "config":
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.config.update if i.key})
            elif which == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
        runs[name] = run
    return runs


def same_series(got: list[tuple], want: list[tuple]) -> bool:
    """Same steps, values equal up to float rounding."""
    got, want = sorted(got), sorted(want)
    return [g[0] for g in got] == [w[0] for w in want] and \
        [g[1] for g in got] == pytest.approx([w[1] for w in want])


def _config_value(value):
    return value.get("value") if isinstance(value, dict) and "value" in value else value


def mlflow_runs(uri: str) -> dict[str, dict]:
    """MLflow runs of every experiment: ``{run name: {"params", "metrics": {name: [(step,
    value)]}, "status"}}``."""
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri)
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            metrics = {k: sorted((m.step, m.value) for m in client.get_metric_history(
                run.info.run_id, k)) for k in run.data.metrics}
            out[run.info.run_name] = {"params": run.data.params, "metrics": metrics,
                                      "status": run.info.status, "experiment": exp.name}
    return out


def _tracker_env(monkeypatch, tmp_path: Path) -> str:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "wb").mkdir()
    for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"),
                           WANDB_SILENT="true", MLFLOW_TRACKING_URI=uri).items():
        monkeypatch.setenv(key, value)
    import mlflow
    mlflow.set_tracking_uri(uri)  # the process-wide URI another test's tracker may have set
    return uri


def test_train_logs_its_metrics_to_wandb_offline_and_mlflow(tmp_path, monkeypatch, capsys):
    uri = _tracker_env(monkeypatch, tmp_path)
    argv = ["train"] + [a for s in TINY + [f"output.dir={tmp_path}/runs", "output.name=r1",
                                           "output.loggers=[wandb, mlflow]",
                                           "augment.method=cutmix"] for a in ("--set", s)]
    assert main(argv) == 0
    capsys.readouterr()
    epochs = read_results(str(tmp_path / "runs" / "r1")).epochs.to_pandas()
    want = [(int(e), v) for e, v in zip(epochs.epoch, epochs.val_top1_err)]
    assert len(want) == 2

    ml = mlflow_runs(uri)
    assert list(ml) == ["r1"] and ml["r1"]["status"] == "FINISHED"
    assert same_series(ml["r1"]["metrics"]["val_top1_err"], want)
    assert "hard_share" not in ml["r1"]["metrics"]  # NULL for CutMix: never logged
    assert ml["r1"]["params"]["augment.method"] == "cutmix"
    assert ml["r1"]["params"]["augment.criterion"] == ""  # does not apply to CutMix

    wb = wandb_runs(tmp_path / "wb")
    assert list(wb) == ["r1"]
    history = [(h["_step"], h["val_top1_err"]) for h in wb["r1"]["history"]]
    assert same_series(history, want)
    assert _config_value(wb["r1"]["config"]["augment.method"]) == "cutmix"


# --------------------------------------------------------------------------------------------
# 4. timm models
# --------------------------------------------------------------------------------------------


def test_timm_model_builds_with_the_data_shape_trains_and_is_costed(tmp_path):
    pytest.importorskip("timm")
    import torch

    from hardmix.config import ModelConfig
    from hardmix.models import build_model
    from tune.plan import trial_cost

    model = build_model(ModelConfig(name="timm:resnet10t"), num_classes=7, in_channels=1,
                        image_size=16)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)

    summary = _train(tmp_path, "sw", "timm-s0", "model.name=timm:resnet10t", "optim.epochs=1",
                     "augment.method=hardmix")
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    trials = read_results(str(tmp_path / "sw")).trials.to_pandas()
    assert list(trials["model.name"]) == ["timm:resnet10t"]

    run = load_config(RunConfig, None, None, TIMM_TINY + ["model.name=timm:resnet10t"])
    passes, flops = trial_cost(run, {})
    assert passes == 2 * 461 and flops and flops > 0

    from hardmix.errors import ConfigError
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="timm:no_such_model_x"), 10, 3, 16)


def test_timm_kwargs_reach_the_model_and_a_kwarg_it_does_not_take_is_one_line(tmp_path, capsys):
    """``model.kwargs`` go to timm.create_model (drop_path_rate builds DropPath layers); one the
    model does not take, or one hardmix sets itself, is refused before anything is written."""
    pytest.importorskip("timm")
    from hardmix.config import ModelConfig
    from hardmix.models import build_model

    def drop_paths(kwargs: dict) -> list[float]:
        model = build_model(ModelConfig(name="timm:test_resnet", kwargs=kwargs), 5, 3, 32)
        return [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]

    assert not drop_paths({}) and max(drop_paths({"drop_path_rate": 0.2})) == pytest.approx(0.2)
    for kwargs, field in (("{no_such_arg: 1}", "model.kwargs"),
                          ("{num_classes: 3}", "model.kwargs.num_classes")):
        code = main(["train", *[a for o in TIMM_TINY for a in ("--set", o)], "--set",
                     "model.name=timm:test_resnet", "--set", f"model.kwargs={kwargs}", "--set",
                     f"output.dir={tmp_path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"hardmix: error: {field} = ")
        assert not list(tmp_path.iterdir())


def _hub_cache(folder: Path, repo: str, state: dict) -> None:
    """``state`` as the Hugging Face Hub cache holds a downloaded ``model.safetensors``."""
    from safetensors.torch import save_file

    snapshot = folder / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


def test_timm_pretrained_loads_cached_weights_and_offline_without_them_is_one_line(
        tmp_path, monkeypatch, capsys):
    """``model.pretrained``: timm's weights from the local Hub cache (the classifier is new);
    offline (HF_HUB_OFFLINE) without them in the cache, one line and exit 2 before anything is
    written, at once (no download is tried); a model timm has no weights for, likewise."""
    pytest.importorskip("timm")
    import huggingface_hub.constants as hub
    import timm
    import torch

    from hardmix.config import ModelConfig
    from hardmix.models import build_model

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ["train", *[a for o in TIMM_TINY for a in ("--set", o)], "--set",
            "model.name=timm:test_resnet", "--set", "model.pretrained=true", "--set",
            f"output.dir={tmp_path / 'runs'}"]
    t0 = time.perf_counter()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and time.perf_counter() - t0 < 20
    assert err[0].startswith("hardmix: error: model.pretrained = True: ") and \
        "HF_HUB_OFFLINE" in err[0] and "not in the local cache" in err[0]
    assert not (tmp_path / "runs").exists()

    torch.manual_seed(3)
    weights = timm.create_model("test_resnet").state_dict()  # the "pretrained" ImageNet model
    _hub_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", weights)
    model = build_model(ModelConfig(name="timm:test_resnet", pretrained=True), 5, 3, 32)
    got = model.state_dict()
    assert got["fc.weight"].shape == (5, weights["fc.weight"].shape[1])  # a new classifier
    assert all(torch.equal(got[k], v) for k, v in weights.items() if not k.startswith("fc."))
    assert main([*args, "--set", "optim.epochs=1"]) == 0  # the whole run, from the cache

    code = main(["train", *[a for o in TIMM_TINY for a in ("--set", o)], "--set",
                 "model.name=timm:botnet50ts_256", "--set", "model.pretrained=true", "--set",
                 f"output.dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.pretrained" in err[0] and \
        "no pretrained weights" in err[0]


# --------------------------------------------------------------------------------------------
# 5. TensorBoard HParams of one run
# --------------------------------------------------------------------------------------------


def read_hparams(run_dir: Path) -> tuple[dict, dict]:
    """``(hparams, {metric: value})`` of a run folder's HParams entry (EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: (v.string_value if v.HasField("string_value") else
                   v.bool_value if v.HasField("bool_value") else v.number_value)
               for k, v in info.hparams.items()}
    metrics = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]
               if t.startswith("hparam/")}
    return hparams, metrics


def test_hparams_list_exactly_the_given_fields_with_inert_ones_null(tmp_path):
    from hardmix.tensorboard import TensorBoardCallback

    cfg = load_config(RunConfig, None, None, ["augment.method=none", "seed=3"])
    cb = TensorBoardCallback(hparams=["seed", "augment.method", "augment.criterion"])
    cb.on_run_start(cfg, {"run_dir": str(tmp_path), "rank": 0})
    cb.on_run_end({"status": "completed", "epochs_run": 2, "final_val_top1_err": 20.0,
                   "final_top1_err": 21.0, "final_top5_err": 5.0, "best_val_top1_err": 19.0})
    hparams, metrics = read_hparams(tmp_path)
    assert hparams == {"seed": 3.0, "augment.method": "none", "augment.criterion": "null"}
    assert metrics == {"hparam/final_val_top1_err": 20.0, "hparam/final_top1_err": 21.0,
                       "hparam/final_top5_err": 5.0, "hparam/best_val_top1_err": 19.0}


# --------------------------------------------------------------------------------------------
# 6. Progress: done/total, elapsed, ETA
# --------------------------------------------------------------------------------------------


def test_eta_is_the_work_left_at_the_mean_trial_time_over_the_slots():
    from tune.progress import eta_seconds

    assert eta_seconds([], [5.0], pending=3, slots=2) is None  # nothing ended: no mean yet
    # mean 10 s; pending 4 x 10 = 40; running trials lack 10-4=6 and 0 (past the mean): 46 / 2
    assert eta_seconds([8.0, 12.0], [4.0, 15.0], pending=4, slots=2) == 23.0
    assert eta_seconds([10.0], [], pending=3, slots=1) == 30.0
    assert eta_seconds([10.0], [], pending=0, slots=4) == 0.0


def test_a_resumed_trial_counts_as_the_whole_run_it_stands_for():
    """Resumed at epoch 50 of 60, a trial reports 10 epochs in 60 s: as a full run that is
    360 s, so 3 pending trials after it are 3 x 360 s of work, not 3 x 60 s."""
    from tune.progress import eta_seconds, seconds_from_start

    resumed = {"time_total_s": 60.0, "epoch": 60, "training_iteration": 10}
    assert seconds_from_start(resumed) == 360.0
    assert seconds_from_start({"time_total_s": 30.0, "epoch": 3, "training_iteration": 3}) == 30.0
    assert seconds_from_start({"epoch": 3}) is None
    assert eta_seconds([seconds_from_start(resumed)], [], pending=3, slots=1) == 1080.0


class _Named(SimpleNamespace):
    def __str__(self) -> str:
        return self.name

    def get_error(self):
        return None


def _fake(tid, status, epoch=0, seconds=None, value=None) -> _Named:
    result = {"epoch": epoch, "epochs_planned": 4}
    if value is not None:
        result["val_top1_err"] = value
    if seconds is not None:
        result["time_total_s"] = seconds
    return _Named(trial_id=tid, name=tid, status=status, last_result=result)


def test_plain_progress_lines_show_done_of_total_elapsed_and_eta(monkeypatch):
    from tune.progress import SweepProgress

    monkeypatch.delenv("CI", raising=False)
    now = [1000.0]
    out = io.StringIO()  # not a terminal: plain lines
    rep = SweepProgress("val_top1_err", epochs=4, total=6, label="demo", out=out,
                        clock=lambda: now[0])
    trials = [_fake("c000-s0", "RUNNING", 1, seconds=20.0), _fake("c001-s0", "RUNNING", 1, 15.0)]
    now[0] += 30
    rep.report(trials, done=False)
    assert out.getvalue().splitlines()[-1] == \
        "[demo] 2 running, 0 done, 0 failed of 6 | 0/6 ended, elapsed 0m30s, ETA —"
    trials = [_fake("c000-s0", "TERMINATED", 4, seconds=100.0, value=12.5),
              _fake("c001-s0", "TERMINATED", 2, seconds=50.0, value=40.0),
              _fake("c002-s0", "RUNNING", 2, seconds=45.0), _fake("c003-s0", "RUNNING", 0)]
    now[0] += 120
    assert rep.should_report(trials)  # trials ended
    rep.report(trials, done=False)
    lines = out.getvalue().splitlines()
    assert lines[-3:-1] == ["  done    c000-s0  val_top1_err 12.50",
                            "  pruned  c001-s0  at epoch 2  val_top1_err 40.00"]
    # mean 75 s; 2 pending (6 total - 4 created) x 75 + (75-45) + (75-0) = 255 s over 2 slots
    assert lines[-1] == ("[demo] 2 running, 1 done, 1 pruned, 0 failed of 6 | best val_top1_err "
                         "12.50 (c000-s0) | 2/6 ended, elapsed 2m30s, ETA 2m07s")
    assert not rep.should_report(trials)  # nothing new, heartbeat not due (60 s)
    now[0] += 61
    assert rep.should_report(trials)


def test_live_progress_redraws_one_bar_and_ends_with_a_newline(monkeypatch):
    from tune.progress import SweepProgress, is_live, progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "200")  # the bar is cut to the terminal width
    assert is_live(Terminal()) and not is_live(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not is_live(Terminal())  # CI logs get plain lines
    monkeypatch.delenv("CI")
    assert progress_bar(1, 4, width=8) == "██░░░░░░" and progress_bar(0, 0, 4) == "░░░░"

    now = [0.0]
    out = Terminal()
    rep = SweepProgress("val_top1_err", epochs=4, total=2, label="demo", out=out,
                        clock=lambda: now[0])
    now[0] = 5.0
    rep.report([_fake("a", "RUNNING", 1, 5.0), _fake("b", "PENDING")], done=False)
    assert out.getvalue().startswith("\r\x1b[K[demo] ░░░░░░░░░░░░░░░░░░░░ 0/2 ended")
    assert "\n" not in out.getvalue()  # one line, redrawn
    now[0] = 5.5
    assert not rep.should_report([_fake("a", "RUNNING", 1, 5.0), _fake("b", "PENDING")])
    now[0] = 20.0
    trials = [_fake("a", "TERMINATED", 4, 20.0, 10.0), _fake("b", "TERMINATED", 4, 15.0, 9.0)]
    rep.report(trials, done=True)
    text = out.getvalue()
    assert "\r\x1b[K  done    a  val_top1_err 10.00\n" in text
    last = text.rsplit("\r\x1b[K", 1)[1]
    assert last.startswith("[demo] " + "█" * 20 + " 2/2 ended, elapsed 0m20s, ETA 0m00s")
    assert last.endswith("best val_top1_err 9.00 (b)\n")


# --------------------------------------------------------------------------------------------
# 1, 3, 4, 5 on Ray: one tiny sweep with a timm model and both trackers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_sweep(ray_local, tmp_path_factory):
    """A grid over none / CutMix (seed 0) with ``timm:resnet10t``, W&B offline and MLflow at
    its default store, run from an empty working folder; returns ``(sweep folder, mlflow uri,
    wandb folder, outcome, printed summary, working folder)``."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("timm")
    from tune.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("raysweep")
    uri = f"sqlite:///{tmp}/tb/mlflow.db"  # the default: in the sweep folder
    (tmp / "wb").mkdir()
    (tmp / "cwd").mkdir()
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp / "wb")).items():
            mp_env.setenv(key, value)
        for key in ("MLFLOW_TRACKING_URI", "WANDB_SILENT", "HARDMIX_VERBOSE"):
            mp_env.delenv(key, raising=False)
        mp_env.chdir(tmp / "cwd")
        cfg = load_config(SweepConfig, None, None, [
            f"storage={tmp}", "name=tb", "run.data.name=synthetic",
            "run.model.name=timm:resnet10t", "run.optim.epochs=2", "run.data.batch_size=64",
            "run.device=cpu", "run.output.image_grid=false", "report=false", "max_failures=0",
            "max_concurrent_trials=2", "mode=grid", "seeds=[0]",
            "space={augment.method: {values: [none, cutmix]}}",
            "run.output.loggers=[wandb, mlflow]"])
        out = io.StringIO()
        outcome = run_sweep(cfg, out=out)
    return Path(outcome.sweep_dir), uri, tmp / "wb", outcome, out.getvalue(), tmp / "cwd"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_with_a_timm_model_is_read_directly(ray_sweep):
    sweep, _, _, outcome, _, _ = ray_sweep
    assert outcome.counts == {"completed": 2}
    check_direct_reads(sweep, n_trials=2, n_epochs=4)
    trials = read_results(str(sweep)).trials.to_pandas()
    assert set(trials["model.name"]) == {"timm:resnet10t"}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_logs_each_trial_once_to_mlflow_and_wandb(ray_sweep):
    sweep, uri, wb_dir, _, _, _ = ray_sweep
    res = read_results(str(sweep))
    trials = dict(zip(res.trials.column("trial_id").to_pylist(),
                      res.trials.column("augment.method").to_pylist()))
    want = {}
    for t, e, v in zip(res.epochs.column("trial_id").to_pylist(),
                       res.epochs.column("epoch").to_pylist(),
                       res.epochs.column("val_top1_err").to_pylist()):
        want.setdefault(t, []).append((e, v))

    # Run names: the trial id beside its readable name (what varies: the method; the seed).
    named = {"c000-s0": "c000-s0 none-s0", "c001-s0": "c001-s0 cutmix-s0"}
    ml = {k.split(" ")[0]: v for k, v in mlflow_runs(uri).items()}
    assert sorted(mlflow_runs(uri)) == sorted(named.values())  # one run per trial
    assert sorted(ml) == sorted(trials) == ["c000-s0", "c001-s0"]
    for name, run in ml.items():
        assert run["status"] == "FINISHED" and run["experiment"] == "tb"
        assert same_series(run["metrics"]["val_top1_err"], want[name])
        assert run["params"]["augment.method"] == trials[name]
        assert run["params"]["model.name"] == "timm:resnet10t"
        assert not any(k.startswith("config/") for k in run["metrics"])
    assert ml["c000-s0"]["params"]["augment.criterion"] == ""  # `none` has no criterion
    assert "mixed_rate" not in ml["c000-s0"]["metrics"] and "mixed_rate" in ml["c001-s0"]["metrics"]

    # Ray's W&B logging actors flush their offline files after the sweep returns: wait for them
    # (over a minute when the 2 cores are busy)
    deadline = time.time() + 150
    wb = wandb_runs(wb_dir)
    while (None in wb or len(wb) < 2) and time.time() < deadline:
        time.sleep(1)
        wb = wandb_runs(wb_dir)
    assert sorted(wb) == sorted(named.values())
    wb = {k.split(" ")[0]: v for k, v in wb.items()}
    for name, run in wb.items():
        history = [(h["training_iteration"], h["val_top1_err"]) for h in run["history"]]
        assert same_series(history, want[name])
        assert _config_value(run["config"]["augment.method"]) == trials[name]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_hparams_list_only_what_varies_with_final_errors(ray_sweep):
    sweep, _, _, _, _, _ = ray_sweep
    trials = read_results(str(sweep)).trials.to_pandas().set_index("trial_id")
    assert trials["trial_name"].to_dict() == {"c000-s0": "none-s0", "c001-s0": "cutmix-s0"}
    for trial_id, row in trials.iterrows():
        # TensorBoard names a run by its folder: <trial id>/<readable name>
        assert [p.name for p in (sweep / "runs" / trial_id).iterdir() if p.is_dir()
                and list(p.glob("events.out.tfevents.*"))] == [row["trial_name"]]
        hparams, metrics = read_hparams(sweep / "runs" / trial_id / row["trial_name"])
        assert hparams == {"seed": 0.0, "augment.method": row["augment.method"]}
        assert metrics["hparam/final_val_top1_err"] == pytest.approx(row["final_val_top1_err"])
        assert metrics["hparam/final_top1_err"] == pytest.approx(row["final_top1_err"])
        assert metrics["hparam/final_top5_err"] == pytest.approx(row["final_top5_err"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_summary_says_where_each_tracker_wrote_and_nothing_lands_in_the_working_folder(
        ray_sweep):
    sweep, uri, wb_dir, _, text, cwd = ray_sweep
    assert f"  MLflow       experiment tb at {uri}; open with  mlflow ui --backend-store-uri " \
           f"{uri}" in text
    assert f"  W&B          offline runs in {wb_dir}/wandb; upload with  wandb sync " \
           f"{wb_dir}/wandb/offline-run-*" in text
    assert glob.glob(f"{wb_dir}/wandb/offline-run-*") and (sweep / "mlflow.db").is_file()
    assert not list(cwd.iterdir())  # no mlflow.db, mlruns or wandb folder where it ran


def test_dry_run_estimates_the_compute_of_a_timm_model(tmp_path):
    pytest.importorskip("timm")
    from tune.sweep import run_sweep

    cfg = load_config(SweepConfig, None, None, [
        f"storage={tmp_path}", "name=dry", "run.data.name=synthetic",
        "run.model.name=timm:resnet10t", "run.optim.epochs=2", "mode=grid", "seeds=[0, 1]",
        "space={augment.method: {values: [none, hardmix]}}"])
    out = io.StringIO()
    assert run_sweep(cfg, dry_run=True, out=out).dry_run
    text = out.getvalue()
    assert "run: timm:resnet10t on" in text
    assert "compute: 4 trials, 3,688 training image passes in all, about" in text
    assert "FLOP" in text and not (tmp_path / "dry").exists()
