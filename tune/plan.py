"""What a sweep is before it runs, known without Ray: its folder and the files in it, its
trials and what they will cost (``hardmix sweep --dry-run`` prints :func:`plan_text`).

The sweep folder (``<storage>/<name>``, a local path or a URI) holds ``sweep.yaml``
(:data:`SWEEP_FILE`), ``followup.json`` (:data:`FOLLOWUP_FILE`), the Parquet store, each phase's
Ray Tune folder (:data:`MAIN_PHASE`, :data:`FOLLOWUP_PHASE`) and the trials' run folders; see
:mod:`tune.sweep`.

The compute estimate counts image passes and FLOPs (torch's ``FlopCounterMode`` on one image
through the run's model): training forward + backward (~3 forwards), the hardness forward on
mixed steps where the method table says there is one, and the evaluations of ``eval.every`` /
``eval.test_every``. Its time, device-hours and wall-clock, and whether the machine or cluster
holds a trial, are :mod:`tune.estimate`'s. Data that are not here are no error in a plan: it
says so and sizes them by what the dataset registry knows without them (CIFAR-10/100).
"""

from __future__ import annotations

import os

from ablations.storage import absolute, join
from hardmix.config import ConfigError, RunConfig, SweepConfig, to_dict
from tune.space import (describe_param, grid_points, grid_trials, num_trials, point_seeds,
                        trial_config)

#: Ray Tune's experiment folder of each phase, inside the sweep folder.
MAIN_PHASE = "tune"
FOLLOWUP_PHASE = "tune-followup"
#: The resolved sweep config (``--resume`` reads it back) and the follow-up configurations.
SWEEP_FILE = "sweep.yaml"
FOLLOWUP_FILE = "followup.json"


def sweep_dir_of(cfg: SweepConfig) -> str:
    """``<storage>/<name>``: an absolute local path or a URI."""
    return join(absolute(cfg.storage), cfg.name)


def varying_fields(cfg: SweepConfig) -> list[str]:
    """Run fields that vary within the sweep: the space's parameters or the arms' fields."""
    names = list(cfg.space) if cfg.space else []
    for arm in cfg.arms:
        names += [k for k in arm if k != "seeds" and k not in names]
    return names


def joins_cluster(cfg: SweepConfig) -> bool:
    """The sweep joins a Ray cluster (``address``): its driver's machine need not be a node
    its trials run on. A local instance (no ``address``) runs every trial on this machine."""
    return bool(cfg.address)


def local_cpu_count() -> int:
    """Logical CPUs of a local Ray instance: max(4, cores). Two logical CPUs hang nested Tune ->
    Train placement groups (shared/NOTES-ray.md); more logical than physical CPUs is fine."""
    return max(4, os.cpu_count() or 1)


def describe_data(cfg: SweepConfig) -> str:
    from hardmix.datasets import dataset

    return dataset(cfg.run.data.name).describe(cfg.run.data)


def data_facts(run: RunConfig) -> dict | None:
    """Sizes of a run's data (train images after subset and validation split, validation and
    test images, channels, side, classes), or None where they are unknown without reading
    every file (the data set's registry entry says). Data that are not here are sized by
    what the registry knows without them (CIFAR's fixed sizes: ``DatasetSpec.planned_facts``)."""
    from hardmix.datasets import dataset, split_sizes

    try:
        facts = dataset(run.data.name).planned_facts(run.data)
    except (ConfigError, OSError):  # data only the trials' nodes see (a sweep on a cluster)
        return None
    if facts is None:
        return None
    n_used, n_val = split_sizes(run.data, facts.train)
    return {"train": n_used - n_val, "val": n_val, "test": facts.test,
            "channels": facts.channels, "size": facts.size, "classes": facts.classes or 10}


def forward_flops(run: RunConfig, facts: dict) -> float | None:
    """FLOPs of one forward pass of one image through the run's model (torch's counter,
    :func:`hardmix.models.forward_flops`: the count a run's ``flops_per_s`` uses too)."""
    from hardmix.models import forward_flops as count

    return count(run.model, facts["classes"], facts["channels"], facts["size"])


def trial_cost(run: RunConfig, flops_cache: dict) -> tuple[int, float | None] | None:
    """``(image passes, FLOPs)`` of one trial with run config ``run``: training (forward +
    backward ~ 3 forwards, plus the hardness forward on mixed steps where the method table says
    there is one) and the validation and test evaluations ``run.eval`` asks for."""
    from hardmix.methods import extra_forwards
    from hardmix.throughput import training_flops

    facts = data_facts(run)
    if facts is None:
        return None
    e = run.optim.epochs
    passes = e * facts["train"]
    key = (repr(run.model), tuple(sorted(facts.items())))
    if key not in flops_cache:
        flops_cache[key] = forward_flops(run, facts)
    flops = flops_cache[key]
    if flops is None:
        return passes, None
    aug = to_dict(run.augment)
    extra = extra_forwards(aug) * (run.augment.prob if aug["method"] != "none" else 0.0)
    val_evals = len({*range(run.eval.every, e + 1, run.eval.every), e}) if facts["val"] else 0
    test_evals = len({*range(run.eval.test_every, e + 1, run.eval.test_every), e})
    total = (training_flops(flops, e * facts["train"], extra)
             + flops * (val_evals * facts["val"] + test_evals * facts["test"]))
    return passes, total


