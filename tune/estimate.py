"""How long a sweep's trials will take and where they fit, known before Ray starts
(``hardmix sweep --dry-run`` prints :func:`estimate_lines` under the FLOP count of
:mod:`tune.plan`).

The time of a trial is its FLOPs (:func:`tune.plan.trial_cost`) over the rate one trial gets,
from one of two bases, and the text says which:

* **measured here** (:func:`measure_training_rate`): a few training steps of
  the trial's model at its batch and precision on random tensors of the data's shape, with the
  trial's threads (``resources.cpus``), on this machine's CPU, or on its GPU when trials ask
  for GPUs and it has one;
* **the peak table** (:data:`hardmix.throughput.ACCELERATORS`) at the stated utilisation
  (:data:`hardmix.throughput.DEFAULT_UTILISATION`) for the GPU named by ``--device-type``,
  where trials ask for GPUs this machine does not have.

A trial with ``resources.gpus`` of one GPU gets that share of it (four trials of 0.25 fill a
card); GPU-hours count the GPUs held, CPU-core-hours the CPUs. The wall-clock puts the trials
through as many at once as the target holds (:func:`capacity`: this machine for a local Ray
instance, the node types of ``--cluster FILE``, or of the head's bootstrap file when the sweep
joins a cluster), capped by ``max_concurrent_trials``; trials on this machine's CPUs share its
cores. Whether one trial fits at all is :func:`tune.cluster.assess`, the check the sweep runs
once Ray is up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
import time
from typing import Any, Optional, Sequence

from hardmix.config import ConfigError, RunConfig, SweepConfig
from tune.cluster import (ClusterView, NodeGroup, _describe, _view_from_bootstrap, assess,
                          max_placeable, trial_bundle, validate_cluster_file,
                          view_from_cluster_config)

#: Seconds each distinct model is timed for on this machine (after one warm-up step).
CALIBRATION_SECONDS = 1.5


@dataclass(frozen=True)
class Basis:
    """The FLOP/s behind the time estimate: ``rate`` per GPU (``gpu``) or per trial worker on
    ``resources.cpus`` threads (``cpu``), and what it is in words."""

    kind: str
    rate: float
    text: str


def fmt_rate(flops_per_s: float) -> str:
    """``1.23 TFLOP/s``."""
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.3g} {unit}"
    return f"{flops_per_s / 1e6:.3g} MFLOP/s"


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.5 days``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.2g} h" if seconds < 36000 else f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.2g} days"


def uses_gpus(cfg: SweepConfig) -> bool:
    """The trials train on GPUs: they ask for some and the run is not pinned to the CPU."""
    return cfg.resources.gpus > 0 and cfg.run.device != "cpu"


# --------------------------------------------------------------------------------------------
# The basis
# --------------------------------------------------------------------------------------------


def table_basis(run: RunConfig, device_type: str) -> Basis:
    """A named GPU's peak at the precision ``optim.amp`` picks on it, times the stated
    utilisation. Raises ConfigError for an unknown name or a precision it lacks."""
    from hardmix.device import CUDA_BF16_CAPABILITY, CUDA_FP16_CAPABILITY, choose_precision
    from hardmix.throughput import DEFAULT_UTILISATION, named_accelerator

    acc = named_accelerator(device_type)
    cc = acc.capability
    precision = choose_precision(run.optim, "cuda", cc >= CUDA_BF16_CAPABILITY,
                                 cc >= CUDA_FP16_CAPABILITY,
                                 f"{acc.title}: CUDA compute capability {cc[0]}.{cc[1]}")
    peak = acc.peak(precision.kind)
    arithmetic = "tf32 tensor cores (cuDNN's default for fp32)" if (
        precision.kind == "fp32" and acc.tf32) else precision.kind
    return Basis("gpu", peak * DEFAULT_UTILISATION,
                 f"the peak table: {acc.title} (--device-type {acc.key}), {arithmetic} dense peak "
                 f"{fmt_rate(peak)} ({acc.source}) x the stated utilisation "
                 f"{DEFAULT_UTILISATION:.0%} (hardmix.throughput.DEFAULT_UTILISATION; the mfu "
                 f"column of a run measures it) = {fmt_rate(peak * DEFAULT_UTILISATION)} a GPU")


def measured_basis(run: RunConfig, facts: dict, device: str, threads: int,
                   seconds: float = CALIBRATION_SECONDS) -> Optional[Basis]:
    """The rate of the run's own training steps, timed on this machine's ``device``."""
    from hardmix.throughput import cpu_matmul_flops, peak_of

    rate = measure_training_rate(run, facts["classes"], facts["channels"], facts["size"],
                                 device=device, threads=threads, seconds=seconds)
    if rate is None:
        return None
    what = (f"{rate.steps} training step{'s' if rate.steps != 1 else ''} of {run.model.name} at "
            f"batch {rate.batch}" + ("" if rate.batch == run.data.batch_size else
                                     f" (of {run.data.batch_size}: a full step would not fit "
                                     "the calibration's time)") + f", {rate.precision}")
    if device == "cpu":
        peak = cpu_matmul_flops(rate.precision, threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        busy = (f"; this machine was busy (load {load:.1f} on {os.cpu_count()} cores): the "
                "times are long") if load > 0.5 * (os.cpu_count() or 1) else ""
        return Basis("cpu", rate.flops_per_s,
                     f"measured here: {what} with {threads} thread{'s' if threads != 1 else ''}"
                     f" (resources.cpus), {fmt_rate(rate.flops_per_s)} a trial worker "
                     f"({rate.flops_per_s / peak:.0%} of this CPU's measured {rate.precision} "
                     f"matmul rate, {fmt_rate(peak)}){busy}")
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    peak = peak_of(name, rate.precision)
    share = f", {rate.flops_per_s / peak:.0%} of its peak" if peak else ""
    return Basis("gpu", rate.flops_per_s,
                 f"measured here: {what} on this machine's {name}, "
                 f"{fmt_rate(rate.flops_per_s)} a GPU{share} (one trial alone on it)")


def choose_basis(cfg: SweepConfig, run: RunConfig, facts: dict,
                 device_type: Optional[str]) -> Basis | str:
    """The basis for trials of ``run``: the table for a named GPU, else measured here (a GPU
    of this machine for GPU trials, its CPU for CPU trials); or why there is none."""
    if device_type:
        if not uses_gpus(cfg):
            raise ConfigError("--device-type", device_type, "names the GPU of trials that ask "
                              "for GPUs: set resources.gpus > 0 (and run.device auto or cuda)")
        return table_basis(run, device_type)
    if uses_gpus(cfg):
        import torch

        if not torch.cuda.is_available():
            from hardmix.throughput import ACCELERATORS

            return ("the trials ask for GPUs and this machine has none: name theirs with "
                    f"--device-type ({', '.join(ACCELERATORS)}) for a time estimate")
        device, threads = "cuda", 1
    else:
        device, threads = "cpu", max(1, int(cfg.resources.cpus))
    try:
        basis = measured_basis(run, facts, device, threads)
    except (RuntimeError, ValueError) as exc:  # out of memory, a kernel missing: no estimate
        return f"timing {run.model.name} on this machine's {device} failed: {exc}"
    return basis or f"the FLOPs of {run.model.name} could not be counted"


# --------------------------------------------------------------------------------------------
# Where trials fit
# --------------------------------------------------------------------------------------------


#: The node of this machine's view (:func:`local_view`).
THIS_MACHINE = "this machine"


def local_view(cpus: float) -> ClusterView:
    """This machine as the local Ray instance the sweep starts: ``cpus`` logical CPUs
    (``local_cpus``, default :func:`tune.plan.local_cpu_count`) and its GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    node = NodeGroup(THIS_MACHINE, {"CPU": float(cpus), "GPU": float(gpus)}, 1, worker=False)
    return ClusterView((node,), "the local Ray instance the sweep starts", complete=True)


