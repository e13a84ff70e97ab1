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

The driver reads top-down, as one story (:func:`run_sweep`): resolve the config
(:func:`resolve_config`, :func:`tune.preflight.prepare`) -> plan (:mod:`tune.plan`) -> start
Ray (:func:`_start_ray`, :func:`tune.preflight.check_cluster`) -> run the phases
(:func:`_run_phases`: one Ray Tune ``Tuner`` per phase over :func:`tune.trainable.run_trial`,
searched and stopped by :mod:`tune.search`) -> the outcome, read back from the store
(:mod:`tune.outcome`). What a resume reads is :mod:`tune.resume`'s.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from ablations import storage
from ablations.storage import absolute, is_uri, join
from ablations.store import FOLLOWUP_PREFIX, MAIN_PREFIX, trial_name
from hardmix.config import ConfigError, SweepConfig, load_config, to_yaml
from tune.outcome import (SweepOutcome, build_report, followup_configurations, metric_of,
                          planned_trials, print_outcome, rows_with_metric, sweep_outcome)
from tune.plan import (FOLLOWUP_PHASE, MAIN_PHASE, SWEEP_FILE, describe_data, local_cpu_count,
                       plan_text, sweep_dir_of, varying_fields)
from tune.preflight import check_cluster, prepare
from tune.resume import SweepState, finished, resumed_config, stored_configurations, warm_study
from tune.search import make_scheduler, make_searcher, scheduler_epochs
from tune.space import grid_points, point_seeds


def sweep_from_cli(preset: str | None, file: str | None, overrides: list[str],
                   resume: str | None, dry_run: bool, device_type: str | None = None,
                   cluster: str | None = None, close: str | None = None) -> int:
    """``hardmix sweep``: 0 when the sweep ran to its end with at least one completed trial,
    1 when every trial failed, 130 when interrupted (resume it with ``--resume``). A bad config
    raises ConfigError before Ray starts (the CLI prints one line, exit 2). ``device_type``
    and ``cluster`` shape the dry run's estimate (:func:`tune.plan.plan_text`) and need it."""
    for flag, value in (("--device-type", device_type), ("--cluster", cluster)):
        if value is not None and not dry_run:
            raise ConfigError(flag, value, "only shapes the --dry-run estimate: add --dry-run")
    if close is not None:
        return _close(preset, file, overrides, resume, dry_run, close)
    cfg, resuming = resolve_config(preset, file, overrides, resume)
    _TERMINATED.clear()
    outcome = run_sweep(cfg, resume=resuming, dry_run=dry_run,
                        plan_options={"device_type": device_type, "cluster": cluster})
    if outcome.interrupted:
        return 143 if _TERMINATED else 130
    return 0 if outcome.ok else 1


def _close(preset: str | None, file: str | None, overrides: list[str], resume: str | None,
           dry_run: bool, reason: str) -> int:
    """``--resume SWEEP --close REASON``: end an until-resolved sweep's design after its last
    look (:func:`tune.rounds.close_design`), without starting Ray."""
    if resume is None:
        raise ConfigError("--close", reason, "closes a sweep that ran: add --resume SWEEP")
    if dry_run:
        raise ConfigError("--close", reason, "runs nothing to plan: drop --dry-run")
    cfg, _ = resolve_config(preset, file, overrides, resume)
    if not cfg.analysis.until_resolved:
        raise ConfigError("--close", reason, f"{cfg.name} is not an until-resolved sweep "
                          "(analysis.until_resolved): its seeds were fixed, there is no design "
                          "to close")
    from tune.rounds import close_design
    close_design(cfg, sweep_dir_of(cfg), reason)
    return 0


