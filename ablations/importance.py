"""Which factor matters most: Optuna's parameter importance over full-length trials.

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
from typing import Any

import numpy as np
import pandas as pd

from ablations.factors import hashable, is_relevant

TARGET = "final_top1_err"


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


def importance_study(trials: pd.DataFrame, factors: list[str], target: str = TARGET):
    """``(study or None, note)``: an Optuna study rebuilt from the full-length completed rows.

    Each factor becomes a parameter of the trials where it is relevant and is absent elsewhere
    (a conditional parameter). ``None`` when fewer than 2 trials or no varying factor remain.
    """
    import optuna

    usable = trials[full_length(trials)
                    & np.isfinite(pd.to_numeric(trials[target], errors="coerce").astype(float))]
    note = (f"{len(usable)} full-length completed trials (of {len(trials)}); target: {target}; "
            "evaluator: PED-ANOVA (Optuna's default)")
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


def factor_importance(trials: pd.DataFrame, factors: list[str], target: str = TARGET
                      ) -> tuple[pd.DataFrame, str]:
    """``(table, note)``: importance of each factor for ``target`` (lower is better).

    ``factors`` are config columns (``augment.method`` may be one). ``table`` has columns
    ``factor, importance`` sorted by importance; empty when it cannot be computed, with the
    reason in ``note``.
    """
    import optuna

    empty = pd.DataFrame(columns=["factor", "importance"])
    study, note = importance_study(trials, factors, target)
    if study is None:
        return empty, note
    try:
        result = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return empty, note + f"; Optuna could not compute it ({exc})"
    table = pd.DataFrame({"factor": list(result), "importance": list(result.values())})
    # Ties (often several zeros) by name, so that a re-run writes the same report.
    table = table.sort_values("factor").sort_values("importance", ascending=False, kind="stable",
                                                     ignore_index=True)
    return table, note
