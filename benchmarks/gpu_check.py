"""The GPU check: the one prepared script for a machine with a CUDA device (about 10 minutes).

Each check is a named function; ``--only a,b`` runs some of them. On a GPU every check runs on
the GPU; ``--cpu`` runs on any machine the CPU-side halves of the checks that have one (what a
stand-in can show: gloo for NCCL, CPU bf16 autocast, logical Ray GPUs), and CI runs that.

Checks (``--help`` lists them with what each needs):

* ``cuda_tests``: every CUDA-marked test (``pytest -m cuda tests``: no host sync under
  ``torch.cuda.set_sync_debug_mode("error")`` over every method and switch, ...). GPU only.
* ``sync_debug_epoch``: one whole training epoch (device loader, HardMix with the forward
  signal) and its evaluations under ``set_sync_debug_mode("warn")``: every synchronizing call
  is recorded with its call site in hardmix; a site that fires per step or per batch fails
  (the epoch end's one read of its summed statistics is allowed). GPU only.
* ``resume``: ``train()`` 3 epochs with a checkpoint each epoch, stopped after epoch 2, then
  resumed from the checkpoint, for the forward and the cached signal: every epoch row equal
  to the uninterrupted run's (CPU: exactly; CUDA: to 1e-4, cuDNN in deterministic mode).
* ``grad_bf16``: one mixed HardMix step (forward signal: the no-grad hardness forward and the
  training forward under bf16 autocast, as the loop runs them; fp16 on GPUs without native
  bf16): every conv and linear weight gets a finite, non-zero gradient whose cosine with the
  fp32 step's on the same mixed batch is >= 0.9 (every sample hard by construction, so both
  steps mix the same way; bf16 rounding through BatchNorm's backward at initialisation leaves
  cosines of 0.94-0.99 on the CPU, the linear layer's 0.99999).
* ``ddp_resume``: data-parallel ``train()`` over ``torch.distributed`` set up from
  torchrun-style variables (NCCL, one rank per GPU, at most 2; ``--cpu``: gloo, 2 ranks), 3
  epochs, stopped after 2 and resumed: rank 0's rows equal the uninterrupted run's.
* ``folder_epoch``: an image-folder run (PNG files, ``data.workers=2``, pinned memory on
  CUDA) for one epoch: finite loss and errors, batches on the device.
* ``step_ratios``: ``benchmarks/bench_step.py`` (GPU: width 64, 40 rounds; ``--cpu``:
  ``--smoke``): exit 0 and finite ratios (the figures are printed; targets are not pass/fail).
* ``packed_trials``: a sweep of four trials packed on one GPU (``resources.gpus=0.25``; ``--cpu``:
  one logical Ray GPU, trials on the CPU), one of which fails once after epoch 2 (a fault
  injected by a Ray worker setup hook, nothing in the product changes) and is retried from
  its checkpoint: all four complete (on the GPU), they overlap in time, the retried one's
  rows continue after its checkpoint's epoch.
* ``throughput``: one ResNet-18 CIFAR epoch (50,000 images, HardMix, the run's precision
  policy): images/s and MFU against the GPU's peak. GPU only; a figure, not pass/fail.

Exit 0 when every selected check passed, 1 otherwise (a NaN is a failure), 2 without CUDA and
without ``--cpu``. Last line: ``gpu_check: <passed>/<total> passed ...`` with the mode, the
device and the failed checks.

    python benchmarks/gpu_check.py [--data ../shared/data/cifar10.npz] [--only resume,grad_bf16]
    python benchmarks/gpu_check.py --cpu            # the CPU-side halves (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Deterministic cuBLAS for the resume checks; must be set before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The run config of the small runs (resume, DDP, sync debug): synthetic images, smallnet.
SMALL = {"data": {"name": "synthetic", "batch_size": 32, "subset": 192, "val_size": 0.125},
         "model": {"name": "smallnet", "width": 8},
         "optim": {"epochs": 3, "lr": 0.05, "schedule": "cosine"},
         "output": {"checkpoint_every": 1, "tensorboard": False, "image_grid": False,
                    "progress": False}}
FAULT_ENV = "HARDMIX_GPU_CHECK_FAULT"


class CheckFailed(AssertionError):
    """A check's finding (the line printed under FAIL)."""


