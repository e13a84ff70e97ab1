"""What a resume picks: which checkpoint a trial continues from, and what a resumed search
counts as done (:mod:`tune.resume`), read back from real folders and a real results store.

* A trial continues from its newest checkpoint by the epoch its ``hardmix_checkpoint.json``
  records -- across every Tune phase folder (``tune``, ``tune-r1``, ... whose ``checkpoint_*``
  numbering restarts), never another trial's, never one whose metadata is unreadable, never a
  folder outside the Tune phases -- copied out file by file; none at all gives None.
* A search resumed with some seeds of a configuration unfinished: only completed and pruned
  trials are final; a configuration is told to the fresh Optuna study only when every seed
  has a row, with the mean of its finite metric values; the parameters of a configuration are
  read back from its rows, NULL fields left out; follow-up and hand-named trials are not
  main-phase configurations.
* The sweep's bookkeeping (``sweep_state.json``) counts every start and all the time, and an
  unreadable or impossible file is one ConfigError.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import optuna
import pytest

from ablations.store import ResultStore
from hardmix.config import ConfigError, SweepConfig, load_config
from hardmix.checkpoint import checkpoint_path
from tune.checkpoints import stored_checkpoint
from tune.resume import (FINAL, STATE_FILE, SweepState, finished, stored_configurations,
                         stored_params, trial_rows, warm_study)
from tune.space import with_default_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def ray_checkpoint(sweep: Path, phase: str, trial: str, folder: str, epoch, payload: bytes,
                   meta: str | None = None) -> Path:
    d = sweep / phase / trial / folder
    d.mkdir(parents=True)
    (d / "hardmix_checkpoint.json").write_text(meta if meta is not None else
                                               json.dumps({"epoch": epoch}))
    (d / "last.pt").write_bytes(payload)
    return d


def test_resume_picks_the_newest_epoch_across_phases_and_only_its_own(tmp_path):
    sweep = tmp_path / "s"
    t = "c003-s1"
    ray_checkpoint(sweep, "tune", t, "checkpoint_000004", 4, b"epoch 4")
    ray_checkpoint(sweep, "tune", t, "checkpoint_000005", 5, b"epoch 5")
    # the resumed phase numbers its checkpoints from 0 again: epoch, not folder name, decides
    ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000000", 6, b"epoch 6")
    ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000001", 7, b"epoch 7")
    # never these: another trial, a folder that is no Tune phase, unreadable metadata
    ray_checkpoint(sweep, "tune", "c003-s0", "checkpoint_000009", 40, b"other trial")
    ray_checkpoint(sweep, "runs", t, "checkpoint_000009", 41, b"not a phase")
    ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000002", None, b"broken", meta="{epoch: 9")
    ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000003", None, b"no epoch", meta='["x"]')
    ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000004", None, b"text", meta='{"epoch": "x"}')
    (sweep / "tune-r1" / t / "notes_000000").mkdir()  # not a checkpoint folder
    (sweep / "tune-r2").write_text("a file, not a phase folder")
    chosen = ray_checkpoint(sweep, "tune-r1", t, "checkpoint_000005", 8, b"epoch 8")
    (chosen / "nested").mkdir()  # only files are copied
    (chosen / "nested" / "x").write_text("x")
    local = stored_checkpoint(str(sweep), t)
    assert local is not None and Path(local) != chosen
    assert sorted(p.name for p in Path(local).iterdir()) == ["hardmix_checkpoint.json", "last.pt"]
    assert (Path(local) / "last.pt").read_bytes() == b"epoch 8"
    # a tie keeps the first one found; an epoch of 0 still counts as a checkpoint
    assert stored_checkpoint(str(sweep), "c009-s0") is None
    ray_checkpoint(sweep, "tune", "c009-s0", "checkpoint_000000", 0, b"epoch 0")
    got = stored_checkpoint(str(sweep), "c009-s0")
    assert got is not None and (Path(got) / "last.pt").read_bytes() == b"epoch 0"


def test_a_run_resumes_from_its_own_last_checkpoint_file(tmp_path):
    assert checkpoint_path(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "last.pt"
    assert checkpoint_path(str(tmp_path)) == tmp_path / "checkpoints" / "last.pt"


def search(*overrides: str) -> SweepConfig:
    return with_default_space(load_config(SweepConfig, None, None, ["storage=/tmp", *overrides]))


def row(status, alpha, err, **extra):
    return {"status": status, "augment.alpha": alpha, "augment.criterion": "misclassified",
            "augment.k": None, "augment.fallback": "random", "final_val_top1_err": err, **extra}


def test_a_search_resumed_with_unfinished_seeds_tells_optuna_only_whole_configurations():
    cfg = search("seeds=[0, 1, 2]", "num_samples=8")
    rows = {
        # configuration 0: every seed final (one pruned) -> told, mean of the three
        "c000-s0": row("completed", 0.5, 10.0), "c000-s1": row("pruned", 0.5, 13.0),
        "c000-s2": row("completed", 0.5, 16.0),
        # configuration 1: seed 2 never started -> not told
        "c001-s0": row("completed", 1.5, 1.0), "c001-s1": row("completed", 1.5, 2.0),
        # configuration 2: seed 2 failed (retried by the resume, then given up) -> told with
        # the mean of its finite values
        "c002-s0": row("completed", 0.8, 20.0), "c002-s1": row("completed", 0.8, 24.0),
        "c002-s2": row("failed", 0.8, float("nan")),
        # configuration 4: no finite value at all -> not told
        "c004-s0": row("failed", 1.1, None), "c004-s1": row("failed", 1.1, None),
        "c004-s2": row("running", 1.1, None),
        # follow-up and hand-named trials are not configurations of the main phase
        "f000-s0": row("completed", 0.3, 0.1), "my-run": row("completed", 0.3, 0.1),
    }
    assert finished(rows) == {"c000-s0", "c000-s1", "c000-s2", "c001-s0", "c001-s1",
                              "c002-s0", "c002-s1", "f000-s0", "my-run"}
    assert set(FINAL) == {"completed", "pruned"}
    configs = stored_configurations(rows, cfg.space)
    assert list(configs) == [0, 1, 2, 4]  # sorted by index, gaps kept
    assert {k: sorted(v["rows"]) for k, v in configs.items()} == {
        0: [0, 1, 2], 1: [0, 1], 2: [0, 1, 2], 4: [0, 1, 2]}
    assert configs[1]["params"] == {"augment.alpha": 1.5, "augment.criterion": "misclassified",
                                    "augment.fallback": "random"}
    storage, name = warm_study(cfg, configs, lambda r: r["final_val_top1_err"])
    told = {t.params["augment.alpha"]: t.value
            for t in optuna.load_study(study_name=name, storage=storage).trials}
    assert told == {0.5: pytest.approx(13.0), 0.8: pytest.approx(22.0)}
    # the unfinished seeds are exactly what a resumed search runs first
    unfinished = {(k, s) for k in configs for s in cfg.seeds
                  if f"c{k:03d}-s{s}" not in finished(rows)}
    assert unfinished == {(1, 2), (2, 2), (4, 0), (4, 1), (4, 2)}


def test_stored_params_leave_out_what_did_not_exist_for_the_trial():
    cfg = search("seeds=[0]")
    got = stored_params({"augment.alpha": 0.7, "augment.k": float("nan"),
                         "augment.fallback": None, "augment.criterion": "topk_loss",
                         "optim.lr": 0.1, "status": "completed"}, cfg.space)
    assert got == {"augment.alpha": 0.7, "augment.criterion": "topk_loss"}


def test_trial_rows_are_the_latest_row_of_each_trial(tmp_path):
    sweep = tmp_path / "sw"
    assert trial_rows(str(sweep)) == {}
    store = ResultStore(str(sweep))
    store.write_trial({"trial_id": "c000-s0", "status": "running", "seed": 0})
    time.sleep(0.01)
    store.write_trial({"trial_id": "c000-s0", "status": "completed", "seed": 0})
    store.write_trial({"trial_id": "c001-s0", "status": "running", "seed": 0})
    rows = trial_rows(str(sweep))
    assert {t: r["status"] for t, r in rows.items()} == {"c000-s0": "completed",
                                                       "c001-s0": "running"}
    assert finished(rows) == {"c000-s0"}


def test_sweep_state_counts_runs_and_time_and_refuses_a_bad_file(tmp_path):
    d = str(tmp_path)
    state = SweepState.load(d)
    assert (state.runs, state.wall_seconds) == (0, 0.0)
    state.runs += 1
    with state.clock(d, every=0.05):
        time.sleep(0.3)
        mid = SweepState.load(d)  # saved while the block runs
    assert 0.0 < mid.wall_seconds < 5
    again = SweepState.load(d)
    assert again.runs == 1 and 0.25 <= again.wall_seconds < 5
    with again.clock(d, every=60):
        time.sleep(0.05)
    assert SweepState.load(d).wall_seconds >= again.wall_seconds > 0.3
    for text in ("{not json", '{"runs": -1}', '{"wall_seconds": "nan"}', "[1]",
                 '{"wall_seconds": -2}'):
        (tmp_path / STATE_FILE).write_text(text)
        with pytest.raises(ConfigError) as err:
            SweepState.load(d)
        assert err.value.field == "--resume", text
    (tmp_path / STATE_FILE).write_text('{"runs": 0, "wall_seconds": 0}')
    assert SweepState.load(d).runs == 0 and math.isfinite(SweepState.load(d).wall_seconds)
    (tmp_path / STATE_FILE).write_text("{}")  # written by an older version: nothing counted
    assert (SweepState.load(d).runs, SweepState.load(d).wall_seconds) == (0, 0.0)


def saved_sweep(tmp_path, *overrides: str) -> Path:
    from hardmix.config import to_yaml
    from tune.plan import SWEEP_FILE

    folder = tmp_path / "sweeps" / "mine"
    folder.mkdir(parents=True)
    cfg = load_config(SweepConfig, None, None, ["storage=/elsewhere", "name=other", *overrides])
    (folder / SWEEP_FILE).write_text(to_yaml(cfg))
    return folder


def test_a_resume_continues_the_saved_sweep_and_changes_only_how_it_runs(tmp_path):
    from tune.resume import RESUMABLE, check_resume_changes, resumed_config

    folder = saved_sweep(tmp_path, "mode=grid", "seeds=[0, 1]")
    cfg = resumed_config(str(folder), "mine", ["max_failures=3", "description=again"])
    # the folder resumed names the sweep, wherever the saved file said it was
    assert (cfg.storage, cfg.name) == (str(folder.parent), "mine")
    assert cfg.max_failures == 3 and cfg.seeds == [0, 1]
    assert resumed_config(str(folder), "mine", ["seeds=[0, 1, 2]"]).seeds == [0, 1, 2]
    for change, field in ((["seeds=[1]"], "seeds"), (["run.optim.lr=0.5"], "run.optim.lr"),
                          (["mode=search"], "mode")):
        with pytest.raises(ConfigError) as err:
            resumed_config(str(folder), "mine", change)
        assert err.value.field == field, change
    with pytest.raises(ConfigError) as err:  # a new value must itself be valid
        resumed_config(str(folder), "mine", ["max_failures=-2"])
    assert err.value.field == "max_failures"
    assert "address" in RESUMABLE and "seeds" not in RESUMABLE
    saved = load_config(SweepConfig, None, None, ["storage=/tmp", "mode=grid",
                                                  "arms=[{augment.method: cutmix}]"])
    more = saved.seeds + [max(saved.seeds) + 1]
    with pytest.raises(ConfigError) as err:  # arms carry their own seeds: none added
        check_resume_changes(saved, load_config(SweepConfig, None, None, [
            "storage=/tmp", "mode=grid", "arms=[{augment.method: cutmix}]", f"seeds={more}"]))
    assert err.value.field == "seeds"


def test_a_folder_that_is_no_sweep_or_holds_a_bad_config_is_one_error(tmp_path):
    from tune.plan import SWEEP_FILE
    from tune.resume import resumed_config

    empty = tmp_path / "empty"
    empty.mkdir()
    for text in (None, "run: [unclosed", "- a list", "seeds: not-a-list\n", "mode: nope\n"):
        folder = tmp_path / f"f{abs(hash(text)) % 10**6}"
        folder.mkdir()
        if text is not None:
            (folder / SWEEP_FILE).write_text(text)
        with pytest.raises(ConfigError) as err:
            resumed_config(str(folder), "given-name", [])
        assert err.value.field == "--resume", text
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # names what the user typed, else the folder
        resumed_config(str(empty), "", [])
    assert err.value.value == str(empty)


def test_a_packed_checkpoint_goes_back_where_the_run_wrote_it(tmp_path):
    from tune.checkpoints import ATTEMPT_FILE, next_attempt, pack_checkpoint, restore_checkpoint

    run = tmp_path / "run"
    ckpt = checkpoint_path(run)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights at epoch 4")
    assert next_attempt(run, None) == 1 and next_attempt(run, None) == 2  # counted in the run
    packed = tmp_path / "ray_ckpt"
    packed.mkdir()
    pack_checkpoint(str(ckpt), run, packed, attempt=5, epoch=4)
    meta = json.loads((packed / "hardmix_checkpoint.json").read_text())
    assert meta == {"file": "last.pt", "relpath": "checkpoints/last.pt", "attempt": 5, "epoch": 4}
    # a retry on another machine: an empty run folder, the Ray checkpoint restored into it
    other = tmp_path / "elsewhere"
    assert next_attempt(other, str(packed)) == 6  # the checkpoint's count is the larger
    assert restore_checkpoint(str(packed), other)
    assert checkpoint_path(other).read_bytes() == b"weights at epoch 4"
    # no checkpoint: a fresh start in a clean folder, the attempt counter kept
    (other / "logs").mkdir()
    (other / "logs" / "events").write_text("old")
    assert not restore_checkpoint(None, other)
    assert not restore_checkpoint(str(tmp_path / "no-such-folder"), other)
    assert sorted(p.name for p in other.iterdir()) == [ATTEMPT_FILE]
    # a checkpoint whose metadata points outside the run folder is refused
    (packed / "hardmix_checkpoint.json").write_text(json.dumps(
        {"file": "last.pt", "relpath": "../../escape.pt", "attempt": 1, "epoch": 1}))
    with pytest.raises(ValueError):
        restore_checkpoint(str(packed), other)
    (packed / "hardmix_checkpoint.json").write_text(json.dumps(
        {"file": "sub/last.pt", "relpath": "x.pt", "attempt": 1, "epoch": 1}))
    with pytest.raises(ValueError):
        restore_checkpoint(str(packed), other)
    assert not (tmp_path / "escape.pt").exists()
