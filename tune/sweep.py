"""``hardmix sweep``: many training runs on Ray Tune, every result in Parquet.

A sweep is one folder, ``<storage>/<name>`` (a local or network path, or a URI such as
``s3://bucket/sweeps/name``)::

    sweep.yaml              the resolved sweep config (``--resume`` reads it back)
    sweep_state.json        runs of the driver and their total wall time
    followup.json           the follow-up configurations of a search
    trials/ epochs/         Parquet rows of every trial and epoch (ablations.store)
    runs/<trial>/           each trial's run folder: TensorBoard logs, run checkpoints
    tune/ tune-followup/    Ray Tune's experiment state and Ray checkpoints (for --resume)
    train/<trial>/          Ray Train's state of data-parallel trials (workers > 1)
    report/                 ``hardmix report`` output when ``report: true``

Modes: ``search`` asks Optuna (TPE by default) for ``num_samples`` configurations of the
define-by-run space (:mod:`tune.space`) and runs each once per seed, Optuna learning from the mean
over seeds; ``grid`` runs every valid combination once per seed. Optional ASHA stops poor trials
early on the validation metric; test error is recorded, never optimised. ``followup.top > 0``
re-runs the best configurations of a search with ``followup.seeds``.

Everything that can be wrong with the config is checked before Ray is imported; ``--dry-run``
stops there, after printing the trials, resources and a compute estimate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, TextIO

from ablations.store import FOLLOWUP_PREFIX, MAIN_PREFIX, trial_name
from hardmix.config import (ConfigError, RunConfig, SweepConfig, check_sweep_environment,
                            deep_merge, from_dict, load_config, parse_overrides, to_dict, to_yaml,
                            validate)
from tune.space import (check_space, describe_param, grid_points, grid_trials, num_trials,
                        point_seeds, trial_config, with_default_space)

MAIN_PHASE = "tune"
FOLLOWUP_PHASE = "tune-followup"
SWEEP_FILE = "sweep.yaml"
FOLLOWUP_FILE = "followup.json"


@dataclass
class SweepOutcome:
    """What a sweep left behind (returned by :func:`run_sweep`)."""

    sweep_dir: str
    counts: dict[str, int] = field(default_factory=dict)  # completed / pruned / failed / unfinished
    best: Optional[dict] = None                           # trial, value, params of the best trial
    report: Optional[str] = None
    interrupted: bool = False
    wall_seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and (self.dry_run or self.counts.get("completed", 0) > 0)


# --------------------------------------------------------------------------------------------
# Paths (local folders and URIs alike)
# --------------------------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def sweep_dir_of(cfg: SweepConfig) -> str:
    """``<storage>/<name>``: an absolute local path or a URI."""
    storage = cfg.storage if is_uri(cfg.storage) else os.path.abspath(
        os.path.expanduser(cfg.storage))
    return join(storage, cfg.name)


def _fs(path: str):
    import pyarrow.fs as pafs
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs
    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def _read_text(path: str) -> str:
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def _write_text(path: str, text: str) -> None:
    """Atomic: a temporary file renamed into place locally; one object put on object stores."""
    fs, inner = _fs(path)
    parent = inner.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
        return
    tmp = f"{parent}/.{inner.rsplit('/', 1)[1]}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, inner)


# --------------------------------------------------------------------------------------------
# Configuration (no Ray)
# --------------------------------------------------------------------------------------------


def resolve_config(preset: str | None, file: str | None, overrides: list[str] | None,
                   resume: str | None) -> tuple[SweepConfig, bool]:
    """The sweep config and whether to resume.

    ``resume`` is None (a new sweep), ``""`` (resume the sweep named by the config) or a sweep
    folder / URI / name under ``storage``. A resumed sweep reads its saved ``sweep.yaml``, with
    ``overrides`` on top (e.g. a new ``address``).
    """
    overrides = list(overrides or [])
    if resume is None:
        return load_config(SweepConfig, preset, file, overrides), False
    if resume == "":
        base = load_config(SweepConfig, preset, file, overrides)
        folder = sweep_dir_of(base)
    elif is_uri(resume) or os.path.isdir(os.path.expanduser(resume)):
        folder = resume if is_uri(resume) else os.path.abspath(os.path.expanduser(resume))
    else:  # a sweep name under the configured storage
        base = load_config(SweepConfig, preset, file, overrides)
        storage = base.storage if is_uri(base.storage) else os.path.abspath(
            os.path.expanduser(base.storage))
        folder = join(storage, resume)
    saved = join(folder, SWEEP_FILE)
    if not _exists(saved):
        raise ConfigError("--resume", resume or folder,
                          f"is not a sweep folder (no {SWEEP_FILE} in {folder})")
    import yaml

    try:
        raw = yaml.safe_load(_read_text(saved)) or {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("--resume", saved, f"is not a readable {SWEEP_FILE} "
                                             f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict):
        raise ConfigError("--resume", saved, f"is not a sweep config ({SWEEP_FILE} must hold a "
                                             "mapping)")
    storage, name = (folder.rstrip("/").rsplit("/", 1) if is_uri(folder)
                     else os.path.split(folder.rstrip(os.sep)))
    raw.update(storage=storage, name=name)  # the folder being resumed wins
    try:
        saved_cfg = from_dict(SweepConfig, raw)
        validate(saved_cfg)
    except ConfigError as exc:
        raise ConfigError("--resume", saved, f"holds an invalid sweep config ({exc})") from None
    cfg = from_dict(SweepConfig, deep_merge(raw, parse_overrides(overrides, SweepConfig)))
    validate(cfg)
    check_resume_changes(saved_cfg, cfg)
    return cfg, True


#: Sweep fields a resume may change: how and where it runs, not which trials it has.
RESUMABLE = ("address", "local_cpus", "max_concurrent_trials", "max_failures", "report",
             "storage", "name", "description")


def check_resume_changes(saved: SweepConfig, new: SweepConfig) -> None:
    """A resume continues the saved sweep. It may change how it runs (address, concurrency,
    retries, report) and, in a grid, add seeds (their trials run as part of the sweep);
    anything else would silently mix two sweeps: one line, nothing started."""
    from hardmix.config import flatten

    before, after = flatten(saved), flatten(new)
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key.split(".")[0] in RESUMABLE:
            continue
        if key == "seeds" and new.mode == "grid" and not new.arms \
                and set(before["seeds"]) <= set(after["seeds"]):
            continue  # added seeds: new cells of the grid
        raise ConfigError(key, after.get(key),
                          f"cannot change on --resume (the sweep was started with "
                          f"{before.get(key)!r}); start a new sweep with --set name=... "
                          + ("or add seeds to a grid without arms" if key == "seeds" else ""))


def prepare(cfg: SweepConfig) -> SweepConfig:
    """Every check that needs no Ray, and paths made absolute (Tune runs trials in their own
    working directories). Raises ConfigError."""
    cfg = with_default_space(cfg)
    check_space(cfg)
    data = cfg.run.data
    if data.path and not is_uri(data.path):
        data.path = os.path.abspath(os.path.expanduser(data.path))
    # On a cluster the driver's machine may never read the data nor hold a GPU: what depends on
    # the node is checked on a trial's node once Ray is up (check_on_trial_node).
    check_sweep_environment(cfg, node=not joins_cluster(cfg))
    if cfg.mode == "grid" and cfg.followup.top:
        raise ConfigError("followup.top", cfg.followup.top,
                          "follow-up runs re-run the best of a search: use mode=search "
                          "(a grid already runs every configuration)")
    return cfg


# --------------------------------------------------------------------------------------------
# Dry run: trials, resources, compute
# --------------------------------------------------------------------------------------------


def data_facts(run: RunConfig) -> dict | None:
    """Sizes of a run's data (train images after subset and validation split, validation and
    test images, channels, side, classes), or None where they are unknown without reading
    every file (the data set's registry entry says)."""
    from hardmix.datasets import dataset, split_sizes

    try:
        facts = dataset(run.data.name).facts(run.data)
    except (ConfigError, OSError):  # data only the trials' nodes see (a sweep on a cluster)
        return None
    if facts is None:
        return None
    n_used, n_val = split_sizes(run.data, facts.train)
    return {"train": n_used - n_val, "val": n_val, "test": facts.test,
            "channels": facts.channels, "size": facts.size, "classes": facts.classes or 10}


def forward_flops(run: RunConfig, facts: dict) -> float | None:
    """FLOPs of one forward pass of one image through the run's model (torch's counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hardmix.models import build_model

    try:
        model = build_model(run.model, facts["classes"], facts["channels"], facts["size"])
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, facts["channels"], facts["size"], facts["size"]))
        return float(counter.get_total_flops())
    except Exception:  # an estimate only; never block a sweep on it
        return None


def trial_cost(run: RunConfig, flops_cache: dict) -> tuple[int, float | None] | None:
    """``(image passes, FLOPs)`` of one trial with run config ``run``: training (forward +
    backward ~ 3 forwards, plus the hardness forward on mixed steps where the method table says
    there is one) and the validation and test evaluations ``run.eval`` asks for."""
    from hardmix.methods import extra_forwards

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
    total = flops * (e * facts["train"] * (3 + extra) + val_evals * facts["val"]
                     + test_evals * facts["test"])
    return passes, total


def _fmt_flops(f: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                        ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def plan_text(cfg: SweepConfig) -> str:
    """The ``--dry-run`` description: trials, resources, compute."""
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
            text += (f", about {_fmt_flops(total)} (training with the hardness forward where "
                     "it runs, and the evaluations of eval.every / eval.test_every)")
        if cfg.mode == "search":
            text += "; estimated from the base run" + (
                ", an upper bound: ASHA stops trials early" if cfg.scheduler.type == "asha"
                else "")
        lines.append(text)
    else:
        lines.append(f"compute: {n_trials} trials x {run.optim.epochs} epochs "
                     "(data size unknown before reading the folder)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Checks where the trials run
# --------------------------------------------------------------------------------------------


def joins_cluster(cfg: SweepConfig) -> bool:
    """The sweep joins a Ray cluster (``address``): its driver's machine need not be a node
    its trials run on. A local instance (no ``address``) runs every trial on this machine."""
    return bool(cfg.address)


def check_gpu_request(cfg: SweepConfig, cluster: dict) -> None:
    """A cluster with GPUs and trials that ask for none while ``device=auto``: each trial would
    take whatever GPU its node shows it (Ray reserves none for it; Ray 2.60 leaves
    ``CUDA_VISIBLE_DEVICES`` alone for a zero-GPU task) or train on the CPU of a node without
    one. One line, before any trial."""
    gpus = float(cluster.get("GPU", 0) or 0)
    if gpus <= 0 or cfg.resources.gpus > 0:
        return
    devices = {cfg.run.device, *(arm["device"] for arm in cfg.arms if "device" in arm)}
    if "device" in cfg.space:
        devices |= set(cfg.space["device"].values or [])
    if "auto" not in devices:
        return
    raise ConfigError("resources.gpus", cfg.resources.gpus,
                      f"the cluster has {gpus:g} GPU{'s' if gpus != 1 else ''} but each trial "
                      "asks for none, so with run.device=auto a trial would use a GPU Ray has "
                      "not reserved for it, or the CPU on a node without one: ask for GPUs "
                      "(e.g. resources.gpus=0.25 puts four trials on one GPU) or set "
                      "run.device=cpu to train on CPUs on purpose")


def _check_here(cfg: SweepConfig) -> dict:
    """The node's half of the environment check (:func:`check_sweep_node`), inside a Ray task
    on a node where trials run; the error's fields and where it ran, as plain values."""
    import socket

    import ray

    from hardmix.config.environment import check_sweep_node

    where = {"node_id": ray.get_runtime_context().get_node_id() or "",
             "ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}
    try:
        check_sweep_node(cfg)
    except ConfigError as exc:
        return {**where, "error": [exc.field, exc.value, exc.allowed]}
    return {**where, "error": None}


def check_on_trial_node(cfg: SweepConfig, out: TextIO) -> None:
    """Run the node's half of the environment check in a Ray task that asks for what one trial
    worker asks (CPUs, GPUs, custom resources: Ray places it where it would place a trial), so
    a CPU head accepts a GPU sweep and data staged only on the workers. One line naming the
    node when it fails. Every trial checks again at its start (:func:`hardmix.train.train`);
    a trial that lands on a node that differs fails with that line as its error."""
    import ray

    from tune.cluster import trial_bundle

    bundle = trial_bundle(cfg)
    options: dict = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0),
                     "max_retries": 0}
    if bundle:
        options["resources"] = bundle
    print("checking the data and the device on a node where trials run ...", file=out,
          flush=True)
    seen = ray.get(ray.remote(_check_here).options(**options).remote(cfg))
    node = f"node {seen['host']} ({seen['ip']}, Ray node {seen['node_id'][:12]})"
    if seen["error"]:
        field, value, allowed = seen["error"]
        raise ConfigError(field, value, f"{allowed} (checked on {node}, where this sweep's "
                                        "trials run)")
    print(f"  data and device are fine on {node}", file=out)