@dataclass
class Env:
    """What every check knows: the device, whether it is the CPU stand-in, the options."""

    device: str  # "cuda" or "cpu"
    cpu_mode: bool
    data: str | None
    peak: float | None
    scratch: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def small_config(env: Env, tag: str, **sections):
    """A RunConfig of :data:`SMALL` with ``sections`` merged in, on the check's device."""
    from hardmix.config import RunConfig, deep_merge, from_dict

    raw = deep_merge(json.loads(json.dumps(SMALL)), sections)
    raw["device"] = env.device
    raw.setdefault("output", {})["name"] = tag
    raw["output"]["dir"] = str(env.scratch)
    return from_dict(RunConfig, raw)


class Rows:
    """A callback that keeps every epoch's metrics; optionally stops the run after an epoch."""

    def __init__(self, stop_after: int = 0, deterministic: bool = False):
        self.rows: list[dict] = []
        self.stop_after, self.deterministic = stop_after, deterministic

    def on_run_start(self, cfg, info) -> None:
        if self.deterministic:  # after train() set cudnn.benchmark: identical algorithms
            import torch
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    def on_mixed_preview(self, images) -> None:
        pass

    def on_epoch_end(self, metrics: dict, checkpoint=None) -> None:
        from hardmix.metrics import StopRun

        self.rows.append(dict(metrics))
        if self.stop_after and metrics["epoch"] == self.stop_after:
            raise StopRun(f"stopped after epoch {self.stop_after} by the check")

    def on_run_end(self, summary: dict) -> None:
        self.summary = summary


def compared(row: dict) -> dict:
    """The fields of an epoch row a resume must reproduce: everything but the timings."""
    from hardmix.metrics import EPOCH_METRICS

    return {k: v for k, v in row.items()
            if k == "epoch" or (k in EPOCH_METRICS and EPOCH_METRICS[k].group != "speed")}


def same_rows(a: list[dict], b: list[dict], exact: bool) -> str | None:
    """None when the rows agree, else the first difference."""
    if [r["epoch"] for r in a] != [r["epoch"] for r in b]:
        return f"epochs {[r['epoch'] for r in a]} vs {[r['epoch'] for r in b]}"
    for ra, rb in zip(a, b):
        ca, cb = compared(ra), compared(rb)
        for k in ca:
            va, vb = ca[k], cb.get(k)
            if isinstance(va, float) or isinstance(vb, float):
                if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
                    if va != vb or (isinstance(va, float) and math.isnan(va)):
                        return f"epoch {ra['epoch']} {k}: {va} vs {vb}"
                    continue
                if exact and va != vb or not exact and abs(va - vb) > 1e-4 * max(1, abs(va)):
                    return f"epoch {ra['epoch']} {k}: {va!r} vs {vb!r}"
            elif va != vb:
                return f"epoch {ra['epoch']} {k}: {va!r} vs {vb!r}"
    return None


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check_cuda_tests(env: Env) -> str:
    """every CUDA-marked test (pytest -m cuda tests)"""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                          "no:cacheprovider", "tests"], cwd=REPO, timeout=420)
    expect(res.returncode == 0, f"pytest -m cuda exited {res.returncode}")
    return "all CUDA-marked tests passed"


