"""Experiment trackers for sweeps: Ray Tune's own W&B and MLflow integrations.

When ``run.output.loggers`` names ``wandb`` and/or ``mlflow``, :func:`tracker_callbacks` gives
the sweep's Tuner Ray's ``WandbLoggerCallback`` / ``MLflowLoggerCallback``. They run on the
driver and log what every trial reports to Tune (each epoch's metrics, at step = epoch), one
tracker run per trial, named by its sweep trial id and readable name (``c003-s1
hardmix-topk_loss-s1``) and grouped by the sweep.

One copy per trial: the trials themselves never start the per-run trackers of
:mod:`hardmix.trackers` (:func:`tune.trainable.trial_callbacks` holds only the store and
TensorBoard), so nothing is logged twice. Driver-side logging also means workers on other nodes
need neither the tracker's credentials nor a route to its server.

Ray's callbacks log the trial's *Tune* config (a grid cell, or Optuna's parameters); these
subclasses log each trial's complete run config instead (flattened, inert ``augment.*`` fields
as NULL, like the Parquet rows), and leave out what is not a metric (the facts each report
carries for the store, Tune's copy of the config).

Configuration is the libraries' own: W&B reads ``WANDB_PROJECT`` (default ``hardmix``),
``WANDB_ENTITY``, ``WANDB_MODE`` (``offline`` needs no account) and ``WANDB_DIR`` (default: the
sweep's ``wandb/`` folder for a local sweep); MLflow reads ``MLFLOW_TRACKING_URI`` (default
here: ``sqlite:///<sweep>/mlflow.db``, or ``~/.cache/hardmix/mlflow/<sweep name>/mlflow.db``
for a sweep on a URI storage; never the working directory) and ``MLFLOW_EXPERIMENT_NAME``
(default: the sweep's name). W&B's logging processes are Ray actors that do not inherit the
driver's later environment changes, so mode, folder and (unless ``--verbose``) silence are
handed to them explicitly. :func:`summary_lines` tells the end-of-sweep summary where each
tracker wrote and how to open it.
"""

from __future__ import annotations

import os
from typing import Any

from hardmix.config import SweepConfig, flatten
from hardmix.trackers import mlflow_uri, quiet_tracker_logs, wandb_settings

DEFAULT_PROJECT = "hardmix"
#: Report keys that are facts for the store (strings, JSON) or bookkeeping, not metrics.
NOT_METRICS = ("config", "device", "git_commit", "data_sha256", "versions_json", "classes_json",
               "precision", "hostname", "node_id", "trial_id", "date", "pid", "node_ip",
               "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "done")


def trial_params(ctx: Any, trial: Any) -> dict[str, Any]:
    """A trial's complete run config, flattened, as its Parquet row holds it (inert augment
    fields None). Plain values only: lists and mappings as text."""
    from ablations.store import as_run

    cfg = ctx.run_config(trial.config, str(trial))
    flat = as_run(dict(flatten(cfg)))
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flat.items()}


def _names(ctx: Any, trial: Any) -> tuple[str, str]:
    """``(run name, readable name)`` of a trial: ``("c003-s1 hardmix-topk_loss-s1",
    "hardmix-topk_loss-s1")`` (the id alone when its config cannot be built)."""
    label = ctx.trial_label(trial)
    return label, label.split(" ", 1)[1] if " " in label else ""


def wandb_folder(sweep_dir: str) -> str | None:
    """Where W&B writes: ``WANDB_DIR``, else the sweep's ``wandb/`` folder (local sweeps)."""
    return os.environ.get("WANDB_DIR") or (None if "://" in sweep_dir
                                           else os.path.join(sweep_dir, "wandb"))


def default_mlflow_uri(cfg: SweepConfig, sweep_dir: str) -> str:
    """``MLFLOW_TRACKING_URI``, else a sqlite store in the sweep folder (a local cache folder
    named after the sweep when the storage is a URI, which sqlite cannot write to)."""
    if "://" in sweep_dir and not sweep_dir.startswith("file://"):
        return mlflow_uri(os.path.join("~", ".cache", "hardmix", "mlflow", cfg.name))
    return mlflow_uri(sweep_dir[len("file://"):] if sweep_dir.startswith("file://")
                      else sweep_dir)


