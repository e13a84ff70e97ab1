"""What a search can and cannot tell.

Two limits of an ASHA search, each a function of the explored trials and their epochs:

* :func:`rung_correlations`: whether the early rungs predict the end. ASHA keeps a trial at a
  rung only if its validation error there ranks among the best; that is sound only where the
  ranking at the rung is the ranking at the end, and mixing methods reorder with epochs
  (stronger mixing learns slower early and catches up). Per rung: Spearman's ρ between the
  search metric at the rung and at the trial's last epoch, over the trials that reached both,
  with a 95% interval (Fisher's z with Fieller's variance 1.06/(n − 3)). The rule
  (:func:`predicts`): a rung predicts the end when ρ ≥ :data:`RHO_MIN` and the interval excludes
  0; with fewer than :data:`MIN_PAIRS` trials (or no spread) it is unknown. Any rung that does
  not, or is unknown, gets a warning.
* :func:`selection_noise`: how noisy the runs were that chose the follow-up. The follow-up's
  configurations were the best by the search metric (validation, never test) of one run each
  (or the mean of the search's seeds); the noise of a single run is the seed-to-seed SD of the
  chosen configuration's validation error over its follow-up re-runs, else the pooled
  within-configuration SD over every configuration that ran more than one seed (follow-up or
  search). It is set against the chosen configuration's lead over the runner-up.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats as sps

from ablations.factors import factor_frame, fmt_value, short_names, varying_factors
from ablations.importance import full_length
from ablations.text import md_table

#: A rung predicts the end when Spearman's ρ is at least this and its 95% interval excludes 0.
RHO_MIN = 0.5
#: Fewest trials (reached the rung and the end) for an interval: Fisher's z needs n > 3.
MIN_PAIRS = 4
RUNG_COLUMNS = ["rung", "stopped_here", "n", "rho", "ci_low", "ci_high", "p", "predicts"]


def _last_values(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str) -> pd.Series:
    """Per trial (indexed like ``trials``) the ``metric`` at its last epoch that has it."""
    if epochs.empty or metric not in epochs:
        return pd.Series(np.nan, index=trials.index)
    rows = epochs[["sweep", "trial_id", "epoch", metric]].copy()
    rows[metric] = pd.to_numeric(rows[metric], errors="coerce")
    rows = rows[np.isfinite(rows[metric].astype(float))].sort_values("epoch")
    last = rows.groupby(["sweep", "trial_id"], as_index=False).tail(1)
    got = trials[["sweep", "trial_id"]].merge(last, on=["sweep", "trial_id"], how="left")
    return pd.Series(got[metric].to_numpy(dtype=float), index=trials.index)


def _at_epoch(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str, epoch: int) -> pd.Series:
    rows = epochs[epochs["epoch"] == epoch][["sweep", "trial_id", metric]].drop_duplicates(
        ["sweep", "trial_id"], keep="last")
    got = trials[["sweep", "trial_id"]].merge(rows, on=["sweep", "trial_id"], how="left")
    return pd.Series(pd.to_numeric(got[metric], errors="coerce").to_numpy(dtype=float),
                     index=trials.index)


def rung_epochs(explored: pd.DataFrame) -> list[int]:
    """The epochs at which early stopping cut trials of the search: the epochs its pruned
    trials ran (ASHA stops a trial only at a rung), below the full length."""
    pruned = explored[explored["status"] == "pruned"]
    if pruned.empty or "epochs_run" not in pruned:
        return []
    ran = pd.to_numeric(pruned["epochs_run"], errors="coerce")
    if "optim.epochs" in pruned:
        ran = ran[ran < pd.to_numeric(pruned["optim.epochs"], errors="coerce")]
    return sorted({int(e) for e in ran.dropna() if e >= 1})


def spearman_interval(x: np.ndarray, y: np.ndarray, level: float = 0.95
                      ) -> tuple[float, float, float, float]:
    """``(rho, low, high, p)``: Spearman's rank correlation of ``x`` and ``y`` (scipy), its
    interval from Fisher's z with Fieller's variance 1.06 / (n − 3), and scipy's p. NaN where
    n < :data:`MIN_PAIRS` (no interval) or a side is constant (no ranking)."""
    n = len(x)
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return (math.nan,) * 4
    rho, p = sps.spearmanr(x, y)
    if n < MIN_PAIRS:
        return float(rho), math.nan, math.nan, float(p)
    z = math.atanh(min(max(float(rho), -0.999999), 0.999999))
    half = sps.norm.ppf(0.5 + level / 2) * math.sqrt(1.06 / (n - 3))
    return float(rho), math.tanh(z - half), math.tanh(z + half), float(p)


def predicts(n: int, rho: float, low: float) -> str:
    """The rule: ``yes`` when ρ ≥ :data:`RHO_MIN` and the interval excludes 0 (low > 0),
    ``unknown`` with fewer than :data:`MIN_PAIRS` trials or no ranking (NaN), else ``no``."""
    if n < MIN_PAIRS or not np.isfinite(rho) or not np.isfinite(low):
        return "unknown"
    return "yes" if rho >= RHO_MIN and low > 0 else "no"


def rung_correlations(explored: pd.DataFrame, epochs: pd.DataFrame,
                      metric: str = "val_top1_err") -> pd.DataFrame:
    """One row per rung (:func:`rung_epochs`): how many trials early stopping cut there, the
    n trials that reached the rung and the end (completed every epoch, with ``metric`` at the
    rung and at their last epoch), Spearman's ρ between the two with its 95% interval and p,
    and whether the rung predicts the end (:func:`predicts`)."""
    rungs = rung_epochs(explored)
    if not rungs or epochs.empty or metric not in epochs:
        return pd.DataFrame(columns=RUNG_COLUMNS)
    ended = explored[full_length(explored)]
    final = _last_values(ended, epochs, metric)
    ran = pd.to_numeric(explored["epochs_run"], errors="coerce")
    pruned = explored["status"] == "pruned"
    rows = []
    for r in rungs:
        at = _at_epoch(ended, epochs, metric, r)
        ok = np.isfinite(at) & np.isfinite(final)
        x, y = at[ok].to_numpy(), final[ok].to_numpy()
        rho, low, high, p = spearman_interval(x, y)
        rows.append({"rung": r, "stopped_here": int((pruned & (ran == r)).sum()),
                     "n": int(ok.sum()), "rho": rho, "ci_low": low, "ci_high": high, "p": p,
                     "predicts": predicts(int(ok.sum()), rho, low)})
    return pd.DataFrame(rows, columns=RUNG_COLUMNS)


def rung_text(table: pd.DataFrame, metric: str) -> tuple[list[str], Optional[str]]:
    """``(Markdown lines, warning or None)`` for :func:`rung_correlations`' table."""
    lines = ["### Early stopping: do the rungs predict the end?", "",
             f"Per rung (an epoch at which early stopping cut trials): Spearman's ρ between "
             f"{metric} there and at the end, over the trials that reached both (completed "
             "every epoch), with a 95% interval (Fisher's z, variance 1.06/(n − 3)). These are "
             "the survivors of every cut, a narrower range than the rung ranked, which lowers "
             f"ρ. Rule: a rung predicts the end when ρ ≥ {RHO_MIN:g} and the interval excludes "
             f"0; with fewer than {MIN_PAIRS} such trials, or no spread, it is unknown.", ""]
    if table.empty:
        return lines + ["_No rung: early stopping cut no trial._", ""], None
    shown = table.assign(rung=table["rung"].map(lambda e: f"epoch {e}"))
    lines += [md_table(shown, 2), ""]
    bad = table[table["predicts"] == "no"]
    unknown = table[table["predicts"] == "unknown"]
    if bad.empty and unknown.empty:
        return lines + ["Every rung predicts the end by this rule.", ""], None
    parts = []
    if not bad.empty:
        parts.append("at " + "; ".join(
            f"epoch {r.rung} ρ = {r.rho:.2f}, 95% CI [{r.ci_low:+.2f}, {r.ci_high:+.2f}], "
            f"n = {r.n}" for r in bad.itertuples()) + " the rung does not predict the end")
    if not unknown.empty:
        parts.append("at epoch " + ", ".join(str(r) for r in unknown["rung"])
                     + " whether it does is unknown (fewer than "
                     f"{MIN_PAIRS} trials reached both, or no spread)")
    cut = int(table.loc[bad.index.union(unknown.index), "stopped_here"].sum())
    warning = (("the early rungs do not predict the end: " if not bad.empty else
                "whether the early rungs predict the end is unknown: ") + "; ".join(parts)
               + f" (rule: ρ ≥ {RHO_MIN:g} with a 95% interval excluding 0). The {cut} trials "
               "cut there were judged on a ranking the final error need not keep (mixing "
               "methods reorder with epochs): read the search's choice as what survived early "
               "stopping, not as the best configuration.")
    return lines + [f"**Warning:** {warning}", ""], warning


