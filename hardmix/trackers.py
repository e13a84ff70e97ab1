"""Experiment trackers for ``hardmix train``: Weights & Biases and MLflow through their own APIs.

``output.loggers: [wandb, mlflow]`` adds one callback per tracker (optional extras ``[wandb]``,
``[mlflow]``). Each logs the run's config once, every per-epoch scalar of
:data:`hardmix.metrics.EPOCH_METRICS` (NULLs skipped) at step = epoch, and the summary at the
end. They use the libraries' own configuration: ``WANDB_PROJECT`` (default ``hardmix``),
``WANDB_MODE=offline`` (no account needed), ``WANDB_DIR`` (default: the run folder);
``MLFLOW_TRACKING_URI`` (default here: ``sqlite:///<run folder>/mlflow.db``, never the working
directory) and ``MLFLOW_EXPERIMENT_NAME``. The libraries' banners (W&B's ``wandb: ...`` lines,
the MLflow store's set-up logs) stay off the console unless ``--verbose``
(``HARDMIX_VERBOSE=1``, :func:`verbose`).

Sweeps log through Ray Tune's ``WandbLoggerCallback`` and ``MLflowLoggerCallback`` on the
driver instead (:mod:`tune.trackers`); sweep trials never add these callbacks
(:func:`tune.trainable.trial_callbacks`), so a trial is logged once, not twice.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from hardmix.config import RunConfig, flatten
from hardmix.config.acts import as_run
from hardmix.metrics import Callback, reported

DEFAULT_PROJECT = "hardmix"
#: Set (to 1) by ``hardmix --verbose``: trackers and Ray may talk on the console.
VERBOSE_ENV = "HARDMIX_VERBOSE"


def verbose() -> bool:
    """Whether the console may show the trackers' own banners (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_tracker_logs() -> None:
    """Unless :func:`verbose`: the loggers that announce a tracker's store (MLflow's sqlite
    migrations through alembic, MLflow's own notes) only pass warnings and errors."""
    if not verbose():
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)


def wandb_settings() -> dict:
    """``wandb.init(settings=...)``: silent (no ``wandb:`` banner lines) unless verbose."""
    return {} if verbose() else {"silent": True}


def mlflow_uri(folder: str | Path) -> str:
    """MLflow's tracking URI: ``MLFLOW_TRACKING_URI``, else a sqlite store in ``folder`` (the
    run's or the sweep's; never the working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(os.path.expanduser(str(folder))).resolve() / 'mlflow.db'}"


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in reported(metrics).items()
            if k != "epoch" and not math.isnan(float(v))}


def _summary_scalars(summary: dict) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _params(cfg: RunConfig) -> dict[str, Any]:
    """The run config, flattened, as it runs: fields that do not act None (as in the Parquet
    rows: :func:`hardmix.config.acts.as_run`), ``box: auto`` resolved; lists and mappings as
    text."""
    flat = as_run(flatten(cfg))
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in flat.items()}


class WandbCallback(Callback):
    """A W&B run per training run (rank 0), named after the run."""

    def __init__(self, name: str):
        self.name, self.run = name, None

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        if info.get("rank", 0) != 0:
            return
        import wandb

        # WANDB_PROJECT / WANDB_DIR win (wandb.init's arguments would override them).
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                              name=self.name, config=_params(cfg), reinit="finish_previous",
                              dir=os.environ.get("WANDB_DIR") or info.get("run_dir"),
                              settings=wandb_settings())

    def on_epoch_end(self, metrics: dict, checkpoint: Optional[str]) -> None:
        if self.run is not None:
            self.run.log(_scalars(metrics), step=int(metrics["epoch"]))

    def on_run_end(self, summary: dict) -> None:
        if self.run is None:
            return
        self.run.summary.update({**_summary_scalars(summary), "status": summary.get("status")})
        self.run.finish(exit_code=0 if summary.get("status") != "failed" else 1)
        self.run = None


class MlflowCallback(Callback):
    """An MLflow run per training run (rank 0): params, per-epoch metrics, summary metrics."""

    def __init__(self, name: str):
        self.name, self.active = name, False

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        if info.get("rank", 0) != 0:
            return
        import mlflow

        quiet_tracker_logs()
        mlflow.set_tracking_uri(mlflow_uri(info.get("run_dir") or "."))
        mlflow.start_run(run_name=self.name)
        self.active = True
        params = {k: ("" if v is None else v) for k, v in _params(cfg).items()}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def on_epoch_end(self, metrics: dict, checkpoint: Optional[str]) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics(_scalars(metrics), step=int(metrics["epoch"]))

    def on_run_end(self, summary: dict) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.log_metrics({f"summary_{k}": v for k, v in _summary_scalars(summary).items()})
        mlflow.set_tag("status", summary.get("status"))
        mlflow.end_run(status="FAILED" if summary.get("status") == "failed" else "FINISHED")
        self.active = False


TRACKERS = {"wandb": WandbCallback, "mlflow": MlflowCallback}


def tracker_callbacks(cfg: RunConfig, name: str) -> list[Callback]:
    """One callback per tracker named in ``output.loggers``."""
    return [TRACKERS[logger](name) for logger in cfg.output.loggers]