def check_sync_debug_epoch(env: Env) -> str:
    """one epoch + evaluation under set_sync_debug_mode: no per-step or per-batch sync"""
    import warnings
    from collections import Counter

    import torch

    from hardmix.train import train

    roots = (str(REPO / "hardmix"), str(REPO / "tune"))
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(roots)]
        where = frames[-1] if frames else None
        sites[f"{Path(where.filename).relative_to(REPO)}:{where.lineno} ({where.name})"
              if where else f"{filename}:{lineno}"] += 1

    class Watch(Rows):
        """Records syncs from the end of the run's setup to the end of its first epoch."""

        def on_run_start(self, cfg, info) -> None:
            self.guard = warnings.catch_warnings()
            self.guard.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

        def on_epoch_end(self, metrics, checkpoint=None) -> None:
            torch.cuda.set_sync_debug_mode(0)
            self.guard.__exit__(None, None, None)
            super().on_epoch_end(metrics, checkpoint)

    cfg = small_config(env, "sync", optim={"epochs": 1}, data={"batch_size": 16})
    watch = Watch()
    try:
        train(cfg, callbacks=[watch], run_dir=env.scratch / "sync")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    steps = 512 * 7 // 8 // 16  # synthetic train images after the validation split, batch 16
    per_step = {s: n for s, n in sites.items() if n >= 5}
    expect(not per_step, f"synchronizing calls per step or batch ({steps} steps): {per_step}")
    return f"{sum(sites.values())} syncs at {len(sites)} sites, none per step: {dict(sites)}"


def _resume_round_trip(env: Env, signal: str) -> str:
    from hardmix.train import train

    aug = {"method": "hardmix", "signal": signal, **({"prob": 0.5} if signal == "cached" else {})}
    det = env.cuda
    whole = Rows(deterministic=det)
    train(small_config(env, f"whole-{signal}", augment=aug), callbacks=[whole],
          run_dir=env.scratch / f"whole-{signal}")
    cut_dir = env.scratch / f"cut-{signal}"
    first = Rows(stop_after=2, deterministic=det)
    train(small_config(env, f"cut-{signal}", augment=aug), callbacks=[first], run_dir=cut_dir)
    expect(first.summary["status"] == "pruned" and len(first.rows) == 2,
           f"the first part did not stop after epoch 2: {first.summary['status']}")
    second = Rows(deterministic=det)
    train(small_config(env, f"cut-{signal}", augment=aug), callbacks=[second], run_dir=cut_dir,
          resume=True)
    expect([r["epoch"] for r in second.rows] == [3],
           f"the resume ran epochs {[r['epoch'] for r in second.rows]}, not [3]")
    diff = same_rows(whole.rows, first.rows + second.rows, exact=not env.cuda)
    expect(diff is None, f"signal={signal}: resumed rows differ from the uninterrupted run: "
                         f"{diff}")
    return f"{signal}: 3 epoch rows equal"


def check_resume(env: Env) -> str:
    """train 3 epochs, stop after 2, resume: rows equal (forward and cached signals)"""
    return "; ".join(_resume_round_trip(env, s) for s in ("forward", "cached"))


