"""Experiment trackers for sweeps: Ray Tune's own W&B and MLflow integrations.

When ``run.output.loggers`` names ``wandb`` and/or ``mlflow``, :func:`tracker_callbacks` gives
the sweep's Tuner Ray's ``WandbLoggerCallback`` / ``MLflowLoggerCallback``. They run on the
driver and log what every trial reports to Tune (each epoch's metrics, at step = epoch), one
tracker run per trial, named by its sweep trial id (``c003-s1``) and grouped by the sweep.

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
sweep's ``wandb/`` folder for a local sweep); MLflow reads ``MLFLOW_TRACKING_URI`` (MLflow's
default is ``sqlite:///mlflow.db`` in the working directory) and ``MLFLOW_EXPERIMENT_NAME``
(default: the sweep's name). W&B's logging processes are Ray actors that do not inherit the
driver's later environment changes, so mode and folder are handed to them explicitly.
"""

from __future__ import annotations

import os
from typing import Any

from hardmix.config import SweepConfig, flatten

DEFAULT_PROJECT = "hardmix"
#: Report keys that are facts for the store (strings, JSON) or bookkeeping, not metrics.
NOT_METRICS = ("config", "device", "git_commit", "versions_json", "classes_json", "precision",
               "hostname", "node_id", "trial_id", "date", "pid", "node_ip", "experiment_tag",
               "checkpoint_dir_name", "should_checkpoint", "done")


def trial_params(ctx: Any, trial: Any) -> dict[str, Any]:
    """A trial's complete run config, flattened, as its Parquet row holds it (inert augment
    fields None). Plain values only: lists and mappings as text."""
    from ablations.store import as_run

    cfg = ctx.run_config(trial.config, str(trial))
    flat = as_run(dict(flatten(cfg)))
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flat.items()}


def _metrics_only(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in NOT_METRICS}


def wandb_callback(cfg: SweepConfig, ctx: Any):
    """Ray Tune's ``WandbLoggerCallback`` logging each trial's run config."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class HardmixWandb(WandbLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            # Read by the parent's log_trial_start when it builds wandb.init's arguments.
            self.kwargs["config"] = trial_params(ctx, trial)
            super().log_trial_start(trial)

    kwargs: dict[str, Any] = {}
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]
    folder = os.environ.get("WANDB_DIR") or (None if "://" in ctx.sweep_dir
                                              else os.path.join(ctx.sweep_dir, "wandb"))
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
            super().log_trial_start(trial)
            if first:  # a retried trial continues its run; its params are there already
                params = {k: "" if v is None else str(v)[:500]
                          for k, v in trial_params(ctx, trial).items()}
                self.mlflow_util.log_params(run_id=self._trial_runs[trial],
                                            params_to_log=params)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            super().log_trial_result(iteration, trial, _metrics_only(result))

    return HardmixMlflow(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
                         experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name,
                         tags={"sweep": cfg.name}, save_artifact=False)


TRACKERS = {"wandb": wandb_callback, "mlflow": mlflow_callback}


def tracker_callbacks(cfg: SweepConfig, ctx: Any) -> list:
    """The Tune callbacks for the trackers named in ``run.output.loggers`` (may be empty)."""
    return [TRACKERS[name](cfg, ctx) for name in cfg.run.output.loggers if name in TRACKERS]
