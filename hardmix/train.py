"""One training run: ``train(cfg, callbacks, run_dir, resume) -> summary``. No Ray, no store.

The loop trains ``cfg.model`` on ``cfg.data`` with the augmentation ``cfg.augment`` from the core
library (:class:`hardmix.HardMix`), evaluates validation and test error on the epochs
``cfg.eval`` asks for and hands the metrics (:data:`hardmix.metrics.EPOCH_METRICS`) to
callbacks (:class:`hardmix.metrics.Callback`). It writes nothing itself except the run folder's
metadata (``config.yaml``, ``run.json``) and checkpoints (``checkpoints/last.pt``). Wiring the
Parquet store, TensorBoard and the console to a run is the command line's job
(:mod:`hardmix.cli`); ``tune`` wires its own callbacks and calls :func:`train` inside Ray Tune
trials and Ray Train workers.

One training step, the same every step (the library decides what it needs)::

    out = mix(x, y, model=raw_model, index=idx)   # the model only serves the forward signal
    logits = model(out.x); loss = out.loss(logits, label_smoothing)
    mix.observe(logits, y, idx, out)              # feeds the per-sample memory, if any

Statistics are summed as device tensors and read once per epoch (no per-step host sync).

Failure semantics (what ``tune`` relies on):

* a config or input the machine cannot serve raises :class:`~hardmix.errors.ConfigError`
  before anything is written (no callback sees the run);
* a callback raising :class:`StopRun` (ASHA pruning) ends the run after that epoch with
  ``status="pruned"``; the summary is returned, nothing is raised;
* any exception during the run (a NaN loss is a ``FloatingPointError``) gives a summary with
  ``status="failed"`` and the error string; every callback's ``on_run_end`` still receives it,
  then the exception is re-raised, so Tune can retry the trial (from its last checkpoint when
  called with ``resume=True``).

Data-parallel: when ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does it),
the model is wrapped in DDP, every rank trains on its own disjoint shard with the same number of
steps, metrics are all-reduced before the callbacks see them, and every rank calls the callbacks
with identical metrics (``info["rank"]`` tells a callback whether it should write: the store,
TensorBoard and the console write on rank 0 only; Ray's ``report`` must run on every rank).
Checkpoints are written by rank 0.

Random streams under data-parallel training. What must agree is a function of the seed (and
the epoch) alone, the same on every rank: model init; the epoch's order (one permutation, each
rank its disjoint slice); HardMix's host generator -- the ``prob`` coin, the batch λ and the
batch box -- so every rank mixes on the same steps and runs the extra forward of the
``forward`` signal on the same steps (no rank waits for another's extra forward at the
gradient all-reduce), and the global batch has one λ and one box per step, as one batch on one
device would. What must differ is a function of (seed, rank, epoch)
(:func:`hardmix.data.stream_seed`), restarted at every epoch: HardMix's device generator
(sources, per-sample λ and boxes), the crops and flips, a folder loader's worker seeds, and
torch's global generator (dropout). A resumed run restores the shared host generator from the
checkpoint (rank 0's, which every rank shares) and re-derives the rest, so every rank draws
exactly what it drew in the uninterrupted run, on any number of ranks.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hardmix.checkpoint import (atomic_write_bytes, checkpoint_path, load_checkpoint,
                                rng_state, save_checkpoint, set_rng_state)
from hardmix.config import (OptimConfig, RunConfig, check_run_environment, flatten, to_dict,
                            to_yaml, validate)
from hardmix.config.schema import field_meta, legacy_value
from hardmix.data import Data, build_data, stream_seed
from hardmix.device import Precision, dist_info, precision_policy, resolve_device
from hardmix.errors import ConfigError
from hardmix.methods import extra_forwards
from hardmix.metrics import (ECE_BINS, EPOCH_METRICS, SUMMARY_FIELDS, Callback, StopRun,
                             applicable, evaluation_details, evaluation_sums)
from hardmix.models import build_model, forward_flops
from hardmix.provenance import data_sha256, git_commit, lock_hash, versions
from hardmix.throughput import device_peak, mfu, training_flops

__all__ = ["train", "training_step", "evaluate", "Callback", "StopRun", "precision_policy",
           "Precision", "lr_factor", "resolve_device", "versions", "git_commit", "lock_hash",
           "check_resumable"]

PREVIEW_IMAGES = 8


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, steps_per_epoch: int, o: OptimConfig) -> float:
    """Multiplier of ``optim.lr`` at training step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then multistep (``gamma`` at each milestone epoch), cosine to 0, or
    constant. Steps are per batch, so warm-up and cosine are smooth."""
    t = step / steps_per_epoch  # epochs elapsed
    warm = o.warmup_epochs
    if warm and t < warm:
        return (step + 1) / (warm * steps_per_epoch)
    return _SCHEDULES[o.schedule](t, o)


_SCHEDULES = {
    "multistep": lambda t, o: o.gamma ** bisect.bisect_right(o.milestones, t),
    "cosine": lambda t, o: 0.5 * (1 + math.cos(math.pi * min(1.0, (t - o.warmup_epochs)
                                                         / max(1e-9, o.epochs - o.warmup_epochs)))),
    "constant": lambda t, o: 1.0,
}


def training_step(model: nn.Module, raw_model: nn.Module, mix, optimizer, x: torch.Tensor,
                  y: torch.Tensor, idx: torch.Tensor, *, label_smoothing: float = 0.0,
                  grad_clip: Optional[float] = None, autocast=contextlib.nullcontext,
                  scheduler=None, scaler=None):
    """One step of the loop (also what the step and training benchmarks time).

    The augmentation is called the same way every step: ``raw_model`` (the module inside DDP,
    so the hardness forward runs no DDP collective) for the ``forward`` signal, ``idx`` for a
    per-sample memory, and ``observe`` with the training logits afterwards; HardMix decides what
    it uses.

    The hardness forward (no grad) and the training forward run in two autocast regions:
    autocast caches the low-precision copy of each weight until the outermost region exits,
    and torch releases before the fix of pytorch#112583 reused a copy cast under no_grad in the
    training forward, so conv and linear weights got no gradient. Call it outside any autocast
    region of your own, or the cache outlives the hardness forward.

    ``scaler`` (a ``torch.amp.GradScaler``, the fp16 policy): the loss is scaled for backward,
    gradients are unscaled before clipping, and a step whose gradients hold inf or NaN is
    skipped (the scaler then lowers its scale). GradScaler reads that overflow flag on the host
    once per step; bf16 and fp32 steps read nothing. Returns ``(loss, out)`` with the loss
    detached (no host sync)."""
    with autocast():
        out = mix(x, y, model=raw_model, index=idx)
    with autocast():
        logits = model(out.x)
        loss = out.loss(logits.float(), label_smoothing=label_smoothing)
    mix.observe(logits.detach(), y, idx, out)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skipped when a gradient is inf or NaN
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), out


def build_optimizer(model: nn.Module, o: OptimConfig, steps_per_epoch: int):
    """The optimiser ``optim.name`` from the registry (:mod:`hardmix.optimizers`: the paper's
    Nesterov SGD by default) + a per-step LambdaLR of :func:`lr_factor`."""
    from hardmix.optimizers import build_optimizer as build

    opt = build(model.parameters(), o)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, o))
    return opt, sched


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, precision: Precision,
             world_size: int = 1, details: Optional[dict] = None) -> tuple[float, float, float]:
    """``(loss, top1_err, top5_err)`` over a loader (errors in %); sums over ranks. Runs under
    the run's precision policy, like training. ``details``: filled with ``ece`` and
    ``class_err`` (:func:`hardmix.metrics.evaluation_details`), summed on the device."""
    model.eval()
    dev = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, top1 ok, top5 ok, n
    extra = torch.zeros(3 * ECE_BINS + 2 * num_classes, dtype=torch.float64, device=dev)
    k = min(5, num_classes)
    for x, y, _ in loader:
        x = x.contiguous(memory_format=precision.memory_format)  # a no-op for device batches
        with precision.autocast():
            logits = model(x).float()
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.full((), float(len(y)), dtype=torch.float64, device=dev)])
        if details is not None:
            extra += evaluation_sums(logits, y, num_classes)
    loss, ok1, ok5, n, *rest = _all_reduce(torch.cat([sums, extra]) if details is not None
                                           else sums, world_size).tolist()
    if details is not None and n:
        details.update(evaluation_details(rest, num_classes))
    if n == 0:
        return math.nan, math.nan, math.nan
    return loss / n, 100.0 * (1 - ok1 / n), 100.0 * (1 - ok5 / n)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Run:
    """State of one run; :func:`train` drives it."""

    def __init__(self, cfg: RunConfig, run_dir: Path, callbacks: Sequence[Callback],
                 eval_epochs: Sequence[int] = (), device: Optional[torch.device] = None):
        from hardmix import HardMix

        self.cfg, self.run_dir, self.callbacks = cfg, run_dir, list(callbacks)
        self.augment = to_dict(cfg.augment)
        self.extra_eval_epochs = frozenset(int(e) for e in eval_epochs)
        self.rank, self.world_size = dist_info()
        self.device = resolve_device(cfg.device, device)
        cuda = self.device.type == "cuda"
        self.precision = precision_policy(cfg.optim, self.device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes; bitwise CUDA repeats not promised
        torch.manual_seed(cfg.seed)  # model init: identical on every rank
        np.random.seed(cfg.seed % 2 ** 32)
        import random
        random.seed(cfg.seed)
        self.data: Data = build_data(cfg.data, cfg.seed, self.device, self.rank, self.world_size,
                                     memory_format=self.precision.memory_format)
        self.num_classes = self.data.num_classes
        model = build_model(cfg.model, self.num_classes, self.data.in_channels,
                            self.data.image_size).to(self.device)
        model = model.to(memory_format=self.precision.memory_format)
        self.raw_model = model
        self.model = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.device.index] if cuda else None)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ConfigError("data.subset", cfg.data.subset, "leaves no training batch")
        self.optimizer, self.scheduler = build_optimizer(model, cfg.optim, self.steps_per_epoch)
        self.scaler = self.precision.grad_scaler()  # fp16 only
        self.mix = HardMix.from_config(cfg.augment, num_classes=self.num_classes,
                                       dataset_size=self.data.sizes["train"], seed=cfg.seed,
                                       inplace=True)
        # The achieved FLOP/s of each epoch and their share of the device's peak: counted once
        # (on the meta device, no draw from any generator), applied to the epoch's counts.
        self.flops_per_image = forward_flops(cfg.model, self.num_classes, self.data.in_channels,
                                             self.data.image_size)
        self.peak_flops = device_peak(self.device, self.precision.kind)
        self.start_epoch = 0
        self.history: list[dict] = []
        self.wall_before = 0.0
        self.preview_pending = cfg.output.image_grid and self.rank == 0

    # ---- checkpoints -------------------------------------------------------------------

    def state(self, epoch: int, wall: float) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "mix": self.mix.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(), "epoch": epoch, "history": self.history,
                "wall_seconds": wall, "config": to_dict(self.cfg), "versions": versions(),
                "data": {"mean": list(self.data.mean), "std": list(self.data.std),
                         "classes": list(self.data.classes), "in_channels": self.data.in_channels,
                         "image_size": self.data.image_size, "num_classes": self.num_classes}}

    def restore(self, path: Path) -> None:
        # On the CPU whatever this run's device (a checkpoint written on a GPU resumes on a CPU
        # and the other way round): generator states must stay host ByteTensors, and
        # load_state_dict copies model and optimizer tensors to where their parameters live.
        state = load_checkpoint(path)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):  # fp16: keep the learned scale
            self.scaler.load_state_dict(state["scaler"])
        # The hardness memory goes where the model, and so every batch, lives.
        self.mix.load_state_dict(state["mix"], device=next(self.raw_model.parameters()).device)
        set_rng_state(state["rng"])  # numpy and Python; torch's per rank: seed_epoch each epoch
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.wall_before = float(state["wall_seconds"])
        self.preview_pending = False

    def info(self) -> dict:
        return {"run_dir": str(self.run_dir), "device": str(self.device), "versions": versions(),
                "git_commit": git_commit(), "data_sha256": data_sha256(self.cfg.data.path),
                "num_classes": self.num_classes,
                "classes": list(self.data.classes), "sizes": dict(self.data.sizes),
                "steps_per_epoch": self.steps_per_epoch, "start_epoch": self.start_epoch,
                # The checkpoint is written before its epoch's callbacks run: a run killed in
                # between resumes past an epoch its writers may not have recorded.
                "resumed_metrics": (dict(self.history[-1]) if self.start_epoch and self.history
                                    else None),
                "rank": self.rank, "world_size": self.world_size,
                "threads": torch.get_num_threads(), "precision": self.precision.note,
                "hostname": socket.gethostname()}

    def write_metadata(self, info: dict) -> None:
        """config.yaml and run.json: the config, versions and git commit, with the run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "config.yaml", to_yaml(self.cfg).encode())
        meta = {k: info[k] for k in ("device", "versions", "git_commit", "data_sha256",
                                     "num_classes",
                                     "sizes", "steps_per_epoch", "world_size", "threads",
                                     "precision")}
        meta.update(started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    resumed_from_epoch=self.start_epoch, command=" ".join(sys.argv))
        atomic_write_bytes(self.run_dir / "run.json", json.dumps(meta, indent=2).encode())

    # ---- one epoch ---------------------------------------------------------------------

    def seed_epoch(self, epoch: int) -> None:
        """Restart this rank's own streams for ``epoch`` from (seed, rank, epoch): torch's global
        generator (dropout) and HardMix's device generator; the loaders do the same for crops,
        flips and worker seeds (``set_epoch``). The shared host generator goes on untouched."""
        seed, rank = self.cfg.seed, self.rank
        torch.manual_seed(stream_seed(seed, rank, epoch, "global"))
        state = self.mix.state_dict()  # the device stream restarts at a new seed, nothing else
        state.update(device_seed=stream_seed(seed, rank, epoch, "mix"), device_generators={},
                     signal={})
        self.mix.load_state_dict(state)

    def train_epoch(self, epoch: int, bar) -> dict:
        cfg, dev, c = self.cfg, self.device, self.num_classes
        self.model.train()
        self.seed_epoch(epoch)
        self.data.train.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        # hard share, fallback, distinct sources, steps that pasted (a skipped step pastes nothing:
        # its distinct sources are left out of their mean, not counted as 0)
        mix_sums = torch.zeros(4, dtype=torch.float64, device=dev)
        class_counts = torch.zeros(c, dtype=torch.float64, device=dev)
        seen = steps = mixed = 0
        for x, y, idx in self.data.train:
            x = x.contiguous(memory_format=self.precision.memory_format)  # folder batches
            # The mixer writes into x (inplace): keep the clean batch while a preview is due.
            clean = x.clone() if self.preview_pending else None
            loss, out = self.step(x, y, idx)
            if out.mixed:
                st = out.stats
                pasted = (st["distinct_sources"] > 0).to(st["distinct_sources"].dtype)
                mix_sums += torch.stack([st["hard_share"], st["fallback"],
                                         st["distinct_sources"], pasted]).double()
                class_counts += out.source_counts_by_class(c).double()
                mixed += 1
                if clean is not None:
                    self.preview(clean, y, out)
            loss_sum += loss.double() * len(y)
            seen += len(y)
            steps += 1
            bar.update(1)
        # The lr of this epoch's last step (multistep decays show from the milestone's next epoch).
        lr = cfg.optim.lr * lr_factor(epoch * self.steps_per_epoch - 1, self.steps_per_epoch,
                                      cfg.optim)
        counts = torch.tensor([seen, steps, mixed], dtype=torch.float64, device=dev)
        packed = _all_reduce(torch.cat([loss_sum[None], counts, mix_sums, class_counts]),
                             self.world_size).tolist()
        loss_total, seen, steps, mixed = packed[:4]
        hard, fb, distinct, pasted = packed[4:8]
        per_mixed = (lambda v: v / mixed) if mixed else (lambda v: None)
        memory = self.mix.memory_seen()
        if memory is not None and self.world_size > 1:  # each rank's memory covers its shard
            memory = _all_reduce(memory.double().to(dev), self.world_size) / self.world_size
        return {"train_loss": loss_total / max(1.0, seen), "lr": lr, "seen": seen,
                "hard_share": per_mixed(hard), "fallback_rate": per_mixed(fb),
                "mixed_rate": mixed / max(1.0, steps),
                "distinct_sources": distinct / pasted if pasted else None,
                "memory_seen": float(memory) if memory is not None else None,
                "source_class_counts": [int(round(v)) for v in packed[8:]]}

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """One training step: mix, forward, mixed loss, backward, optimiser and lr step.
        Returns the detached loss (a device tensor) and the mix output."""
        return training_step(self.model, self.raw_model, self.mix, self.optimizer, x, y, idx,
                             label_smoothing=self.cfg.optim.label_smoothing,
                             grad_clip=self.cfg.optim.grad_clip, autocast=self.precision.autocast,
                             scheduler=self.scheduler, scaler=self.scaler)

    def preview(self, x: torch.Tensor, y: torch.Tensor, out) -> None:
        """Hand the first mixed batch (a few images) to ``on_mixed_preview``."""
        self.preview_pending = False
        n = min(PREVIEW_IMAGES, len(y))
        src = out.source_index[:n]
        to_img = lambda t: self.data.denormalize(t.detach()[:n].float()).cpu()
        images = {"images": to_img(x), "sources": to_img(x[src]), "mixed": to_img(out.x),
                  "lam": out.lam[:n].detach().float().cpu(), "labels": y[:n].cpu(),
                  "source_labels": out.y_b[:n].detach().cpu()}
        for cb in self.callbacks:
            cb.on_mixed_preview(images)

    def fit(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        show = cfg.output.progress and self.rank == 0
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch + 1, cfg.optim.epochs + 1):
            self.epoch = epoch  # what a metric's compute(run) may read
            t0 = time.perf_counter()
            with tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.optim.epochs}",
                      disable=not show, leave=False, dynamic_ncols=True, mininterval=0.5,
                      unit="batch") as bar:
                tr = self.train_epoch(epoch, bar)
            t_train = time.perf_counter() - t0
            if not math.isfinite(tr["train_loss"]):
                raise FloatingPointError(
                    f"training loss is {tr['train_loss']} at epoch {epoch} (lr {tr['lr']:.4g}): "
                    "the run diverged; lower optim.lr or set optim.grad_clip")
            none3 = (None, None, None)  # not evaluated this epoch: NULL in the results
            # The module inside DDP: ranks may run different numbers of eval batches, and a DDP
            # forward would start a buffer broadcast on each (BN buffers are rank 0's anyway).
            vd, td = {}, {}  # calibration and per-class errors of the evaluations that ran
            ev = lambda loader, out: evaluate(self.raw_model, loader, self.num_classes,
                                              self.precision, self.world_size, details=out)
            val = (ev(self.data.val, vd) if self.data.val is not None
                   and self.evaluates(epoch, "val") else none3)
            test = ev(self.data.test, td) if self.evaluates(epoch, "test") else none3
            t_epoch = time.perf_counter() - t0
            if self.world_size > 1:  # the slowest rank sets the pace
                import torch.distributed as dist

                times = torch.tensor([t_train, t_epoch], dtype=torch.float64, device=self.device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)
                t_train, t_epoch = times.tolist()
            values = {**tr, "val_loss": val[0], "val_top1_err": val[1], "val_top5_err": val[2],
                      "test_loss": test[0], "test_top1_err": test[1], "test_top5_err": test[2],
                      "val_ece": vd.get("ece"), "test_ece": td.get("ece"),
                      "test_class_err": td.get("class_err"),
                      "images_per_s": tr["seen"] / max(t_train, 1e-9), "epoch_seconds": t_epoch,
                      **self.throughput(tr, t_train)}
            metrics = self.epoch_metrics(epoch, values)
            self.history.append(metrics)
            wall = self.wall_before + time.perf_counter() - t_start
            ckpt = None
            every = cfg.output.checkpoint_every
            if epoch == cfg.optim.epochs or (every and epoch % every == 0):
                if self.rank == 0:
                    ckpt = str(save_checkpoint(checkpoint_path(self.run_dir),
                                               self.state(epoch, wall)))
            self.epochs_done, self.wall_now = epoch, wall
            stop = 0.0
            for cb in self.callbacks:
                try:
                    cb.on_epoch_end(dict(metrics), ckpt)
                except StopRun:
                    stop = 1.0
            # Every rank must stop at the same epoch, whichever rank's callback asked.
            if self.world_size > 1:
                flag = torch.tensor([stop], device=self.device)
                stop = _all_reduce(flag, self.world_size).item()
            if stop:
                raise StopRun(f"stopped by a callback after epoch {epoch}")

    def throughput(self, tr: dict, t_train: float) -> dict:
        """``flops_per_s`` and ``mfu`` of an epoch from its host-side counts (images seen by all
        ranks, the share of mixed steps) and its training seconds: no device sync."""
        if not self.flops_per_image:
            return {"flops_per_s": None, "mfu": None}
        extra = extra_forwards(self.augment) * tr["mixed_rate"]
        rate = training_flops(self.flops_per_image, tr["seen"], extra) / max(t_train, 1e-9)
        return {"flops_per_s": rate, "mfu": mfu(rate, self.peak_flops, self.world_size)}

    def evaluates(self, epoch: int, split: str) -> bool:
        """Whether ``split`` (val or test) is evaluated after ``epoch``: every ``eval.every`` /
        ``eval.test_every`` epochs, at the last epoch, and (validation) at the extra epochs a
        scheduler decides on."""
        if epoch == self.cfg.optim.epochs:
            return True
        if split == "val":
            return epoch % self.cfg.eval.every == 0 or epoch in self.extra_eval_epochs
        return epoch % self.cfg.eval.test_every == 0

    def epoch_metrics(self, epoch: int, values: dict) -> dict:
        """The epoch's row of :data:`EPOCH_METRICS`: the loop's values, registered metrics'
        ``compute(run)``, None where a metric does not apply to this run's method."""
        out: dict[str, Any] = {"epoch": epoch}
        for name, metric in EPOCH_METRICS.items():
            value = metric.compute(self) if metric.compute is not None else values.get(name)
            out[name] = value if applicable(metric, self.augment) else None
        return out

    def summary(self, status: str, error: str, wall: float) -> dict:
        """The run summary (:data:`SUMMARY_FIELDS`); test and validation errors of the last
        epoch (evaluated at every last epoch), the best *validation* error over epochs."""
        h = self.history
        vals = [m["val_top1_err"] for m in h if m.get("val_top1_err") is not None]
        last = h[-1] if h else {}
        return {"status": status, "error": error, "epochs_run": int(last.get("epoch", 0)),
                "wall_seconds": wall, "device": str(self.device),
                "threads": torch.get_num_threads(), "precision": self.precision.note,
                "final_top1_err": last.get("test_top1_err"),
                "final_top5_err": last.get("test_top5_err"),
                "final_val_top1_err": last.get("val_top1_err"),
                "best_val_top1_err": min(vals) if vals else None,
                "classes": list(self.data.classes)}


