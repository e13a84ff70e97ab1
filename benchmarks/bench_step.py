"""Time of one training step (forward, backward, optimiser) with no mixing, CutMix and HardMix.

The step is the training loop's own (:func:`hardmix.train.training_step`): smallnet at batch 128
on 32x32 images. Four variants, each with its own copy of the same model and optimiser, are
timed in interleaved rounds so that load on a shared machine hits them alike:

* ``none``: plain cross-entropy step (reference of the reference);
* ``cutmix``: random sources + box;
* ``hardmix_forward``: hard sources from an extra no-grad eval-mode forward of the clean batch;
* ``hardmix_cached``: hard sources from the per-sample memory (fed from the clean rows).

Every mixer has ``prob`` (default 0.5, CutMix's CIFAR setting) and the same seed, so the same
steps mix in every variant: the cached memory needs unmixed steps to learn from (the config
refuses ``signal=cached`` with ``prob=1``). The ratios compare the medians over the *mixed*
steps (``none``: over every step), which is what a step of each method costs when it mixes.

The clock is the thread's CPU time (``--clock cpu``, the default with ``--threads 1``): on a
machine shared with other jobs it leaves out the time the process waits for a core, which
dominates wall-clock figures there; ``--clock wall`` uses ``time.perf_counter`` (and is what
``--threads`` > 1 and CUDA use). Exit 1 when a loss or a ratio is not finite (NaN).

    python benchmarks/bench_step.py [--width 32] [--rounds 25] [--batch 128] [--prob 0.5]
    python benchmarks/bench_step.py --smoke           # tiny sizes: that it runs, not a measurement

Last line: ``cached_over_cutmix=<x> forward_over_cutmix=<y>`` (targets: <= 1.03 and <= 1.40).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardmix import HardMix  # noqa: E402
from hardmix.models import SmallNet  # noqa: E402
from hardmix.train import training_step  # noqa: E402

DATASET = 50_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32, help="smallnet width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prob", type=float, default=0.5,
                    help="probability that a step mixes, every variant (< 1 for cached)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="cpu: thread CPU time (default with one CPU thread); wall: perf_counter")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (width 4, batch 32, 8 rounds): that it runs, not a measurement")
    args = ap.parse_args()
    if args.smoke:
        args.width, args.batch, args.rounds, args.warmup = 4, 32, 8, 1
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 and dev.type == "cpu" else "wall")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    base = SmallNet(args.width, num_classes=10).to(dev)
    variants = {
        "none": dict(method="none"),
        "cutmix": dict(method="cutmix"),
        "hardmix_forward": dict(method="hardmix", signal="forward"),
        "hardmix_cached": dict(method="hardmix", signal="cached", dataset_size=DATASET),
    }
    runs = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"signal='cached'")  # observe(mask=...) is used
        for name, kw in variants.items():
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)
            runs[name] = (model, opt, HardMix(prob=args.prob, num_classes=10, seed=0,
                                              inplace=True, **kw))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g),
                torch.randperm(DATASET, generator=g)[:args.batch]) for _ in range(4)]
    batches = [tuple(t.to(dev) for t in b) for b in batches]
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: list[torch.Tensor] = []
    print(f"smallnet width {args.width}, batch {args.batch}, prob {args.prob:g}, device {dev}, "
          f"torch threads {torch.get_num_threads()}, {clock_name} clock, "
          f"{args.rounds} interleaved rounds")
    for r in range(args.warmup + args.rounds):
        for name, (model, opt, mix) in runs.items():
            x, y, idx = batches[r % len(batches)]
            x = x.clone()  # the mixer works in place, as in the training loop
            model.train()
            sync()
            t0 = clock()
            loss, out = training_step(model, model, mix, opt, x, y, idx)
            sync()
            if r >= args.warmup:
                if out.mixed or name == "none":
                    times[name].append(clock() - t0)
                losses.append(loss)
    med = {name: statistics.median(ts) if ts else math.nan for name, ts in times.items()}
    for name, m in med.items():
        print(f"{name:16s} median {1000 * m:8.2f} ms/step  {args.batch / m:8.0f} img/s  "
              f"{m / med['cutmix']:.3f} x cutmix  ({len(times[name])} steps timed)")
    cached, forward = med["hardmix_cached"] / med["cutmix"], med["hardmix_forward"] / med["cutmix"]
    finite_losses = bool(torch.isfinite(torch.stack(losses)).all())
    print(f"cached_over_cutmix={cached:.3f} forward_over_cutmix={forward:.3f}")
    if not (finite_losses and math.isfinite(cached) and math.isfinite(forward)):
        print("bench_step: FAILED: " + ("a loss is not finite" if not finite_losses else
                                        "a ratio is not finite (a variant never mixed?)"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
