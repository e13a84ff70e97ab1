"""What running trials through ``hardmix sweep`` costs over calling the training function.

The same N real single-worker training trials (the small network, about ``--trial-seconds``
each; different seeds of one configuration) run in this one run, one trial at a time:

* ``loop``: a fresh Python process calls :func:`hardmix.train.train` N times, with the callbacks
  a run has anyway (Parquet store, TensorBoard);
* ``sweep``: ``hardmix sweep`` (a grid over the N seeds, ``max_concurrent_trials=1``, no report),
  which starts a local Ray instance, runs each trial as a Ray Tune trial with per-epoch reports
  and Ray checkpoints, writes the same Parquet rows and TensorBoard logs, and shuts Ray down.

Both are timed as whole commands (interpreter start, imports, everything). The loop runs before
and after the sweep and counts as the mean of the two, so a machine that gets busier or quieter
during the run biases neither side. The epochs per trial come from a short calibration run
first (not timed). Last line: ``sweep_overhead_fraction=<x>`` ((sweep - loop) / loop; target
<= 0.10).

    python benchmarks/bench_sweep.py                      # 4 trials of ~60 s on digits
    python benchmarks/bench_sweep.py --trials 3 --trial-seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_overrides(args: argparse.Namespace, epochs: int) -> list[str]:
    """The trial's run config (one configuration; the seed varies)."""
    return [f"data.name={args.data}", "model.name=smallnet", f"model.width={args.width}",
            f"optim.epochs={epochs}", "optim.schedule=cosine", "optim.lr=0.05",
            "data.batch_size=64", "device=cpu", "augment.method=hardmix",
            "output.progress=false", f"output.checkpoint_every={args.checkpoint_every}"]


def calibrate(args: argparse.Namespace) -> tuple[int, float]:
    """Epochs that make one trial last about ``args.trial_seconds`` on this machine: a short
    probe run gives the seconds per epoch (from its metrics) and the fixed set-up time."""
    import torch

    from hardmix.config import RunConfig, load_config
    from hardmix.train import Callback, train

    class Epochs(Callback):
        seconds: list[float] = []

        def on_epoch_end(self, metrics: dict, checkpoint=None) -> None:
            self.seconds.append(metrics["epoch_seconds"])

    torch.set_num_threads(args.threads)
    probe = 4
    cfg = load_config(RunConfig, None, None, run_overrides(args, probe))
    epochs = Epochs()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train(cfg, [epochs], Path(d) / "probe")
        total = time.perf_counter() - t0
    per_epoch = sum(epochs.seconds[1:]) / (probe - 1)  # the first epoch warms caches up
    setup = max(0.0, total - sum(epochs.seconds))
    return max(2, round((args.trial_seconds - setup) / per_epoch)), per_epoch


def loop_main(args: argparse.Namespace) -> None:
    """The reference: N trials by a plain loop over ``train()`` (run in its own process)."""
    import torch

    from ablations.store import ResultStore, StoreCallback
    from hardmix.config import RunConfig, load_config
    from hardmix.tensorboard import TensorBoardCallback
    from hardmix.train import train

    torch.set_num_threads(args.threads)
    store = ResultStore(str(Path(args.out) / args.name))
    for seed in range(args.trials):
        overrides = run_overrides(args, args.epochs) + [f"seed={seed}"]
        cfg = load_config(RunConfig, None, None, overrides)
        trial_id = f"c000-s{seed}"
        run_dir = Path(args.out) / args.name / "runs" / trial_id
        train(cfg, [StoreCallback(store, trial_id, cfg, extra={}), TensorBoardCallback()], run_dir)


def epoch_seconds(sweep_dir: str) -> float:
    """Seconds spent inside the training epochs of a sweep folder (from its Parquet rows)."""
    from ablations.store import read_results

    _, epochs = read_results(sweep_dir).to_pandas()
    return float(epochs.epoch_seconds.sum())


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials per method (default 4)")
    p.add_argument("--trial-seconds", type=float, default=60.0, help="target length of a trial")
    p.add_argument("--data", default="digits", help="data.name (default: digits, offline)")
    p.add_argument("--width", type=int, default=16, help="smallnet width")
    p.add_argument("--threads", type=int, default=1, help="torch threads = the trial's CPUs")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--epochs", type=int, default=0, help="skip calibration and use these epochs")
    p.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--name", default="loop", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.epochs = 1, 1
    if args.loop_only:
        loop_main(args)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAY_AUTH_MODE="disabled")
    if not args.epochs:
        args.epochs, per_epoch = calibrate(args)
        print(f"calibration: {per_epoch:.2f} s/epoch -> {args.epochs} epochs per trial")
    out = tempfile.mkdtemp(prefix="bench-sweep-")
    try:
        common = ["--trials", str(args.trials), "--data", args.data, "--width", str(args.width),
                  "--threads", str(args.threads), "--epochs", str(args.epochs),
                  "--checkpoint-every", str(args.checkpoint_every), "--out", out]
        loop_cmd = [sys.executable, __file__, "--loop-only", *common]
        loop_a = timed(loop_cmd + ["--name", "loop-a"], env)
        print(f"loop:  {args.trials} trials in {loop_a:.1f} s (before the sweep)")
        sweep_cmd = [sys.executable, "-m", "hardmix.cli", "sweep", "--set", "name=bench",
                     "--set", f"storage={out}", "--set", "mode=grid",
                     "--set", f"seeds={json.dumps(list(range(args.trials)))}",
                     "--set", "max_concurrent_trials=1", "--set", "report=false",
                     "--set", f"resources.cpus={args.threads}"]
        for o in run_overrides(args, args.epochs):
            sweep_cmd += ["--set", f"run.{o}"]
        sweep_s = timed(sweep_cmd, env)
        print(f"sweep: {args.trials} trials in {sweep_s:.1f} s")
        loop_b = timed(loop_cmd + ["--name", "loop-b"], env)
        print(f"loop:  {args.trials} trials in {loop_b:.1f} s (after the sweep)")
        loop_s = (loop_a + loop_b) / 2
        # Time inside the training epochs of each (a machine busy with other work shows here).
        inside = {n: epoch_seconds(os.path.join(out, n)) for n in ("loop-a", "bench", "loop-b")}
        print("inside the epochs: " + ", ".join(f"{n} {v:.1f} s" for n, v in inside.items()))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"sweep_overhead_fraction={(sweep_s - loop_s) / loop_s:.3f}")


if __name__ == "__main__":
    main()
