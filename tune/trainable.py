"""One sweep trial on Ray: a Tune function trainable around :func:`hardmix.train.train`.

The training run knows nothing about Ray; this module adapts it:

* the trial's :class:`~hardmix.config.RunConfig` is the sweep's run with the trial's parameters
  and seed (:func:`tune.space.trial_config`), validated like any run;
* each epoch a callback ``ray.tune.report``\\ s the metrics and, when the run wrote a checkpoint,
  that checkpoint file as a Ray checkpoint: a lost node or a retried trial continues from it
  (``ray.tune.get_checkpoint()``), costing at most the epochs since;
* :class:`ablations.store.StoreCallback` writes the trial and epoch rows into the sweep's store
  while the trial runs; the trial row carries the seed and every config column, and the Tune
  trial id and attempt (as ``extra``);
* TensorBoard logs come from the run itself, one run folder per trial under
  ``<sweep>/runs/<trial>`` (Tune's own loggers are switched off, so there is no second copy);
  with a URI storage a trial's run folder is its Tune trial folder, which Ray syncs, except for
  a data-parallel trial, whose rank 0 may run on another node: it writes into a folder of its
  own node and copies it into ``<sweep>/runs/<trial>`` through the storage
  (:class:`tune.checkpoints.RunFolderSync`);
* ``resources.workers > 1`` fits a Ray Train ``TorchTrainer`` (gloo on CPU, nccl on GPU) whose
  workers each call ``train()``; ``TuneReportCallback`` carries rank 0's reports to Tune.

Each trial's final row (completed, pruned, failed after the last retry) is written again by
:class:`StoreStatusCallback` on the driver, because Ray may end a trial before its own callbacks
see the end (pruning), and a dead process writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ray.tune import Callback as TuneCallback

from ablations import storage
from ablations.store import MAIN_PREFIX
import hardmix.train
from hardmix.config import ResourcesConfig, RunConfig
from hardmix.metrics import Callback, reported
from tune.checkpoints import (RunFolderSync, next_attempt, pack_checkpoint, restore_checkpoint,
                              stored_checkpoint)
from tune.space import ConditionalSpace, seed_major, trial_config

#: Key the search adds to a trial's config: which of the configuration's seeds it runs
#: (``ray.tune.search.repeater.TRIAL_INDEX``).
TRIAL_INDEX = "__trial_index__"
#: Reported with every epoch: the trial's own ``optim.epochs`` (it may be a searched parameter).
EPOCHS_PLANNED = "epochs_planned"


class TrialFailed(RuntimeError):
    """The run ended with status ``failed`` (e.g. a NaN loss); raised so Tune retries it."""


@dataclass
class SweepContext:
    """What every trial of one sweep phase needs to know (picklable; shipped to Ray once).

    ``points`` are the phase's configurations when they are fixed in advance (grid mode and
    follow-up runs); ``None`` in search mode, where Optuna suggests them. ``point_seeds`` gives
    each point its own seeds (a grid's arms); by default every point runs every seed of
    ``seeds``. ``prefix`` starts the trial ids of the phase: ``c`` for the main phase, ``f``
    for follow-up runs.
    """

    sweep_dir: str
    run: RunConfig
    seeds: list[int]
    metric: str
    resources: ResourcesConfig
    prefix: str = MAIN_PREFIX
    points: Optional[list[dict]] = None
    point_seeds: Optional[list[list[int]]] = None
    ray_version: str = ""
    local_runs: bool = True  # run folders under <sweep>/runs (local or network disk)
    #: Epochs where the scheduler decides (ASHA's rungs): the run evaluates validation there too.
    eval_epochs: tuple[int, ...] = ()
    #: Config fields that vary within the sweep: TensorBoard's HParams view shows these.
    hparams: tuple[str, ...] = ()
    #: Search phases of a resumed sweep number their configurations from here on.
    index_offset: int = 0
    #: The sweep is being resumed: a trial without a Ray checkpoint continues from the newest
    #: checkpoint it left (its run folder, or its Ray checkpoints in the sweep's storage).
    resuming: bool = False

    # ---- trial identity ---------------------------------------------------------------------

    def cells(self, indices: Optional[list[int]] = None) -> list[dict[str, Any]]:
        """The fixed trials of the phase, ``{"point", "seed", "index"}``, seed-major;
        ``indices`` numbers the points (default 0, 1, ...)."""
        points = self.points or []
        seeds = self.point_seeds or [self.seeds] * len(points)
        index = {id(p): i for i, p in zip(indices or range(len(points)), points)}
        return [{"point": p, "seed": s, "index": index[id(p)]}
                for p, s in seed_major(points, seeds)]

    def params_and_seed(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """The run-config overrides and the seed of a trial, from its Tune config."""
        if "cell" in config:
            return dict(config["cell"]["point"]), int(config["cell"]["seed"])
        if "point" in config:  # a grid started before arms existed, being resumed
            return dict(config["point"]), int(config["seed"])
        params = {k: v for k, v in config.items() if k != TRIAL_INDEX}
        return ConditionalSpace.params(params), int(self.seeds[int(config.get(TRIAL_INDEX, 0))])

    def config_index(self, trial: Any) -> int:
        """Which configuration of the phase a Tune trial runs (0-based)."""
        config = trial.config
        if "cell" in config and "index" in config["cell"]:
            return int(config["cell"]["index"])
        if self.points is not None and ("cell" in config or "point" in config):
            point = config["cell"]["point"] if "cell" in config else config["point"]
            return self.points.index(point)
        # The searcher numbers its trials 1, 2, ... in the experiment tag; Repeater hands out
        # len(seeds) consecutive trials per configuration.
        number = int(str(trial.experiment_tag).split("_", 1)[0])
        return self.index_offset + (number - 1) // max(1, len(self.seeds))

    def trial_id(self, trial: Any) -> str:
        """The sweep's id of a Tune trial: ``c007-s1`` = configuration 7, seed 1. No timestamp,
        so ``--resume`` and the store find the same trial again."""
        _, seed = self.params_and_seed(trial.config)
        return f"{self.prefix}{self.config_index(trial):03d}-s{seed}"

    def run_config(self, config: Mapping[str, Any], trial_id: str) -> RunConfig:
        params, seed = self.params_and_seed(config)
        cfg = trial_config(self.run, params, seed)
        cfg.output.name = trial_id
        cfg.output.dir = self.runs_root() or cfg.output.dir
        cfg.output.progress = False  # trial output is not shown; the sweep prints progress
        return cfg

    def hparam_fields(self) -> list[str]:
        """The fields TensorBoard's HParams view lists: those that vary within the sweep."""
        return ["seed", *self.hparams]

    def trial_name(self, cfg: RunConfig) -> str:
        """A trial's readable name from what varies within the sweep (``hardmix-topk_loss-s3``;
        :func:`hardmix.config.acts.readable_name`), shown beside its id."""
        from hardmix.config import flatten
        from hardmix.config.acts import readable_name

        return readable_name(flatten(cfg), self.hparams)

    def trial_label(self, trial: Any) -> str:
        """``c003-s0 hardmix-topk_loss-s0``: a Tune trial's id and readable name (the id alone
        when its config cannot be built)."""
        trial_id = self.trial_id(trial)
        try:
            return f"{trial_id} {self.trial_name(self.run_config(trial.config, trial_id))}"
        except Exception:  # noqa: BLE001 - a label never fails a sweep
            return trial_id

    def runs_root(self) -> str | None:
        return f"{self.sweep_dir}/runs" if self.local_runs else None


class TrialNamer:
    """``trial_name_creator`` / ``trial_dirname_creator`` for Tune (picklable)."""

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx

    def __call__(self, trial: Any) -> str:
        return self.ctx.trial_id(trial)


def tune_metrics(metrics: Mapping[str, Any], best: dict[str, float], attempt: int,
                 epochs: int) -> dict:
    """The scalar metrics sent to Tune, with the run's best errors so far (kept in ``best``),
    the attempt and the run's planned epochs (a trial that stops before them was pruned)."""
    out = reported(metrics)
    for key, src in (("best_val_top1_err", "val_top1_err"),):
        value = out.get(src)
        if isinstance(value, (int, float)) and not math.isnan(value):
            best[key] = min(best.get(key, math.inf), float(value))
        if key in best:
            out[key] = best[key]
    out["attempt"] = attempt
    out[EPOCHS_PLANNED] = epochs
    return out


# --------------------------------------------------------------------------------------------
# Callbacks (inside the trial)
# --------------------------------------------------------------------------------------------


class Writers(Callback):
    """The run's writing callbacks (store, TensorBoard) behind one switch.

    When Ray stops a trial (ASHA pruning, or the sweep being interrupted) the training thread
    gets ``SystemExit`` inside ``report`` and ``train()`` ends with status ``failed``. That is not
    what happened, so the writers are silenced first: the driver records a pruned trial
    (:class:`StoreStatusCallback`), and an interrupted one stays ``running`` until it resumes.
    """

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)
        self.silenced = False

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        for cb in self.callbacks:
            cb.on_run_start(cfg, info)

    def on_mixed_preview(self, images: dict) -> None:
        if not self.silenced:
            for cb in self.callbacks:
                cb.on_mixed_preview(images)

    def on_epoch_end(self, metrics: dict, checkpoint: str | None = None) -> None:
        if not self.silenced:
            for cb in self.callbacks:
                cb.on_epoch_end(metrics, checkpoint)

    def on_run_end(self, summary: dict) -> None:
        if not self.silenced:
            for cb in self.callbacks:
                cb.on_run_end(summary)


