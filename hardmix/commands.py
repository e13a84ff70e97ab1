"""The ``hardmix train`` and ``hardmix eval`` commands: a run wired to the Parquet store,
TensorBoard, the trackers and the console. The command-line layer: the only place in
``hardmix/`` (with :mod:`hardmix.cli`) that reaches ``ablations``, lazily.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

from hardmix.config import RunConfig, deep_merge, from_dict, parse_overrides, validate
from hardmix.config.environment import check_run_environment
from hardmix.errors import ConfigError
from hardmix.metrics import Callback


def _fmt(value: Optional[float], suffix: str = "%") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}{suffix}"


class ConsoleCallback(Callback):
    """One line per epoch on rank 0 (through tqdm, so it does not break progress bars)."""

    def __init__(self, stream=None):
        self.stream, self.active, self.epochs = stream, True, 0

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        self.active = info.get("rank", 0) == 0
        self.epochs = cfg.optim.epochs
        if self.active:
            s = info["sizes"]
            self._write(f"hardmix train: {cfg.augment.method} {cfg.model.name} on {cfg.data.name} "
                        f"({s['train']} train / {s['val']} val / {s['test']} test, "
                        f"{info['num_classes']} classes) on {info['device']} "
                        f"({info['precision']}, {info['threads']} threads) -> {info['run_dir']}"
                        + (f" (resumed after epoch {info['start_epoch']})"
                           if info["start_epoch"] else ""))

    def on_epoch_end(self, metrics: dict, checkpoint: Optional[str]) -> None:
        if not self.active:
            return
        m = metrics
        val = "" if m["val_top1_err"] is None else f"val err {m['val_top1_err']:5.2f}%  "
        test = ("" if m["test_top1_err"] is None else
                f"test err {m['test_top1_err']:5.2f}% (top-5 {m['test_top5_err']:5.2f}%)  ")
        self._write(f"epoch {m['epoch']:>3}/{self.epochs}  loss {m['train_loss']:.4f}  {val}"
                    f"{test}lr {m['lr']:.4g}  {m['images_per_s']:,.0f} img/s  "
                    f"{m['epoch_seconds']:.1f} s")

    def _write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=self.stream or sys.stdout)


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.augment.method}-{cfg.model.name.replace(':', '_')}-s{cfg.seed}"


def run_folder(cfg: RunConfig, resume: bool) -> tuple[Path, str]:
    """``(run_dir, name)`` of a CLI run. A fresh run never reuses a folder: with the default
    name it gets a numbered suffix, with an explicit ``output.name`` it is an error."""
    from hardmix.checkpoint import checkpoint_path

    base = Path(os.path.expanduser(cfg.output.dir)) if "://" not in cfg.output.dir else Path("runs")
    name = cfg.output.name or default_run_name(cfg)
    run_dir = base / name
    if resume:
        if not checkpoint_path(run_dir).is_file():
            raise ConfigError("--resume", str(run_dir), "has no checkpoint to resume from "
                                                        "(checkpoints/last.pt)")
        return run_dir, name
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if cfg.output.name:
            raise ConfigError("output.name", name, f"run folder {run_dir} exists: pass --resume "
                                                   "to continue it or choose another name")
        i = 2
        while (base / f"{name}-{i}").exists():
            i += 1
        name = f"{name}-{i}"
    return base / name, name


def run_callbacks(cfg: RunConfig, store_dir: str, trial_id: str,
                  extra: Optional[dict] = None) -> list[Callback]:
    """The writers of a run: the Parquet store, TensorBoard (``output.tensorboard``) and the
    trackers of ``output.loggers`` (W&B, MLflow through their own APIs)."""
    from ablations.store import ResultStore, StoreCallback

    callbacks: list[Callback] = [StoreCallback(ResultStore(store_dir), trial_id=trial_id,
                                               cfg=cfg, extra=extra or {})]
    if cfg.output.tensorboard:
        from hardmix.tensorboard import TensorBoardCallback
        callbacks.append(TensorBoardCallback())
    if cfg.output.loggers:
        from hardmix.trackers import tracker_callbacks
        callbacks += tracker_callbacks(cfg, trial_id)
    return callbacks


def train_from_cli(cfg: RunConfig, resume: bool = False) -> int:
    """``hardmix train``: train with the store, TensorBoard, trackers and console. Returns 0 when the run completes, 1 when it fails (the failure is
    recorded in the store); a config the machine cannot serve raises ConfigError before
    anything is written (the CLI prints one line and exits 2)."""
    from hardmix.train import train

    # train() checks the environment and a resumed checkpoint once, before any callback (and
    # so the store) sees the run: a run that cannot start writes nothing.
    run_dir, name = run_folder(cfg, resume)
    results = (f"{cfg.output.dir.rstrip('/')}/{name}" if "://" in cfg.output.dir else str(run_dir))
    callbacks = run_callbacks(cfg, results, name) + [ConsoleCallback()]
    try:
        s = train(cfg, callbacks, run_dir, resume=resume)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded as failed by the store already
        print(f"hardmix: error: run failed: {type(exc).__name__}: {exc} (recorded in {run_dir})",
              file=sys.stderr)
        return 1
    print(f"{s['status']}: test error {_fmt(s['final_top1_err'])} (validation "
          f"{_fmt(s['final_val_top1_err'])}) after {s['epochs_run']} epochs, "
          f"{s['wall_seconds']:.0f} s -> {run_dir}")
    return 0 if s["status"] == "completed" else 1


def evaluate_checkpoint_cli(path: str, overrides: list[str]) -> int:
    """``hardmix eval CHECKPOINT``: test error of a saved model on its run's test set
    (``--set`` may change stored config fields, e.g. ``data.path``)."""
    from hardmix.checkpoint import load_checkpoint
    from hardmix.data import build_data
    from hardmix.models import build_model
    from hardmix.train import evaluate, precision_policy, resolve_device

    state = load_checkpoint(path)
    raw = deep_merge(state["config"], parse_overrides(overrides or [], RunConfig))
    cfg = from_dict(RunConfig, raw)
    validate(cfg)
    check_run_environment(cfg, outputs=False)
    device = resolve_device(cfg.device)
    d = state.get("data") or {}
    if not all(k in d for k in ("mean", "std", "num_classes", "in_channels", "image_size")):
        raise ConfigError("checkpoint", path, "is not a hardmix checkpoint (no data statistics)")
    data = build_data(cfg.data, cfg.seed, device, test_only=True,
                      stats=(tuple(d["mean"]), tuple(d["std"])))
    if data.num_classes != d["num_classes"] or data.in_channels != d["in_channels"]:
        raise ConfigError("data", cfg.data.name, f"does not match the checkpoint's data "
                                                 f"({d['num_classes']} classes, "
                                                 f"{d['in_channels']} channels)")
    model = build_model(cfg.model, d["num_classes"], d["in_channels"], d["image_size"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("checkpoint", path, f"does not fit model {cfg.model.name} "
                                              f"({first[:160]})") from None
    precision = precision_policy(cfg.optim, device)
    model.to(device, memory_format=precision.memory_format)
    loss, top1, top5 = evaluate(model, data.test, data.num_classes, precision)
    print(f"test_top1_err={top1:.2f} test_top5_err={top5:.2f} test_loss={loss:.4f} "
          f"images={data.sizes['test']} epoch={state.get('epoch')} checkpoint={path}")
    return 0
