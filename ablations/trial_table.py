"""The one per-trial table a report is a function of.

:func:`split_trials` separates the trials a report uses (completed, with a final test error)
from those it leaves out (with the reason) and from a followed-up search's exploration;
:func:`trial_table` gives each used trial its epoch summaries (the diagnostics' means over
epochs, the last epoch's outcomes and per-class errors, the mixing sources per class) and its
variant. Every table, verdict and figure of the report is computed from that frame (the figures
over epochs also from the epochs of the same trials); ``trials.csv`` is its projection onto the
columns a reader needs to recompute them (:func:`per_trial_table`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.factors import factor_frame, hashable, variant_labels, varying_factors
from ablations.store import FOLLOWUP_PREFIX, MAIN_PREFIX, parse_trial_id
from hardmix.metrics import EPOCH_METRICS, OUTCOMES, diagnostics


#: Why a trial is not in the tables, by status.
LEFT_OUT_REASONS = {"running": "still running", "failed": "failed", "pruned": "pruned (stopped early)"}


#: Per-class columns of trials.csv only up to this many classes (CIFAR-100 and ImageNet get the
#: class table's CSV, not 100 or 1000 columns per trial).
MAX_CLASS_COLUMNS = 20


def search_phase(trials: pd.DataFrame) -> pd.Series:
    """The exploration of a search whose sweep has follow-up trials (``c…`` ids where ``f…`` ids
    exist). Its configurations ran one seed each and the best were chosen by that run's
    validation error, so a chosen run is not evidence for itself: the comparisons use the
    follow-up's re-runs, which took no part in the choice."""
    prefix = trials["trial_id"].map(lambda t: (parse_trial_id(t) or ("",))[0])
    followed = prefix.eq(FOLLOWUP_PREFIX).groupby(trials["sweep"]).transform("any")
    return followed & prefix.eq(MAIN_PREFIX)