class RayReporter(Callback):
    """Reports every epoch to Ray, with the epoch's checkpoint (when the run wrote one) as a Ray
    checkpoint. ``train=False``: ``ray.tune.report`` from a Tune trial; ``train=True``:
    ``ray.train.report`` from a Ray Train worker, where every rank reports each epoch (it is a
    barrier) and rank 0 attaches the checkpoint."""

    def __init__(self, run_dir: Path, attempt: int, writers: Writers, train: bool = False):
        self.run_dir, self.attempt, self.writers, self.train = run_dir, attempt, writers, train
        self.best: dict[str, float] = {}
        self.rank = 0
        self.epochs = 0
        self.facts: dict[str, str] = {}

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        self.rank = int(info.get("rank", 0) or 0)
        self.epochs = cfg.optim.epochs
        # Strings travel with the results, so the driver can write a complete row for a trial
        # whose process died.
        self.facts = {"device": str(info.get("device", "")),
                      "git_commit": str(info.get("git_commit", "")),
                      "data_sha256": str(info.get("data_sha256") or ""),
                      "versions_json": json.dumps(info.get("versions") or {}, sort_keys=True),
                      "classes_json": json.dumps(info.get("classes") or []),
                      "precision": str(info.get("precision", "")),
                      "threads": int(info.get("threads") or 0),
                      "hostname": str(info.get("hostname", "")), "node_id": _node_id() or ""}

    def on_epoch_end(self, metrics: dict, checkpoint: str | None = None) -> None:
        import ray.train
        import ray.tune

        report = ray.train.report if self.train else ray.tune.report
        Checkpoint = ray.train.Checkpoint if self.train else ray.tune.Checkpoint
        out = {**tune_metrics(metrics, self.best, self.attempt, self.epochs), **self.facts}
        try:
            if self.rank != 0 or not checkpoint or not os.path.isfile(checkpoint):
                report(out)
                return
            with tempfile.TemporaryDirectory(prefix="hardmix-ckpt-") as folder:
                pack_checkpoint(checkpoint, self.run_dir, Path(folder), self.attempt,
                                 int(metrics.get("epoch", 0)))
                # report() copies the folder into the sweep's storage before it returns.
                report(out, checkpoint=Checkpoint.from_directory(folder))
        except SystemExit:
            self.writers.silenced = True
            raise