def target_view(cfg: SweepConfig, cluster: Optional[str],
                local_cpus: float) -> Optional[ClusterView]:
    """What the trials will run on: a cluster file's node types (``--cluster``, validated as
    ``python -m tune.cluster`` does), this machine for a local instance, the head's bootstrap
    file for a sweep joining a cluster from its head; None when nothing tells."""
    if cluster:
        return view_from_cluster_config(validate_cluster_file(cluster), cluster)
    if not cfg.address:
        return local_view(local_cpus)
    return _view_from_bootstrap()


@dataclass(frozen=True)
class Capacity:
    """How many trials the target holds at once (``math.inf``: unbounded; 0: not one), what
    it is in words, and the refusal the sweep would stop with when it holds none."""

    trials: float
    where: str
    refusal: Optional[ConfigError] = None


def capacity(cfg: SweepConfig, view: ClusterView) -> Capacity:
    """One trial's fit on ``view`` (:func:`tune.cluster.assess`) and how many fit at once."""
    where = _describe(view)
    refusal = assess(cfg, view)
    if refusal is not None:
        return Capacity(0, where, refusal)
    fits = max_placeable(trial_bundle(cfg), view)
    return Capacity(fits if math.isinf(fits) else fits // cfg.resources.workers, where)


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def trial_rate(cfg: SweepConfig, basis: Basis) -> float:
    """FLOP/s one trial gets: its share of a GPU (``resources.gpus``), or its own threads,
    times its data-parallel workers."""
    r = cfg.resources
    return basis.rate * (r.gpus if basis.kind == "gpu" else 1.0) * r.workers


def held(cfg: SweepConfig, basis: Basis) -> tuple[float, str]:
    """Devices one trial holds while it runs, and their unit."""
    r = cfg.resources
    if basis.kind == "gpu":
        return r.gpus * r.workers, "GPU-hours"
    return r.cpus * r.workers, "CPU-core-hours"


def at_once(cfg: SweepConfig, cap: Optional[Capacity], basis: Basis) -> tuple[float, str] | None:
    """How many trials run at once, and why: what the target holds, capped by
    ``max_concurrent_trials``; trials on this machine's CPUs share its cores."""
    limit = cfg.max_concurrent_trials or math.inf
    if cap is not None and cap.trials > 0:
        n, why = min(cap.trials, limit), ("max_concurrent_trials" if limit <= cap.trials
                                          else "as many as fit")
    elif cfg.max_concurrent_trials:
        n, why = limit, "max_concurrent_trials"
    else:
        return None
    if math.isinf(n):
        return None
    if basis.kind == "cpu" and not cfg.address:
        cores = os.cpu_count() or 1
        per = cfg.resources.cpus * cfg.resources.workers
        if n * per > cores:
            return max(cores / per, 1.0), f"{n:g} at once ({why}) sharing this machine's {cores} cores"
    return n, f"{n:g} at once ({why})"


#: Distinct trial models timed at most; the others take the base run's rate.
MAX_CALIBRATIONS = 4


def _key(run: RunConfig) -> tuple:
    """What a measured rate depends on: the model, the batch, the precision settings."""
    return (repr(run.model), run.data.batch_size, run.optim.amp, run.optim.channels_last,
            run.optim.name)


def estimate_lines(cfg: SweepConfig, runs: Sequence[RunConfig],
                   flops: Optional[Sequence[float]], facts: Optional[dict],
                   local_cpus: float, device_type: Optional[str] = None,
                   cluster: Optional[str] = None) -> list[str]:
    """The dry run's lines on time and fit: whether the target holds one trial, the basis,
    per trial and in all (device-hours), the wall-clock. ``runs``/``flops``: the trials and
    their FLOPs (None: unknown); ``facts``: the base run's data sizes (the shape of the
    calibration's tensors); ``local_cpus``: the logical CPUs of a local Ray instance."""
    lines = []
    view = target_view(cfg, cluster, local_cpus)
    cap = capacity(cfg, view) if view is not None else None
    if cap is None:
        lines.append("fit: unknown (a sweep joining a cluster: give its file with --cluster "
                     "cluster.yaml to check its node types)")
    elif cap.refusal is not None:
        e = cap.refusal
        lines.append(f"fit: {view.source} cannot hold one trial; the sweep would stop with: "
                     f"{e.field} = {e.value!r}: {e.allowed}")
    else:
        count = "any number of" if math.isinf(cap.trials) else f"{cap.trials:g}"
        lines.append(f"fit: {count} trial{'s' if cap.trials != 1 else ''} at once on {cap.where}")
    if flops is None or facts is None:
        if device_type:  # still refused when it names nothing known
            choose_basis(cfg, cfg.run, {}, device_type)
        lines.append("time: unknown (the data's sizes, or the model's FLOPs, are unknown)")
        return lines
    bases: dict[tuple, Basis] = {}
    base = choose_basis(cfg, cfg.run, facts, device_type)
    if isinstance(base, str):
        lines.append(f"time: unknown ({base})")
        return lines
    bases[_key(cfg.run)] = base
    for run in runs:  # each distinct model timed too (a table's rate is the same for all)
        if _key(run) not in bases and len(bases) < MAX_CALIBRATIONS:
            other = choose_basis(cfg, run, facts, device_type)
            bases[_key(run)] = other if isinstance(other, Basis) else base
    lines.append(f"time basis: {base.text}")
    rates = {k: trial_rate(cfg, b) for k, b in bases.items()}
    if len(set(rates.values())) > 1:
        lines.append(f"  and {len(bases) - 1} more of the trials' models, batches or precisions "
                     f"timed the same way: {fmt_rate(min(rates.values()))} to "
                     f"{fmt_rate(max(rates.values()))} a trial"
                     + (f" (beyond {MAX_CALIBRATIONS}, the base run's rate)"
                        if len({_key(r) for r in runs} | {_key(cfg.run)}) > len(bases) else ""))
    seconds = [f / rates.get(_key(r), rates[_key(cfg.run)]) for r, f in zip(runs, flops)]
    devices, unit = held(cfg, base)
    total = sum(seconds)
    lo, hi = min(seconds), max(seconds)
    spread = "" if hi <= 1.05 * lo else f" ({fmt_duration(lo)} to {fmt_duration(hi)})"
    text = (f"time (compute only; starting Ray and the trials comes on top): "
            f"{fmt_duration(total / len(seconds))} a trial{spread}, "
            f"{total * devices / 3600:.3g} {unit} in all")
    concurrent = at_once(cfg, cap, base)
    if concurrent is not None:
        n, why = concurrent
        text += f"; wall-clock {fmt_duration(max(total / n, hi))} with {why}"
    lines.append(text)
    return lines


# --------------------------------------------------------------------------------------------
# The calibration: the run's training step, timed here
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRate:
    """A measured training rate: FLOP/s (:func:`hardmix.models.forward_flops` x
    :data:`hardmix.throughput.TRAIN_PASSES` per image), the batch and steps it was timed on, the precision."""

    flops_per_s: float
    batch: int
    steps: int
    seconds: float
    precision: str
    device: str


#: The smallest batch a calibration step takes (BatchNorm needs more than one value a channel).
MIN_CALIBRATION_BATCH = 4


def calibration_batch(batch: int, step_flops: float, rate: float, seconds: float) -> int:
    """The batch to time: ``batch`` unless one step of it would take more than half of
    ``seconds`` at ``rate`` FLOP/s (an upper bound, so the step takes longer still); then
    the batch that fits, at least :data:`MIN_CALIBRATION_BATCH`."""
    if step_flops <= 0 or rate <= 0 or step_flops / rate <= seconds / 2:
        return batch
    fit = int(batch * (seconds / 2) / (step_flops / rate))
    return max(min(batch, MIN_CALIBRATION_BATCH), min(batch, fit))


def measure_training_rate(run: Any, classes: int, channels: int, size: int,
                          device: str = "cpu", threads: Optional[int] = None,
                          seconds: float = 2.0) -> Optional[TrainingRate]:
    """Time training steps of the run's model (``run.model``), optimiser (``run.optim``) and
    precision (``optim.amp`` on ``device``) at its batch (``run.data.batch_size``) on random
    tensors of the data's shape, with ``threads`` torch threads, through the run's own
    :func:`hardmix.train.training_step` (unmixed): one warm-up step, then steps
    until ``seconds`` have passed (at least one). On the CPU a batch whose step would not fit
    in the time is scaled down (:func:`calibration_batch`): the rate per image hardly depends
    on it. Torch's generator and thread count are put back. None when the model's FLOPs are
    unknown."""
    import torch

    from hardmix.augment import HardMix
    from hardmix.config import AugmentConfig
    from hardmix.device import precision_policy
    from hardmix.models import build_model, forward_flops
    from hardmix.optimizers import build_optimizer
    from hardmix.throughput import TRAIN_PASSES, cpu_matmul_flops
    from hardmix.train import training_step

    per_image = forward_flops(run.model, classes, channels, size)
    if not per_image:
        return None
    dev = torch.device(device)
    precision = precision_policy(run.optim, dev)
    before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    batch = run.data.batch_size
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        if threads:
            torch.set_num_threads(int(threads))
        torch.backends.cudnn.benchmark = cuda  # as the run sets it (hardmix.train)
        if not cuda:
            rate = cpu_matmul_flops(precision.kind, seconds=min(0.2, seconds / 10))
            batch = calibration_batch(batch, TRAIN_PASSES * per_image * batch, rate, seconds)
        index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda \
            else None
        with torch.random.fork_rng(devices=[index] if cuda else []):
            model = build_model(run.model, classes, channels, size).to(dev)
            model = model.to(memory_format=precision.memory_format).train()
            opt = build_optimizer(model.parameters(), run.optim)
            x = torch.randn(batch, channels, size, size, device=dev)
            x = x.contiguous(memory_format=precision.memory_format)
            y = torch.randint(0, classes, (batch,), device=dev)
            idx = torch.arange(batch, device=dev)
            scaler = precision.grad_scaler()
            # The run's own step, unmixed: the rate of its three passes (the hardness forward
            # is counted apart, as extra forwards, where a run has one).
            plain = HardMix.from_config(AugmentConfig(method="none"), num_classes=classes,
                                        dataset_size=batch)

            def step() -> None:
                training_step(model, model, plain, opt, x, y, idx,
                              autocast=precision.autocast, scaler=scaler)

            for _ in range(3 if cuda else 1):  # warm-up (cuDNN picks its algorithms)
                step()
            sync()
            steps, start = 0, time.perf_counter()
            while steps == 0 or time.perf_counter() - start < seconds:
                step()
                sync()  # the calibration's own loop: the run's steps never wait like this
                steps += 1
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.benchmark = before[1]
    return TrainingRate(TRAIN_PASSES * per_image * batch * steps / max(elapsed, 1e-9), batch,
                        steps, elapsed, precision.kind, str(dev))