def _groups(frame: pd.DataFrame, factors: list[str], values: pd.Series) -> dict[tuple, list]:
    """``{configuration key: [values]}`` over the ``factors`` as the report shows them."""
    shown = factor_frame(frame, factors)
    out: dict[tuple, list] = {}
    for key, v in zip(shown[factors].itertuples(index=False), values):
        if np.isfinite(v):
            out.setdefault(tuple(key), []).append(float(v))
    return out


def _pooled_sd(groups: list[list[float]]) -> tuple[float, int, int]:
    """``(pooled SD, configurations, degrees of freedom)`` over groups of ≥ 2 values."""
    multi = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in multi)
    if not dof:
        return math.nan, 0, 0
    ss = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in multi)
    return math.sqrt(ss / dof), len(multi), dof


def selection_noise(search: pd.DataFrame, followup: pd.DataFrame, epochs: pd.DataFrame,
                    metric: str = "val_top1_err") -> tuple[list[str], dict]:
    """``(Markdown lines, figures)``: how the follow-up was chosen and the noise of the single
    runs that chose it. ``search``: the exploration's trials; ``followup``: the follow-up's
    completed trials. Figures: ``chosen`` (its configuration as text), ``sd`` and ``sd_kind``
    (``chosen`` or ``pooled``), ``lead`` over the runner-up and ``runs`` per configuration in
    the search."""
    factors = varying_factors(search)
    if search.empty or followup.empty or not factors or not all(f in followup for f in factors):
        return [], {}
    ended = search[full_length(search)]
    searched = _groups(ended, factors, _last_values(ended, epochs, metric))
    again = _groups(followup, factors, _last_values(followup, epochs, metric))
    chosen = sorted((float(np.mean(v)), k) for k, v in searched.items() if k in again)
    if not chosen:
        return [], {}
    best_value, best = chosen[0]
    runs = len(searched[best])
    others = sorted(float(np.mean(v)) for k, v in searched.items() if k != best)
    lead = others[0] - best_value if others else math.nan
    names = short_names(factors)
    label = ", ".join(f"{names[f]}={fmt_value(v)}" for f, v in zip(factors, best))
    if len(again[best]) >= 2:
        sd, kind = float(np.std(again[best], ddof=1)), "chosen"
        how = (f"the seed-to-seed SD of the chosen configuration's {metric} over its "
               f"{len(again[best])} follow-up re-runs")
    else:
        pools = [v for v in again.values()] + [v for k, v in searched.items()]
        sd, k, dof = _pooled_sd(pools)
        kind = "pooled"
        how = (f"the pooled within-configuration SD over the {k} configurations that ran more "
               f"than one seed (follow-up and search; {dof} degrees of freedom): the chosen "
               "one has fewer than 2 follow-up re-runs")
    figures = {"chosen": label, "sd": sd, "sd_kind": kind, "lead": lead, "runs": runs,
               "metric": metric}
    lines = ["### The follow-up's choice", "",
             f"The follow-up re-runs the configurations the search ranked best by {metric} "
             "(validation, carved from the training set: never test error) at the last "
             "epoch of the trials that completed every epoch, "
             + (f"the mean of {runs} seeds" if runs > 1 else "one run each") + f". Best: {label}."]
    if not np.isfinite(sd):
        lines[-1] += (" The noise of a single run is not measured here: every configuration "
                      "ran one seed.")
        return lines + [""], figures
    unit = " points" if metric.endswith("_err") else ""
    lines[-1] += f" Noise of a single run: SD {sd:.2f}{unit} of {metric} ({how})."
    if np.isfinite(lead):
        spread = sd * math.sqrt(2 / runs)  # SD of a difference of two such search values
        lines[-1] += (f" Its lead over the runner-up in the search was {lead:.2f}{unit}, "
                      + (f"within the {spread:.2f}{unit} by which a difference of two such "
                         "values varies from noise alone: the search cannot tell the two "
                         "apart." if lead < spread else
                         f"more than the {spread:.2f}{unit} by which a difference of two such "
                         "values varies from noise alone."))
    return lines + [""], figures


def search_limits(explored: pd.DataFrame, search: pd.DataFrame, followup: pd.DataFrame,
                  epochs: pd.DataFrame, declared: dict
                  ) -> tuple[pd.DataFrame, list[str], Optional[str]]:
    """``(rungs table, Markdown lines, warning or None)`` for a search
    (:func:`ablations.declared.declared_search`'s ``declared``): the rung correlations when it
    stopped early with ASHA, the follow-up's choice when it has one. Empty for a grid."""
    if declared["mode"] != "search":
        return pd.DataFrame(columns=RUNG_COLUMNS), [], None
    metric = declared["metric"]
    table, lines, warning = pd.DataFrame(columns=RUNG_COLUMNS), [], None
    if declared["scheduler"]["type"] == "asha":
        table = rung_correlations(explored, epochs, metric)
        lines, warning = rung_text(table, metric)
    noise, _ = selection_noise(search, followup, epochs, metric)
    return table, lines + noise, warning