#: Fields a resumed run may change: where and how it reports, not what it trains.
RESUMABLE_CHANGES = ("output.", "description", "eval.", "data.path", "data.workers",
                     "data.eval_batch_size", "data.download", "device")


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """A run folder can be resumed with ``cfg``: its checkpoint is readable and was trained
    with the same options (raises ConfigError naming the first difference; nothing changes)."""
    state = load_checkpoint(checkpoint_path(run_dir))
    saved, now = flatten_mapping(state["config"]), flatten(cfg)
    for key, value in saved.items():  # a value an earlier version took: its replacement
        if key in now:
            saved[key] = legacy_value(field_meta(RunConfig, key), value)
    try:  # augment fields as they run (inert ones and box: auto do not count)
        from hardmix.methods import effective_augment
        for flat, prefix in ((saved, "augment."), (now, "augment.")):
            aug = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            flat.update({prefix + k: v for k, v in effective_augment(aug).items()})
    except ConfigError:
        pass  # an unknown stored method: compared as written
    for key, value in now.items():
        if key.startswith(RESUMABLE_CHANGES) or key not in saved:
            continue
        if saved[key] != value and not (isinstance(value, float) and saved[key] == value):
            raise ConfigError("--resume", str(run_dir),
                              f"was trained with {key}={saved[key]!r}, not {value!r}: resume "
                              "with the same options, or start a new run (another output.name)")


