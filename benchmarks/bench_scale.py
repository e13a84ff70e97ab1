"""Scale simulation: a few hundred very short trials through the real sweep path, with faults.

What runs is exactly what ``hardmix sweep`` runs on a cluster (``tune.sweep`` -> Ray Tune ->
``tune.trainable`` -> ``hardmix.train`` -> ``ablations.store`` Parquet), on a local Ray instance,
with tiny trials (synthetic 16x16 images, a 4-channel smallnet, 2 epochs) so that Ray's and the
store's per-trial cost is what gets measured. On top of it:

* injected exceptions: a worker-process setup hook (Ray's ``worker_process_setup_hook``, set by
  this script's ``ray.init``; nothing in the product changes) wraps ``hardmix.train.train`` so
  that, with probability ``--fail-prob`` per (trial, attempt, epoch), an epoch raises right after
  its rows were written: the trial records the failure and Tune retries it from its last
  checkpoint, re-writing that epoch;
* injected crashes: the script SIGKILLs a running trial process every ``--kill-every`` seconds
  (a lost worker or node: nothing in the trial gets to record anything);
* one driver interruption: a SIGINT (Ctrl+C) to the ``hardmix sweep`` driver process once
  ``--interrupt-at`` of the trials have started, then the sweep is resumed the way
  ``hardmix sweep --resume <folder>`` does it.

Then the check: every trial of the grid is in the store exactly once (one trial id per
configuration and seed, none extra), completed unless its faults used up every retry (then
failed, with the error), and every completed trial has each epoch's row exactly once. It prints
the time per trial.

    python benchmarks/bench_scale.py                  # 300 trials, ~10 min on 2 cores
    python benchmarks/bench_scale.py --trials 60      # a quick look

Last line: ``scale_trials=<n> exactly_once=<bool> seconds_per_trial=<x>``.

Not part of the test suite; tests/test_scale.py runs a small version of the same check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAULT_ENV = "HARDMIX_BENCH_FAULTS"  # JSON {"p": ..., "seed": ..., "log": ...}; bench only
TRIAL_PROCESS_TITLES = ("ray::ImplicitFunc", "ray::_Inner")  # Tune function trainable actors


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------


def sweep_yaml(name: str, storage: str, trials: int, seeds: int, epochs: int, cpus: int,
               max_failures: int) -> str:
    """A grid sweep of ``trials`` tiny runs: ``trials / seeds`` values of augment.alpha x seeds."""
    n_configs = max(1, math.ceil(trials / seeds))
    alphas = [round(0.1 + 0.05 * i, 4) for i in range(n_configs)]
    return f"""\
name: {name}
mode: grid
space:
  augment.alpha: {{type: choice, values: {json.dumps(alphas)}}}
seeds: {json.dumps(list(range(seeds)))}
storage: {storage}
local_cpus: {cpus}
max_failures: {max_failures}
report: false
resources: {{cpus: 1, gpus: 0, workers: 1}}
run:
  device: cpu
  data: {{name: synthetic, batch_size: 128, eval_batch_size: 256, val_size: 0.25}}
  model: {{name: smallnet, width: 4}}
  optim: {{epochs: {epochs}, milestones: [{epochs}], amp: fp32}}
  augment: {{method: hardmix}}
  output: {{checkpoint_every: 1, tensorboard: false, image_grid: false, progress: false}}
