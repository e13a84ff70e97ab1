"""Which factor matters most: Optuna's parameter importance over full-length trials of an
Optuna search, with bootstrap intervals, and only where it can mean something.

A grid or arms design gets no importance table: its comparisons are planned, and the one-factor
contrasts answer which factor matters, with intervals. A search gets one only with at least
:data:`MIN_TRIALS` full-length trials, and every importance comes with a 95% bootstrap interval
over trials, so that a zero is read as "not resolved at this n", not as "no effect".

The study is rebuilt from the Parquet rows (``optuna.trial.create_trial`` + ``study.add_trial``)
rather than taken from the sweep's own Optuna study, because Ray Tune records trials that ASHA
stopped early as COMPLETE with their early value, which would bias the analysis. Only trials with
status ``completed`` that ran all ``optim.epochs`` count; pruned, failed and running ones do not.

Each factor is a parameter only where it is relevant (see :mod:`ablations.factors`): ``k`` of a
``misclassified`` trial is absent rather than a misleading constant. The default evaluator
(PED-ANOVA) handles such conditional parameters.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from ablations.factors import hashable, is_relevant

#: What a search optimised (validation error of the last epoch): importance explains that.
TARGET = "final_val_top1_err"
MIN_TRIALS = 20
BOOTSTRAP = 100


def full_length(trials: pd.DataFrame) -> pd.Series:
    """Rows that are completed and ran every configured epoch."""
    ok = trials["status"] == "completed"
    if "epochs_run" in trials and "optim.epochs" in trials:
        ok &= trials["epochs_run"].fillna(-1) >= trials["optim.epochs"].fillna(math.inf)
    return ok


def _distribution(values: pd.Series):
    import optuna.distributions as od

    vals = [hashable(v) for v in values]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, {}
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                  for v in vals)
    if numeric:
        lo, hi = min(vals), max(vals)
        if lo == hi:
            return None, {}
        if all(isinstance(v, (int, np.integer)) for v in vals):
            return od.IntDistribution(int(lo), int(hi)), {}
        return od.FloatDistribution(float(lo), float(hi)), {}
    # Categorical: Optuna stores the choice itself, so tuples/lists become their text.
    to_choice = {v: (v if isinstance(v, (str, bool, int, float)) else str(v)) for v in set(vals)}
    choices = sorted(set(to_choice.values()), key=str)
    if len(choices) < 2:
        return None, {}
    return od.CategoricalDistribution(choices), to_choice


def importance_study(trials: pd.DataFrame, factors: list[str], target: str = TARGET,
                     rows: Optional[pd.Series] = None,
                     population: str = "full-length completed trials"):
    """``(study or None, note)``: an Optuna study rebuilt from the full-length completed rows
    (or from ``rows``, a mask, described by ``population``).

    Each factor becomes a parameter of the trials where it is relevant and is absent elsewhere
    (a conditional parameter). ``None`` when fewer than 2 trials or no varying factor remain.
    """
    import optuna

    keep = full_length(trials) if rows is None else rows
    usable = trials[keep & np.isfinite(pd.to_numeric(trials[target], errors="coerce")
                                       .astype(float))]
    note = f"{len(usable)} {population} (of {len(trials)}); target: {target}"
    if not factors:
        return None, note + "; no factor varies"
    if len(usable) < 2:
        return None, note + "; needs at least 2 such trials"

    dists: dict[str, Any] = {}
    maps: dict[str, dict] = {}
    for col in factors:
        rel = [is_relevant(col, r) for r in usable.to_dict("records")]
        dist, mapping = _distribution(usable.loc[rel, col])
        if dist is not None:
            dists[col], maps[col] = dist, mapping
    if not dists:
        return None, note + "; no factor varies among them"

    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for row in usable.to_dict("records"):
        params, pdists = {}, {}
        for col, dist in dists.items():
            v = hashable(row.get(col))
            if v is None or not is_relevant(col, row):
                continue  # a conditional parameter absent from this trial
            v = maps[col].get(v, v)
            if isinstance(v, np.generic):
                v = v.item()
            params[col], pdists[col] = v, dist
        study.add_trial(optuna.trial.create_trial(params=params, distributions=pdists,
                                                  value=float(row[target])))
    return study, note


def rung_target(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str = "val_top1_err",
                min_trials: int = MIN_TRIALS) -> tuple[pd.DataFrame, pd.Series, str, int]:
    """Where too few trials of a search ran to the end (ASHA stops most): ``metric`` at the
    latest epoch that at least ``min_trials`` trials reached (an early rung), as ``(trials with that column, mask of the trials that have it, the
    column, the epoch)``; epoch 0 when no epoch has enough. It explains what early stopping
    decided on, not the final error."""
    column = f"{metric} at epoch"
    if epochs.empty or metric not in epochs:
        return trials, pd.Series(False, index=trials.index), column, 0
    ids = trials[["sweep", "trial_id"]]
    rows = epochs.merge(ids, on=["sweep", "trial_id"])
    rows = rows[np.isfinite(pd.to_numeric(rows[metric], errors="coerce").astype(float))]
    reached = rows.groupby("epoch")["trial_id"].nunique()
    enough = reached[reached >= min_trials]
    if enough.empty:
        return trials, pd.Series(False, index=trials.index), column, 0
    epoch = int(enough.index.max())
    at = rows[rows["epoch"] == epoch].drop_duplicates(["sweep", "trial_id"], keep="last")
    column = f"{metric} at epoch {epoch}"
    out = trials.merge(at[["sweep", "trial_id", metric]].rename(columns={metric: column}),
                       on=["sweep", "trial_id"], how="left")
    out.index = trials.index
    return out, out[column].notna(), column, epoch


def _importances(study) -> dict[str, float]:
    import optuna

    return dict(optuna.importance.get_param_importances(study))


def factor_importance(trials: pd.DataFrame, factors: list[str], mode: str = "search",
                      target: str = TARGET, min_trials: int = MIN_TRIALS,
                      boot: int = BOOTSTRAP, seed: int = 0, rows: Optional[pd.Series] = None,
                      population: str = "full-length completed trials"
                      ) -> tuple[pd.DataFrame, str]:
    """``(table, note)``: importance of each factor for ``target`` (lower is better), with a
    95% bootstrap interval over trials and the number of trials, or an empty table and why.

    ``mode``: the sweep's design; only ``search`` gets a table. ``rows`` / ``population``: as
    in :func:`importance_study`.
    """
    empty = pd.DataFrame(columns=["factor", "importance", "ci_low", "ci_high", "n"])
    if mode != "search":
        return empty, ("Not computed: this is a grid (or arms) design. Its comparisons are "
                       "planned, and the one-factor contrasts above say which factor moves the "
                       "error and by how much, with intervals; an importance model fitted to a "
                       "few arms would mostly restate which factors the arms vary.")
    study, note = importance_study(trials, factors, target, rows, population)
    n = len(study.trials) if study is not None else 0
    if study is None:
        return empty, f"Not computed: {note}."
    if n < min_trials:
        return empty, (f"Not computed: {n} {population}; an importance estimate "
                       f"needs at least {min_trials} ({note}).")
    try:
        point = _importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return empty, f"Not computed: Optuna could not ({exc}); {note}."
    import optuna

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    frozen = list(study.trials)
    for _ in range(boot):
        pick = rng.integers(0, len(frozen), len(frozen))
        st = optuna.create_study(direction="minimize")
        st.add_trials([frozen[i] for i in pick])
        try:
            imp = _importances(st)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        for k in samples:
            samples[k].append(float(imp.get(k, 0.0)))
    rows = []
    for k, v in point.items():
        lo, hi = (np.percentile(samples[k], [2.5, 97.5]) if samples[k] else (np.nan, np.nan))
        rows.append({"factor": k, "importance": float(v), "ci_low": float(lo),
                     "ci_high": float(hi), "n": n})
    table = pd.DataFrame(rows, columns=list(empty.columns))
    table = table.sort_values("factor").sort_values("importance", ascending=False,
                                                     kind="stable", ignore_index=True)
    note = (f"PED-ANOVA (Optuna's default) over {note}; 95% intervals from {boot} bootstrap "
            "resamples of the trials. Importance is the share of the variation among the best "
            "trials a factor explains, not its direction; an interval that reaches 0 means the "
            f"factor is not resolved at n = {n}.")
    unresolved = table[table["ci_low"].fillna(0) <= 1e-9]
    if len(unresolved) == len(table):
        note += " No factor is resolved: read the table as 'unknown', not as 'no effect'."
    unstable = outside_interval(table)
    if unstable:
        note += (" The estimate of " + ", ".join(unstable) + " lies outside its own bootstrap "
                 "interval: the estimator is unstable at this n (resampled trials change which "
                 "ones are best), so those values are not to be read as measured.")
    return table, note


def outside_interval(table: pd.DataFrame) -> list[str]:
    """Factors whose point importance lies outside their bootstrap interval."""
    out = (table["importance"] < table["ci_low"] - 1e-12) | \
        (table["importance"] > table["ci_high"] + 1e-12)
    return list(table.loc[out.fillna(False), "factor"])