def run_sweep(cfg: SweepConfig, resume: bool = False, dry_run: bool = False,
              out: TextIO | None = None, plan_options: dict | None = None) -> SweepOutcome:
    """Run (or resume, or only plan) a sweep; see the module docstring. ``plan_options``: the
    dry run's ``device_type`` and ``cluster`` (:func:`tune.plan.plan_text`).

    Raises ConfigError before Ray starts when the config cannot work. Trial failures do not
    raise: they are retried ``max_failures`` times, recorded as failed, and counted. An
    interrupted sweep (Ctrl+C, SIGTERM) leaves what it finished in the store; ``resume=True``
    continues it from there (:mod:`tune.resume`).
    """
    out = out or sys.stdout
    # 1. resolve: every check that needs no Ray
    cfg = prepare(cfg, plan=dry_run)
    sweep_dir = sweep_dir_of(cfg)
    # 2. plan
    if cfg.analysis.until_resolved:  # its design and contrasts, refused here if they cannot work
        from tune.rounds import plan_of, plan_text as rounds_text
        plan_of(cfg)
    if dry_run:
        text = rounds_text if cfg.analysis.until_resolved else plan_text
        print(text(cfg, **{k: v for k, v in (plan_options or {}).items() if v}), file=out)
        return SweepOutcome(sweep_dir, dry_run=True)
    if not resume and storage.exists(join(sweep_dir, SWEEP_FILE)):
        raise ConfigError("name", cfg.name,
                          f"a sweep of this name already exists in {sweep_dir}: continue it "
                          f"with `hardmix sweep --resume {sweep_dir}` or pick another name "
                          "(--set name=...)")
    if resume and not storage.exists(join(sweep_dir, SWEEP_FILE)):
        raise ConfigError("--resume", sweep_dir, f"holds no sweep ({SWEEP_FILE} is missing)")
    state = SweepState.load(sweep_dir) if resume else SweepState()

    from tune.progress import quiet_ray
    quiet_ray()
    state.runs += 1
    state.save(sweep_dir)  # a driver killed now still counts as a run
    with state.clock(sweep_dir):
        # 3. start Ray, and the checks only the cluster can answer
        started = _start_ray(cfg)
        _stop_on_sigterm()
        try:
            check_cluster(cfg, out)
            # Written once the checks passed: a refused sweep leaves no sweep.yaml, so the same
            # name can be run again once fixed. A resume may add seeds.
            storage.write_text(join(sweep_dir, SWEEP_FILE), to_yaml(cfg))
            print(f"hardmix sweep {cfg.name}: {describe_data(cfg)}; results in {sweep_dir}"
                  + (" (resuming)" if resume else ""), file=out)
            # 4. run the phases
            _run_phases(cfg, sweep_dir, state, resume, out)
        finally:
            if started:
                import ray
                ray.shutdown()

    # 5. the outcome, from the store
    outcome = sweep_outcome(cfg, sweep_dir, state.wall_seconds)
    if cfg.report and not outcome.interrupted and outcome.counts.get("completed"):
        outcome.report = build_report(sweep_dir, out)
    print_outcome(cfg, outcome, out)
    return outcome


# --------------------------------------------------------------------------------------------
# 1. Resolve the config (no Ray)
# --------------------------------------------------------------------------------------------


def resolve_config(preset: str | None, file: str | None, overrides: list[str] | None,
                   resume: str | None) -> tuple[SweepConfig, bool]:
    """The sweep config and whether to resume.

    ``resume`` is None (a new sweep), ``""`` (resume the sweep named by the config) or a sweep
    folder / URI / name under ``storage``. A resumed sweep reads its saved ``sweep.yaml``, with
    ``overrides`` on top (e.g. a new ``address``): :func:`tune.resume.resumed_config`.
    """
    overrides = list(overrides or [])
    if resume is None:
        return load_config(SweepConfig, preset, file, overrides), False
    if resume == "":
        folder = sweep_dir_of(load_config(SweepConfig, preset, file, overrides))
    elif is_uri(resume) or os.path.isdir(os.path.expanduser(resume)):
        folder = absolute(resume)
    else:  # a sweep name under the configured storage
        base = load_config(SweepConfig, preset, file, overrides)
        folder = join(absolute(base.storage), resume)
    return resumed_config(folder, resume, overrides), True


# --------------------------------------------------------------------------------------------
# 3. Start Ray
# --------------------------------------------------------------------------------------------


#: Environment variables a sweep joining a cluster passes on to every trial (runtime_env).
CLUSTER_ENV = ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
               "PYTHONWARNINGS", "OMP_WAIT_POLICY")


