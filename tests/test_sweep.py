"""``hardmix sweep`` on a local Ray instance: search, grid, failures, resume, Ray Train, CLI.

Trials are tiny (smallnet of width 8 on the synthetic set, a few epochs); every Ray test shares
the session's Ray instance (``ray_local``), and the interrupted sweep is a second driver that
joins it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hardmix.config import ResourcesConfig, RunConfig, SweepConfig, flatten, load_config
from hardmix.metrics import EPOCH_METRICS
from promise_helpers import cli_runs

REPO = Path(__file__).resolve().parents[1]
TINY = ["run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=8",
        "run.optim.epochs=2", "run.data.batch_size=64", "run.device=cpu",
        "run.output.checkpoint_every=1", "run.output.image_grid=false", "report=false",
        "max_failures=0", "max_concurrent_trials=2"]
#: mfu depends on the device, not the method: NULL on a CPU (no peak), asserted on its own.
SCALAR_METRICS = [k for k, m in EPOCH_METRICS.items() if m.kind == "float" and k != "mfu"]


def assert_metrics_complete(trials, epochs) -> None:
    """Every scalar metric is there on every epoch where it applies to the trial's method, and
    NULL where it does not (the run evaluates every epoch in these tests)."""
    from hardmix.metrics import applicable

    augs = {r["trial_id"]: {k[len("augment."):]: v for k, v in r.items()
                            if k.startswith("augment.")} for r in trials.to_dict("records")}
    for row in epochs.to_dict("records"):
        assert row["mfu"] is None or row["mfu"] != row["mfu"], row["trial_id"]  # CPU: NULL
        for k in SCALAR_METRICS:
            assert (row[k] == row[k] and row[k] is not None) == \
                applicable(EPOCH_METRICS[k], augs[row["trial_id"]]), (k, row["trial_id"])


def tiny(tmp_path: Path, name: str, *overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, None,
                       [f"storage={tmp_path}", f"name={name}", *TINY, *overrides])


def results(sweep_dir: str | Path):
    from ablations.store import read_results
    return read_results(str(sweep_dir)).to_pandas()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``hardmix ARGS`` in a fresh interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "hardmix.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


# --------------------------------------------------------------------------------------------
# Before Ray: validation, dry run, presets
# --------------------------------------------------------------------------------------------


BAD = [("run.augment.alpha=-1", "run.augment.alpha"),
       ("space={augment.k: {type: float, low: 0.1, high: 0.5, when: {augment.criterion: "
        "[topk_loss]}}}", "space.augment.k.when"),
       ("resources.workers=0", "resources.workers")]

def test_bad_configs_fail_before_ray_and_dry_run_plans_without_it(tmp_path):
    runs = [["sweep", "--set", f"storage={tmp_path}", "--set", bad] for bad, _ in BAD]
    runs.append(["sweep", "--preset", "quickstart", "--set", f"storage={tmp_path}", "--dry-run"])
    report = cli_runs(runs, timeout=180)
    assert report["ray_imported"] is False  # neither a bad config nor a dry run starts Ray

    for (bad, field), run in zip(BAD, report["runs"]):
        assert run["rc"] == 2, run
        lines = run["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"hardmix: error: {field}"), run["err"]

    dry = report["runs"][-1]
    assert dry["rc"] == 0, dry["err"]
    assert "6 configurations x 3 seeds [0, 1, 2] = 18" in dry["out"]
    for needle in ("c005", "criterion=topk_loss", "fallback=skip",
                   "resources per trial: 1 x (1 CPU)", "compute: 18 trials, ", "FLOP"):
        assert needle in dry["out"], needle
    assert not any(tmp_path.iterdir())  # nothing written


def test_quickstart_covers_both_criteria_and_all_fallbacks_on_real_data():
    from tune.space import grid_points

    cfg = load_config(SweepConfig, "quickstart")
    points = grid_points(cfg)
    assert len(points) * len(cfg.seeds) >= 6
    assert {p.get("augment.criterion") for p in points} >= {"misclassified", "topk_loss"}
    assert {p.get("augment.fallback") for p in points} >= {"random", "skip", "topk_loss"}
    assert "cutmix" in {p["augment.method"] for p in points}  # the report's baseline
    assert cfg.run.data.name == "digits" and cfg.mode == "grid" and cfg.report


@pytest.mark.parametrize("name", ["quickstart", "ablation-baselines", "ablation-signal",
                                  "ablation-box", "ablation-prob", "search-hardmix"])
def test_sweep_presets_are_valid_and_plannable(name):
    from tune.plan import plan_text
    from tune.preflight import prepare

    text = plan_text(prepare(load_config(SweepConfig, name)))
    assert f"sweep {name!r}" in text and "trials:" in text


@pytest.mark.parametrize("preset", ["cifar10-cpu-study", "cifar10-gpu-study"])
def test_cifar10_study_compares_five_seeds_and_ablates_every_axis_with_three(tmp_path, preset):
    """The study preset (issue: none/CutMix/HardMix x >= 5 seeds; criterion, fallbacks with a
    min_hard that can fire, and signal x >= 3 seeds) plans against a CIFAR-shaped .npz."""
    import numpy as np

    from tune.space import grid_trials, trial_config
    from tune.plan import plan_text
    from tune.preflight import prepare

    path = tmp_path / "c10.npz"
    rng = np.random.RandomState(0)
    np.savez(path, x_train=rng.randint(0, 256, (200, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(200) % 10, x_test=np.zeros((20, 32, 32, 3), np.uint8),
             y_test=np.arange(20) % 10)
    cfg = prepare(load_config(SweepConfig, preset,
                              overrides=[f"run.data.path={path}", "run.data.subset=200"]))
    assert "33 trials" in plan_text(cfg)
    runs: dict[tuple, set] = {}
    for point, seed in grid_trials(cfg):
        run = trial_config(cfg.run, point, seed)
        a = run.augment
        key = (a.method, a.criterion, a.fallback, a.min_hard, a.signal, a.prob)
        runs.setdefault(key if a.method == "hardmix" else (a.method,), set()).add(seed)
    main = ("hardmix", "misclassified", "random", 1, "forward", 1.0)
    for key in [("none",), ("cutmix",), main]:
        assert len(runs[key]) >= 5, key
    fires = 40  # min_hard of the fallback arms: a third of the batch of 128
    ablations = [("hardmix", "topk_loss", "random", 1, "forward", 1.0)]
    ablations += [("hardmix", "misclassified", f, fires, "forward", 1.0)
                  for f in ("random", "skip", "topk_loss")]
    ablations += [("hardmix", "misclassified", "random", 1, s, 0.5) for s in ("forward", "cached")]
    for key in ablations:
        assert len(runs[key]) >= 3, key
    assert 1 < fires < cfg.run.data.batch_size


# --------------------------------------------------------------------------------------------
# Driver-side rows (no Ray cluster needed)
# --------------------------------------------------------------------------------------------


class FakeTrial(SimpleNamespace):
    def __str__(self) -> str:
        return self.name

    def get_error(self) -> str:
        return self.error


def test_driver_records_pruned_and_failed_trials_with_their_last_report(tmp_path):
    from tune.trainable import StoreStatusCallback, SweepContext

    run = load_config(RunConfig, None, None, ["optim.epochs=6", "output.dir=" + str(tmp_path)])
    ctx = SweepContext(sweep_dir=str(tmp_path / "s"), run=run, seeds=[0, 1], metric="val_top1_err",
                       resources=ResourcesConfig())
    cb = StoreStatusCallback(ctx)
    last = {"epoch": 2, "epochs_planned": 6, "val_top1_err": 40.0, "test_top1_err": 41.0,
            "best_val_top1_err": 38.0, "attempt": 1, "device": "cpu",
            "git_commit": "abc", "versions_json": json.dumps({"torch": "x"}),
            "data_sha256": "d" * 64, "time_total_s": 12.5}
    pruned = FakeTrial(name="c000-s1", trial_id="t1", num_failures=0, error=None,
                       config={"augment.alpha": 0.5, "__trial_index__": 1}, last_result=last)
    cb.on_trial_complete(0, [], pruned)
    failed = FakeTrial(name="c001-s0", trial_id="t2", num_failures=2,
                       error="Failure # 2\nTraceback (most recent call last):\n  File \"x\"\n"
                             "ValueError: boom\n", config={"augment.alpha": 2.0,
                                                          "__trial_index__": 0},
                       last_result={**last, "epoch": 4})
    cb.on_trial_error(0, [], failed)
    full = FakeTrial(name="c002-s0", trial_id="t3", num_failures=0, error=None,
                     config={"augment.alpha": 1.0, "__trial_index__": 0},
                     last_result={**last, "epoch": 6})
    cb.on_trial_complete(0, [], full)

    trials, _ = results(tmp_path / "s")
    rows = {r["trial_id"]: r for r in trials.to_dict("records")}
    p, f, c = rows["c000-s1"], rows["c001-s0"], rows["c002-s0"]
    assert (p["status"], p["epochs_run"], p["seed"], p["augment.alpha"]) == ("pruned", 2, 1, 0.5)
    assert (p["best_val_top1_err"], p["final_top1_err"], p["wall_seconds"]) == (38.0, 41.0, 12.5)
    assert (f["status"], f["error"], f["attempt"], f["epochs_run"], f["seed"]) == \
        ("failed", "ValueError: boom", 2, 4, 0)
    assert c["status"] == "completed"
    assert p["device"] == "cpu" and p["git_commit"] == "abc" and p["data_sha256"] == "d" * 64
    assert json.loads(p["versions"])["torch"] == "x" and "ray" in json.loads(p["versions"])
    assert p["tune_trial_id"] == "t1"


def test_a_resumed_trial_with_nothing_left_to_run_keeps_its_completed_row(tmp_path):
    """Resumed from its last epoch's checkpoint, a trial reports nothing to Tune before it
    completes; the row it wrote itself ("completed") must not be superseded by "pruned"."""
    from ablations.store import ResultStore, StoreCallback
    from tune.trainable import StoreStatusCallback, SweepContext

    run = load_config(RunConfig, None, None, ["optim.epochs=6", "output.dir=" + str(tmp_path)])
    ctx = SweepContext(sweep_dir=str(tmp_path / "s"), run=run, seeds=[0], metric="val_top1_err",
                       resources=ResourcesConfig())
    own = StoreCallback(ResultStore(ctx.sweep_dir), "c000-s0", ctx.run_config(
        {"__trial_index__": 0}, "c000-s0"))
    own.on_run_end({"status": "completed", "epochs_run": 6, "wall_seconds": 30.0,
                    "best_val_top1_err": 20.0, "final_top1_err": 21.0})
    resumed = FakeTrial(name="c000-s0", trial_id="t9", num_failures=0, error=None,
                        config={"__trial_index__": 0}, last_result={})
    StoreStatusCallback(ctx).on_trial_complete(0, [], resumed)
    trials, _ = results(tmp_path / "s")
    assert trials.set_index("trial_id").loc["c000-s0", "status"] == "completed"


def test_progress_prints_each_ending_once_with_counts_and_best(tmp_path):
    import io

    from tune.progress import SweepProgress

    out = io.StringIO()
    reporter = SweepProgress("val_top1_err", epochs=4, total=5, label="demo", out=out)
    res = lambda epoch, v: {"epoch": epoch, "epochs_planned": 4, "val_top1_err": v}
    trials = [FakeTrial(name="c000-s0", trial_id="a", status="RUNNING", last_result=res(2, 30.0),
                        error=None),
              FakeTrial(name="c001-s0", trial_id="b", status="TERMINATED",
                        last_result=res(4, 12.5), error=None),
              FakeTrial(name="c002-s0", trial_id="c", status="TERMINATED",
                        last_result=res(1, 80.0), error=None),
              FakeTrial(name="c003-s0", trial_id="d", status="ERROR", last_result={},
                        error="Traceback (most recent call last):\n  File \"x\"\n"
                              "FloatingPointError: training loss is nan\n"),
              FakeTrial(name="c004-s0", trial_id="e", status="PENDING", last_result={},
                        error=None)]
    reporter.report(trials[:1], done=False)   # first report: nothing has ended yet
    assert reporter.should_report(trials)     # three trials ended since
    reporter.report(trials, done=False)
    reporter.report(trials, done=True)        # the same state again: nothing new
    lines = out.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines if ln.startswith("  ")] == ["done", "pruned", "FAILED"]
    assert "FloatingPointError: training loss is nan" in lines[-2]
    status = lines[-1]
    assert status.startswith("[demo] 1 running, 1 done, 1 pruned, 1 failed of 5")
    assert "best val_top1_err 12.50 (c001-s0)" in status
    assert len(lines) == 5  # status, three endings, status; the final call adds nothing


# --------------------------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_optuna_search_end_to_end_writes_every_trial_and_epoch(tmp_path, ray_local, capsys):
    """Search (default space) x 2 seeds with ASHA, then the best configuration with a new seed."""
    from tune.sweep import run_sweep

    cfg = tiny(tmp_path, "search", "mode=search", "num_samples=2", "seeds=[0, 1]",
               "run.optim.epochs=3", "scheduler.type=asha", "scheduler.grace_period=1",
               "scheduler.reduction_factor=2", "followup.top=1", "followup.seeds=[5]")
    outcome = run_sweep(cfg)
    assert not outcome.interrupted and sum(outcome.counts.values()) == 5
    assert set(outcome.counts) <= {"completed", "pruned"} and outcome.counts["completed"] >= 2
    out = capsys.readouterr().out
    assert "follow-up: best 1 configurations" in out and "tensorboard --logdir" in out

    trials, epochs = results(outcome.sweep_dir)
    main = trials[trials.trial_id.str.startswith("c")]
    assert sorted(main.trial_id) == ["c000-s0", "c000-s1", "c001-s0", "c001-s1"]
    assert set(trials.status) <= {"completed", "pruned"}
    assert (trials.attempt == 1).all() and trials.tune_trial_id.str.len().gt(0).all()
    # each trial's torch threads follow its CPU resources (two trials must not each take all)
    assert (trials.threads == int(cfg.resources.cpus)).all() and trials.precision.notna().all()
    for _, group in main.groupby(main.trial_id.str[:4]):
        assert sorted(group.seed) == [0, 1]                      # seeds are a factor
        assert group["augment.alpha"].nunique() == 1             # of one configuration
        criterion = group["augment.criterion"].iloc[0]
        assert criterion in ("misclassified", "history", "topk_loss")
    assert set(flatten(RunConfig())) <= set(trials.columns)     # every config column
    # Each trial's epochs are all there; pruned trials stopped early, completed ones did not.
    per_trial = epochs.groupby("trial_id").epoch.agg(["max", "count"])
    for row in trials.itertuples():
        assert per_trial.loc[row.trial_id, "max"] == per_trial.loc[row.trial_id, "count"] \
            == row.epochs_run
        assert (row.epochs_run == 3) == (row.status == "completed")
    assert_metrics_complete(trials, epochs)

    # Follow-up: the configuration with the best mean validation error over its full-length
    # trials, again with seed 5.
    done = main[main.status == "completed"]
    means = done.groupby(done.trial_id.str[:4]).final_val_top1_err.mean()
    follow = trials[trials.trial_id.str.startswith("f")]
    assert list(follow.trial_id) == ["f000-s5"] and follow.seed.iloc[0] == 5
    alpha = follow["augment.alpha"].iloc[0]
    chosen = main[main["augment.alpha"] == alpha].trial_id.str[:4].iloc[0]
    assert means[chosen] == means.min()

    # TensorBoard: one run folder per trial, written by the run; none from Tune itself.
    sweep = Path(outcome.sweep_dir)
    for trial in trials.trial_id:
        assert glob.glob(str(sweep / "runs" / trial / "*" / "events.out.tfevents.*"))  # /<name>/
    assert not glob.glob(str(sweep / "tune*" / "**" / "events.out.tfevents.*"), recursive=True)
    assert not glob.glob(str(sweep / "tune*" / "*" / "progress.csv"))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_failing_trial_is_retried_then_recorded_as_failed_while_others_complete(tmp_path,
                                                                               ray_local):
    """Also the storage-as-URI path (file:// here, s3:// or gs:// on a cluster)."""
    from tune.sweep import run_sweep

    # Also a grid given as arms, each with its own seeds. lr 1e12: NaN loss.
    cfg = tiny(tmp_path, "fail", f"storage=file://{tmp_path}", "mode=grid", "max_failures=1",
               "seeds=[0]", "arms=[{optim.lr: 0.05, seeds: [0, 3]}, {optim.lr: 1.0e+12}]")
    outcome = run_sweep(cfg)
    assert outcome.counts == {"completed": 2, "failed": 1}
    assert outcome.sweep_dir == f"file://{tmp_path}/fail"

    trials, epochs = results(outcome.sweep_dir)
    rows = {r["trial_id"]: r for r in trials.to_dict("records")}
    assert set(rows) == {"c000-s0", "c000-s3", "c001-s0"}
    ok, bad = rows["c000-s0"], rows["c001-s0"]
    assert ok["status"] == "completed" and ok["optim.lr"] == 0.05
    assert rows["c000-s3"]["status"] == "completed" and rows["c000-s3"]["seed"] == 3
    assert bad["status"] == "failed" and bad["optim.lr"] == 1e12
    assert "FloatingPointError" in bad["error"] and "diverged" in bad["error"]
    assert bad["attempt"] == 2  # one retry, then recorded
    assert set(epochs.trial_id) == {"c000-s0", "c000-s3"}
    # With a URI storage the run folder (TensorBoard logs) is synced into the Tune trial folder.
    assert glob.glob(str(tmp_path / "fail" / "tune" / "c000-s0" / "run" / "*"
                         / "events.out.tfevents.*"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_interrupted_sweep_resumes_mid_trial_without_rerunning_or_duplicating(tmp_path,
                                                                              ray_local):
    address = ray_local.get_runtime_context().gcs_address
    sweep = tmp_path / "resume"
    args = ["sweep", "--set", f"storage={tmp_path}", "--set", "name=resume", "--set",
            f"address={address}", "--set", "mode=grid", "--set", "max_concurrent_trials=1",
            "--set", "space={optim.epochs: {values: [2, 40]}}", "--set", "seeds=[0]"]
    args += [a for o in TINY if not o.startswith("max_concurrent")
             for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    first = subprocess.Popen([sys.executable, "-m", "hardmix.cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Interrupt once the long trial has a Ray checkpoint of a later epoch than its first.
    deadline = time.time() + 200
    while time.time() < deadline and first.poll() is None:
        if len(glob.glob(str(sweep / "tune" / "c001-s0" / "checkpoint_*"))) and \
                _epochs_done(sweep, "c001-s0") >= 3:
            break
        time.sleep(0.3)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert "hardmix sweep --resume" in out

    trials, _ = results(sweep)
    status = dict(zip(trials.trial_id, trials.status))
    assert status == {"c000-s0": "completed", "c001-s0": "running"}
    short_files = sorted(glob.glob(str(sweep / "*" / "sweep=resume" / "c000-s0-*.parquet")))
    stopped_at = _epochs_done(sweep, "c001-s0")
    assert 3 <= stopped_at < 40

    resumed = cli("sweep", "--resume", str(sweep), "--set", f"address={address}", timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials, epochs = results(sweep)
    assert len(trials) == 2 and set(trials.status) == {"completed"}
    # The finished trial was not run again: not one new file of it.
    assert sorted(glob.glob(str(sweep / "*" / "sweep=resume" / "c000-s0-*.parquet"))) == short_files
    long = trials.set_index("trial_id").loc["c001-s0"]
    assert long.epochs_run == 40 and long.attempt == 2
    assert sorted(epochs[epochs.trial_id == "c001-s0"].epoch) == list(range(1, 41))
    # ... and the interrupted one continued from its checkpoint, not from scratch.
    run_json = json.loads((sweep / "runs" / "c001-s0" / "run.json").read_text())
    assert 1 <= run_json["resumed_from_epoch"] <= stopped_at


def _epochs_done(sweep: Path, trial: str) -> int:
    try:
        _, epochs = results(sweep)
    except Exception:  # nothing written yet
        return 0
    done = epochs[epochs.trial_id == trial].epoch
    return int(done.max()) if len(done) else 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_trial_with_two_ray_train_workers_gives_the_same_rows(tmp_path, ray_local):
    from tune.sweep import run_sweep

    cfg = tiny(tmp_path, "ddp", "mode=grid", "seeds=[0]", "resources.workers=2",
               "resources.cpus=1")
    outcome = run_sweep(cfg)
    assert outcome.counts == {"completed": 1}

    trials, epochs = results(outcome.sweep_dir)
    row = trials.iloc[0]
    assert (row.trial_id, row.status, row.epochs_run, row.seed) == ("c000-s0", "completed", 2, 0)
    assert not math.isnan(row.final_top1_err)
    assert sorted(epochs.epoch) == [1, 2]
    assert_metrics_complete(trials, epochs)
    assert all(len(c) == 10 for c in epochs.source_class_counts)
    meta = json.loads((Path(outcome.sweep_dir) / "runs" / "c000-s0" / "run.json").read_text())
    assert meta["world_size"] == 2  # really data-parallel
    assert glob.glob(str(Path(outcome.sweep_dir) / "train" / "c000-s0" / "checkpoint_*"))


def test_grid_trials_are_cells_and_grids_started_before_arms_still_resume():
    from tune.trainable import SweepContext

    ctx = SweepContext(sweep_dir="/tmp/s", run=RunConfig(), seeds=[0, 1], metric="val_top1_err",
                       resources=ResourcesConfig(),
                       points=[{"optim.lr": 0.1}, {"optim.lr": 0.2}],
                       point_seeds=[[0, 1, 2], [5]])
    cells = ctx.cells()
    assert [(c["point"]["optim.lr"], c["seed"]) for c in cells] == [
        (0.1, 0), (0.2, 5), (0.1, 1), (0.1, 2)]
    trial = SimpleNamespace(config={"cell": cells[1]}, experiment_tag="2")
    assert ctx.params_and_seed(trial.config) == ({"optim.lr": 0.2}, 5)
    assert ctx.trial_id(trial) == "c001-s5"
    # The Tune config of a grid trial before arms: {"point": ..., "seed": ...}.
    legacy = SimpleNamespace(config={"point": {"optim.lr": 0.1}, "seed": 1}, experiment_tag="3")
    assert ctx.params_and_seed(legacy.config) == ({"optim.lr": 0.1}, 1)
    assert ctx.trial_id(legacy) == "c000-s1"


def test_sweep_clock_keeps_the_state_current_while_the_driver_runs(tmp_path):
    """A driver killed outright (SIGKILL, a lost machine) never reaches its final save: the
    sweep's wall time must already hold what it ran, not only the runs that ended."""
    from tune.resume import STATE_FILE, SweepState

    state = SweepState(runs=2, wall_seconds=100.0)
    seen = []
    with state.clock(str(tmp_path), every=0.05):
        deadline = time.time() + 5
        while time.time() < deadline and len(seen) < 3:
            path = tmp_path / STATE_FILE
            if path.is_file():
                seen.append(json.loads(path.read_text())["wall_seconds"])
            time.sleep(0.06)
    assert len(seen) >= 3 and seen[0] > 100.0 and seen == sorted(seen)
    final = json.loads((tmp_path / STATE_FILE).read_text())
    assert final["runs"] == 2 and final["wall_seconds"] >= seen[-1]
    assert SweepState.load(str(tmp_path)).wall_seconds == pytest.approx(state.wall_seconds)