def trial_callbacks(cfg: RunConfig, store_cb: Callback, run_dir: Path, attempt: int,
                    train: bool = False, hparams: Optional[list[str]] = None,
                    sync: Optional[Callback] = None, name: Optional[str] = None
                    ) -> list[Callback]:
    """Store, TensorBoard (the run's own logs, in its run folder: in its subfolder ``name``, the
    trial's readable name, so TensorBoard lists the run as ``<trial id>/<name>``), the run
    folder's copy into the storage (``sync``, where the run folder is a node-local one), then
    the Ray reporter: an epoch's rows and files are written before Ray hears of it (and
    possibly stops the trial)."""
    writers = [store_cb]
    if cfg.output.tensorboard:
        from hardmix.tensorboard import TensorBoardCallback
        writers.append(TensorBoardCallback(hparams=hparams, run_name=name))
    guard = Writers(writers)
    return [guard, *([sync] if sync is not None else []),
            RayReporter(run_dir, attempt, guard, train=train)]


# --------------------------------------------------------------------------------------------
# The trainable
# --------------------------------------------------------------------------------------------


def _set_threads(cpus: float) -> None:
    import torch
    torch.set_num_threads(max(1, int(cpus)))


def _run(ctx: SweepContext, cfg: RunConfig, callbacks: list, run_dir: Path,
         resume: bool, device: Any = None) -> dict:
    """``train()``; it records a failure through the callbacks and re-raises it, so Tune
    retries the trial. ``device``: the one Ray Train assigned a worker (its own lookup)."""
    summary = hardmix.train.train(cfg, callbacks=callbacks, run_dir=run_dir, resume=resume,
                                  eval_epochs=ctx.eval_epochs, device=device)
    if summary.get("status") == "failed":  # train() raises on failure; be strict anyway
        raise TrialFailed(summary.get("error") or "the run failed")
    return summary