"""


def expected_trials(cfg) -> dict[str, tuple]:
    """Trial id -> (point, seed) of every trial the grid must leave in the store."""
    from tune.space import grid_points

    points = grid_points(cfg)
    return {f"c{i:03d}-s{seed}": (json.dumps(p, sort_keys=True), seed)
            for i, p in enumerate(points) for seed in cfg.seeds}


# ------------------------------------------------------------------------------------------------
# Fault injection (runs inside Ray's worker processes)
# ------------------------------------------------------------------------------------------------


def fault_draw(seed: int, trial: str, attempt: int, epoch: int) -> float:
    """A uniform number in [0, 1), the same on every run for the same trial/attempt/epoch."""
    digest = hashlib.sha256(f"{seed}/{trial}/{attempt}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def install_faults() -> None:
    """Ray ``worker_process_setup_hook``: wrap ``hardmix.train.train`` with injected faults."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    spec = json.loads(spec)
    import hardmix.train as ht

    if getattr(ht.train, "_bench_faults", False):
        return
    real_train = ht.train

    class InjectedFault(RuntimeError):
        pass

    class FaultCallback(ht.Callback):
        def __init__(self, trial: str, attempt: int):
            self.trial, self.attempt = trial, attempt

        def on_epoch_end(self, metrics: dict, checkpoint=None) -> None:
            epoch = int(metrics.get("epoch", 0))
            if fault_draw(spec["seed"], self.trial, self.attempt, epoch) < spec["p"]:
                with open(spec["log"], "a") as f:  # one short line: O_APPEND keeps it whole
                    f.write(json.dumps({"trial": self.trial, "attempt": self.attempt,
                                        "epoch": epoch}) + "\n")
                raise InjectedFault(f"injected fault after epoch {epoch} "
                                    f"(attempt {self.attempt})")

    def train(cfg, callbacks=(), run_dir="runs/run", resume=False, **options):
        # **options: whatever else train() takes (eval_epochs, ...) passes through unchanged.
        callbacks = list(callbacks)
        try:
            attempt = int(json.loads((Path(run_dir) / "attempt.json").read_text())["attempt"])
        except (OSError, ValueError, KeyError):
            attempt = 1
        # After the writers (the epoch's rows are in the store), before the Ray reporter (so
        # Ray's latest checkpoint is the previous epoch's and the retry re-runs this one).
        at = max(0, len(callbacks) - 1)
        callbacks.insert(at, FaultCallback(cfg.output.name or "?", attempt))
        return real_train(cfg, callbacks=callbacks, run_dir=run_dir, resume=resume, **options)

    train._bench_faults = True
    ht.train = train


def driver(config_file: str, resume: str | None, cpus: int, fault_spec: str | None) -> int:
    """One ``hardmix sweep`` driver process: Ray with the fault hook, then the CLI's own entry."""
    import ray

    from hardmix.config import ConfigError, fail
    from tune.sweep import sweep_from_cli

    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
           if k in os.environ}
    if fault_spec:
        env[FAULT_ENV] = fault_spec
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": install_faults})
    try:
        return sweep_from_cli(None, config_file, [], resume=resume, dry_run=False)
    except ConfigError as exc:
        return fail(exc)
    except KeyboardInterrupt:  # a second Ctrl+C, as in hardmix.cli
        return 130
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------
# The outside: crashes, the interruption, the check
# ------------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux; psutil is not a dependency)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def trial_processes(root_pid: int) -> list[int]:
    """Pids of running Tune trial processes under ``root_pid`` (the driver that started Ray: its
    raylet and workers are its descendants): only this sweep's, never another Ray's."""
    tree, out, todo = _children(), [], [root_pid]
    while todo:
        for pid in tree.get(todo.pop(), []):
            todo.append(pid)
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith(TRIAL_PROCESS_TITLES) and "train" in title:
                out.append(pid)
    return out


class Crasher(threading.Thread):
    """SIGKILLs one running trial process every ``every`` seconds (a lost worker)."""

    def __init__(self, every: float, seed: int, root_pid: int):
        super().__init__(daemon=True)
        import random

        self.every, self.rng, self.root_pid = every, random.Random(seed), root_pid
        self.stop = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop.wait(self.every * (0.5 + self.rng.random())):
            pids = trial_processes(self.root_pid)
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except OSError:  # it ended on its own meanwhile
                    pass


def started_trials(sweep_dir: Path) -> int:
    """Trials with at least one row file (cheap: file names, no Parquet reads)."""
    folder = sweep_dir / "trials"
    if not folder.is_dir():
        return 0
    ids = {p.name.rsplit("-", 1)[0] for p in folder.rglob("*.parquet")}
    return len(ids)


