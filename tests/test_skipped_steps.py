"""A diagnostic that does not apply to a step is left out of its epoch mean, not averaged in as 0
(#23 item 7): a step skipped by ``fallback=skip`` pastes nothing, so it has no distinct sources.

The trainer's per-step statistics are recorded here (around the real training step) and the
epoch's ``distinct_sources`` recomputed from them.
"""

from __future__ import annotations

import numpy as np
import pytest

import hardmix.train as train_mod
from test_train import Recorder, tiny


def _run(tmp_path, monkeypatch, min_hard: int) -> tuple[dict, list[dict]]:
    """One epoch of HardMix (misclassified, fallback skip, every step mixed) on the synthetic
    set: the epoch's metrics and each mixed step's statistics."""
    steps: list[dict] = []
    real = train_mod.training_step

    def recording(*args, **kwargs):
        loss, out = real(*args, **kwargs)
        if out.mixed:
            steps.append({k: float(v) for k, v in out.stats.items()})
        return loss, out

    monkeypatch.setattr(train_mod, "training_step", recording)
    rec = Recorder()
    cfg = tiny(tmp_path, "augment.method=hardmix", "augment.criterion=misclassified",
               "augment.fallback=skip", f"augment.min_hard={min_hard}", "augment.prob=1.0")
    train_mod.train(cfg, [rec], run_dir=tmp_path / "run")
    return rec.metrics[-1], steps


def test_skipped_steps_are_left_out_of_the_distinct_sources_mean(tmp_path, monkeypatch):
    # The synthetic set's batches of 64 have 56-62 misclassified samples at the start: a floor
    # of 58 skips some steps and mixes the others.
    metrics, steps = _run(tmp_path, monkeypatch, min_hard=58)
    skipped = [s for s in steps if s["fallback"] == 1]
    pasted = [s for s in steps if s["fallback"] == 0]
    assert skipped and pasted, [s["n_hard"] for s in steps]  # the premise: both kinds of step
    assert all(s["distinct_sources"] == 0 for s in skipped)
    assert metrics["fallback_rate"] == pytest.approx(len(skipped) / len(steps))
    expected = np.mean([s["distinct_sources"] for s in pasted])
    assert metrics["distinct_sources"] == pytest.approx(expected)
    # not the mean with the skipped steps counted as 0
    assert metrics["distinct_sources"] > np.mean([s["distinct_sources"] for s in steps]) + 1


def test_an_epoch_of_skipped_steps_has_no_distinct_sources_not_zero(tmp_path, monkeypatch):
    metrics, steps = _run(tmp_path, monkeypatch, min_hard=64)
    assert steps and all(s["fallback"] == 1 for s in steps)
    assert metrics["fallback_rate"] == 1.0 and metrics["distinct_sources"] is None