def describe_data(cfg: SweepConfig) -> str:
    from hardmix.datasets import dataset

    return dataset(cfg.run.data.name).describe(cfg.run.data)


def local_cpu_count() -> int:
    """Logical CPUs of a local Ray instance: max(4, cores). Two logical CPUs hang nested Tune ->
    Train placement groups (shared/NOTES-ray.md); more logical than physical CPUs is fine."""
    return max(4, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def _start_ray(cfg: SweepConfig) -> bool:
    """Connect to Ray (or reuse a running connection). True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Trial output stays in Ray's logs; the sweep prints its own progress.
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if cfg.address:
        env = {k: os.environ[k] for k in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
                                          "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                          "PYTHONWARNINGS") if k in os.environ}
        ray.init(address=cfg.address, runtime_env={"env_vars": env}, **common)
    else:
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        # A local instance serves this sweep alone: nothing of it may be reachable from the
        # network (anyone who reaches a Ray port can run code). Ray's servers listen on
        # loopback only when the node's IP is exactly 127.0.0.1, but ray.init rewrites
        # _node_ip_address="127.0.0.1" to the machine's external IP
        # (services.resolve_ip_for_localhost) unless ENABLE_RAY_CLUSTER is off, as Ray has it
        # on macOS and Windows. Private constant: ray is pinned (requirements-cluster.txt).
        # address="local": a new instance, never one that /tmp/ray/ray_current_cluster names
        # (ray.init(address=None) joins the last `ray start` cluster of the machine).
        import ray._private.ray_constants as ray_constants

        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address="local", num_cpus=cfg.local_cpus or local_cpu_count(),
                     _node_ip_address="127.0.0.1", **common)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    return True


def _make_context(cfg: SweepConfig, sweep_dir: str, prefix: str, seeds: list[int],
                  points: list[dict] | None, point_seeds: list[list[int]] | None = None,
                  resuming: bool = False, index_offset: int = 0):
    import ray

    from tune.trainable import SweepContext

    return SweepContext(sweep_dir=sweep_dir, run=cfg.run, seeds=list(seeds), metric=cfg.metric,
                        resources=cfg.resources, prefix=prefix, points=points,
                        point_seeds=point_seeds,
                        ray_version=ray.__version__, local_runs=not is_uri(sweep_dir),
                        eval_epochs=tuple(scheduler_epochs(cfg)),
                        hparams=tuple(varying_fields(cfg)), resuming=resuming,
                        index_offset=index_offset)


def varying_fields(cfg: SweepConfig) -> list[str]:
    """Run fields that vary within the sweep: the space's parameters or the arms' fields."""
    names = list(cfg.space) if cfg.space else []
    for arm in cfg.arms:
        names += [k for k in arm if k != "seeds" and k not in names]
    return names


def _trainable(ctx):
    from ray import tune

    from tune.trainable import run_trial

    r = ctx.resources
    if r.workers > 1:
        # The trial only drives a TorchTrainer whose workers reserve their own resources
        # (custom ones included: they steer the workers); resources.driver steers the driver.
        from tune.cluster import driver_bundle

        driver = driver_bundle(r)
        resources = {"cpu": driver.pop("CPU", 0.0), "custom_resources": driver}
    else:
        # Under "custom_resources", not as top-level keys: Tune would read a custom resource
        # named "cpu" or "gpu" as the built-in one.
        resources = {"cpu": r.cpus, "gpu": r.gpus,
                     "custom_resources": {k: v for k, v in r.custom.items() if v > 0}}
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)


def make_sampler(cfg: SweepConfig):
    """The Optuna sampler named by ``cfg.sampler``; TPE is multivariate and grouped, which is
    how TPE models conditional spaces (parameters that exist only for some trials)."""
    import warnings

    import optuna

    seed = cfg.seeds[0]
    # TPE models the space only after its random start-up trials: a third of a small search.
    startup = min(10, max(2, cfg.num_samples // 3))
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                                  n_startup_trials=startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
    }
    with warnings.catch_warnings():  # `group` is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[cfg.sampler]()


def make_searcher(cfg: SweepConfig, warm: tuple | None = None):
    """OptunaSearch over the define-by-run space, each suggestion repeated once per seed; Optuna
    is told the mean over the seeds. ``warm``: ``(storage, study_name)`` of a study that
    already holds the finished configurations (a resumed search)."""
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import ConditionalSpace

    storage, name = warm or (None, None)
    search = OptunaSearch(space=ConditionalSpace(cfg.space, cfg.run), metric=cfg.metric,
                          mode="min", sampler=make_sampler(cfg), storage=storage,
                          study_name=name)
    return Repeater(search, repeat=len(cfg.seeds), set_index=True)


def _max_epochs(cfg: SweepConfig) -> int:
    """The longest trial's epochs (``optim.epochs`` may be searched): ASHA's top rung."""
    searched = cfg.space.get("optim.epochs")
    if searched is not None:
        return int(max(searched.values or [searched.high]))
    return cfg.run.optim.epochs


def scheduler_epochs(cfg: SweepConfig) -> list[int]:
    """The epochs at which the scheduler compares trials (ASHA's rungs, as Ray computes them:
    ``grace_period * reduction_factor**k`` below ``max_t``). Trials evaluate validation error
    there whatever ``eval.every`` says, so every decision sees a fresh value."""
    if cfg.scheduler.type != "asha":
        return []
    s, max_t = cfg.scheduler, _max_epochs(cfg)
    rungs = int(math.log(max_t / s.grace_period) / math.log(s.reduction_factor) + 1)
    return sorted({math.ceil(s.grace_period * s.reduction_factor ** k - 1e-9)
                   for k in range(max(0, rungs))})


def make_scheduler(cfg: SweepConfig):
    if cfg.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    max_t = _max_epochs(cfg)
    return ASHAScheduler(time_attr="epoch", metric=cfg.metric, mode="min",
                         max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _tuner(cfg: SweepConfig, ctx, phase: str, label: str, cells: list[dict] | None = None,
           samples: int = 0, warm: tuple | None = None):
    """A new Tuner for one phase of the sweep: the fixed ``cells`` (a grid, a follow-up, the
    unfinished seeds of a resumed search), or ``samples`` configurations from Optuna (warm
    started with ``warm``). Tune's own saved state is never restored (see tune.resume)."""
    from ray import tune

    from tune.progress import SweepProgress
    from tune.trackers import tracker_callbacks
    from tune.trainable import StoreStatusCallback, TrialNamer

    trainable = _trainable(ctx)
    if cells is not None:
        param_space = {"cell": tune.grid_search(cells)}
        search_alg, scheduler, num_samples = None, None, 1
        total = len(cells)
    else:
        param_space = {}
        search_alg, scheduler = make_searcher(cfg, warm), make_scheduler(cfg)
        num_samples = total = samples * len(ctx.seeds)
    namer = TrialNamer(ctx)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=cfg.max_concurrent_trials or None,
        # A finished trial's worker process takes the next trial (same resources): no new
        # process, no second import of torch, per trial.
        reuse_actors=ctx.resources.workers == 1,
        trial_name_creator=namer, trial_dirname_creator=namer)
    run_config = tune.RunConfig(
        name=phase, storage_path=ctx.sweep_dir,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        sync_config=tune.SyncConfig(sync_artifacts=not ctx.local_runs),
        callbacks=[StoreStatusCallback(ctx), *tracker_callbacks(cfg, ctx)],
        progress_reporter=SweepProgress(cfg.metric, cfg.run.optim.epochs, total, label=label),
        verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _metric_of(cfg: SweepConfig):
    """The searched metric of a trial row: the run's last validation value (the trials table
    carries top-1; other metrics come from the trial's last epoch row)."""
    def get(row: dict) -> float | None:
        value = row.get("final_val_top1_err") if cfg.metric == "val_top1_err" else \
            row.get(f"_last_{cfg.metric}")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return get


def _rows_with_metric(cfg: SweepConfig, sweep_dir: str) -> dict[str, dict]:
    """Latest trial rows, with the last epoch's ``cfg.metric`` attached when it is not the
    trials table's own validation column."""
    from tune.resume import trial_rows

    rows = trial_rows(sweep_dir)
    if cfg.metric != "val_top1_err" and rows:
        from ablations.store import read_results

        epochs = read_results(sweep_dir, on_corrupt="skip").epochs.to_pylist()
        last: dict[str, tuple] = {}
        for e in epochs:
            if e.get(cfg.metric) is not None and e["epoch"] >= last.get(e["trial_id"], (0,))[0]:
                last[e["trial_id"]] = (e["epoch"], e[cfg.metric])
        for t, (_, v) in last.items():
            if t in rows:
                rows[t][f"_last_{cfg.metric}"] = v
    return rows


def best_configurations(cfg: SweepConfig, rows: dict[str, dict], top: int) -> list[dict]:
    """The ``top`` configurations of the search with the lowest mean validation value over
    their seeds, from trials that completed every epoch (early values of pruned trials would
    flatter them)."""
    from tune.resume import stored_configurations

    metric = _metric_of(cfg)
    ranked = []
    for entry in stored_configurations(rows, cfg.space).values():
        values = [metric(r) for r in entry["rows"].values() if r.get("status") == "completed"]
        values = [v for v in values if v is not None]
        if values:
            ranked.append((sum(values) / len(values), entry["params"]))
    ranked.sort(key=lambda kv: kv[0])
    return [params for _, params in ranked[:top]]


def matched_baseline(cfg: SweepConfig, point: dict) -> dict:
    """``followup.baseline`` matched to a configuration: the baseline method with the
    configuration's value of every augment field the baseline reads too (α, prob, box, ...),
    and every other run field as in the configuration."""
    from hardmix.methods import active_fields

    aug = {**to_dict(cfg.run.augment), "method": cfg.followup.baseline}
    acts = active_fields(aug)
    out = {"augment.method": cfg.followup.baseline}
    for k, v in point.items():
        if not k.startswith("augment.") or k[len("augment."):] in acts:
            out.setdefault(k, v)
    return out


def planned_trials(cfg: SweepConfig, followup: list[dict] | None = None) -> list[str]:
    """Every trial id the sweep will have once it ends (main phase, then follow-up)."""

    if cfg.mode == "grid":
        ids = [trial_name(MAIN_PREFIX, i, s) for i, (_, seeds) in enumerate(zip(grid_points(cfg),
                                                                         point_seeds(cfg)))
               for s in seeds]
    else:
        ids = [trial_name(MAIN_PREFIX, i, s) for i in range(cfg.num_samples) for s in cfg.seeds]
    if followup:
        ids += [trial_name(FOLLOWUP_PREFIX, i, s) for i in range(len(followup)) for s in cfg.followup.seeds]
    return ids


def _print_paths(cfg: SweepConfig, outcome: SweepOutcome, out: TextIO) -> None:
    d = outcome.sweep_dir
    c = outcome.counts
    print(f"\nsweep {cfg.name}: {sum(c.values())} trials: {c.get('completed', 0)} completed, "
          f"{c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed"
          + (f", {c['unfinished']} unfinished" if c.get("unfinished") else "")
          + (f", {c['not started']} not started" if c.get("not started") else "")
          + f" ({outcome.wall_seconds / 60:.1f} min in all)", file=out)
    if outcome.best:
        b = outcome.best
        params = ", ".join(f"{k}={v}" for k, v in b["params"].items())
        print(f"  best         {b['trial']}  {cfg.metric} {b['value']:.2f}  ({params})", file=out)
    print(f"  data         {describe_data(cfg)}", file=out)
    print(f"  Parquet      {join(d, 'trials')}  {join(d, 'epochs')}", file=out)
    # A URI storage: Ray syncs a trial's run folder into its Tune trial folder, but a
    # data-parallel trial's rank 0 copies it into runs/ (tune.trainable.RunFolderSync).
    runs = join(d, "runs") if not is_uri(d) or cfg.resources.workers > 1 else join(d, MAIN_PHASE)
    print(f"  TensorBoard  tensorboard --logdir {runs}", file=out)
    if outcome.report:
        print(f"  report       {outcome.report}", file=out)
    if outcome.interrupted:
        print(f"  interrupted: continue with  hardmix sweep --resume {d}", file=out)


def _build_report(sweep_dir: str, out: TextIO) -> str | None:
    """``hardmix report`` on the finished sweep: prints its main table, returns report.md."""
    try:
        from ablations.report import build_report
    except ImportError as exc:  # the analysis layer is optional at run time
        print(f"hardmix: report skipped: ablations.report is not available ({exc}); run "
              f"`hardmix report {sweep_dir}` once it is", file=sys.stderr)
        return None
    try:
        report = build_report(sweep_dir)
    except ConfigError as exc:
        print(f"hardmix: report skipped: {exc}", file=sys.stderr)
        return None
    print("\n" + report.terminal, file=out)
    return report.path


def _fit(tuner) -> None:
    tuner.fit()


def _run_phases(cfg: SweepConfig, sweep_dir: str, state, resume: bool, out: TextIO) -> None:
    """Run what the sweep still lacks: the main phase (grid cells, or the unfinished seeds of
    started configurations and then new Optuna suggestions), then the follow-up. What is done
    comes from the store; nothing of Tune's saved state is read."""
    from tune.resume import finished, stored_configurations, warm_study

    suffix = "" if state.runs <= 1 else f"-r{state.runs - 1}"
    rows = _rows_with_metric(cfg, sweep_dir) if resume else {}
    done = finished(rows)
    if cfg.mode == "grid":
        points = grid_points(cfg)
        ctx = _make_context(cfg, sweep_dir, MAIN_PREFIX, cfg.seeds, points, point_seeds(cfg),
                            resuming=resume)
        cells = [c for c in ctx.cells() if trial_name(MAIN_PREFIX, c["index"], c["seed"]) not in done]
        if cells:
            _fit(_tuner(cfg, ctx, MAIN_PHASE + suffix, cfg.name, cells=cells))
    else:
        configs = stored_configurations(rows, cfg.space) if resume else {}
        partial = {k: e for k, e in configs.items()
                   if any(trial_name(MAIN_PREFIX, k, s) not in done for s in cfg.seeds)}
        if partial:  # finish the seeds of configurations the last run had started
            indices = list(partial)
            ctx = _make_context(cfg, sweep_dir, MAIN_PREFIX, cfg.seeds,
                                [partial[k]["params"] for k in indices], resuming=True)
            cells = [c for c in ctx.cells(indices)
                     if trial_name(MAIN_PREFIX, c["index"], c["seed"]) not in done]
            print(f"resume: finishing {len(cells)} trials of {len(indices)} started "
                  "configurations", file=out)
            _fit(_tuner(cfg, ctx, MAIN_PHASE + suffix + "-started", cfg.name, cells=cells))
            rows = _rows_with_metric(cfg, sweep_dir)
            configs = stored_configurations(rows, cfg.space)
        remaining = cfg.num_samples - len(configs)
        if remaining > 0:
            warm = warm_study(cfg, configs, _metric_of(cfg)) if configs else None
            offset = max(configs) + 1 if configs else 0
            ctx = _make_context(cfg, sweep_dir, MAIN_PREFIX, cfg.seeds, None, resuming=resume,
                                index_offset=offset)
            _fit(_tuner(cfg, ctx, MAIN_PHASE + suffix, cfg.name, samples=remaining, warm=warm))

    if cfg.followup.top and cfg.mode == "search":
        rows = _rows_with_metric(cfg, sweep_dir)
        main = [t for t in planned_trials(cfg) if t not in finished(rows)]
        if main:
            return  # interrupted before the main phase ended: no follow-up yet
        points_file = join(sweep_dir, FOLLOWUP_FILE)
        if _exists(points_file):
            top = json.loads(_read_text(points_file))
            if not isinstance(top, list) or not all(isinstance(p, dict) for p in top):
                raise ConfigError("--resume", points_file, "is not a list of configurations")
        else:
            top = best_configurations(cfg, rows, cfg.followup.top)
            if cfg.followup.baseline:  # the matched baseline of each, once
                for m in [matched_baseline(cfg, p) for p in top]:
                    if m not in top:
                        top.append(m)
            _write_text(points_file, json.dumps(top, indent=1))
        if top:
            fctx = _make_context(cfg, sweep_dir, FOLLOWUP_PREFIX, cfg.followup.seeds, top, resuming=resume)
            done = finished(rows)
            cells = [c for c in fctx.cells() if trial_name(FOLLOWUP_PREFIX, c["index"], c["seed"]) not in done]
            if cells:
                print(f"follow-up: best {len(top)} configurations x seeds "
                      f"{cfg.followup.seeds}", file=out)
                _fit(_tuner(cfg, fctx, FOLLOWUP_PHASE + suffix, f"{cfg.name} follow-up",
                            cells=cells))


def _outcome(cfg: SweepConfig, sweep_dir: str, wall: float) -> SweepOutcome:
    """Counts over the whole sweep (every planned trial, including those not started) and the
    best trial by validation, read from the store."""
    rows = _rows_with_metric(cfg, sweep_dir)
    followup = None
    if cfg.followup.top and _exists(join(sweep_dir, FOLLOWUP_FILE)):
        followup = json.loads(_read_text(join(sweep_dir, FOLLOWUP_FILE)))
    planned = planned_trials(cfg, followup)
    if cfg.followup.top and followup is None:
        n = cfg.followup.top * (2 if cfg.followup.baseline else 1) * len(cfg.followup.seeds)
        planned += [f"f-planned-{i}" for i in range(n)]
    outcome = SweepOutcome(sweep_dir, wall_seconds=wall)
    for t in planned:
        status = rows.get(t, {}).get("status", "not started")
        status = "unfinished" if status == "running" else status
        outcome.counts[status] = outcome.counts.get(status, 0) + 1
    outcome.interrupted = any(k in outcome.counts for k in ("unfinished", "not started"))
    metric = _metric_of(cfg)
    done = [(metric(r), t, r) for t, r in rows.items()
            if r.get("status") == "completed" and metric(r) is not None]
    if done:
        value, trial, row = min(done, key=lambda x: x[0])
        params = {k: row.get(k) for k in (list(cfg.space) or varying_fields(cfg))
                  if row.get(k) is not None}
        outcome.best = {"trial": trial, "value": value, "params": params}
    return outcome


def run_sweep(cfg: SweepConfig, resume: bool = False, dry_run: bool = False,
              out: TextIO | None = None) -> SweepOutcome:
    """Run (or resume, or only plan) a sweep; see the module docstring.

    Raises ConfigError before Ray starts when the config cannot work. Trial failures do not
    raise: they are retried ``max_failures`` times, recorded as failed, and counted. An
    interrupted sweep (Ctrl+C, SIGTERM) leaves what it finished in the store; ``resume=True``
    continues it from there (:mod:`tune.resume`).
    """
    from tune.resume import SweepState

    out = out or sys.stdout
    cfg = prepare(cfg)
    sweep_dir = sweep_dir_of(cfg)
    if dry_run:
        print(plan_text(cfg), file=out)
        return SweepOutcome(sweep_dir, dry_run=True)
    if not resume and _exists(join(sweep_dir, SWEEP_FILE)):
        raise ConfigError("name", cfg.name,
                          f"a sweep of this name already exists in {sweep_dir}: continue it "
                          f"with `hardmix sweep --resume {sweep_dir}` or pick another name "
                          "(--set name=...)")
    if resume and not _exists(join(sweep_dir, SWEEP_FILE)):
        raise ConfigError("--resume", sweep_dir, f"holds no sweep ({SWEEP_FILE} is missing)")
    state = SweepState.load(sweep_dir) if resume else SweepState()

    from tune.progress import quiet_ray
    quiet_ray()
    state.runs += 1
    state.save(sweep_dir)  # a driver killed now still counts as a run
    with state.clock(sweep_dir):
        started = _start_ray(cfg)
        _stop_on_sigterm()
        try:
            from tune.cluster import check_cluster_resources
            check_cluster_resources(cfg)  # a trial no node can ever hold would wait forever
            if joins_cluster(cfg):
                import ray
                check_gpu_request(cfg, ray.cluster_resources())
                check_on_trial_node(cfg, out)
            # Written once the checks passed: a refused sweep leaves no sweep.yaml, so the same
            # name can be run again once fixed. A resume may add seeds.
            _write_text(join(sweep_dir, SWEEP_FILE), to_yaml(cfg))
            print(f"hardmix sweep {cfg.name}: {describe_data(cfg)}; results in {sweep_dir}"
                  + (" (resuming)" if resume else ""), file=out)
            _run_phases(cfg, sweep_dir, state, resume, out)
        finally:
            if started:
                import ray
                ray.shutdown()

    outcome = _outcome(cfg, sweep_dir, state.wall_seconds)
    if cfg.report and not outcome.interrupted and outcome.counts.get("completed"):
        outcome.report = _build_report(sweep_dir, out)
    _print_paths(cfg, outcome, out)
    return outcome


def sweep_from_cli(preset: str | None, file: str | None, overrides: list[str],
                   resume: str | None, dry_run: bool) -> int:
    """``hardmix sweep``: 0 when the sweep ran to its end with at least one completed trial,
    1 when every trial failed, 130 when interrupted (resume it with ``--resume``). A bad config
    raises ConfigError before Ray starts (the CLI prints one line, exit 2)."""
    cfg, resuming = resolve_config(preset, file, overrides, resume)
    _TERMINATED.clear()
    outcome = run_sweep(cfg, resume=resuming, dry_run=dry_run)
    if outcome.interrupted:
        return 143 if _TERMINATED else 130
    return 0 if outcome.ok else 1


#: Holds the signal once a SIGTERM arrived (the exit code then says "terminated", 143).
_TERMINATED: list = []


def _stop_on_sigterm() -> None:
    """SIGTERM (what a cluster scheduler or ``kill`` sends) stops a sweep as Ctrl+C does: Tune
    winds down its trials and the sweep can be resumed. Installed after ``ray.init``, whose
    C++ handler would otherwise abort the driver with a stack dump."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        _TERMINATED.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (called from Python): leave it alone
        pass