def check_grad_bf16(env: Env) -> str:
    """a mixed HardMix step under bf16 autocast: every weight's gradient as fp32's"""
    import copy

    import torch

    from hardmix import HardMix
    from hardmix.models import SmallNet
    from hardmix.train import training_step

    dev = torch.device(env.device)
    dtype = torch.bfloat16
    if env.cuda and torch.cuda.get_device_capability() < (8, 0):
        dtype = torch.float16  # no native bf16: the fp16 policy's autocast
    torch.manual_seed(0)
    base = SmallNet(16, num_classes=10).to(dev)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 32, 32, generator=g).to(dev)
    with torch.no_grad():
        base.eval()
        # Labels the model ranks last: every sample is misclassified under either precision,
        # so the hard set (everything) and the mixed batch are the same in both steps.
        y = base(x).argmin(1)
        base.train()
    idx = torch.arange(64, device=dev)
    grads = {}
    for name, autocast in (("fp32", None), ("low", dtype)):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        mix = HardMix(method="hardmix", signal="forward", prob=1.0, num_classes=10, seed=0,
                      inplace=True)
        ctx = ((lambda: torch.autocast(dev.type, dtype=autocast)) if autocast else
               (lambda: torch.autocast(dev.type, enabled=False)))
        loss, out = training_step(model, model, mix, opt, x.clone(), y, idx, autocast=ctx)
        expect(bool(torch.isfinite(loss)), f"{name} loss is {float(loss)}")
        expect(float(out.stats["hard_share"]) == 1.0, f"{name}: not every sample was hard")
        grads[name] = {n: (None if m.weight.grad is None else m.weight.grad.detach().float())
                       for n, m in model.named_modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    worst = 1.0
    for n, ref in grads["fp32"].items():
        low = grads["low"][n]
        expect(ref is not None and low is not None, f"{n}.weight got no gradient under "
                                                    f"{'fp32' if ref is None else dtype}")
        expect(bool(torch.isfinite(low).all()) and float(low.norm()) > 0,
               f"{n}.weight: gradient under {dtype} is zero or not finite")
        cos = float(torch.nn.functional.cosine_similarity(low.flatten(), ref.flatten(), dim=0))
        worst = min(worst, cos)
        expect(cos >= 0.9, f"{n}.weight: gradient under {dtype} has cosine {cos:.3f} with "
                           "fp32's (>= 0.9 expected)")
    return (f"{len(grads['fp32'])} conv/linear weights, lowest cosine with fp32's gradient "
            f"{worst:.4f} under {str(dtype).replace('torch.', '')} on {env.device}")


def _ddp_rank(spec: dict) -> int:
    """One rank of :func:`check_ddp_resume` (this script with ``--ddp-rank``): the process group
    from torchrun-style variables, then the uninterrupted run, the stopped run and its resume;
    rank 0 writes its rows."""
    import torch.distributed as dist

    from hardmix.train import train

    env = Env(spec["device"], spec["cpu_mode"], None, None, Path(spec["scratch"]))
    backend = "nccl" if env.cuda else "gloo"
    if env.cuda:
        import torch
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        runs = {}
        for tag, stop, resume in (("whole", 0, False), ("cut", 2, False), ("cut", 0, True)):
            rows = Rows(stop_after=stop, deterministic=env.cuda)
            train(small_config(env, f"ddp-{tag}"), callbacks=[rows],
                  run_dir=env.scratch / f"ddp-{tag}", resume=resume)
            runs.setdefault(tag, []).extend(rows.rows)
            dist.barrier()
        if dist.get_rank() == 0:
            Path(spec["out"]).write_text(json.dumps(runs))
    finally:
        dist.destroy_process_group()
    return 0


def check_ddp_resume(env: Env) -> str:
    """data-parallel train() with a resume (NCCL on GPUs, gloo with --cpu)"""
    import torch

    world = min(2, torch.cuda.device_count()) if env.cuda else 2
    scratch = Path(tempfile.mkdtemp(dir=env.scratch, prefix="ddp-"))
    out = scratch / "rows.json"
    spec = {"device": env.device, "cpu_mode": env.cpu_mode, "scratch": str(scratch),
            "out": str(out)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], [scratch / f"rank{r}.log" for r in range(world)]
    for rank in range(world):
        penv = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                    WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                    OMP_NUM_THREADS="1")
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--ddp-rank",
                                           json.dumps(spec)], cwd=REPO, env=penv, stdout=log,
                                          stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, code in enumerate(codes):
        if code:
            print(f"-- rank {rank} (exit {code}):\n{logs[rank].read_text()[-3000:]}")
    expect(codes == [0] * world, f"ranks exited {codes}")
    runs = json.loads(out.read_text())
    diff = same_rows(runs["whole"], runs["cut"], exact=not env.cuda)
    expect(diff is None, f"resumed data-parallel rows differ from the uninterrupted run: {diff}")
    backend = "nccl" if env.cuda else "gloo"
    return f"{world} {backend} rank(s): 3 epoch rows equal after a resume"


