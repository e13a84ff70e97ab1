"""The report's descriptive tables, each a function of the per-trial table
(:mod:`ablations.trial_table`): the main table (one row per variant), variants that trained
identically, marginal means per factor, a search's exploration and the per-class errors of the
primary method contrast.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from ablations.contrasts import Contrast
from ablations.factors import (factor_frame, fmt_value, hashable, method_order, relevance,
                               short_names, varying_factors)
from ablations.stats import summarize
from ablations.trial_table import class_names
from hardmix.metrics import diagnostics


def _per_seed(g: pd.DataFrame) -> dict:
    return {hashable(s): float(v) for s, v in zip(g["seed"], g["final_top1_err"])}


def identical_variants(used: pd.DataFrame) -> dict[str, str]:
    """``{variant: earlier variant}`` for variants whose every seed gave exactly the result of
    an earlier variant (same seeds, same final error to 1e-9): they trained identically, so the
    setting that tells them apart did nothing here."""
    order = list(dict.fromkeys(used["variant"]))
    seeds = {v: _per_seed(used[used["variant"] == v]) for v in order}
    same: dict[str, str] = {}
    for i, v in enumerate(order):
        for w in order[:i]:
            if w in same:
                continue
            a, b = seeds[v], seeds[w]
            if a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-9 for s in a):
                same[v] = w
                break
    return same


def seeds_text(seeds: pd.Series) -> str:
    return ",".join(str(s) for s in sorted({hashable(s) for s in seeds}, key=str))


def main_table(used: pd.DataFrame, factors: list[str], same: dict[str, str]) -> pd.DataFrame:
    """One row per variant: mean ± std over seeds of final test top-1 / top-5 error, n, the
    diagnostics (means per trial, then over trials) and an ``identical_to`` note."""
    frame = factor_frame(used, factors)
    diag = [c for c in diagnostics() if c in used]
    rows = []
    for variant, g in used.groupby("variant", sort=False):
        top1, top5 = summarize(g["final_top1_err"]), summarize(g["final_top5_err"])
        row: dict[str, Any] = {"variant": variant, "method": g["augment.method"].iloc[0]}
        row.update({f: frame.loc[g.index[0], f] for f in factors})
        row.update(n=top1.n, seeds=seeds_text(g["seed"]) if "seed" in g else "",
                   top1_mean=top1.mean, top1_std=top1.std, top5_mean=top5.mean,
                   top5_std=top5.std)
        for col in diag:
            vals = pd.to_numeric(g[col], errors="coerce")
            row[col] = float(vals.mean()) if vals.notna().any() else np.nan
        row["identical_to"] = same.get(variant, "")
        rows.append(row)
    cols = ["variant", "method", *factors, "n", "seeds", "top1_mean", "top1_std", "top5_mean",
            "top5_std", *diag, "identical_to"]
    table = pd.DataFrame(rows, columns=cols)
    if table.empty:
        return table
    order = table["method"].map(method_order)
    return table.assign(_o=order).sort_values(["_o", "variant"], kind="stable") \
        .drop(columns="_o").reset_index(drop=True)


def factor_tables(used: pd.DataFrame, factors: list[str]) -> dict[str, pd.DataFrame]:
    """Marginal tables per factor, by method (descriptive: they average over other factors)."""
    out: dict[str, pd.DataFrame] = {}
    names = short_names(factors)
    for f in factors:
        t = used[relevance(used, f)]
        if t.empty:
            continue
        rows = []
        for (method, value), g in t.groupby(["augment.method", t[f].map(fmt_value)], sort=True):
            s, s5 = summarize(g["final_top1_err"]), summarize(g["final_top5_err"])
            rows.append({"method": method, f: value, "n": s.n, "top1_mean": s.mean,
                         "top1_std": s.std, "top5_mean": s5.mean, "top5_std": s5.std})
        table = pd.DataFrame(rows)
        table = table.assign(_o=table["method"].map(method_order)).sort_values(["_o", f]) \
            .drop(columns="_o").reset_index(drop=True)
        out[f"factor_{names[f].replace('.', '_')}"] = table
    return out


def search_table(search: pd.DataFrame, followup: pd.DataFrame) -> pd.DataFrame:
    """The configurations a search tried, best validation error first among those that ran
    longest (ASHA stops most early: an error at epoch 6 is not comparable with one at 60), with
    the searched factors where they act and whether the follow-up (``followup``: its trials,
    whatever their status) re-runs the configuration."""
    if search.empty:
        return pd.DataFrame()
    factors = varying_factors(search)
    shown = factor_frame(search, factors)
    followed = set()
    if factors and not followup.empty and all(c in followup for c in factors):
        again = factor_frame(followup, factors)
        followed = set(map(tuple, again[factors].itertuples(index=False)))
    out = pd.DataFrame({
        "trial": search["trial_id"].to_numpy(), "status": search["status"].to_numpy(),
        "epochs": pd.to_numeric(search["epochs_run"], errors="coerce").to_numpy(),
        "val top-1 err (%)": pd.to_numeric(search["final_val_top1_err"],
                                           errors="coerce").to_numpy()})
    names = short_names(factors)
    for f in factors:
        out[names[f]] = shown[f].to_numpy()
    out["followed up"] = ["yes" if tuple(r) in followed else ""
                          for r in shown[factors].itertuples(index=False)] if factors else ""
    out = out.sort_values(["epochs", "val top-1 err (%)"], ascending=[False, True],
                          na_position="last", kind="stable")
    out["epochs"] = out["epochs"].map(lambda e: "—" if pd.isna(e) else str(int(e)))
    return out.reset_index(drop=True)


def class_table(contrasts: list[Contrast], used: pd.DataFrame, baseline: str = "cutmix"
                ) -> tuple[pd.DataFrame, str]:
    """The per-class final test error of the primary family's method contrast of a
    hard-source variant (HardMix) against ``baseline`` (else against any reference), over the
    seeds both ran, with the classes' share as that variant's mixing sources. Descriptive: no
    test per class."""
    from ablations.factors import HARD_SOURCE

    method = [c for c in contrasts if not c.excluded and c.factor == "augment.method"
              and c.value in HARD_SOURCE]
    method.sort(key=lambda c: c.reference_value != baseline)  # stable: the baseline's first
    if not method:
        return pd.DataFrame(), ""
    c = method[0]
    var, ref = c.difference.variant, c.difference.baseline
    if "final_test_class_err" not in used:
        return pd.DataFrame(), "No per-class test errors recorded (sweeps run before hardmix " \
            "recorded `test_class_err`)."
    seeds = set(c.difference.seeds) if c.difference.seeds else None

    def rows(v: str) -> pd.DataFrame:
        g = used[used["variant"] == v]
        return g[g["seed"].map(hashable).isin(seeds)] if seeds else g

    def mean_of(g: pd.DataFrame, col: str) -> Optional[np.ndarray]:
        vals = [np.asarray(x, dtype=float) for x in g[col]
                if isinstance(x, (list, tuple, np.ndarray)) and len(x)] if col in g else []
        if not vals or len({v.size for v in vals}) != 1:
            return None
        return np.nanmean(np.stack(vals), axis=0)

    gv, gr = rows(var), rows(ref)
    ev, er = mean_of(gv, "final_test_class_err"), mean_of(gr, "final_test_class_err")
    if ev is None or er is None or ev.size != er.size:
        return pd.DataFrame(), ("No per-class test errors for both sides of "
                                f"{var} vs {ref}.")
    src = [t / t.sum() for t in gv.get("source_totals", []) if isinstance(t, np.ndarray)
           and t.size == ev.size and t.sum() > 0]
    share = np.mean(np.stack(src), axis=0) if src else np.full(ev.size, np.nan)
    names = class_names(used, ev.size)
    table = pd.DataFrame({"class": names, f"{ref} (%)": er, f"{var} (%)": ev,
                          "Δ (points)": ev - er, f"share as {c.value} source (%)": 100 * share})
    n = len(set(gv["seed"].map(hashable)) & set(gr["seed"].map(hashable)))
    note = (f"{var} against {ref} (the primary family's method contrast), mean final test "
            f"error per class over the {n} seeds both ran, and each class's share of the "
            f"patches as a {c.value} source (all epochs and seeds; uniform = "
            f"{100 / ev.size:.1f}%). Descriptive: no test per class.")
    return table, note