def _start_ray(cfg: SweepConfig) -> bool:
    """Connect to Ray (or reuse a running connection). True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Trial output stays in Ray's logs; the sweep prints its own progress.
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if cfg.address:
        # What the trials need from this command's environment: a cluster's workers were
        # started by `ray start`, not by us, and inherit none of it.
        env = {k: os.environ[k] for k in CLUSTER_ENV if k in os.environ}
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


# --------------------------------------------------------------------------------------------
# 4. Run the phases: one Tuner each
# --------------------------------------------------------------------------------------------


def _run_phases(cfg: SweepConfig, sweep_dir: str, state, resume: bool, out: TextIO) -> None:
    """Run what the sweep still lacks: the main phase (grid cells, or the unfinished seeds of
    started configurations and then new Optuna suggestions), then the follow-up. What is done
    comes from the store; nothing of Tune's saved state is read."""
    suffix = "" if state.runs <= 1 else f"-r{state.runs - 1}"
    rows = rows_with_metric(cfg, sweep_dir) if resume else {}
    if cfg.mode == "grid" and cfg.analysis.until_resolved:  # seeds in rounds (tune.rounds)
        from tune.rounds import run_rounds
        run_rounds(cfg, sweep_dir, lambda seeds, name: _grid_phase(
            cfg, sweep_dir, rows_with_metric(cfg, sweep_dir), resume, suffix + name, seeds), out)
    elif cfg.mode == "grid":
        _grid_phase(cfg, sweep_dir, rows, resume, suffix)
    else:
        _search_phase(cfg, sweep_dir, rows, resume, suffix, out)
    if cfg.followup.top and cfg.mode == "search":
        _followup_phase(cfg, sweep_dir, resume, suffix, out)


def _grid_phase(cfg: SweepConfig, sweep_dir: str, rows: dict, resume: bool,
                suffix: str, seeds: list[list[int]] | None = None) -> None:
    """Every cell of the grid (each point with each of its seeds: ``seeds``, default
    :func:`tune.space.point_seeds`) not finished yet."""
    done = finished(rows)
    ctx = _make_context(cfg, sweep_dir, MAIN_PREFIX, cfg.seeds, grid_points(cfg),
                        point_seeds(cfg) if seeds is None else seeds, resuming=resume)
    cells = [c for c in ctx.cells() if trial_name(MAIN_PREFIX, c["index"], c["seed"]) not in done]
    if cells:
        _fit(_tuner(cfg, ctx, MAIN_PHASE + suffix, cfg.name, cells=cells))


def _search_phase(cfg: SweepConfig, sweep_dir: str, rows: dict, resume: bool, suffix: str,
                  out: TextIO) -> None:
    """The seeds that configurations of an earlier run lack, then as many new configurations
    from Optuna (told the finished ones) as ``num_samples`` still asks for."""
    done = finished(rows)
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
        configs = stored_configurations(rows_with_metric(cfg, sweep_dir), cfg.space)
    remaining = cfg.num_samples - len(configs)
    if remaining > 0:
        warm = warm_study(cfg, configs, metric_of(cfg)) if configs else None
        offset = max(configs) + 1 if configs else 0
        ctx = _make_context(cfg, sweep_dir, MAIN_PREFIX, cfg.seeds, None, resuming=resume,
                            index_offset=offset)
        _fit(_tuner(cfg, ctx, MAIN_PHASE + suffix, cfg.name, samples=remaining, warm=warm))


def _followup_phase(cfg: SweepConfig, sweep_dir: str, resume: bool, suffix: str,
                    out: TextIO) -> None:
    """The best configurations of the search (and their matched baselines) again, with the
    follow-up seeds, once every trial of the main phase finished."""
    rows = rows_with_metric(cfg, sweep_dir)
    if any(t not in finished(rows) for t in planned_trials(cfg)):
        return  # interrupted before the main phase ended: no follow-up yet
    top = followup_configurations(cfg, sweep_dir, rows)
    if not top:
        return
    ctx = _make_context(cfg, sweep_dir, FOLLOWUP_PREFIX, cfg.followup.seeds, top,
                        resuming=resume)
    done = finished(rows)
    cells = [c for c in ctx.cells()
             if trial_name(FOLLOWUP_PREFIX, c["index"], c["seed"]) not in done]
    if cells:
        print(f"follow-up: best {len(top)} configurations x seeds {cfg.followup.seeds}",
              file=out)
        _fit(_tuner(cfg, ctx, FOLLOWUP_PHASE + suffix, f"{cfg.name} follow-up", cells=cells))


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
        progress_reporter=SweepProgress(cfg.metric, cfg.run.optim.epochs, total, label=label,
                                        names=ctx.trial_label),
        verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _fit(tuner) -> None:
    tuner.fit()
