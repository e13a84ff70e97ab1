"""TensorBoard logs of one run, written into the run folder itself.

:class:`TensorBoardCallback` writes, on rank 0:

* every epoch, the per-epoch metrics as scalars, grouped as ``error/``, ``loss/``, ``hardmix/``
  (hard share, fallback rate, mixed rate, distinct sources), ``speed/`` and ``lr/``, each tag
  ending in its metric name (``error/test_top1_err``); with at most 20 classes also how often each
  class served as a source (``sources/class_<i>``);
* at the first mixed batch, an image grid: originals (top row), their source images, the mixed
  result (bottom row);
* at the end, the run's hyperparameters (every config field) with its summary metrics in the
  HParams dashboard, written with ``run_name="."`` so they land in the same run, not a sub-run.

Point TensorBoard at a folder of runs (``tensorboard --logdir runs``) or of sweep trials.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from hardmix.config import RunConfig, flatten, to_yaml
from hardmix.train import Callback

#: Scalar group of each per-epoch metric (the tag is ``group/metric``).
GROUPS = {
    "train_loss": "loss", "val_loss": "loss", "test_loss": "loss",
    "val_top1_err": "error", "val_top5_err": "error", "test_top1_err": "error",
    "test_top5_err": "error", "lr": "lr", "images_per_s": "speed", "epoch_seconds": "speed",
    "hard_share": "hardmix", "fallback_rate": "hardmix", "mixed_rate": "hardmix",
    "distinct_sources": "hardmix",
}
#: Summary values shown in the HParams dashboard (as ``hparam/<key>`` scalars).
HPARAM_METRICS = ("final_top1_err", "best_top1_err", "final_top5_err", "best_top5_err",
                  "final_val_top1_err", "best_val_top1_err", "epochs_run", "wall_seconds")
MAX_CLASS_SCALARS = 20


def hparam_value(value: Any) -> Any:
    """A config value as TensorBoard's HParams accepts it (numbers, strings, booleans)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


class TensorBoardCallback(Callback):
    """Scalars, HParams and a mixed-image grid into ``log_dir`` (default: the run folder)."""

    def __init__(self, log_dir: Optional[str | Path] = None):
        self.log_dir = log_dir
        self.writer = None
        self.cfg: Optional[RunConfig] = None

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        if info.get("rank", 0) != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        log_dir = str(self.log_dir or info["run_dir"])
        # A resumed run drops the events it is about to write again.
        purge = info.get("start_epoch", 0) + 1 if info.get("start_epoch") else None
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge)
        if not info.get("start_epoch"):
            self.writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)

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
        for key, group in GROUPS.items():
            value = metrics.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{group}/{key}", value, step)
        counts = metrics.get("source_class_counts") or []
        if 0 < len(counts) <= MAX_CLASS_SCALARS and sum(counts):
            total = sum(counts)
            for i, c in enumerate(counts):
                self.writer.add_scalar(f"sources/class_{i}", c / total, step)
        self.writer.flush()

    def on_run_end(self, summary: dict) -> None:
        if self.writer is None:
            return
        hparams = {k: hparam_value(v) for k, v in flatten(self.cfg).items()}
        hparams["status"] = summary.get("status", "")
        metrics = {f"hparam/{k}": float(summary[k]) for k in HPARAM_METRICS
                   if isinstance(summary.get(k), (int, float))}
        self.writer.add_hparams(hparams, metrics, run_name=".",
                                global_step=int(summary.get("epochs_run") or 0))
        self.writer.close()
        self.writer = None