def fmt_flops(f: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                        ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def data_note(run: RunConfig) -> str | None:
    """A line for data that are not here (a plan only): what the plan sizes them by, and that
    a real run refuses to start without them; None when they are here."""
    from hardmix.datasets import dataset, named_after

    spec = dataset(run.data.name)
    if spec.present(run.data):
        return None
    where = "data.path is unset" if not run.data.path else f"{run.data.path} is not here"
    facts = spec.planned_facts(run.data)
    named = run.data.name if spec.shape else \
        f"{getattr(named_after(run.data.path), 'name', None)}, the file's name"
    sized = (f"the plan uses the known sizes of {named} ({facts.train:,} train / "
             f"{facts.test:,} test images, {facts.size}x{facts.size}x{facts.channels}, "
             f"{facts.classes} classes)" if facts is not None else
             "sizes unknown (a .npz named after a data set of fixed sizes, cifar10.npz or "
             "cifar100.npz, is sized as that one while absent)")
    return f"data: {where}; {sized}; the sweep itself refuses to start until it is there"


def plan_text(cfg: SweepConfig, device_type: str | None = None,
              cluster: str | None = None) -> str:
    """The ``--dry-run`` description: trials, resources, compute, time and fit
    (:mod:`tune.estimate`; ``device_type``: the GPU to estimate for, ``cluster``: a cluster
    file whose node types must hold a trial)."""
    from tune.estimate import estimate_lines

    seeds = cfg.seeds
    lines = [f"sweep {cfg.name!r} -> {sweep_dir_of(cfg)}",
             f"mode: {cfg.mode}" + (f" (sampler {cfg.sampler}, {cfg.num_samples} configurations)"
                                    if cfg.mode == "search" else "")]
    if cfg.mode == "grid":
        points = grid_points(cfg)
        if cfg.arms:
            lines.append(f"trials: {len(points)} arms, {num_trials(cfg)} trials "
                         "(each arm x its seeds)")
        else:
            lines.append(f"trials: {len(points)} configurations x {len(seeds)} seeds "
                         f"{seeds} = {len(points) * len(seeds)}")
        for i, (p, s) in enumerate(zip(points[:40], point_seeds(cfg))):
            text = ", ".join(f"{k}={v}" for k, v in p.items()) or "(the base run)"
            lines.append(f"  c{i:03d}  {text}" + (f"  seeds {s}" if cfg.arms else ""))
        if len(points) > 40:
            lines.append(f"  ... and {len(points) - 40} more")
    else:
        lines.append(f"trials: {cfg.num_samples} configurations x {len(seeds)} seeds {seeds} = "
                     f"{cfg.num_samples * len(seeds)}")
        lines.append("space:")
        lines += [f"  {describe_param(n, s)}" for n, s in cfg.space.items()]
    n_trials = num_trials(cfg)
    if cfg.followup.top:
        per = 2 if cfg.followup.baseline else 1
        extra = cfg.followup.top * per * len(cfg.followup.seeds)
        matched = f" (each with {cfg.followup.baseline} matched to it)" if per == 2 else ""
        lines.append(f"follow-up: best {cfg.followup.top} configurations{matched} x seeds "
                     f"{cfg.followup.seeds} = up to {extra} more trials")
        n_trials += extra
    sched = cfg.scheduler
    asha = (f" on {cfg.metric} (grace {sched.grace_period} epochs, reduction "
            f"{sched.reduction_factor:g})") if sched.type == "asha" else ""
    lines.append(f"early stopping: {sched.type}{asha}; search metric {cfg.metric} (validation)")
    r = cfg.resources
    per = f"{r.cpus:g} CPU" + (f" + {r.gpus:g} GPU" if r.gpus else "")
    lines.append(f"resources per trial: {r.workers} x ({per})"
                 + (" data-parallel (Ray Train, "
                    + ("nccl" if r.gpus else "gloo") + ")" if r.workers > 1 else ""))
    lines.append(f"concurrency: {cfg.max_concurrent_trials or 'as resources allow'}; retries per "
                 f"trial: {cfg.max_failures}")
    where = cfg.address or f"a local Ray instance ({cfg.local_cpus or local_cpu_count()} " \
                           "logical CPUs)"
    lines.append(f"ray: {where}")
    if joins_cluster(cfg):
        lines.append("node checks: the data (data.path) and the device (run.device) are checked "
                     "on a node where trials run, once Ray is up and before the first trial; "
                     "this machine need not see them")
    run = cfg.run
    varied = "augment.method" in cfg.space or any("augment.method" in a for a in cfg.arms)
    method = "" if varied else f", augment {run.augment.method}"
    lines.append(f"run: {run.model.name} on {describe_data(cfg)}, {run.optim.epochs} epochs, "
                 f"batch {run.data.batch_size}{method}")
    note = data_note(run)
    if note:
        lines.append(note)
    if cfg.mode == "grid":
        runs = [trial_config(cfg.run, p, seed) for p, seed in grid_trials(cfg)]
    else:  # a search's trials are unknown yet: the base run stands for each of them
        runs = [cfg.run] * n_trials
    cache: dict = {}
    costs = [trial_cost(r, cache) for r in runs]
    if all(c is not None for c in costs):
        passes = sum(c[0] for c in costs)
        text = (f"compute: {n_trials} trials, {passes:,} training image passes in all")
        if all(c[1] is not None for c in costs):
            total = sum(c[1] for c in costs)
            text += (f", about {fmt_flops(total)} (training with the hardness forward where "
                     "it runs, and the evaluations of eval.every / eval.test_every)")
        if cfg.mode == "search":
            text += "; estimated from the base run" + (
                ", an upper bound: ASHA stops trials early" if cfg.scheduler.type == "asha"
                else "")
        lines.append(text)
    else:
        lines.append(f"compute: {n_trials} trials x {run.optim.epochs} epochs "
                     "(data size unknown before reading the folder)")
    flops = [c[1] for c in costs] if all(c is not None and c[1] for c in costs) else None
    lines += estimate_lines(cfg, runs, flops, data_facts(cfg.run),
                            cfg.local_cpus or local_cpu_count(), device_type, cluster)
    return "\n".join(lines)