def raw_epoch_rows(sweep_dir: Path) -> Counter:
    """(trial, epoch) -> how many epoch rows were written, superseded ones included."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in (sweep_dir / "epochs").rglob("*.parquet"):
        table = pq.read_table(path, columns=["trial_id", "epoch"])
        for trial, epoch in zip(table.column("trial_id").to_pylist(),
                                table.column("epoch").to_pylist()):
            counts[(trial, int(epoch))] += 1
    return counts


def check_exactly_once(sweep_dir: Path, cfg, faults: list[dict]) -> dict:
    """Every trial of the grid once, every epoch of a completed trial once; statuses agree with
    the faults injected. Raises AssertionError with what is wrong; returns counts."""
    from ablations.store import read_results

    res = read_results(str(sweep_dir))
    trials, epochs = res.to_pandas()
    expected = expected_trials(cfg)
    got = list(trials["trial_id"])
    dup = [t for t, n in Counter(got).items() if n > 1]
    assert not dup, f"trials with more than one row after deduplication: {dup[:5]}"
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    assert not missing, f"{len(missing)} trials missing from the store, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected trial ids, e.g. {sorted(extra)[:5]}"
    keys = Counter((round(float(a), 6), int(s)) for a, s in zip(trials["augment.alpha"], trials["seed"]))
    assert max(keys.values()) == 1, "a (configuration, seed) ran under two trial ids"
    status = dict(zip(trials["trial_id"], trials["status"]))
    bad = {t: s for t, s in status.items() if s not in ("completed", "failed")}
    assert not bad, f"trials neither completed nor failed: {dict(list(bad.items())[:5])}"

    n_epochs = cfg.run.optim.epochs
    per_trial = epochs.groupby("trial_id")["epoch"].apply(list).to_dict()
    for trial, state in status.items():
        seen = sorted(int(e) for e in per_trial.get(trial, []))
        assert len(seen) == len(set(seen)), f"{trial}: an epoch row twice after deduplication"
        if state == "completed":
            assert seen == list(range(1, n_epochs + 1)), f"{trial}: epochs {seen}"

    # Injected exceptions: a trial whose every allowed attempt drew a fault must be failed, with
    # the injected error; one that drew faults and is completed must show a later attempt.
    attempts_faulted: dict[str, set] = {}
    for f in faults:
        attempts_faulted.setdefault(f["trial"], set()).add(f["attempt"])
    attempt_of = dict(zip(trials["trial_id"], trials["attempt"]))
    error_of = dict(zip(trials["trial_id"], trials["error"]))
    for trial, faulted in attempts_faulted.items():
        if status.get(trial) == "completed":
            assert int(attempt_of[trial]) > max(faulted), \
                f"{trial} completed on attempt {attempt_of[trial]} but attempt {max(faulted)} faulted"
    failed = [t for t, s in status.items() if s == "failed"]
    for trial in failed:
        assert str(error_of[trial]), f"{trial} failed without an error"
    raw = raw_epoch_rows(sweep_dir)
    return {"trials": len(got), "completed": len(got) - len(failed), "failed": len(failed),
            "retried": int((trials["attempt"].astype(int) > 1).sum()),
            "epoch_rows": int(len(epochs)), "raw_epoch_rows": int(sum(raw.values())),
            "superseded_epoch_rows": int(sum(n - 1 for n in raw.values())),
            "injected_exceptions": len(faults)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=300, help="trials in the grid (default 300)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per configuration")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4)")
    ap.add_argument("--fail-prob", type=float, default=0.05,
                    help="probability of an injected exception per trial attempt and epoch")
    ap.add_argument("--kill-every", type=float, default=20.0,
                    help="seconds between SIGKILLs of a running trial process (0: none)")
    ap.add_argument("--max-failures", type=int, default=2, help="retries per trial")
    ap.add_argument("--interrupt-at", type=float, default=0.4,
                    help="interrupt the driver once this share of trials has started")
    ap.add_argument("--workdir", help="where the sweep goes (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--driver", help=argparse.SUPPRESS)  # internal: run one driver process
    ap.add_argument("--resume", help=argparse.SUPPRESS)
    ap.add_argument("--faults", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        args.trials, args.seeds, args.epochs, args.cpus, args.kill_every = 4, 2, 2, 2, 0.0
    if args.driver:
        return driver(args.driver, args.resume, args.cpus, args.faults)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from hardmix.config import SweepConfig, load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hardmix-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"scale-{int(time.time())}"
    config_file = work / f"{name}.yaml"
    config_file.write_text(sweep_yaml(name, str(work / "sweeps"), args.trials, args.seeds,
                                      args.epochs, args.cpus, args.max_failures))
    cfg = load_config(SweepConfig, file=str(config_file))
    total = len(expected_trials(cfg))
    sweep_dir = work / "sweeps" / name
    fault_log = work / "faults.jsonl"
    fault_spec = json.dumps({"p": args.fail_prob, "seed": args.seed, "log": str(fault_log)})
    base = [sys.executable, str(Path(__file__).resolve()), "--cpus", str(args.cpus),
            "--faults", fault_spec, "--driver", str(config_file)]
    print(f"scale simulation: {total} trials x {args.epochs} epochs, {args.cpus} logical CPUs, "
          f"fail-prob {args.fail_prob}/epoch, a kill every ~{args.kill_every:g}s, "
          f"max_failures {args.max_failures}; sweep in {sweep_dir}", flush=True)

    log = open(work / "driver.log", "ab")
    t0 = time.time()
    first = subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT)
    crasher = Crasher(args.kill_every, args.seed, first.pid) if args.kill_every > 0 else None
    if crasher:
        crasher.start()
    interrupted_at = None
    while first.poll() is None:
        time.sleep(1.0)
        if interrupted_at is None and started_trials(sweep_dir) >= args.interrupt_at * total:
            interrupted_at = started_trials(sweep_dir)
            first.send_signal(signal.SIGINT)  # Ctrl+C
    code1 = first.wait()
    t1 = time.time()
    print(f"driver 1: exit {code1} after {t1 - t0:.0f}s, interrupted with {interrupted_at} of "
          f"{total} trials started", flush=True)
    second = subprocess.Popen(base + ["--resume", str(sweep_dir)], stdout=log,
                              stderr=subprocess.STDOUT)
    if crasher:
        crasher.root_pid = second.pid
    code2 = second.wait()
    t2 = time.time()
    if crasher:
        crasher.stop.set()
    print(f"driver 2 (--resume): exit {code2} after {t2 - t1:.0f}s", flush=True)

    faults = [json.loads(line) for line in fault_log.read_text().splitlines()] \
        if fault_log.exists() else []
    counts = check_exactly_once(sweep_dir, cfg, faults)
    wall = t2 - t0
    print(f"exactly once: OK — {counts['trials']} trials ({counts['completed']} completed, "
          f"{counts['failed']} failed after {args.max_failures} retries), {counts['retried']} "
          f"retried; {counts['injected_exceptions']} injected exceptions, "
          f"{crasher.kills if crasher else 0} killed trial processes, 1 driver interruption; "
          f"{counts['epoch_rows']} epoch rows ({counts['superseded_epoch_rows']} superseded "
          f"rewrites of retried epochs)")
    print(f"time: {wall:.0f}s wall for {total} trials = {wall / total:.2f}s per trial "
          f"({args.cpus} trials at once on {os.cpu_count()} cores); logs in {work / 'driver.log'}")
    if code1 not in (130, 0) or code2 != 0:
        print(f"unexpected driver exit codes {code1}, {code2}", file=sys.stderr)
    ok = code1 in (130, 0) and code2 == 0
    print(f"scale_trials={total} exactly_once={ok} seconds_per_trial={wall / total:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