def split_trials(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(used, left_out, search)``: completed trials with a final error, the rest with a
    reason, and a followed-up search's exploration (:func:`search_phase`), which has its own
    section."""
    search = search_phase(trials)
    finite = np.isfinite(pd.to_numeric(trials["final_top1_err"], errors="coerce").astype(float))
    used_mask = (trials["status"] == "completed") & finite & ~search
    left = trials.loc[~used_mask & ~search, ["sweep", "trial_id", "status", "error"]].copy()
    left["reason"] = [
        LEFT_OUT_REASONS.get(s, f"status {s}") if s != "completed"
        else "completed without a final test error"
        for s in left["status"]]
    left["error"] = [(str(e).splitlines() or [""])[0] if isinstance(e, str) else ""
                     for e in left["error"]]
    return (trials.loc[used_mask].copy(), left[["sweep", "trial_id", "status", "reason", "error"]],
            trials.loc[search].copy())


def _epoch_means(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the mean over epochs of the diagnostic metrics and of every witness metric."""
    cols = [c for c in dict.fromkeys(diagnostics() + [m.name for m in EPOCH_METRICS.values()
                                                      if m.witnesses]) if c in epochs]
    if epochs.empty:
        return pd.DataFrame(columns=["sweep", "trial_id", *cols])
    num = epochs[["sweep", "trial_id", *cols]].copy()
    for c in cols:
        num[c] = pd.to_numeric(num[c], errors="coerce")
    return num.groupby(["sweep", "trial_id"], as_index=False)[cols].mean()


def _finals(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial, the last epoch's value of every outcome read from the epochs table (test NLL,
    ECE) and of the per-class test errors."""
    wanted = [o.epoch_metric for o in OUTCOMES.values() if o.epoch_metric] + ["test_class_err"]
    cols = [c for c in wanted if c in epochs]
    if epochs.empty or not cols:
        return pd.DataFrame(columns=["sweep", "trial_id"])
    last = epochs.sort_values("epoch").groupby(["sweep", "trial_id"], as_index=False).tail(1)
    out = last[["sweep", "trial_id", *cols]].copy()
    rename = {o.epoch_metric: o.column for o in OUTCOMES.values() if o.epoch_metric}
    rename["test_class_err"] = "final_test_class_err"
    return out.rename(columns=rename)


def _source_totals(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial, the source counts per class summed over its epochs (None where none)."""
    if epochs.empty or "source_class_counts" not in epochs:
        return pd.DataFrame(columns=["sweep", "trial_id", "source_totals"])
    rows = []
    for (sweep, trial), g in epochs.groupby(["sweep", "trial_id"], sort=False):
        counts = [np.asarray(c, dtype=float) for c in g["source_class_counts"]
                  if isinstance(c, (list, tuple, np.ndarray)) and len(c)]
        total = None
        if counts:
            total = np.zeros(max(c.size for c in counts))
            for c in counts:
                total[:c.size] += c
        rows.append({"sweep": sweep, "trial_id": trial, "source_totals": total})
    return pd.DataFrame(rows)


def class_names(used: pd.DataFrame, width: int) -> list[str]:
    for c in used.get("classes", []):
        if isinstance(c, (list, tuple, np.ndarray)) and len(c) == width:
            return [str(x) for x in c]
    return [str(i) for i in range(width)]


def per_trial_table(used: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """``trials.csv``: one row per trial the tables use (sweep, trial id, arm = the variant,
    seed, every varying field, the final outcomes, validation error, epochs and wall time, the
    diagnostics' per-trial means over epochs; with at most :data:`MAX_CLASS_COLUMNS` classes
    also each class's final test error and share as a mixing source). Every number of the
    report's tables and verdicts derives from it."""
    frame = factor_frame(used, factors)
    out = pd.DataFrame({"sweep": used["sweep"].to_numpy(), "trial_id": used["trial_id"].to_numpy(),
                        "arm": used["variant"].to_numpy(),
                        "method": used["augment.method"].to_numpy(),
                        "seed": used["seed"].to_numpy() if "seed" in used else np.nan})
    for f in factors:
        out[f] = frame[f].to_numpy()
    for o in OUTCOMES.values():
        out[o.column] = pd.to_numeric(used[o.column], errors="coerce").to_numpy() \
            if o.column in used else np.nan
    for col in ("final_val_top1_err", "epochs_run", "wall_seconds"):
        out[col] = pd.to_numeric(used[col], errors="coerce").to_numpy() if col in used else np.nan
    diag = [c for c in dict.fromkeys(diagnostics() + [m.name for m in EPOCH_METRICS.values()
                                                      if m.witnesses]) if c in used]
    for col in diag:
        out[f"mean_{col}"] = pd.to_numeric(used[col], errors="coerce").to_numpy()
    errs = used["final_test_class_err"] if "final_test_class_err" in used else None
    srcs = used["source_totals"] if "source_totals" in used else None
    width = max([len(e) for e in (errs if errs is not None else [])
                 if isinstance(e, (list, tuple, np.ndarray))] or [0])
    if 0 < width <= MAX_CLASS_COLUMNS:
        names = class_names(used, width)
        for i, name in enumerate(names):
            out[f"class_err[{name}]"] = [float(e[i]) if isinstance(e, (list, tuple, np.ndarray))
                                         and len(e) > i else np.nan for e in errs]
            if srcs is not None:
                out[f"source_share[{name}]"] = [
                    float(t[i] / t.sum()) if isinstance(t, np.ndarray) and t.size > i
                    and t.sum() > 0 else np.nan for t in srcs]
    return out


def reused_seeds(used: pd.DataFrame) -> dict[Any, list[str]]:
    """Seeds that trials of more than one sweep used: ``{seed: [sweeps]}``. Pooled, such
    trials share their initialisation and data order: not independent replicates."""
    if used.empty or used["sweep"].nunique() < 2 or "seed" not in used:
        return {}
    by = used.groupby(used["seed"].map(hashable))["sweep"].agg(lambda s: sorted(set(s)))
    return {seed: sweeps for seed, sweeps in by.items() if len(sweeps) > 1}



def trial_table(used: pd.DataFrame, epochs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``(frame, factors)``: the used trials (:func:`split_trials`) with their epoch summaries
    and a ``variant`` column (``augment.method`` + the ``factors`` that vary among them and act
    for that variant; :mod:`ablations.factors`), indexed 0..n-1."""
    used = used.merge(_epoch_means(epochs), on=["sweep", "trial_id"], how="left")
    used = used.merge(_finals(epochs), on=["sweep", "trial_id"], how="left")
    used = used.merge(_source_totals(epochs), on=["sweep", "trial_id"], how="left")
    used.index = range(len(used))
    factors = varying_factors(used) if not used.empty else []
    used["variant"] = variant_labels(used, factors) if not used.empty else []
    return used, factors


def seed_notes(used: pd.DataFrame, avoid_seeds: list) -> list[str]:
    """Notes on the seeds of the used trials: seeds reused across pooled sweeps
    (:func:`reused_seeds`), and seeds the sweep declared to avoid (``analysis.avoid_seeds``)."""
    notes = []
    reused = reused_seeds(used)
    if reused:
        notes.append("seeds reused across the pooled sweeps: " + "; ".join(
            f"seed {s} in {', '.join(sw)}" for s, sw in list(reused.items())[:20])
            + (" ..." if len(reused) > 20 else "") + ". Trials that share a seed share their "
            "initialisation and data order: pooled, they are not independent replicates, and "
            "a variant's runs on one seed are averaged before pairing.")
    avoid = set(avoid_seeds) & {hashable(s) for s in used.get("seed", [])}
    if avoid:
        notes.append(f"trials use seeds the sweep declared to avoid ({', '.join(map(str, sorted(avoid)))}, "
                     "analysis.avoid_seeds): they were run before the declaration or come from "
                     "another sweep pooled here.")
    return notes
