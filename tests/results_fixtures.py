"""Synthetic sweeps written through the real store, for the store / report / stats tests.

The numbers are made up (no training): each test knows them and recomputes what the report
should say independently.
"""

from __future__ import annotations

from typing import Any

import zlib

import numpy as np

from ablations.store import ResultStore
from hardmix.config import RunConfig, flatten

BASE_CFG = flatten(RunConfig())


def config(**changes: Any) -> dict:
    """Flattened config columns with dotted overrides given as ``augment__alpha=0.5``."""
    cfg = dict(BASE_CFG)
    for key, value in changes.items():
        dotted = key.replace("__", ".")
        assert dotted in cfg, dotted
        cfg[dotted] = value
    return cfg


def epoch_rows(n_epochs: int, final_top1: float, *, fallback_rate: float = 0.1,
               hard_share: float = 0.3, num_classes: int = 4, seed: int = 0) -> list[dict]:
    """Per-epoch metrics whose last test error equals ``final_top1``."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, n_epochs + 1):
        err = final_top1 + 5.0 * (n_epochs - e)
        rows.append(dict(epoch=e, train_loss=2.0 / e, val_loss=2.1 / e, val_top1_err=err + 1,
                         val_top5_err=err / 3, test_loss=2.2 / e, test_top1_err=err,
                         test_top5_err=err / 3, lr=0.1, images_per_s=1000.0,
                         epoch_seconds=1.5, hard_share=hard_share, fallback_rate=fallback_rate,
                         mixed_rate=1.0, distinct_sources=7.0,
                         source_class_counts=[int(c) for c in rng.integers(0, 50, num_classes)]))
    return rows


def write_run(store: ResultStore, trial_id: str, cfg: dict, *, top1: float | None,
              top5: float | None = None, status: str = "completed", n_epochs: int | None = None,
              fallback_rate: float = 0.1, hard_share: float = 0.3, error: str = "",
              extra: dict | None = None, running_row: bool = True) -> None:
    """A trial as a run writes it: a running row, its epochs, then the final row."""
    epochs_total = cfg["optim.epochs"]
    n_epochs = epochs_total if n_epochs is None else n_epochs
    base = {**cfg, "trial_id": trial_id, "attempt": 1, "device": "cpu",
            "versions": {"torch": "x"}, "git_commit": "abc", **(extra or {})}
    if running_row:
        store.write_trial({**base, "status": "running", "error": ""})
    rows = epoch_rows(n_epochs, top1 if top1 is not None else 50.0, fallback_rate=fallback_rate,
                      hard_share=hard_share, seed=zlib.crc32(trial_id.encode()))
    for r in rows:  # one file per epoch, as StoreCallback writes them
        store.write_epochs(trial_id, [r])
    if status == "running":
        return
    store.write_trial({**base, "status": status, "error": error, "final_top1_err": top1,
                       "final_top5_err": top5 if top5 is not None else (top1 or 0) / 3,
                       "final_val_top1_err": (top1 + 1) if top1 is not None else None,
                       "epochs_run": n_epochs, "wall_seconds": 3.0 * n_epochs})
