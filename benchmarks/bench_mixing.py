"""Microseconds per mixing call on this machine, against torchvision's CutMix in the same run.

    python benchmarks/bench_mixing.py [--batch 128] [--rounds 15] [--calls 100] [--threads 1]

Batch of ``B`` images 3×32×32 (float32) with labels and clean logits (10 classes), ``prob=1``.
Every method is timed as a full call: source selection (HardMix: hard samples from the logits,
the hard source batch, the fallback), the paste or blend, λ and the source labels. References:
``torchvision.transforms.v2.CutMix`` (one λ and box per batch, soft labels) and ``x.clone()``,
and the *paste floor*: the memory movement alone of a batch-box paste (a copy of the batch and a
strided ``index_select`` of the patch, or in place the patch gathered and written back), which
bounds what any batch-box CutMix can reach in eager PyTorch on the machine.

Methods are timed in interleaved rounds (each round times every method once, ``--calls`` calls
each) so that load from other processes hits all of them alike. The clock is the thread's CPU time
(``--clock cpu``, the default with one thread): on a machine shared with other jobs it leaves out
the time the process waits for a core, which wall-clock figures are dominated by; ``--clock wall``
uses ``time.perf_counter``. The table shows the median and minimum over rounds of the chosen clock
(and the median wall time). The last two lines give the speedups of HardMix (batch box / per-sample
boxes) over torchvision's CutMix from the medians: first when HardMix returns a new batch (the
default), last when it mixes into the input batch (``inplace=True``, what ``hardmix train`` uses).

Last line: ``hardmix_speedup_vs_torchvision_cutmix=<x> per_sample_speedup_vs_torchvision_cutmix=<y>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardmix import HardMix  # noqa: E402


def time_call(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> tuple[float, float]:
    """Mean microseconds per call over ``calls`` calls: (by ``clock``, by wall clock)."""
    start, wall = clock(), time.perf_counter()
    for _ in range(calls):
        fn()
    return ((clock() - start) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100, help="calls per method per round")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable figures on a shared machine)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="cpu: the thread's CPU time (default with one thread); wall: perf_counter")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: checks that the script runs and prints its last line (CI); not a measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.rounds, args.calls = 16, 2, 3
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    b, s, c = args.batch, args.size, 10
    x = torch.randn(b, 3, s, s, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    # Clean logits with about 30% misclassified samples, like mid-training.
    logits = torch.randn(b, c, generator=g)
    logits[torch.arange(b), y] += torch.where(torch.rand(b, generator=g) < 0.7, 3.0, -3.0)
    work = x.clone()  # target of the in-place variants

    def mk(method: str, **kw: object) -> HardMix:
        return HardMix(method=method, prob=1.0, seed=0, num_classes=c, **kw)

    # The floor of any batch-box paste in eager PyTorch: only the memory movement, with boxes
    # of CutMix's law (λ ~ U(0, 1), centre uniform, clipped), cycled. A new batch: one copy plus
    # one strided index_select of the patch into it; in place: the patch gathered, then written
    # back. No source selection, λ or labels: the ratio of this row to torchvision's is the
    # most any batch-box CutMix can reach here.
    from hardmix.mix import rand_box

    boxes = [rand_box(float(u[0]), s, s, float(u[1]), float(u[2]))
             for u in torch.rand(64, 3, generator=g, dtype=torch.float64)]
    perm = torch.randperm(b, generator=g)
    patch_buf = torch.empty_like(x)
    floor_work = x.clone()
    state = {"i": 0}

    def next_box() -> tuple[int, int, int, int]:
        state["i"] = (state["i"] + 1) % len(boxes)
        return boxes[state["i"]]

    def floor_copy() -> torch.Tensor:
        y0, y1, x0, x1 = next_box()
        out = x.clone()
        torch.index_select(x[:, :, y0:y1, x0:x1], 0, perm, out=out[:, :, y0:y1, x0:x1])
        return out

    def floor_inplace() -> torch.Tensor:
        y0, y1, x0, x1 = next_box()
        patch = floor_work[:, :, y0:y1, x0:x1]
        buf = patch_buf[:, :, : y1 - y0, : x1 - x0]
        torch.index_select(patch, 0, perm, out=buf)
        return patch.copy_(buf)

    tv = v2.CutMix(num_classes=c)
    hm_batch, hm_sample = mk("hardmix"), mk("hardmix", box="sample")
    hm_batch_ip, hm_sample_ip = mk("hardmix", inplace=True), mk("hardmix", box="sample", inplace=True)
    cases: dict[str, Callable[[], object]] = {
        "x.clone()": lambda: x.clone(),
        "torchvision v2.CutMix": lambda: tv(x, y),
        "paste floor (new batch)": floor_copy,
        "paste floor (inplace)": floor_inplace,
        "none": (lambda m: lambda: m(x, y))(mk("none")),
        "cutmix (batch box)": (lambda m: lambda: m(x, y))(mk("cutmix")),
        "hardmix (batch box)": lambda: hm_batch(x, y, logits=logits),
        "hardmix (per-sample boxes)": lambda: hm_sample(x, y, logits=logits),
        "hardmix (batch box, inplace)": lambda: hm_batch_ip(work, y, logits=logits),
        "hardmix (per-sample, inplace)": lambda: hm_sample_ip(work, y, logits=logits),
        "mixup (batch λ)": (lambda m: lambda: m(x, y))(mk("mixup")),
        "cutout (batch box)": (lambda m: lambda: m(x, y))(mk("cutout")),
        "saliencymix (batch box)": (lambda m: lambda: m(x, y))(mk("saliencymix")),
    }
    for fn in cases.values():  # warm-up: allocator, lazy generators, first-call paths
        time_call(fn, 20, clock)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    walls: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            t, w = time_call(fn, args.calls, clock)
            samples[name].append(t)
            walls[name].append(w)

    med = {name: statistics.median(v) for name, v in samples.items()}
    ref = med["torchvision v2.CutMix"]
    print(f"batch {b} x 3x{s}x{s}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds x {args.calls} calls, clock={clock_name}")
    print(f"{'method':32s} {'median us':>10s} {'min us':>8s} {'wall us':>8s} {'vs torchvision':>15s}")
    for name, v in samples.items():
        print(f"{name:32s} {med[name]:10.1f} {min(v):8.1f} {statistics.median(walls[name]):8.1f} "
              f"{ref / med[name]:14.2f}x")
    print(f"copy: hardmix_speedup_vs_torchvision_cutmix={ref / med['hardmix (batch box)']:.2f} "
          f"per_sample_speedup_vs_torchvision_cutmix={ref / med['hardmix (per-sample boxes)']:.2f}")
    print(f"floor: paste_floor_speedup_vs_torchvision_cutmix={ref / med['paste floor (new batch)']:.2f} "
          f"inplace_paste_floor_speedup_vs_torchvision_cutmix="
          f"{ref / med['paste floor (inplace)']:.2f}")
    speed_batch = ref / med["hardmix (batch box, inplace)"]
    speed_sample = ref / med["hardmix (per-sample, inplace)"]
    print(f"hardmix_speedup_vs_torchvision_cutmix={speed_batch:.2f} "
          f"per_sample_speedup_vs_torchvision_cutmix={speed_sample:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
