"""What a run's store callback writes, and that the latest write of a trial always wins.

:class:`ablations.store.StoreCallback` is driven here through the callback protocol a run
calls (start, epochs, end or failure), on rank 0 and on another rank, and the rows are read
back with :func:`ablations.store.read_results`. Writes of one trial in a tight loop (the same
microsecond on a fast clock) must still read back as the last one written.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from ablations.store import ResultStore, StoreCallback, read_results
from hardmix.config import RunConfig


def rows(path):
    res = read_results(str(path))
    trials, epochs = res.to_pandas()
    return trials, epochs


def test_a_run_is_recorded_running_then_epoch_by_epoch_then_final(tmp_path):
    st = ResultStore(str(tmp_path / "s"))
    cfg = RunConfig()
    cb = StoreCallback(st, "run-1", extra={"versions": {"extra_lib": "2"}, "tune_trial": "t1"})
    cb.on_run_start(cfg, {"rank": 0, "device": "cpu", "versions": {"torch": "9"},
                          "git_commit": "abc", "threads": 1})
    trials, _ = rows(tmp_path / "s")
    (t,) = trials.to_dict("records")
    assert t["status"] == "running" and t["error"] == "" and t["device"] == "cpu"
    assert t["git_commit"] == "abc" and t["tune_trial"] == "t1" and t["seed"] == cfg.seed
    assert json.loads(t["versions"]) == {"torch": "9", "extra_lib": "2"}  # merged
    for e in (1, 2, 3):
        cb.on_epoch_end({"epoch": e, "train_loss": 1.0 / e})
    _, epochs = rows(tmp_path / "s")
    assert sorted(epochs["epoch"]) == [1, 2, 3]
    cb.on_run_end({"status": "completed", "final_top1_err": 12.5, "not_a_field": 1,
                   "wall_seconds": None})
    trials, _ = rows(tmp_path / "s")
    (t,) = trials.to_dict("records")
    assert t["status"] == "completed" and t["final_top1_err"] == 12.5
    assert t["epochs_run"] == 3 and "not_a_field" not in t  # counted from the epochs written


def test_only_rank_0_writes_and_a_failure_is_recorded(tmp_path):
    st = ResultStore(str(tmp_path / "s"))
    other = StoreCallback(st, "run-2", RunConfig())
    other.on_run_start(None, {"rank": 1})
    other.on_epoch_end({"epoch": 1})
    other.on_run_end({"status": "completed"})
    other.record_failure("boom")
    assert not (tmp_path / "s").exists() or rows(tmp_path / "s")[0].empty
    cb = StoreCallback(st, "run-2", RunConfig())  # the config given here is kept
    cb.on_run_start(None, {})
    cb.on_epoch_end({"epoch": 2})
    cb.record_failure("FloatingPointError: loss is NaN")
    (t,) = rows(tmp_path / "s")[0].to_dict("records")
    assert t["status"] == "failed" and t["error"].startswith("FloatingPointError")
    assert t["epochs_run"] == 2 and t["seed"] == RunConfig().seed


def test_the_last_write_of_a_trial_wins_even_in_a_tight_loop(tmp_path):
    st = ResultStore(str(tmp_path / "s"))
    statuses = ["running", "failed", "running", "pruned", "running", "completed"] * 5
    for s in statuses:
        st.write_trial({"trial_id": "c000-s0", "status": s, "seed": 0})
    (t,) = rows(tmp_path / "s")[0].to_dict("records")
    assert t["status"] == "completed"
    stamps = pq.read_table(st.folder("trials")).column("written_at").to_pylist()
    assert len(set(stamps)) == len(statuses)  # strictly increasing within the process


def test_the_final_row_keeps_the_error_and_counts_no_epoch_as_zero(tmp_path):
    st = ResultStore(str(tmp_path / "s"))
    cb = StoreCallback(st, "run-3", RunConfig())
    cb.on_run_start(None, {"rank": 0})
    cb.on_run_end({"status": "failed", "error": "RuntimeError: boom"})
    (t,) = rows(tmp_path / "s")[0].to_dict("records")
    assert t["error"] == "RuntimeError: boom" and t["epochs_run"] == 0
    early = StoreCallback(st, "run-4", RunConfig())  # died before the run started
    early.record_failure("killed")
    got = {r["trial_id"]: r for r in rows(tmp_path / "s")[0].to_dict("records")}
    assert got["run-4"]["status"] == "failed" and got["run-4"]["epochs_run"] == 0