def check_folder_epoch(env: Env) -> str:
    """one epoch from an image folder with 2 loader workers (pinned memory on CUDA)"""
    import numpy as np
    from PIL import Image

    from hardmix.data import build_data
    from hardmix.train import train

    root = env.scratch / "folder"
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((20, 20, 3)) * 80 + c * 60).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    cfg = small_config(env, "folder", data={"name": "folder", "path": str(root), "workers": 2,
                                            "image_size": 16, "val_size": 0.0, "subset": None},
                       optim={"epochs": 1})
    data = build_data(cfg.data, 0, env.device)
    loader = data.train.loader
    expect(loader.num_workers == 2, f"{loader.num_workers} loader workers, not 2")
    expect(loader.pin_memory == env.cuda, f"pin_memory={loader.pin_memory} on {env.device}")
    data.train.set_epoch(1)
    x, y, _ = next(iter(data.train))
    expect(x.device.type == env.device, f"batches on {x.device}, not {env.device}")
    rows = Rows()
    train(cfg, callbacks=[rows], run_dir=env.scratch / "folder-run")
    row = rows.rows[-1]
    values = [row["train_loss"], row["test_loss"], row["test_top1_err"]]
    expect(all(isinstance(v, float) and math.isfinite(v) for v in values),
           f"not finite: {values}")
    return (f"{len(data.train)} batches, 2 workers, pin_memory={loader.pin_memory}, "
            f"train loss {row['train_loss']:.3f}")


def check_step_ratios(env: Env) -> str:
    """bench_step.py: the HardMix / CutMix step-time ratios (exit 0, finite)"""
    args = (["--smoke"] if env.cpu_mode else ["--device", "cuda", "--width", "64", "--rounds",
                                              "40"])
    res = subprocess.run([sys.executable, "benchmarks/bench_step.py", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=420)
    print(res.stdout[-1500:], res.stderr[-1500:], sep="")
    lines = res.stdout.strip().splitlines()
    last = dict(t.split("=", 1) for t in (lines[-1].split() if lines else []) if "=" in t)
    ratios = {k: float(last.get(k, "nan")) for k in ("cached_over_cutmix", "forward_over_cutmix")}
    expect(res.returncode == 0, f"bench_step.py exited {res.returncode}")
    expect(all(math.isfinite(v) for v in ratios.values()), f"ratios {ratios}")
    return " ".join(f"{k}={v:.3f}" for k, v in ratios.items())


def install_fault() -> None:
    """Ray ``worker_process_setup_hook`` of :func:`check_packed_trials`: the trial named in
    $HARDMIX_GPU_CHECK_FAULT raises after the rows of its epoch 2 on its first attempt, before
    Ray hears of that epoch (so Ray's latest checkpoint is epoch 1's)."""
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    import hardmix.train as ht

    if getattr(ht.train, "_gpu_check_fault", False):
        return
    real = ht.train

    class InjectedFault(RuntimeError):
        pass

    class Fault(ht.Callback):
        def on_epoch_end(self, metrics, checkpoint=None):
            if int(metrics["epoch"]) == 2:
                raise InjectedFault("injected by gpu_check after epoch 2 (attempt 1)")

    def train(cfg, callbacks=(), run_dir="runs/run", resume=False, **kw):
        callbacks = list(callbacks)
        try:
            attempt = json.loads((Path(run_dir) / "attempt.json").read_text())["attempt"]
        except (OSError, ValueError, KeyError):
            attempt = 1
        if cfg.output.name == target and attempt == 1:
            callbacks.insert(max(0, len(callbacks) - 1), Fault())  # before the Ray reporter
        return real(cfg, callbacks=callbacks, run_dir=run_dir, resume=resume, **kw)

    train._gpu_check_fault = True
    ht.train = train


def check_packed_trials(env: Env) -> str:
    """four trials on one GPU (gpus=0.25), one failing once and retried from its checkpoint"""
    from datetime import datetime

    import pyarrow.dataset as ds
    import ray

    from ablations.store import read_results
    from hardmix.config import SweepConfig, load_config
    from tune.sweep import run_sweep

    target = "c000-s2"
    storage = env.scratch / "packed"
    data = (["run.data.name=npz", f"run.data.path={env.data}", "run.data.subset=5000"]
            if env.data and not env.cpu_mode else ["run.data.name=synthetic"])
    model = (["run.model.name=smallnet", "run.model.width=8"] if env.cpu_mode
             else ["run.model.name=resnet18"])
    sets = ["name=pack", f"storage={storage}", "mode=grid", "seeds=[0, 1, 2, 3]",
            "resources.gpus=0.25", "resources.cpus=1", "max_concurrent_trials=4",
            "max_failures=1", "run.optim.epochs=3", "run.data.batch_size=64",
            "run.output.checkpoint_every=1", "run.output.tensorboard=false",
            "run.output.image_grid=false", "report=false", f"run.device={env.device}",
            *data, *model]
    cfg = load_config(SweepConfig, None, None, sets)
    ray.init(address="local", num_cpus=6, num_gpus=1 if env.cpu_mode else None,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {FAULT_ENV: target, "OMP_NUM_THREADS": "1",
                                       "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"},
                          "worker_process_setup_hook": install_fault})
    try:
        outcome = run_sweep(cfg)
    finally:
        ray.shutdown()
    expect(outcome.counts == {"completed": 4}, f"trials: {outcome.counts}")
    trials = {t["trial_id"]: t for t in read_results(outcome.sweep_dir).trials.to_pylist()}
    expect(all(t["device"].startswith(env.device) for t in trials.values()),
           f"devices {[t['device'] for t in trials.values()]}")
    attempts = {k: t["attempt"] for k, t in trials.items()}
    expect(attempts == {k: (2 if k == target else 1) for k in attempts},
           f"attempts {attempts}: only {target} should have been retried")
    raw = ds.dataset(f"{outcome.sweep_dir}/epochs", format="parquet", partitioning="hive")
    rows = [r for r in raw.to_table(columns=["trial_id", "epoch"]).to_pylist()
            if r["trial_id"] == target]
    written = sorted(r["epoch"] for r in rows)
    # Epochs 1 and 2 by the first attempt, then from epoch 1's checkpoint: epoch 1 recorded
    # again (the checkpoint's epoch, which a kill could have left unrecorded), 2 and 3.
    expect(written == [1, 1, 2, 2, 3], f"{target} wrote epochs {written}, not [1, 1, 2, 2, 3] "
                                       "(a retry from epoch 1's checkpoint)")
    spans = []
    for t in trials.values():
        meta = json.loads(Path(outcome.sweep_dir, "runs", t["trial_id"], "run.json").read_text())
        start = datetime.fromisoformat(meta["started_at"]).timestamp()
        spans.append((start, start + float(t["wall_seconds"] or 0)))
    spans.sort()
    expect(any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "the trials did not overlap")
    return (f"4 completed on {env.device}{' (one logical GPU)' if env.cpu_mode else ''}, "
            f"{target} retried from epoch 1's checkpoint, overlapping in time")


