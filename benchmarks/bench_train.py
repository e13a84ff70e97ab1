"""Images per second of full training steps: today's fp32-contiguous path against the default.

A step is the training loop's own (:func:`hardmix.train.training_step`) with HardMix at ``prob=1``
and the ``forward`` signal (the extra no-grad forward included), SGD-Nesterov, batch 128 of
32x32 images. Two numeric policies of :func:`hardmix.train.precision_policy` are timed in
interleaved rounds, each with its own copy of the same model, so that load on a shared machine
hits both alike:

* ``reference``: fp32, contiguous (``optim.amp=fp32``, ``optim.channels_last=false``);
* ``default``: the run's default policy on this machine (bf16 autocast where the CPU or GPU
  computes bf16 natively, channels_last).

Models: smallnet width 16 and 32, and ResNet-18 (CIFAR stem, a few steps: it is slow on a CPU).
Achieved GFLOP/s counts forward + backward + the hardness forward with
``torch.utils.flop_counter`` (one counted step, the same FLOPs under either policy).

``--compile`` adds a third variant, the default policy with ``torch.compile`` on the model, and
prints its compile time and the break-even run length (how long a run must be before compiling
pays off).

    python benchmarks/bench_train.py [--rounds 12] [--threads 1] [--models w16,w32,resnet18]

Last line: ``cpu_train_speedup_w16=<x> cpu_train_speedup_w32=<y> gflops_w32=<z>`` (targets on a
CPU with native bf16: w32 >= 2.0, w16 >= 1.7).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardmix import HardMix  # noqa: E402
from hardmix.config import ModelConfig, OptimConfig  # noqa: E402
from hardmix.models import build_model  # noqa: E402
from hardmix.train import precision_policy, training_step  # noqa: E402

MODELS = {"w16": ModelConfig(name="smallnet", width=16), "w32": ModelConfig(name="smallnet", width=32),
          "resnet18": ModelConfig(name="resnet18")}
#: ResNet-18 is ~35x the FLOPs of smallnet-32: fewer rounds keep the benchmark short.
ROUNDS_SCALE = {"resnet18": 0.25}


def step_flops(model: torch.nn.Module, mix: HardMix, batch: tuple) -> float:
    """FLOPs of one training step (forward, backward, hardness forward) by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y, idx = batch
    with FlopCounterMode(display=False) as counter:
        training_step(model, model, copy.deepcopy(mix), opt, x.clone(), y, idx)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--models", default="w16,w32,resnet18")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.warmup, args.batch, args.models = 1, 0, 16, "w16,w32"
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    policies = {"reference": precision_policy(OptimConfig(amp="fp32", channels_last=False), dev),
                "default": precision_policy(OptimConfig(), dev)}
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}; HardMix prob 1, forward signal")
    for name, p in policies.items():
        print(f"  {name}: {p.note}")
    speedups, gflops = {}, {}
    for key in args.models.split(","):
        mcfg = MODELS[key]
        torch.manual_seed(0)
        base = build_model(mcfg, 10, 3, 32).to(dev)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                    torch.randint(0, 10, (args.batch,), generator=g),
                    torch.randperm(50_000, generator=g)[:args.batch]) for _ in range(3)]
        batches = [tuple(t.to(dev) for t in b) for b in batches]
        flops = step_flops(base, HardMix(prob=1.0, seed=0, inplace=True), batches[0])
        variants = {}
        for name, p in policies.items():
            model = copy.deepcopy(base).to(memory_format=p.memory_format)
            variants[name] = (model, model, p)
        if args.compile:
            p = policies["default"]
            raw = copy.deepcopy(base).to(memory_format=p.memory_format)
            variants["compiled"] = (torch.compile(raw), raw, p)
        runs = {}
        for name, (model, raw, p) in variants.items():
            opt = torch.optim.SGD(raw.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)
            runs[name] = (model, raw, opt, HardMix(prob=1.0, seed=0, inplace=True), p)
        rounds = max(3, int(args.rounds * ROUNDS_SCALE.get(key, 1.0)))
        times: dict[str, list[float]] = {name: [] for name in runs}
        first: dict[str, float] = {}
        for r in range(args.warmup + rounds):
            for name, (model, raw, opt, mix, p) in runs.items():
                x, y, idx = batches[r % len(batches)]
                x = x.contiguous(memory_format=p.memory_format).clone(
                    memory_format=p.memory_format)
                model.train()
                sync()
                t0 = time.perf_counter()
                training_step(model, raw, mix, opt, x, y, idx, autocast=p.autocast)
                sync()
                dt = time.perf_counter() - t0
                if r == 0:
                    first[name] = dt
                if r >= args.warmup:
                    times[name].append(dt)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ref = med["reference"]
        print(f"{key}: {flops / args.batch / 1e6:.1f} MFLOP per image per step")
        for name, m in med.items():
            print(f"  {name:10s} {args.batch / m:8.0f} img/s  {flops / m / 1e9:7.1f} GFLOP/s  "
                  f"{ref / m:5.2f} x reference")
        if "compiled" in med:
            gain = med["default"] - med["compiled"]  # seconds saved per step
            overhead = first["compiled"] - med["compiled"]
            steps = overhead / gain if gain > 0 else float("inf")
            print(f"  compile: first step {first['compiled']:.1f} s; pays off after "
                  f"{steps:,.0f} steps ({steps * med['compiled'] / 60:.1f} min)"
                  if gain > 0 else f"  compile: first step {first['compiled']:.1f} s; no gain")
        speedups[key] = ref / med["default"]
        gflops[key] = flops / med["default"] / 1e9
    print(" ".join([f"cpu_train_speedup_{k}={v:.2f}" for k, v in speedups.items()
                    if k in ("w16", "w32")]
                   + ([f"gflops_w32={gflops['w32']:.1f}"] if "w32" in gflops else [])))


if __name__ == "__main__":
    main()