def run_trial(config: dict, ctx: SweepContext) -> None:
    """Tune function trainable: one training run of the sweep (see the module docstring)."""
    import ray.tune
    from ablations.store import ResultStore, StoreCallback

    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_name()
    cfg = ctx.run_config(config, trial_id)
    root = ctx.runs_root()
    run_dir = Path(root, trial_id) if root else Path(_synced_trial_folder(), "run")
    _set_threads(ctx.resources.cpus)

    if ctx.resources.workers > 1:
        attempt = next_attempt(run_dir, None)
        _fit_data_parallel(ctx, cfg, trial_id, run_dir, attempt, tctx.get_trial_id())
        return

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None and ctx.resuming:
        resume = _resume_from_storage(ctx, trial_id, run_dir)
        attempt = next_attempt(run_dir, None)
    else:
        with (checkpoint.as_directory() if checkpoint else _no_dir()) as ckpt_dir:
            attempt = next_attempt(run_dir, ckpt_dir)
            resume = restore_checkpoint(ckpt_dir, run_dir)
    store_cb = StoreCallback(ResultStore(ctx.sweep_dir), trial_id, cfg,
                             extra=_extra(ctx, attempt, tctx.get_trial_id(), cfg=cfg))
    _run(ctx, cfg, trial_callbacks(cfg, store_cb, run_dir, attempt, hparams=ctx.hparam_fields(),
                                   name=ctx.trial_name(cfg)), run_dir, resume)


def _resume_from_storage(ctx: SweepContext, trial_id: str, run_dir: Path) -> bool:
    """A resumed sweep's trial that Ray gives no checkpoint: continue from the newest one it
    left -- its own run folder's (local runs), else its Ray checkpoints in the sweep's
    storage. True when there is one to continue from."""
    from hardmix.checkpoint import checkpoint_path

    if ctx.local_runs:
        if checkpoint_path(run_dir).is_file():
            return True
        return restore_checkpoint(None, run_dir)  # a fresh start in a clean folder
    folder = stored_checkpoint(ctx.sweep_dir, trial_id)
    try:
        return restore_checkpoint(folder, run_dir) if folder else False
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _synced_trial_folder() -> str:
    """The trial's local folder that Ray syncs to ``<storage>/<sweep>/tune/<trial>`` (used when
    the storage is a URI: the run's TensorBoard logs travel to the bucket that way)."""
    try:
        from ray.train._internal.session import get_session
        return get_session().storage.trial_working_directory
    except (ImportError, AttributeError):  # private in Ray 2.60: fall back to Tune's chdir
        return os.getcwd()