def summary_lines(cfg: SweepConfig, sweep_dir: str) -> list[str]:
    """The end-of-sweep summary's tracker lines: where each tracker wrote and the command that
    opens it."""
    lines = []
    for name in cfg.run.output.loggers:
        if name == "wandb":
            folder = wandb_folder(sweep_dir)
            project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
            if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
                lines.append(f"  W&B          offline runs in {folder}/wandb; upload with  "
                             f"wandb sync {folder}/wandb/offline-run-*")
            else:
                lines.append(f"  W&B          project {project}, group {cfg.name} (local files "
                             f"in {folder or 'the W&B default folder'})")
        elif name == "mlflow":
            uri = default_mlflow_uri(cfg, sweep_dir)
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name
            lines.append(f"  MLflow       experiment {experiment} at {uri}; open with  "
                         f"mlflow ui --backend-store-uri {uri}")
    return lines


def _metrics_only(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in NOT_METRICS}


def wandb_callback(cfg: SweepConfig, ctx: Any):
    """Ray Tune's ``WandbLoggerCallback`` logging each trial's run config."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class HardmixWandb(WandbLoggerCallback):
        def _start_logging_actor(self, trial: Any, exclude_results: list, **kwargs: Any) -> None:
            if not self._remote_logger_class:
                # Ray's own class restarts without end (max_restarts=-1), which makes Ray's core
                # worker print an ERROR line for every trial (ray-project/ray#53727); a logging
                # actor that dies here is not restarted (the Parquet rows are the record).
                import ray
                from ray.air.integrations.wandb import WANDB_ENV_VAR
                from ray.air.util.node import _force_on_current_node

                env = {k: os.environ[k] for k in (WANDB_ENV_VAR,) if k in os.environ}
                self._remote_logger_class = ray.remote(
                    num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": env},
                    max_restarts=0)(self._logger_actor_cls)
            super()._start_logging_actor(trial, exclude_results, **kwargs)

        def log_trial_start(self, trial: Any) -> None:
            # Read by the parent's log_trial_start when it builds wandb.init's arguments.
            self.kwargs["config"] = trial_params(ctx, trial)
            self.kwargs["name"] = _names(ctx, trial)[0]
            super().log_trial_start(trial)

    kwargs: dict[str, Any] = {}
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]
    folder = wandb_folder(ctx.sweep_dir)
    if wandb_settings():
        kwargs["settings"] = wandb_settings()
    if folder:
        os.makedirs(folder, exist_ok=True)
        kwargs["dir"] = folder
    if os.environ.get("WANDB_ENTITY"):
        kwargs["entity"] = os.environ["WANDB_ENTITY"]
    return HardmixWandb(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                        group=cfg.name, excludes=list(NOT_METRICS), **kwargs)


def mlflow_callback(cfg: SweepConfig, ctx: Any):
    """Ray Tune's ``MLflowLoggerCallback`` logging each trial's run config."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class HardmixMlflow(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            first = trial not in self._trial_runs
            if first:  # the run, named by the trial's id and readable name
                label, name = _names(ctx, trial)
                run = self.mlflow_util.start_run(
                    tags={**self.tags, "trial_id": str(trial), "trial_name": name},
                    run_name=label)
                self._trial_runs[trial] = run.info.run_id
            super().log_trial_start(trial)
            if first:  # a retried trial continues its run; its params are there already
                params = {k: "" if v is None else str(v)[:500]
                          for k, v in trial_params(ctx, trial).items()}
                self.mlflow_util.log_params(run_id=self._trial_runs[trial],
                                            params_to_log=params)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            super().log_trial_result(iteration, trial, _metrics_only(result))

    quiet_tracker_logs()
    return HardmixMlflow(tracking_uri=default_mlflow_uri(cfg, ctx.sweep_dir),
                         experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name,
                         tags={"sweep": cfg.name}, save_artifact=False)


TRACKERS = {"wandb": wandb_callback, "mlflow": mlflow_callback}


def tracker_callbacks(cfg: SweepConfig, ctx: Any) -> list:
    """The Tune callbacks for the trackers named in ``run.output.loggers`` (may be empty)."""
    return [TRACKERS[name](cfg, ctx) for name in cfg.run.output.loggers if name in TRACKERS]