def check_throughput(env: Env) -> str:
    """one ResNet-18 CIFAR epoch: images/s and MFU (a figure)"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hardmix import HardMix
    from hardmix.config import DataConfig, ModelConfig, OptimConfig
    from hardmix.data import build_data
    from hardmix.models import build_model
    from hardmix.throughput import device_peak
    from hardmix.train import build_optimizer, precision_policy, training_step

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    torch.backends.cudnn.benchmark = True
    policy = precision_policy(OptimConfig(), dev)
    # The dense peak at the policy's precision: hardmix.throughput's table (the runs' mfu),
    # unless --peak-tflops gives one.
    peak = env.peak * 1e12 if env.peak else device_peak(dev, policy.kind)
    dcfg = (DataConfig(name="npz", path=env.data, val_size=0) if env.data
            else DataConfig(name="synthetic", val_size=0))
    data = build_data(dcfg, 0, dev, memory_format=policy.memory_format)
    if not env.data:  # CIFAR's shape and size without the files
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
    x, yb, idx = next(iter(data.train))
    with FlopCounterMode(display=False) as counter:
        training_step(model, model, mix, opt, x.clone(), yb, idx, autocast=policy.autocast)
    flops_per_step = counter.get_total_flops()
    for _ in range(5):  # warm-up (cudnn autotuning)
        training_step(model, model, mix, opt, x.clone(), yb, idx, autocast=policy.autocast)
    torch.cuda.synchronize()
    t0, n, steps, losses = time.perf_counter(), 0, 0, []
    for x, yb, idx in data.train:
        loss, _ = training_step(model, model, mix, opt, x, yb, idx, autocast=policy.autocast,
                                scheduler=sched)
        losses.append(loss)
        n, steps = n + len(yb), steps + 1
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    expect(bool(torch.isfinite(torch.stack(losses)).all()), "a training loss is not finite")
    rate = flops_per_step * steps / dt
    share = (f"MFU {rate / peak:.1%} of {peak / 1e12:g} TFLOP/s" if peak else
             "MFU unknown (no peak for it in hardmix.throughput: give --peak-tflops)")
    return (f"{policy.note}: {n:,} images in {dt:.1f} s = {n / dt:,.0f} img/s, "
            f"{rate / 1e12:.3g} TFLOP/s; {share} ({name})")


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Env], str]
    cpu_half: bool  # runs with --cpu (a stand-in shows it)

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]


CHECKS = [Check("cuda_tests", check_cuda_tests, False),
          Check("sync_debug_epoch", check_sync_debug_epoch, False),
          Check("resume", check_resume, True),
          Check("grad_bf16", check_grad_bf16, True),
          Check("ddp_resume", check_ddp_resume, True),
          Check("folder_epoch", check_folder_epoch, True),
          Check("step_ratios", check_step_ratios, True),
          Check("packed_trials", check_packed_trials, True),
          Check("throughput", check_throughput, False)]


def run_checks(env: Env, selected: list[Check]) -> tuple[list[str], list[str]]:
    passed, failed = [], []
    for check in selected:
        print(f"\n== {check.name}: {check.doc}", flush=True)
        t0 = time.time()
        try:
            detail = check.run(env)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding; go on
            if not isinstance(exc, CheckFailed):
                traceback.print_exc()
            print(f"FAIL {check.name} ({time.time() - t0:.0f} s): {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            failed.append(check.name)
        else:
            print(f"PASS {check.name} ({time.time() - t0:.0f} s): {detail}", flush=True)
            passed.append(check.name)
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    width = max(len(c.name) for c in CHECKS)
    listing = "\n".join(f"  {c.name:<{width}}  {c.doc}" + ("" if c.cpu_half else "  [GPU only]")
                        for c in CHECKS)
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"checks (in order):\n{listing}\n\nSee the module docstring for what each asserts.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true",
                    help="run the CPU-side halves on the CPU (any machine; what CI runs)")
    ap.add_argument("--only", help="comma-separated check names (default: all)")
    ap.add_argument("--data", help="CIFAR-10 .npz (default: synthetic images of its shape)")
    ap.add_argument("--peak-tflops", type=float, help="dense peak of the GPU at the run's "
                    "precision, TFLOP/s (default: hardmix.throughput's table)")
    ap.add_argument("--ddp-rank", help=argparse.SUPPRESS)  # one rank of ddp_resume
    args = ap.parse_args(argv)
    if args.ddp_rank:
        return _ddp_rank(json.loads(args.ddp_rank))
    import torch

    names = {c.name: c for c in CHECKS}
    wanted = [s.strip() for s in args.only.split(",")] if args.only else list(names)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"gpu_check: error: --only {','.join(unknown)}: unknown; the checks are "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; `gpu_check.py --cpu` runs the "
              "CPU-side halves", file=sys.stderr)
        return 2
    selected = [names[w] for w in wanted if not args.cpu or names[w].cpu_half]
    skipped = [w for w in wanted if names[w] not in selected]
    device = "cpu" if args.cpu else "cuda"
    where = ("cpu mode" if args.cpu else
             f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)")
    print(f"gpu_check ({where}), torch {torch.__version__}: {', '.join(c.name for c in selected)}",
          flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        env = Env(device, args.cpu, args.data, args.peak_tflops, Path(scratch))
        passed, failed = run_checks(env, selected)
    tail = f"; FAILED: {', '.join(failed)}" if failed else ""
    tail += f"; GPU only, not run: {', '.join(skipped)}" if skipped else ""
    print(f"\ngpu_check: {len(passed)}/{len(selected)} passed ({where}, {time.time() - t0:.0f} s"
          f"{tail})")
    return 0 if not failed and selected else 1


if __name__ == "__main__":
    sys.exit(main())