class _no_dir:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - provenance only
        return None


def _extra(ctx: SweepContext, attempt: int, tune_trial_id: str, here: bool = True,
           cfg: Optional[RunConfig] = None) -> dict:
    """Sweep-level columns of a trial row: attempt, Tune's trial id, Ray's version, the
    trial's readable name (from its ``cfg``), and (in a trial process, ``here``) the node the
    attempt runs on; the driver's rows carry the node and host of the trial's last report
    instead."""
    extra = {"attempt": attempt, "tune_trial_id": tune_trial_id,
             "versions": {"ray": ctx.ray_version}}
    if cfg is not None:
        extra["trial_name"] = ctx.trial_name(cfg)
    if here:
        extra["node_id"] = _node_id()
    return extra


# --------------------------------------------------------------------------------------------
# Data-parallel trials: Ray Train inside the Tune trial
# --------------------------------------------------------------------------------------------


def _fit_data_parallel(ctx: SweepContext, cfg: RunConfig, trial_id: str, run_dir: Path,
                       attempt: int, tune_trial_id: str) -> None:
    """Fit a ``TorchTrainer`` with ``resources.workers`` workers for this trial.

    Ray Train keeps its own checkpoints under ``<sweep>/train/<trial>``; fitting again under
    the same name (a retried or resumed trial) continues from the latest one.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = ctx.resources
    # Custom resources (resources.custom) steer each worker to nodes that have them.
    per_worker = {**{k: v for k, v in res.custom.items() if v > 0}, "CPU": res.cpus}
    if res.gpus:
        per_worker["GPU"] = res.gpus
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"ctx": ctx, "cfg": cfg, "trial_id": trial_id,
                           "run_dir": str(run_dir), "attempt": attempt,
                           "tune_trial_id": tune_trial_id},
        torch_config=TorchConfig(backend="nccl" if res.gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=f"{ctx.sweep_dir}/train",
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # Retries are Tune's business (FailureConfig of the sweep): one policy, one count.
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: ``train()`` on its shard; DDP set up by ``train()`` itself."""
    import ray.train
    import ray.train.torch
    from ablations.store import ResultStore, StoreCallback

    ctx: SweepContext = config["ctx"]
    cfg: RunConfig = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(config["run_dir"])
    sync = None
    if not ctx.local_runs:
        # The run folder the Tune trial names lives on the trial driver's node, not
        # necessarily this one: write into a folder of this node, and (rank 0) copy it into
        # <sweep>/runs/<trial> through the storage as the run goes.
        sweep = ctx.sweep_dir.rstrip("/").rsplit("/", 1)[-1]
        run_dir = Path(tempfile.mkdtemp(prefix=f"hardmix-{sweep}-{config['trial_id']}-"
                                               f"rank{rank}-"))
        if rank == 0:
            sync = RunFolderSync(run_dir, storage.join(ctx.sweep_dir, "runs", config["trial_id"]))
    _set_threads(ctx.resources.cpus)
    try:
        checkpoint = ray.train.get_checkpoint()
        with (checkpoint.as_directory() if checkpoint else _no_dir()) as ckpt_dir:
            if ckpt_dir is not None:
                resume = restore_checkpoint(ckpt_dir, run_dir)  # every rank loads the same state
            else:
                resume = False
                if rank == 0:
                    restore_checkpoint(None, run_dir)
                    if sync is not None:
                        sync.clear_remote()
        store_cb = StoreCallback(ResultStore(ctx.sweep_dir), config["trial_id"], cfg,
                                 extra=_extra(ctx, config["attempt"], config["tune_trial_id"],
                                              cfg=cfg))
        _run(ctx, cfg, trial_callbacks(cfg, store_cb, run_dir, config["attempt"], train=True,
                                       hparams=ctx.hparam_fields(), sync=sync,
                                       name=ctx.trial_name(cfg)), run_dir, resume,
             device=ray.train.torch.get_device())  # the GPU Ray assigned, not LOCAL_RANK's
    finally:
        if sync is not None:
            sync.sync()  # whatever the last epoch or a failure left
        if not ctx.local_runs:
            shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The driver side: outcomes the trial cannot record itself
