"""``hardmix sweep``: many training runs on Ray Tune, every result in Parquet.

A sweep is one folder, ``<storage>/<name>`` (a local or network path, or a URI such as
``s3://bucket/sweeps/name``)::

    sweep.yaml              the resolved sweep config (``--resume`` reads it back)
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
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO

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

    raw = yaml.safe_load(_read_text(saved)) or {}
    storage, name = (folder.rstrip("/").rsplit("/", 1) if is_uri(folder)
                     else os.path.split(folder.rstrip(os.sep)))
    raw = deep_merge(raw, parse_overrides(overrides, SweepConfig))
    raw.update(storage=storage, name=name)  # the folder being resumed wins
    cfg = from_dict(SweepConfig, raw)
    validate(cfg)
    return cfg, True


def prepare(cfg: SweepConfig) -> SweepConfig:
    """Every check that needs no Ray, and paths made absolute (Tune runs trials in their own
    working directories). Raises ConfigError."""
    cfg = with_default_space(cfg)
    check_space(cfg)
    data = cfg.run.data
    if data.path and not is_uri(data.path):
        data.path = os.path.abspath(os.path.expanduser(data.path))
    check_sweep_environment(cfg)
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

    facts = dataset(run.data.name).facts(run.data)
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
        extra = cfg.followup.top * len(cfg.followup.seeds)
        lines.append(f"follow-up: best {cfg.followup.top} configurations x seeds "
                     f"{cfg.followup.seeds} = {extra} more trials")
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
            text += "; estimated from the base run"
        lines.append(text)
    else:
        lines.append(f"compute: {n_trials} trials x {run.optim.epochs} epochs "
                     "(data size unknown before reading the folder)")
    return "\n".join(lines)


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
        ray.init(num_cpus=cfg.local_cpus or local_cpu_count(), **common)
    return True


def _make_context(cfg: SweepConfig, sweep_dir: str, prefix: str, seeds: list[int],
                  points: list[dict] | None, point_seeds: list[list[int]] | None = None):
    import ray

    from tune.trainable import SweepContext

    return SweepContext(sweep_dir=sweep_dir, run=cfg.run, seeds=list(seeds), metric=cfg.metric,
                        resources=cfg.resources, prefix=prefix, points=points,
                        point_seeds=point_seeds,
                        ray_version=ray.__version__, local_runs=not is_uri(sweep_dir),
                        eval_epochs=tuple(scheduler_epochs(cfg)),
                        hparams=tuple(varying_fields(cfg)))


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
        # The trial only drives a TorchTrainer whose workers reserve their own resources.
        resources = {"cpu": 0.5}
    else:
        resources = {"cpu": r.cpus, "gpu": r.gpus}
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


def make_searcher(cfg: SweepConfig):
    """OptunaSearch over the define-by-run space, each suggestion repeated once per seed; Optuna
    is told the mean over the seeds."""
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import ConditionalSpace

    search = OptunaSearch(space=ConditionalSpace(cfg.space, cfg.run), metric=cfg.metric,
                          mode="min", sampler=make_sampler(cfg))
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


def _tuner(cfg: SweepConfig, ctx, phase: str, restore: bool, label: str):
    """A new or restored Tuner for one phase of the sweep."""
    from ray import tune

    from tune.progress import SweepProgress
    from tune.trainable import StoreStatusCallback, TrialNamer

    path = join(ctx.sweep_dir, phase)
    trainable = _trainable(ctx)
    if restore:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    if ctx.points is not None:
        cells = ctx.cells()
        param_space = {"cell": tune.grid_search(cells)}
        search_alg, scheduler, num_samples = None, None, 1
        total = len(cells)
    else:
        param_space = {}
        search_alg, scheduler = make_searcher(cfg), make_scheduler(cfg)
        num_samples = total = cfg.num_samples * len(ctx.seeds)
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
        callbacks=[StoreStatusCallback(ctx)],
        progress_reporter=SweepProgress(cfg.metric, cfg.run.optim.epochs, total, label=label),
        verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _can_restore(path: str) -> bool:
    from ray import tune
    return _exists(path) and tune.Tuner.can_restore(path)


def _outcomes(path: str, ctx, epochs: int, total: int) -> tuple[list[dict], bool]:
    """One entry per trial of a phase (id, state, last validation value, params, seed), read
    back from the saved experiment state, and whether the phase is unfinished (interrupted).

    The saved state is what ``--resume`` will see: trials that were running when the sweep was
    interrupted are pending there (in memory Tune has already marked them terminated).
    """
    from ray.tune import ExperimentAnalysis

    from tune.progress import trial_state

    trials = ExperimentAnalysis(path).trials
    states = {"done": "completed", "pruned": "pruned", "failed": "failed"}
    out = []
    for trial in trials:
        params, seed = ctx.params_and_seed(trial.config or {})
        out.append({"trial": str(trial), "status": states.get(trial_state(trial, epochs),
                                                              "unfinished"),
                    "value": (trial.last_result or {}).get(ctx.metric),
                    "params": params, "seed": seed})
    unfinished = len(out) < total or any(o["status"] == "unfinished" for o in out)
    return out, unfinished


def best_configurations(outcomes: list[dict], top: int) -> list[dict]:
    """The ``top`` parameter sets with the lowest mean validation value over their seeds, from
    trials that ran every epoch (early values of pruned trials would flatter them)."""
    groups: dict[str, list] = {}
    for o in outcomes:
        v = o["value"]
        if o["status"] != "completed" or not isinstance(v, (int, float)) or math.isnan(v):
            continue
        key = json.dumps(o["params"], sort_keys=True)
        groups.setdefault(key, []).append(float(v))
    ranked = sorted(groups.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return [json.loads(k) for k, _ in ranked[:top]]


def _print_paths(cfg: SweepConfig, outcome: SweepOutcome, out: TextIO) -> None:
    d = outcome.sweep_dir
    c = outcome.counts
    print(f"\nsweep {cfg.name}: {sum(c.values())} trials: {c.get('completed', 0)} completed, "
          f"{c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed"
          + (f", {c['unfinished']} unfinished" if c.get("unfinished") else "")
          + f" ({outcome.wall_seconds / 60:.1f} min)", file=out)
    if outcome.best:
        b = outcome.best
        params = ", ".join(f"{k}={v}" for k, v in b["params"].items())
        print(f"  best         {b['trial']}  {cfg.metric} {b['value']:.2f}  ({params})", file=out)
    print(f"  data         {describe_data(cfg)}", file=out)
    print(f"  Parquet      {join(d, 'trials')}  {join(d, 'epochs')}", file=out)
    runs = join(d, "runs") if not is_uri(d) else join(d, MAIN_PHASE)
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


def run_sweep(cfg: SweepConfig, resume: bool = False, dry_run: bool = False,
              out: TextIO | None = None) -> SweepOutcome:
    """Run (or resume, or only plan) a sweep; see the module docstring.

    Raises ConfigError before Ray starts when the config cannot work. Trial failures do not
    raise: they are retried ``max_failures`` times, recorded as failed, and counted.
    """
    out = out or sys.stdout
    cfg = prepare(cfg)
    sweep_dir = sweep_dir_of(cfg)
    if dry_run:
        print(plan_text(cfg), file=out)
        return SweepOutcome(sweep_dir, dry_run=True)
    main_path = join(sweep_dir, MAIN_PHASE)
    if not resume and _exists(main_path):
        raise ConfigError("name", cfg.name,
                          f"a sweep of this name already exists in {sweep_dir}: continue it "
                          f"with `hardmix sweep --resume {sweep_dir}` or pick another name "
                          "(--set name=...)")
    if resume and not _exists(join(sweep_dir, SWEEP_FILE)):
        raise ConfigError("--resume", sweep_dir, f"holds no sweep ({SWEEP_FILE} is missing)")

    from tune.progress import quiet_ray
    quiet_ray()
    t0 = time.time()
    if not resume:
        _write_text(join(sweep_dir, SWEEP_FILE), to_yaml(cfg))
    started = _start_ray(cfg)
    try:
        from tune.cluster import check_cluster_resources
        check_cluster_resources(cfg)  # a trial no node can ever hold would wait forever
        print(f"hardmix sweep {cfg.name}: {describe_data(cfg)}; results in {sweep_dir}"
              + (" (resuming)" if resume else ""), file=out)
        points = grid_points(cfg) if cfg.mode == "grid" else None
        ctx = _make_context(cfg, sweep_dir, "c", cfg.seeds, points,
                            point_seeds(cfg) if points is not None else None)
        tuner = _tuner(cfg, ctx, MAIN_PHASE, restore=resume and _can_restore(main_path),
                       label=cfg.name)
        tuner.fit()
        outcomes, interrupted = _outcomes(main_path, ctx, cfg.run.optim.epochs,
                                          num_trials(cfg))

        if cfg.followup.top and not interrupted:
            follow_path = join(sweep_dir, FOLLOWUP_PHASE)
            points_file = join(sweep_dir, FOLLOWUP_FILE)
            if _exists(points_file):
                top = json.loads(_read_text(points_file))
            else:
                top = best_configurations(outcomes, cfg.followup.top)
                _write_text(points_file, json.dumps(top, indent=1))
            if top:
                print(f"follow-up: best {len(top)} configurations x seeds "
                      f"{cfg.followup.seeds}", file=out)
                fctx = _make_context(cfg, sweep_dir, "f", cfg.followup.seeds, top)
                ftuner = _tuner(cfg, fctx, FOLLOWUP_PHASE, restore=_can_restore(follow_path),
                                label=f"{cfg.name} follow-up")
                ftuner.fit()
                more, interrupted = _outcomes(follow_path, fctx, cfg.run.optim.epochs,
                                              len(top) * len(cfg.followup.seeds))
                outcomes += more
    finally:
        if started:
            import ray
            ray.shutdown()

    outcome = SweepOutcome(sweep_dir, interrupted=interrupted, wall_seconds=time.time() - t0)
    for o in outcomes:
        outcome.counts[o["status"]] = outcome.counts.get(o["status"], 0) + 1
    done = [o for o in outcomes if o["status"] == "completed"
            and isinstance(o["value"], (int, float)) and not math.isnan(o["value"])]
    if done:
        b = min(done, key=lambda o: o["value"])
        outcome.best = {"trial": b["trial"], "value": b["value"], "params": b["params"]}
    if cfg.report and not interrupted and done:
        outcome.report = _build_report(sweep_dir, out)
    _print_paths(cfg, outcome, out)
    return outcome


def sweep_from_cli(preset: str | None, file: str | None, overrides: list[str],
                   resume: str | None, dry_run: bool) -> int:
    """``hardmix sweep``: 0 when the sweep ran to its end with at least one completed trial,
    1 when every trial failed, 130 when interrupted (resume it with ``--resume``). A bad config
    raises ConfigError before Ray starts (the CLI prints one line, exit 2)."""
    cfg, resuming = resolve_config(preset, file, overrides, resume)
    outcome = run_sweep(cfg, resume=resuming, dry_run=dry_run)
    if outcome.interrupted:
        return 130
    return 0 if outcome.ok else 1
