"""Accuracy is unchanged by the fast CPU path: ``cpu-quick`` at the default numeric policy (bf16
autocast + channels_last where the CPU has native bf16) against fp32-contiguous, 2 seeds each.

Each run is the real ``hardmix train`` loop (cpu-quick: smallnet width 16 on CIFAR-10, 5
epochs, HardMix cached at prob 0.5). The check passes when the two means differ by at most one
seed-std (the larger of the two sides' sample std).

    python benchmarks/bench_accuracy.py --data ../shared/data/cifar10.npz [--seeds 0 1]

Last line: ``default_top1=<m>±<s> fp32_top1=<m>±<s> diff=<d> within_one_std=<bool>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardmix.config import RunConfig, load_config  # noqa: E402
from hardmix.train import train  # noqa: E402


def run(data: str | None, seed: int, fp32: bool, threads: int,
        extra_overrides: tuple[str, ...] = ()) -> tuple[float, float, str]:
    import torch

    torch.set_num_threads(threads)
    extra = ["optim.amp=fp32", "optim.channels_last=false"] if fp32 else []
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(RunConfig, "cpu-quick", None,
                          [f"data.path={data}" if data else "data.name=digits", f"seed={seed}",
                           f"output.dir={out}", "output.progress=false",
                           "output.tensorboard=false", *extra, *extra_overrides])
        t0 = time.perf_counter()
        s = train(cfg, [], Path(out) / "r")
        return s["final_top1_err"], time.perf_counter() - t0, s["precision"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 .npz (required unless --smoke, which uses digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = ap.parse_args()
    if not (args.data or args.smoke):
        ap.error("--data is required (a CIFAR-10 .npz), unless --smoke")
    extra = ("optim.epochs=1",) if args.smoke else ()
    res: dict[str, list[float]] = {"default": [], "fp32": []}
    for seed in args.seeds:
        for name in res:  # interleaved, so that machine load hits both alike
            err, secs, note = run(args.data, seed, name == "fp32", args.threads, extra)
            res[name].append(err)
            print(f"{name:8s} seed {seed}: test error {err:.2f}% in {secs:.0f} s ({note})",
                  flush=True)
    m = {k: statistics.mean(v) for k, v in res.items()}
    s = {k: statistics.stdev(v) if len(v) > 1 else float("nan") for k, v in res.items()}
    diff = m["default"] - m["fp32"]
    ok = abs(diff) <= max(s.values())
    print(f"default_top1={m['default']:.2f}±{s['default']:.2f} fp32_top1={m['fp32']:.2f}"
          f"±{s['fp32']:.2f} diff={diff:+.2f} within_one_std={ok}")


if __name__ == "__main__":
    main()