def flatten_mapping(raw: dict, prefix: str = "") -> dict:
    """``flatten`` of a config stored as a nested mapping (a checkpoint's ``config``)."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k not in ("space",):
            out.update(flatten_mapping(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(cfg: RunConfig, callbacks: Sequence[Callback] = (), run_dir: str | Path = "runs/run",
          resume: bool = False, eval_epochs: Sequence[int] = (),
          device: Optional[torch.device] = None) -> dict:
    """Train one run and return its summary (:data:`hardmix.metrics.SUMMARY_FIELDS`).

    ``run_dir`` receives ``config.yaml``, ``run.json`` and ``checkpoints/last.pt``; callbacks
    receive everything else. ``resume=True`` continues from ``run_dir``'s checkpoint when there
    is one (else starts fresh), reproducing the uninterrupted run on the deterministic CPU path;
    a checkpoint trained with other options is refused before anything changes.
    ``eval_epochs``: extra epochs that evaluate validation error (a scheduler's decisions).
    ``device``: the device the launcher assigned this process (Ray Train's
    ``ray.train.torch.get_device()``), used for ``cfg.device`` auto or cuda
    (:func:`resolve_device`).
    See the module docstring for pruning (:class:`StopRun`) and failure semantics.
    """
    run_dir = Path(run_dir)
    validate(cfg)
    check_run_environment(cfg, outputs=False)
    from hardmix.config import check_writable
    check_writable("output.dir", str(run_dir))
    resume = resume and checkpoint_path(run_dir).is_file()
    if resume:
        check_resumable(cfg, run_dir)
    t0 = time.perf_counter()
    run: Optional[_Run] = None
    status, error, failure = "completed", "", None
    try:
        run = _Run(cfg, run_dir, callbacks, eval_epochs, device)
        if resume:
            run.restore(checkpoint_path(run_dir))
        info = run.info()
        if run.rank == 0:
            run.write_metadata(info)
        for cb in callbacks:
            cb.on_run_start(cfg, dict(info))
        run.fit()
    except StopRun:
        status = "pruned"
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        status, failure = "failed", exc
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - t0
    if run is not None:
        summary = run.summary(status, error, run.wall_before + elapsed)
    else:
        summary = {k: None for k in SUMMARY_FIELDS}
        summary.update(status=status, error=error, epochs_run=0, wall_seconds=elapsed,
                       device=str(cfg.device))
    callback_error = None
    for cb in callbacks:
        try:
            cb.on_run_end(dict(summary))
        except Exception as exc:  # noqa: BLE001 - every callback gets the summary first
            callback_error = callback_error or exc
    if failure is not None:
        raise failure
    if callback_error is not None:
        raise callback_error
    return summary
