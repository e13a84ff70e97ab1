"""TensorBoard logs of one run, written into the run folder itself.

:class:`TensorBoardCallback` writes, on rank 0:

* every epoch, each per-epoch metric of :data:`hardmix.metrics.EPOCH_METRICS` that has a
  ``group`` as a scalar ``<group>/<metric>`` (``error/test_top1_err``, ``hardmix/hard_share``,
  ...), skipping values that are NULL (not evaluated that epoch, or not applicable); with at
  most 20 classes also how often each class served as a source (``sources/<class name>``);
* at the first mixed batch, an image grid: originals (top row), their source images, the mixed
  result (bottom row);
* at the end, the HParams entry of the run: exactly the fields given as ``hparams`` (a sweep
  passes the seed and the fields that vary within it, so the view's columns are the sweep's
  factors), by default the run's acting augment fields, model, data and seed; fields that do
  not act for the run (another method's, optimiser's or model's) show as ``null``; the final
  validation and test errors (and the best validation error) are its metrics, absent for a
  run that ended without them; written with ``run_name="."`` so they land in the same run,
  not a sub-run.

Point TensorBoard at a folder of runs (``tensorboard --logdir runs``) or of sweep trials.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from hardmix.config import RunConfig, flatten, to_dict, to_yaml
from hardmix.config.acts import as_run
from hardmix.methods import active_fields
from hardmix.metrics import EPOCH_METRICS, Callback

#: Summary values shown in the HParams dashboard (as ``hparam/<key>`` scalars).
HPARAM_METRICS = ("final_val_top1_err", "final_top1_err", "final_top5_err", "best_val_top1_err")
MAX_CLASS_SCALARS = 20


def hparam_value(value: Any) -> Any:
    """A config value as TensorBoard's HParams accepts it (numbers, strings, booleans)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


def default_hparams(cfg: RunConfig) -> list[str]:
    """A single run's HParams: the augment fields that act, the model, the data, the seed."""
    acting = sorted(active_fields(to_dict(cfg.augment)))
    return ["seed", "data.name", "model.name"] + [f"augment.{f}" for f in acting]


def run_hparams(cfg: RunConfig, names: Sequence[str]) -> dict[str, Any]:
    """The HParams entry of a run: exactly the fields ``names`` (no status or other extras,
    so the view's columns are the sweep's factors), with fields that do not act for the run
    as ``"null"`` (as in the Parquet rows: a ``none`` run has no criterion, an SGD run no
    betas; :func:`hardmix.config.acts.as_run`)."""
    flat = as_run(flatten(cfg))
    return {k: hparam_value(flat[k]) for k in names if k in flat}


class TensorBoardCallback(Callback):
    """Scalars, HParams and a mixed-image grid into ``log_dir`` (default: the run folder), in
    its subfolder ``run_name`` when given (a sweep trial's readable name: TensorBoard names a
    run by its folder, so it lists ``c003-s0/hardmix-topk_loss-s0``).
    ``hparams``: the config fields of the HParams entry (None: :func:`default_hparams`)."""

    def __init__(self, log_dir: Optional[str | Path] = None,
                 hparams: Optional[Sequence[str]] = None, run_name: Optional[str] = None):
        self.log_dir = log_dir
        self.run_name = run_name
        self.hparams = list(hparams) if hparams is not None else None
        self.writer = None
        self.cfg: Optional[RunConfig] = None
        self.classes: list[str] = []

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        if info.get("rank", 0) != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.classes = [str(c) for c in info.get("classes") or []]
        log_dir = str(Path(self.log_dir or info["run_dir"], self.run_name or ""))
        # A resumed run drops the events it is about to write again, from the epoch it
        # resumed at (whose events a kill may have cut off: written again from the checkpoint).
        resumed = info.get("resumed_metrics")
        purge = info.get("start_epoch") or None
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge)
        if not info.get("start_epoch"):
            self.writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)
        elif resumed:
            self.on_epoch_end(resumed, None)

    def on_mixed_preview(self, images: dict) -> None:
        if self.writer is None:
            return
        import torch
        from torchvision.utils import make_grid

        n = len(images["images"])
        grid = make_grid(torch.cat([images["images"], images["sources"], images["mixed"]]),
                         nrow=n, padding=2, pad_value=1.0)
        self.writer.add_image("mixed_batch", grid, 0)
        lam = ", ".join(f"{v:.2f}" for v in images["lam"].tolist())
        labels = ", ".join(f"{a}<-{b}" for a, b in zip(images["labels"].tolist(),
                                                       images["source_labels"].tolist()))
        self.writer.add_text("mixed_batch", f"rows: originals, sources, mixed. lam (share of the "
                                            f"original): {lam}. labels (target<-source): {labels}", 0)

    def on_epoch_end(self, metrics: dict, checkpoint: Optional[str]) -> None:
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for name, metric in EPOCH_METRICS.items():
            value = metrics.get(name)
            if metric.group is None or not isinstance(value, (int, float)) or \
                    isinstance(value, bool) or math.isnan(value):
                continue
            self.writer.add_scalar(f"{metric.group}/{name}", value, step)
        counts = metrics.get("source_class_counts") or []
        if 0 < len(counts) <= MAX_CLASS_SCALARS and sum(counts):
            total = sum(counts)
            for i, c in enumerate(counts):
                label = self.classes[i] if i < len(self.classes) else f"class_{i}"
                self.writer.add_scalar(f"sources/{label}", c / total, step)
        self.writer.flush()

    def on_run_end(self, summary: dict) -> None:
        if self.writer is None:
            return
        names = self.hparams if self.hparams is not None else default_hparams(self.cfg)
        hparams = run_hparams(self.cfg, names)
        metrics = {f"hparam/{k}": float(summary[k]) for k in HPARAM_METRICS
                   if isinstance(summary.get(k), (int, float))}
        self.writer.add_hparams(hparams, metrics, run_name=".",
                                global_step=int(summary.get("epochs_run") or 0))
        self.writer.close()
        self.writer = None