# --------------------------------------------------------------------------------------------


def summary_from_result(result: Mapping[str, Any], status: str, error: str = "") -> dict:
    """A run summary (:data:`hardmix.metrics.SUMMARY_FIELDS`) rebuilt from a trial's last Tune
    result (its metrics and the facts :class:`RayReporter` sends along)."""
    def get(key: str) -> float | None:
        value = result.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None

    try:
        classes = json.loads(result.get("classes_json") or "null")
    except ValueError:
        classes = None
    return {"status": status, "error": error, "epochs_run": int(result.get("epoch", 0) or 0),
            "wall_seconds": get("time_total_s"), "device": result.get("device") or None,
            "threads": int(result["threads"]) if result.get("threads") else None,
            "precision": result.get("precision") or None,
            "final_top1_err": get("test_top1_err"), "final_top5_err": get("test_top5_err"),
            "final_val_top1_err": get("val_top1_err"),
            "best_val_top1_err": get("best_val_top1_err"), "classes": classes}


class StoreStatusCallback(TuneCallback):
    """Driver-side Tune callback writing each trial's final row.

    The trial writes its own rows while it runs, but Ray ends a trial's thread when Tune stops
    it (ASHA pruning, or ASHA's stop at ``max_t`` on the last epoch), so its own callbacks may
    never see the end; and a process or node that dies writes nothing. The driver therefore
    writes the final status of every trial: ``completed`` (every epoch ran) or ``pruned`` when
    Tune completes it, ``failed`` (with the error's last line) after its last allowed attempt.
    Rows are built from the trial's last report, which carries the run's device, versions and
    commit; being written last, they are the ones readers keep.
    """

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx

    def _write(self, trial: Any, status: str, error: str = "") -> None:
        from ablations.store import ResultStore, StoreCallback

        result = dict(trial.last_result or {})
        attempt = (int(getattr(trial, "num_failures", 0) or 0) if status == "failed"
                   else int(result.get("attempt", 1) or 1))
        extra = _extra(self.ctx, max(1, attempt), trial.trial_id, here=False)
        extra.update(node_id=result.get("node_id") or None, hostname=result.get("hostname") or None)
        try:
            versions = json.loads(result.get("versions_json") or "{}")
        except ValueError:
            versions = {}
        extra["versions"] = {**versions, **extra["versions"]}
        extra["git_commit"] = result.get("git_commit") or None
        extra["data_sha256"] = result.get("data_sha256") or None
        try:
            cfg = self.ctx.run_config(trial.config, str(trial))
        except Exception as exc:  # the trial's config itself is what failed
            cfg, error = None, error or f"{type(exc).__name__}: {exc}"
        if cfg is not None:
            extra["trial_name"] = self.ctx.trial_name(cfg)
        cb = StoreCallback(ResultStore(self.ctx.sweep_dir), str(trial), cfg, extra=extra)
        cb.on_run_end(summary_from_result(result, status, error))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from tune.progress import ran_every_epoch

        # Tune can stop a trial only after a report: one that completes without reporting this
        # attempt (resumed from its last epoch's checkpoint, nothing left to run) ended its loop
        # itself and wrote its own final row, which must stand.
        if "epoch" not in (trial.last_result or {}):
            return
        # (Tune marks the trial terminated only after its callbacks ran: look at the result.)
        done = ran_every_epoch(trial.last_result, self.ctx.run.optim.epochs)
        self._write(trial, "completed" if done else "pruned")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from tune.progress import last_error_line

        self._write(trial, "failed", last_error_line(_error_text(trial)))


def _error_text(trial: Any) -> str | None:
    """The trial's error trace. Tune writes it to the trial's local folder before it calls the
    callbacks and syncs it to the storage later, so with a URI storage only the local copy is
    there yet: read that first."""
    local = getattr(trial, "error_file", None)
    if local and os.path.isfile(local):
        with open(local, encoding="utf-8", errors="replace") as f:
            return f.read()
    return trial.get_error()
