"""The GPU check: one prepared script for a machine with a CUDA device (under 8 minutes).

1. the test suite's CUDA-marked tests (``pytest -m cuda``: no host sync in the augmentation
   step under ``torch.cuda.set_sync_debug_mode("error")``, bf16 + channels_last training, the
   device loader on the GPU);
2. one ResNet-18 CIFAR epoch (50,000 images, batch 128, HardMix, bf16 + channels_last, the
   device loader): images/s and model FLOPs utilisation (MFU, from torch's FLOP counter and the
   GPU's bf16 peak);
3. the HardMix / CutMix step-time ratio on the GPU (benchmarks/bench_step.py; targets as on
   the CPU: cached <= 1.03, forward <= 1.40);
4. four small trials packed on one GPU with fractional resources (``resources.gpus=0.25``), on a
   local Ray instance: all four must complete on the GPU, and they must overlap in time.

On a machine without CUDA it says so in one line and exits 0. Real CIFAR-10 is used when
``--data`` points at the .npz (else synthetic images of CIFAR's shape). Last line:
``gpu_imgs_per_s=<x> mfu=<y> forward_over_cutmix=<a> cached_over_cutmix=<b> packed_trials=<n>``.

    python benchmarks/gpu_check.py [--data ../shared/data/cifar10.npz] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Dense bf16 peak (TFLOP/s) by device name, for the MFU (override with --peak-tflops).
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
         "A10G": 125.0, "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0}


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def cuda_tests() -> bool:
    step("CUDA tests (pytest -m cuda)")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                          "tests/test_cuda.py"], cwd=REPO, timeout=300)
    return res.returncode == 0


def cifar_epoch(data_path: str | None, peak: float) -> tuple[float, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hardmix import HardMix
    from hardmix.config import DataConfig, ModelConfig, OptimConfig
    from hardmix.data import build_data
    from hardmix.models import build_model
    from hardmix.train import build_optimizer, precision_policy, training_step

    step("one ResNet-18 CIFAR epoch (bf16 + channels_last, HardMix)")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    policy = precision_policy(OptimConfig(), dev)
    dcfg = (DataConfig(name="npz", path=data_path, val_size=0) if data_path
            else DataConfig(name="synthetic", val_size=0))
    data = build_data(dcfg, 0, dev, memory_format=policy.memory_format)
    if not data_path:  # CIFAR's shape and size without the files
        import hardmix.data as hd

        x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 10, (50_000,))
        data.train = hd.DeviceLoader(x, y, 128, (0.5,) * 3, (0.25,) * 3, train=True, device=dev,
                                     memory_format=policy.memory_format)
    model = build_model(ModelConfig(name="resnet18"), 10, 3, 32).to(
        dev, memory_format=policy.memory_format)
    opt, sched = build_optimizer(model, OptimConfig(epochs=1, milestones=[]), len(data.train))
    mix = HardMix(seed=0, inplace=True, num_classes=10)
    data.train.set_epoch(1)
    batches = iter(data.train)
    x, yb, idx = next(batches)
    with FlopCounterMode(display=False) as counter:
        training_step(model, model, mix, opt, x.clone(), yb, idx, autocast=policy.autocast)
    flops_per_step = counter.get_total_flops()
    for _ in range(5):  # warm-up (cudnn autotuning)
        training_step(model, model, mix, opt, x.clone(), yb, idx, autocast=policy.autocast)
    torch.cuda.synchronize()
    t0, n, steps = time.perf_counter(), 0, 0
    for x, yb, idx in data.train:
        training_step(model, model, mix, opt, x, yb, idx, autocast=policy.autocast,
                      scheduler=sched)
        n, steps = n + len(yb), steps + 1
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    imgs = n / dt
    mfu = flops_per_step * steps / dt / (peak * 1e12)
    print(f"{policy.note}: {n:,} images in {dt:.1f} s = {imgs:,.0f} img/s; "
          f"{flops_per_step / len(yb) / 1e9:.2f} GFLOP per image per step; MFU {mfu:.1%} of "
          f"{peak:g} TFLOP/s")
    return imgs, mfu


def step_ratios() -> tuple[float, float]:
    step("HardMix / CutMix step time on the GPU (bench_step.py)")
    res = subprocess.run([sys.executable, "benchmarks/bench_step.py", "--device", "cuda",
                          "--width", "64", "--rounds", "40"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    print(res.stdout[-1500:], res.stderr[-500:])
    m = re.search(r"cached_over_cutmix=([\d.]+) forward_over_cutmix=([\d.]+)", res.stdout)
    return (float(m[2]), float(m[1])) if m else (float("nan"), float("nan"))


def packed_trials(data_path: str | None) -> int:
    step("four trials packed on one GPU (resources.gpus=0.25)")
    out = tempfile.mkdtemp(prefix="gpu-pack-")
    data = (["run.data.name=npz", f"run.data.path={data_path}", "run.data.subset=5000"]
            if data_path else ["run.data.name=synthetic"])
    sets = ["name=pack", f"storage={out}", "mode=grid", "seeds=[0, 1, 2, 3]",
            "resources.gpus=0.25", "resources.cpus=1", "max_concurrent_trials=4",
            "run.model.name=resnet18", "run.optim.epochs=2", "run.data.batch_size=128",
            "run.output.checkpoint_every=0", "report=false", "local_cpus=8", *data]
    cmd = [sys.executable, "-m", "hardmix.cli", "sweep", *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    print(res.stdout[-1500:], res.stderr[-800:])
    from ablations.store import read_results

    trials = read_results(f"{out}/pack").trials.to_pandas()
    ok = trials[(trials.status == "completed") & trials.device.str.startswith("cuda")]
    from datetime import datetime

    spans = []
    for t, wall in zip(ok.trial_id, ok.wall_seconds):
        meta = json.loads(Path(out, "pack", "runs", t, "run.json").read_text())
        start = datetime.fromisoformat(meta["started_at"]).timestamp()
        spans.append((start, start + float(wall)))
    spans.sort()
    overlap = any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    print(f"{len(ok)} of 4 completed on the GPU; wall {ok.wall_seconds.round(1).tolist()} s; "
          + ("they ran at the same time" if overlap else "they did NOT overlap"))
    if not overlap:
        return 0
    return len(ok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 .npz (default: synthetic images of its shape)")
    ap.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the GPU, TFLOP/s")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), 100.0)
    print(f"gpu_check on {name} (bf16 peak {peak:g} TFLOP/s), torch {torch.__version__}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.time()
    tests_ok = cuda_tests()
    imgs, mfu = cifar_epoch(args.data, peak)
    fwd, cached = step_ratios()
    packed = packed_trials(args.data)
    print(f"\ncuda tests {'passed' if tests_ok else 'FAILED'}; {time.time() - t0:.0f} s in all")
    print(f"gpu_imgs_per_s={imgs:.0f} mfu={mfu:.3f} forward_over_cutmix={fwd:.3f} "
          f"cached_over_cutmix={cached:.3f} packed_trials={packed}")
    return 0 if tests_ok and packed == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
