"""``hardmix report``: turn a sweep's Parquet results into the tables and plots of a paper, and
say only what the data support.

:func:`build_report` reads a sweep folder (or a folder of sweeps, local or URI), keeps the
completed trials, groups them into variants (``augment.method`` + the config columns that vary
within the sweep and act for that variant, seed excluded; see :mod:`ablations.factors`) and
writes into ``<sweep>/report/`` (or ``out``):

* ``report.md`` -- everything below, with the verdicts in plain words;
* ``main_table.csv`` -- one row per variant: mean ± std final test top-1 / top-5 error over
  seeds, n, the diagnostics of :mod:`hardmix.metrics` (hard share, fallback rate, source
  diversity), and which variants trained *identically* to another (same result for every seed);
* ``trials.csv`` -- one row per trial used (sweep, trial id, arm, seed, every varying field,
  final outcomes, diagnostics' means, per-class errors and source shares): every number of the
  tables and verdicts derives from it (:func:`per_trial_table`);
* ``contrasts.csv`` -- the primary family: every pair of variants that differ in exactly one
  factor they share (the method counts as one; settings only one side has, such as HardMix's
  fallback against CutMix, belong to the changed switch and are named in the change), on the
  primary outcome, paired by seed, tested as one family (Bonferroni, or uncorrected) with a
  four-valued verdict, MDE and seeds each (:mod:`ablations.stats`). Pairs that cannot be told
  apart by construction are left out of the family and listed: identical results, or a switch
  whose witness metric shows it never acted (a fallback that fired on 0% of steps);
* ``contrasts_<outcome>.csv`` -- the secondary families (top-5 error, test NLL, ECE by
  default): the same contrasts on another outcome, each corrected on its own;
* ``class_errors.csv`` -- per-class test error of the primary method contrast, with the
  classes' share as HardMix sources;
* ``differences.csv`` -- the same comparisons seen from the baseline method (default CutMix):
  each variant against the CutMix variant that matches it on every shared factor (prob, α, box,
  ...), with the family's interval; a variant without such a match is listed as unmatched;
* ``settings.csv`` -- what every trial used shares (per method for a method's own fields):
  the configuration the variant names leave out;
* ``factor_<name>.csv`` -- marginal means per factor (descriptive, no test);
* ``search.csv`` -- a followed-up search's exploration (:func:`search_phase`): every
  configuration it tried, how far it ran and its validation error; the tables above use only
  the follow-up's re-runs, since the exploration chose them;
* ``importance.csv`` -- Optuna's factor importance over a search's exploration, only with
  enough full-length trials, with bootstrap intervals (:mod:`ablations.importance`);
  ``importance_early.csv`` where too few ran to the end: the same at the latest epoch enough
  trials reached (what early stopping decided on, labelled as such);
* ``left_out.csv`` / ``skipped_files.csv`` -- every trial not in the tables and why;
* PNG plots (:mod:`ablations.plots`), one colour per variant across all of them.

No number selected on the test set appears: tables use the last epoch's test error, and
choices (the best trial of a search) use validation error. A re-run replaces only the files a
report wrote before (listed in its manifest, ``.hardmix-report.json``); nothing else in
``out`` is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from ablations import plots
from ablations.factors import (INERT, factor_frame, fixed_settings, fmt_value, hashable,
                               is_relevant, method_order, relevance, short_names, variant_labels,
                               varying_factors)
from ablations.importance import factor_importance, rung_target
from ablations.stats import (ALPHA, CORRECTIONS, Difference, correct, difference,
                             interval_label, mean_std_text, summarize, verdict)
from ablations.store import (FOLLOWUP_PREFIX, MAIN_PREFIX, _resolve, parse_trial_id, read_results,
                             sweep_roots)
from hardmix.config import RunConfig, flatten
from hardmix.config.environment import check_writable
from hardmix.errors import ConfigError
from hardmix.methods import METHODS, SWITCHES
from hardmix.metrics import EPOCH_METRICS, OUTCOMES, diagnostics, witness_of

#: Why a trial is not in the tables, by status.
LEFT_OUT_REASONS = {"running": "still running", "failed": "failed", "pruned": "pruned (stopped early)"}
MANIFEST = ".hardmix-report.json"
#: The paper's HardMix as the library's defaults: the setting an ablation departs from.
_DEFAULTS = {k: hashable(v) for k, v in flatten(RunConfig()).items()}
_SWITCH_COLS = tuple(f"augment.{s}" for s in SWITCHES)
#: Per-class columns of trials.csv only up to this many classes (CIFAR-100 and ImageNet get the
#: class table's CSV, not 100 or 1000 columns per trial).
MAX_CLASS_COLUMNS = 20


@dataclass
class Contrast:
    """``variant − reference`` where the two differ in one shared ``factor``; ``dependents``:
    settings that only one side has (they come with the changed switch)."""

    factor: str
    reference_value: Any
    value: Any
    difference: Difference
    dependents: str = ""
    excluded: str = ""  # why it is not in the family ("" = in it)
    outcome: str = "top1"  # the hardmix.metrics.OUTCOMES entry the difference is on

    @property
    def change(self) -> str:
        """``1 → 16 (fallback=random)``: the values as the tables print them, with the settings
        that come with the changed switch."""
        text = f"{fmt_value(self.reference_value)} → {fmt_value(self.value)}"
        return text + (f" ({self.dependents})" if self.dependents else "")


@dataclass
class Report:
    """What :func:`build_report` produced: ``path`` is report.md (file or URI) inside ``out``;
    ``text`` its Markdown."""

    out: str
    path: str
    text: str
    main_table: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    contrasts: list[Contrast] = field(default_factory=list)
    differences: list[Contrast] = field(default_factory=list)
    left_out: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    factors: list[str] = field(default_factory=list)
    family: str = ""
    n_trials: int = 0
    n_used: int = 0
    terminal: str = ""
    secondary: dict[str, list[Contrast]] = field(default_factory=dict)
    margin: Optional[float] = None
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Selecting trials
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Variants, identical variants
# --------------------------------------------------------------------------------------------


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


def _seeds_text(seeds: pd.Series) -> str:
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
        row.update(n=top1.n, seeds=_seeds_text(g["seed"]) if "seed" in g else "",
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


def _cell(values: pd.Series) -> str:
    s = summarize(values)
    return f"{mean_std_text(s)} (n={s.n})"


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


def _mode(values: pd.Series) -> Any:
    vals = [hashable(v) for v in values]
    return max(set(vals), key=lambda v: (vals.count(v), str(v)))


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def _reference_first(factor: str, a: Any, b: Any, counts: dict[Any, int]) -> bool:
    """Whether ``a`` is the reference side of a contrast over ``factor``: for the method, the
    one earlier in the method table (none < ... < CutMix < ... < HardMix); otherwise the
    library's default (the paper's setting: fallback random, min_hard 1, signal forward, ...),
    else the factor's most common value in the sweep."""
    if factor == "augment.method":
        return method_order(a) <= method_order(b)
    default = _DEFAULTS.get(factor)
    if default in (a, b) and a != b:
        return a == default
    return (-counts.get(a, 0), str(a)) <= (-counts.get(b, 0), str(b))


def _matches_family(factor: str, family: Optional[Sequence[str]]) -> bool:
    if not family:
        return True
    return any(factor == f or factor.rsplit(".", 1)[-1] == f for f in family)


def one_factor_contrasts(used: pd.DataFrame, factors: list[str], same: dict[str, str],
                         family: Optional[Sequence[str]] = None,
                         correction: str = "bonferroni", margin: Optional[float] = None,
                         outcome: str = "top1") -> list[Contrast]:
    """Every pair of variants that differ in exactly one factor both have (the method counts
    as one), as ``variant − reference`` in ``outcome`` (:data:`hardmix.metrics.OUTCOMES`),
    paired by seed.

    Settings only one side has are dependents of the changed switch and are named with the
    change (``cutmix → hardmix (fallback=skip, min_hard=40)``). Pairs left out of the family:
    one side identical to another variant (only the first of identical variants takes part),
    both sides identical, or a factor whose witness metric (:func:`hardmix.metrics.witness_of`)
    is 0 on both sides (the switch never acted), and factors outside ``family``. The rest is
    one family (:func:`ablations.stats.correct`: ``correction`` ``bonferroni`` or ``none``,
    the equivalence tests against ``margin``).
    """
    column = OUTCOMES[outcome].column
    cols = ["augment.method"] + [f for f in factors if f != "augment.method"]
    if used.empty:
        return []
    groups = dict(tuple(used.groupby("variant", sort=False)))
    reps = {v: {c: _mode(g[c]) for c in cols} for v, g in groups.items()}
    acts = {v: {c: is_relevant(c, g.iloc[0].to_dict()) for c in cols} for v, g in groups.items()}
    counts = {c: used.loc[relevance(used, c), c].map(hashable).value_counts().to_dict()
              for c in cols}
    names = sorted(groups, key=lambda v: (method_order(reps[v]["augment.method"]), v))
    short = short_names(cols)
    found: list[Contrast] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [c for c in cols if acts[a][c] and acts[b][c]]
            diff = [c for c in shared if reps[a][c] != reps[b][c]]
            if len(diff) != 1:
                continue
            c = diff[0]
            one_sided = [x for x in cols if acts[a][x] != acts[b][x]]
            if one_sided and c not in _SWITCH_COLS:
                continue  # (cannot happen: only switches change what acts)
            ref, var = (a, b) if _reference_first(c, reps[a][c], reps[b][c], counts[c]) else (b, a)
            deps = ", ".join(f"{short[x]}={fmt_value(reps[var][x])}" for x in one_sided
                             if acts[var][x])
            gv, gr = groups[var], groups[ref]
            d = difference(var, gv[column].tolist(), gv["seed"].tolist(),
                           ref, gr[column].tolist(), gr["seed"].tolist())
            excluded = ""
            if var in same or ref in same:
                twin = var if var in same else ref
                excluded = f"{twin} trained identically to {same[twin]}"
            elif d.tested and d.se == 0 and d.diff == 0:
                excluded = "identical results on every seed"
            else:
                witness = witness_of(c[len("augment."):]) if c.startswith("augment.") else None
                if witness and witness in gv and witness in gr:
                    wv = pd.to_numeric(gv[witness], errors="coerce").mean()
                    wr = pd.to_numeric(gr[witness], errors="coerce").mean()
                    if wv == 0 and wr == 0:
                        excluded = f"{short[c]} never acted ({witness} 0 on both sides)"
            if not excluded and not _matches_family(c, family):
                excluded = "outside the family"
            found.append(Contrast(c, reps[ref][c], reps[var][c], d, deps, excluded, outcome))
    members = [i for i, ct in enumerate(found) if not ct.excluded]
    corrected = correct([found[i].difference for i in members], ALPHA, correction, margin)
    for i, d in zip(members, corrected):
        found[i].difference = d
    return found


def retest(contrasts: list[Contrast], used: pd.DataFrame, outcome: str, correction: str,
           margin: Optional[float] = None) -> list[Contrast]:
    """The primary family's member contrasts on another ``outcome``: a secondary family,
    corrected on its own. A contrast where the outcome was not recorded (NaN on a side) is
    ``n too small``; one with the same outcome on every seed is left out of the family, as in
    the primary one."""
    column = OUTCOMES[outcome].column
    groups = dict(tuple(used.groupby("variant", sort=False)))
    out = []
    for c in contrasts:
        if c.excluded:
            continue
        gv, gr = groups[c.difference.variant], groups[c.difference.baseline]
        vals = pd.to_numeric(gv[column], errors="coerce") if column in gv else \
            pd.Series(np.nan, index=gv.index)
        base = pd.to_numeric(gr[column], errors="coerce") if column in gr else \
            pd.Series(np.nan, index=gr.index)
        d = difference(c.difference.variant, vals.tolist(), gv["seed"].tolist(),
                       c.difference.baseline, base.tolist(), gr["seed"].tolist())
        same = d.tested and d.se == 0 and d.diff == 0
        out.append(Contrast(c.factor, c.reference_value, c.value, d, c.dependents,
                            "identical results on every seed" if same else "", outcome))
    members = [c for c in out if not c.excluded]
    for c, d in zip(members, correct([c.difference for c in members], ALPHA, correction,
                                     margin)):
        c.difference = d
    return out


def differences_from(contrasts: list[Contrast], used: pd.DataFrame, baseline: str
                     ) -> tuple[list[Contrast], list[str]]:
    """The method contrasts of the family with a ``baseline`` variant on either side (the same
    intervals as in the contrasts; ``none -> cutmix`` keeps its direction), and a note for
    every other variant: matched but left out of the family (and why), or not matched."""
    if not (used["augment.method"] == baseline).any():
        return [], [f"No completed `{baseline}` trials: nothing to compare against {baseline}."]
    base_variants = set(used.loc[used["augment.method"] == baseline, "variant"])
    pairs = [c for c in contrasts if c.factor == "augment.method"
             and base_variants & {c.difference.baseline, c.difference.variant}]
    diffs = [c for c in pairs if not c.excluded]
    matched = {v for c in diffs for v in (c.difference.variant, c.difference.baseline)}
    # A matched pair left out of the family has a match: say why it is not tested here rather
    # than claim there is nothing to compare it with.
    why = {}
    for c in pairs:
        for v in (c.difference.variant, c.difference.baseline):
            if v not in matched and v not in base_variants:
                other = c.difference.baseline if v == c.difference.variant else \
                    c.difference.variant
                why.setdefault(v, f"matched by {other}, but not tested here ({c.excluded}"
                               + ("; `--family method` tests it" if c.excluded ==
                                  "outside the family" else "") + ").")
    notes = []
    for v in dict.fromkeys(used.loc[used["augment.method"] != baseline, "variant"]):
        if v not in matched:
            notes.append(f"{v}: " + why.get(v, f"no `{baseline}` variant matches it on every "
                                             "shared factor (prob, α, box, ...): not compared."))
    return diffs, notes


CONTRAST_COLUMNS = ["outcome", "factor", "change", "variant", "reference", "n", "delta", "sd",
                    "interval", "level", "ci_low", "ci_high", "p", "p_adjusted", "comparisons",
                    "margin", "p_noninf", "p_nonsup", "p_tost", "eq_low", "eq_high", "mde",
                    "seeds_margin", "seeds_resolve", "verdict", "test", "excluded", "sentence"]


def contrast_table(contrasts: list[Contrast]) -> pd.DataFrame:
    """One row per contrast: Δ (variant − reference, in the outcome's units), its interval
    and what kind it is, the tests at the contrast's level (two-sided, the one-sided margin
    tests, TOST), the power figures and the verdict with its sentence."""
    names = short_names(sorted({c.factor for c in contrasts}))
    rows = []
    for c in contrasts:
        d, o = c.difference, OUTCOMES[c.outcome]
        member = not c.excluded and d.tested
        rows.append({"outcome": c.outcome, "factor": names.get(c.factor, c.factor),
                     "change": c.change, "variant": d.variant, "reference": d.baseline,
                     "n": d.n, "delta": d.diff, "sd": d.sd,
                     "interval": d.interval_label if member else "", "level": d.level,
                     "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p,
                     "p_adjusted": d.p_adjusted, "comparisons": d.m if not c.excluded else 0,
                     "margin": d.margin, "p_noninf": d.p_noninf, "p_nonsup": d.p_nonsup,
                     "p_tost": d.p_tost, "eq_low": d.eq_low, "eq_high": d.eq_high,
                     "mde": d.mde, "seeds_margin": d.seeds_margin,
                     "seeds_resolve": d.seeds_resolve,
                     "verdict": d.verdict if not c.excluded else "", "test": d.kind,
                     "excluded": c.excluded,
                     "sentence": verdict(d, o.title, o.unit) if not c.excluded else ""})
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        if abs(v) < 1e-9:  # rounding residue of a mean of equal numbers, not a small value
            v = 0.0
        text = f"{v:.{digits}f}"
        # A small positive rate is not zero: a fallback that fired once must not read "never".
        if 0 < abs(v) < 0.5 * 10 ** -digits:
            return ("<" if v > 0 else ">-") + f"{10 ** -digits:.{digits}f}"
        return text
    return str(v)


def md_table(df: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df.empty:
        return "_(none)_"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v, digits).replace("|", "\\|") for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _ms(mean: float, std: float, n: int) -> str:
    if not n or not np.isfinite(mean):
        return "—"
    return f"{mean:.2f}" if n < 2 or not np.isfinite(std) else f"{mean:.2f} ± {std:.2f}"


_DIAG_TITLES = {"hard_share": "hard share", "fallback_rate": "fallback rate",
                "distinct_sources": "distinct sources"}


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The main table as shown: ``mean ± std`` text columns."""
    if table.empty:
        return table
    out = pd.DataFrame({"variant": table["variant"], "n": table["n"]})
    out["top-1 err (%)"] = [_ms(m, s, n) for m, s, n in
                            zip(table["top1_mean"], table["top1_std"], table["n"])]
    out["top-5 err (%)"] = [_ms(m, s, n) for m, s, n in
                            zip(table["top5_mean"], table["top5_std"], table["n"])]
    for col in diagnostics():
        if col in table:
            out[_DIAG_TITLES.get(col, col)] = table[col].map(
                lambda v: _fmt(v, 1 if col == "distinct_sources" else 3))
    out["seeds"] = table["seeds"]
    if table["identical_to"].astype(bool).any():
        out["note"] = [f"identical to {t}" if t else "" for t in table["identical_to"]]
    return out


def _left_out_summary(left: pd.DataFrame, skipped: list[tuple[str, str]]) -> str:
    counts = left["reason"].value_counts()
    known = list(LEFT_OUT_REASONS.values())
    order = sorted(counts.index, key=lambda r: (known.index(r) if r in known else len(known), r))
    parts = [f"{counts[reason]} {reason}" for reason in order]
    if skipped:
        parts.append(f"{len(skipped)} corrupt file(s) skipped")
    return ", ".join(parts) if parts else "none"


def _search_count(search: Optional[pd.DataFrame]) -> str:
    if search is None:
        return ""
    return (f" The {len(search)} trials of the search phase are under \"Search\": the "
            "comparisons use the follow-up's re-runs of the configurations it chose.")


def _ci_text(d: Difference) -> str:
    return "—" if not d.tested else f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"


def _family_text(contrasts: list[Contrast], family: Optional[Sequence[str]],
                 correction: str, margin: Optional[float] = None, outcome: str = "top1") -> str:
    """The family in one sentence: outcome, which contrasts, how many, the correction, the
    interval's meaning and the margin."""
    m = sum(1 for c in contrasts if not c.excluded and c.difference.tested)
    o = OUTCOMES[outcome]
    which = ("all one-factor contrasts of this report" if not family else
             "the one-factor contrasts over " + ", ".join(family))
    label = interval_label(correction, ALPHA, m)
    if correction == "none":
        how = (f"uncorrected: each contrast tested at {ALPHA:g}, each interval a per-comparison "
               f"{label.split()[1]} interval for its own question")
    elif m > 1:
        how = (f"Bonferroni: each contrast tested at {ALPHA:g}/{m} = {ALPHA / m:.3g}; the "
               f"intervals are {label}, so all {m} cover their true Δ together with "
               f"probability ≥ {1 - ALPHA:.0%}")
    else:
        how = f"one contrast, tested at {ALPHA:g}"
    marg = (f"; margin ±{margin:g} {o.unit} (declared smallest effect of interest)" if margin
            else "; no margin declared: no equivalence verdicts")
    return (f"{o.title}, the {m} comparison{'s' if m != 1 else ''} of {which}; {how}{marg}")


def _interval_head(items: list[Contrast]) -> str:
    tested = [c.difference for c in items if c.difference.tested]
    return (f"{tested[0].interval_label} interval" if tested else "interval")


def _verdict_cell(d: Difference) -> str:
    if not d.tested:
        return "n too small"
    if d.verdict == "undetermined":
        seeds = d.seeds_resolve
        return ("undetermined" if np.isnan(seeds) else "undetermined (> 10,000 seeds)"
                if np.isinf(seeds) else f"undetermined (≈ {int(seeds)} seeds)")
    if d.verdict == "equivalent":
        return f"equivalent within ±{d.margin:g}"
    return d.verdict


def _seeds_cell(x: float) -> str:
    return "—" if not (x == x) else ("> 10,000" if np.isinf(x) else str(int(x)))


def _comparison_rows(items: list[Contrast], with_factor: bool = True) -> pd.DataFrame:
    names = short_names(sorted({c.factor for c in items}))
    head = _interval_head(items)
    rows = []
    for c in items:
        d, o = c.difference, OUTCOMES[c.outcome]
        row = {}
        if with_factor:
            row["factor"] = names.get(c.factor, c.factor)
        row.update({"change": c.change, "with the rest as in": d.baseline, "n": d.n,
                    f"Δ {o.title} ({o.unit})": d.diff, head: _ci_text(d),
                    "verdict": _verdict_cell(d), f"MDE ({o.unit})": d.mde})
        if any(c.difference.margin > 0 for c in items):
            row["TOST p"] = d.p_tost
            row["seeds for ±margin"] = _seeds_cell(d.seeds_margin)
        rows.append(row)
    return pd.DataFrame(rows)


def _family_section(title: str, items: list[Contrast], family_text: str,
                    limit: int = 80) -> list[str]:
    """A family's Markdown: what it is, its table, one sentence per verdict."""
    lines = [title, "", f"Family: {family_text}.", ""]
    if not items:
        return lines + ["_No contrast in this family._", ""]
    lines += [md_table(_comparison_rows(items[:limit]), 3), ""]
    if len(items) > limit:
        lines += [f"... {len(items) - limit} more in the CSV.", ""]
    lines += [f"- {verdict(c.difference, OUTCOMES[c.outcome].title, OUTCOMES[c.outcome].unit)}"
              for c in items if c.difference.tested][:40]
    return lines + [""]


def _markdown(ctx: dict) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    factors, names = ctx["factors"], short_names(ctx["factors"])
    contrasts: list[Contrast] = ctx["contrasts"]
    family = ctx["family_text"]
    lines = [f"# HardMix report: {ctx['sweeps']}", "",
             f"Source: `{ctx['path']}` · generated {now}", "",
             f"**{len(ctx['used'])} of {len(ctx['trials'])} trials used.** Left out: "
             f"{_left_out_summary(ctx['left'], ctx['skipped'])} (details at the end and in "
             "`left_out.csv`)." + _search_count(ctx["tables"].get("search")), ""]
    lines += ["Errors are final test errors in percent (lower is better) at the last epoch, "
              "mean ± sample std over the seeds of a variant (n). No number in this report is "
              "selected on the test set. A variant is the method plus the factors that vary in "
              "this sweep" + (f" ({', '.join(names.values())})" if factors else "") +
              f"; a factor that has no effect on a method shows as {INERT} and does not split "
              "it.", ""]
    lines += ["## Main table", "", md_table(ctx["shown"]) if not ctx["shown"].empty else
              "_No completed trials yet._", ""]
    diag = [_DIAG_TITLES.get(c, c) for c in diagnostics()]
    lines += [f"Diagnostics ({', '.join(diag)}): means over epochs, then over seeds; — where "
              "they do not apply to the method. Fallback rate: share of mixed steps where the "
              "batch had fewer than min_hard hard samples; hard share: share of the batch that "
              "was hard.", ""]
    if ctx["same"]:
        lines += ["**Identical variants.** These trained exactly like another variant on every "
                  "seed, so the setting that tells them apart did nothing here; they are left "
                  "out of every comparison:", ""]
        lines += [f"- {v} = {w}" for v, w in ctx["same"].items()] + [""]
    settings = ctx["tables"].get("settings")
    if settings is not None and not settings.empty:
        lines += ["**Held fixed** (shared by every trial used, so the variant names leave it "
                  "out; `settings.csv`):", ""]
        for scope, sub in settings.groupby("scope", sort=False):
            pairs = ", ".join(f"{f.removeprefix('augment.')}={v}"
                              for f, v in zip(sub["field"], sub["value"]))
            lines.append(f"- {scope}: {pairs}")
        lines.append("")

    lines += ["## Comparisons", ""]
    members = [c for c in contrasts if not c.excluded]
    o = OUTCOMES[ctx["primary"]]
    lines += ["Pairs of variants that differ in exactly one factor they share: the effect of "
              "that change with everything else held fixed. Δ = after − before (negative: the "
              "change lowers the error: every outcome here is better lower); the reference side "
              "is the earlier method (none < CutMix < HardMix) or the library's default (the "
              "paper's setting). Settings only one side has come with the change (in "
              "brackets). Paired by seed. Each family is corrected on its own; each contrast "
              "ends in one verdict at its family's level: **better** / **worse** (the two-sided "
              "t-test rejects Δ = 0: the interval excludes 0), else **equivalent within "
              "±margin** (with a declared margin: the TOST rejects |Δ| ≥ margin, i.e. the "
              "(1 − 2·level) interval lies within ±margin), else **undetermined**, with the "
              "seeds that would resolve it at the observed SD. MDE: the smallest |Δ| the "
              "contrast detects with 80% power at its level. See docs/reports.md.", ""]
    if ctx.get("notes"):
        lines += [f"**Note.** {n}" for n in ctx["notes"]] + [""]
    lines += _family_section(f"### Primary family: {o.title}", members, family)
    if not members:
        lines[-2:-2] = ["_No two variants differ in exactly one factor (or every such pair was "
                        "left out below)._"]
    out = [c for c in contrasts if c.excluded and c.excluded != "outside the family"]
    if out:
        lines += ["Left out of the family (they cannot show a difference by construction):", ""]
        lines += [f"- {c.difference.variant} vs {c.difference.baseline}: {c.excluded}"
                  for c in out] + [""]
    for name, items in ctx["secondary"].items():
        lines += _family_section(f"### Secondary family: {OUTCOMES[name].title}",
                                 [c for c in items if not c.excluded], ctx["secondary_text"][name])
        lines += [f"- Left out: {c.difference.variant} vs {c.difference.baseline}: {c.excluded}."
                  for c in items if c.excluded]
        lines += [""] if any(c.excluded for c in items) else []
    if ctx.get("class_note"):
        lines += ["### Per-class test error of the primary method contrast", "",
                  ctx["class_note"], ""]
        if "class_errors" in ctx["tables"]:
            lines += [md_table(ctx["tables"]["class_errors"], 2), ""]

    lines += [f"## Against {ctx['baseline']}", ""]
    if ctx["diffs"]:
        lines += [f"Each variant against the `{ctx['baseline']}` variant that matches it on "
                  "every shared factor: the method comparisons of the primary family, with the "
                  f"same intervals and verdicts ({family}).", ""]
        lines += [md_table(_comparison_rows(ctx["diffs"], with_factor=False), 3), ""]
    lines += [f"- {n}" for n in ctx["diff_notes"]]
    if not ctx["diffs"] and not ctx["diff_notes"]:
        lines += ["_Nothing to compare._"]
    lines += [""]

    factor_names = [n for n in ctx["tables"] if n.startswith("factor_")]
    if factor_names:
        lines += ["## Factors (descriptive)", "", "Marginal means over the other factors "
                  "(top-1 error, %). In a sweep of arms they mix settings; the comparisons "
                  "above are what answer an ablation.", ""]
        for name in factor_names:
            lines += [f"### {name.replace('factor_', '').replace('_', ' ')}", "",
                      md_table(ctx["tables"][name]), ""]

    search = ctx["tables"].get("search")
    if search is not None:
        lines += ["## Search", "", f"The configurations the search tried, one run each "
                  f"(seed {_seeds_text(ctx['search_seeds'])}), longest-running first, then by "
                  "validation error at the epoch each reached: ASHA stops most of them early, "
                  "and an error at an early rung is not comparable with a final one. No test "
                  "error is shown: these runs chose the follow-up's configurations (by the "
                  "validation error of the full-length runs), and the tables above use only "
                  "the follow-up's re-runs, which took no part in that choice.", "",
                  md_table(search, 2), ""]
    lines += ["## Factor importance", "", ctx["importance_note"], ""]
    if not ctx["tables"]["importance"].empty:
        lines += [md_table(ctx["tables"]["importance"], 3), ""]
    if ctx["early_note"]:
        lines += ["### At an early rung", "", "What early stopping decided on, not the final "
                  "error: the validation error at the latest epoch that enough trials reached. "
                  "A factor that slows early learning but pays off by the end (stronger "
                  "mixing often does) counts against itself here.", "", ctx["early_note"], ""]
        if "importance_early" in ctx["tables"]:
            lines += [md_table(ctx["tables"]["importance_early"], 3), ""]

    if ctx["made"]:
        lines += ["## Plots", ""]
        for name, p in ctx["made"].items():
            lines += [f"### {plots.TITLES.get(name, name)}", "", f"![{name}]({Path(p).name})", ""]

    lines += ["## Left out", ""]
    lines += [md_table(ctx["left"]) if not ctx["left"].empty else "_No trial left out._", ""]
    if ctx["skipped"]:
        lines += ["Corrupt files (skipped):", ""]
        lines += [f"- `{f}`: {why}" for f, why in ctx["skipped"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _default_out(path: str) -> str:
    return path.rstrip("/") + "/report" if "://" in path else str(Path(path) / "report")


def _clear_previous(folder: Path) -> None:
    """Remove the files this report wrote last time (its manifest lists them), nothing else."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        names = json.loads(manifest.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and "/" not in name and "\\" not in name and \
                name not in ("", ".", ".."):
            (folder / name).unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _publish(staging: Path, out: str) -> None:
    """Upload a staged report to a URI destination, one object per file."""
    fs, root = _resolve(out)
    fs.create_dir(root, recursive=True)
    for p in sorted(staging.iterdir()):
        if p.is_file():
            with fs.open_output_stream(f"{root}/{p.name}") as stream:
                stream.write(p.read_bytes())


def _sweep_mode(path: str) -> str:
    """``search`` or ``grid`` from the sweep's saved ``sweep.yaml`` (grid when unknown)."""
    import yaml

    try:
        fs, root = _resolve(path)
        with fs.open_input_stream(f"{root}/sweep.yaml") as f:
            raw = yaml.safe_load(f.read().decode()) or {}
        return "search" if isinstance(raw, dict) and raw.get("mode") == "search" else "grid"
    except Exception:  # noqa: BLE001 - a folder of runs, or no sweep.yaml
        return "grid"


def declared_analysis(path: str) -> tuple[dict, list[str]]:
    """The ``analysis`` section each sweep at ``path`` declared in its saved sweep.yaml (the
    defaults where absent), and notes: sweeps pooled here that declared different ones (the
    first sweep's stands)."""
    import yaml

    from hardmix.config import from_dict
    from hardmix.config.schema import AnalysisConfig

    found: list[tuple[str, dict]] = []
    try:
        fs, roots = sweep_roots(path)
    except ConfigError:
        return to_dict_analysis(AnalysisConfig()), []
    for root in roots:
        try:
            with fs.open_input_stream(f"{root}/sweep.yaml") as f:
                raw = yaml.safe_load(f.read().decode()) or {}
            section = raw.get("analysis") if isinstance(raw, dict) else None
            cfg = from_dict(AnalysisConfig, section or {}, "analysis.")
        except Exception:  # noqa: BLE001 - no sweep.yaml (a folder of runs), or an old one
            cfg = AnalysisConfig()
        found.append((root.rsplit("/", 1)[-1], to_dict_analysis(cfg)))
    if not found:
        return to_dict_analysis(AnalysisConfig()), []
    first = found[0][1]
    notes = [f"sweep {name} declared analysis {a}, not {first}; the report uses the first "
             f"sweep's ({found[0][0]})" for name, a in found[1:] if a != first]
    return first, notes


def to_dict_analysis(cfg: Any) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


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


def _class_names(used: pd.DataFrame, width: int) -> list[str]:
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
        names = _class_names(used, width)
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
    names = _class_names(used, ev.size)
    table = pd.DataFrame({"class": names, f"{ref} (%)": er, f"{var} (%)": ev,
                          "Δ (points)": ev - er, f"share as {c.value} source (%)": 100 * share})
    n = len(set(gv["seed"].map(hashable)) & set(gr["seed"].map(hashable)))
    note = (f"{var} against {ref} (the primary family's method contrast), mean final test "
            f"error per class over the {n} seeds both ran, and each class's share of the "
            f"patches as a {c.value} source (all epochs and seeds; uniform = "
            f"{100 / ev.size:.1f}%). Descriptive: no test per class.")
    return table, note


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def build_report(path: str, out: str | None = None, baseline: str = "cutmix",
                 family: Optional[Sequence[str]] = None, correction: str = "bonferroni",
                 margin: Optional[float] = None) -> Report:
    """Read the sweep at ``path`` and write report.md, CSV tables and PNGs into ``out``
    (default ``<path>/report``). ``family``: factors whose contrasts form the primary family
    (default: the sweep's ``analysis.family``, else all); ``correction``: ``bonferroni``
    (default) or ``none``; ``margin``: the smallest effect of interest on the primary outcome
    (default: the sweep's ``analysis.margin``). Raises ConfigError on a missing or empty sweep,
    a bad option or an unwritable ``out``."""
    if baseline not in METHODS:
        raise ConfigError("--baseline", baseline, f"must be one of {', '.join(METHODS)}")
    if correction not in CORRECTIONS:
        raise ConfigError("--correction", correction, f"must be one of {', '.join(CORRECTIONS)}")
    if margin is not None and not (0 < margin <= 100):
        raise ConfigError("--margin", margin, "must be a number of points in (0, 100]")
    path = str(path)
    out = out or _default_out(path)
    check_writable("--out", out)
    res = read_results(path, on_corrupt="skip")
    trials, epochs = res.to_pandas()
    if trials.empty:
        extra = ""
        if res.skipped:
            f, why = res.skipped[0]
            extra = f"; {len(res.skipped)} corrupt file(s), e.g. {f}: {why}"
        raise ConfigError("path", path, "holds no trial results yet (empty sweep)" + extra)

    declared, notes = declared_analysis(path)
    margin = margin if margin is not None else declared["margin"]
    from_cli = bool(family)
    family = family if family else (declared["family"] or None)
    primary = declared["primary"]
    secondary = [o for o in declared["secondary"] if o != primary]
    used, left, search = split_trials(trials)
    used = used.merge(_epoch_means(epochs), on=["sweep", "trial_id"], how="left")
    used = used.merge(_finals(epochs), on=["sweep", "trial_id"], how="left")
    used = used.merge(_source_totals(epochs), on=["sweep", "trial_id"], how="left")
    used.index = range(len(used))
    factors = varying_factors(used) if not used.empty else []
    used["variant"] = variant_labels(used, factors) if not used.empty else []
    if family:
        known = {f for f in factors} | {f.rsplit(".", 1)[-1] for f in factors} | {"method",
                                                                                  "augment.method"}
        bad = [f for f in family if f not in known]
        if bad and from_cli:
            raise ConfigError("--family", bad[0], "must name a factor that varies in this sweep: "
                              + ", ".join(["method", *[short_names(factors)[f] for f in factors]]))
        if bad:  # declared before the runs; not (yet) varying among the completed trials
            notes.append(f"analysis.family names {', '.join(bad)}, which does not vary among "
                         "the trials used: left out of the family.")
            family = [f for f in family if f in known] or None

    same = identical_variants(used) if not used.empty else {}
    table = main_table(used, factors, same)
    per_trial = per_trial_table(used, factors) if not used.empty else pd.DataFrame()
    tables: dict[str, pd.DataFrame] = {"main_table": table, "trials": per_trial}
    if not used.empty:
        tables["settings"] = fixed_settings(used, factors)
    contrasts = one_factor_contrasts(used, factors, same, family, correction, margin, primary)
    tables["contrasts"] = contrast_table(contrasts)
    families = {name: retest(contrasts, used, name, correction) for name in secondary}
    for name, items in families.items():
        tables[f"contrasts_{name}"] = contrast_table(items)
    class_errors, class_note = class_table(contrasts, used, baseline) if not used.empty \
        else (pd.DataFrame(), "")
    if not class_errors.empty:
        tables["class_errors"] = class_errors
    reused = reused_seeds(used)
    if reused:
        notes.append("seeds reused across the pooled sweeps: " + "; ".join(
            f"seed {s} in {', '.join(sw)}" for s, sw in list(reused.items())[:20])
            + (" ..." if len(reused) > 20 else "") + ". Trials that share a seed share their "
            "initialisation and data order: pooled, they are not independent replicates, and "
            "a variant's runs on one seed are averaged before pairing.")
    avoid = set(declared["avoid_seeds"]) & {hashable(s) for s in used.get("seed", [])}
    if avoid:
        notes.append(f"trials use seeds the sweep declared to avoid ({', '.join(map(str, sorted(avoid)))}, "
                     "analysis.avoid_seeds): they were run before the declaration or come from "
                     "another sweep pooled here.")
    diffs, diff_notes = (differences_from(contrasts, used, baseline) if not used.empty
                         else ([], []))
    tables["differences"] = contrast_table(diffs)
    tables.update(factor_tables(used, factors) if not used.empty else {})
    if not search.empty:
        tables["search"] = search_table(search, trials.drop(index=search.index))
    # Importance explains the exploration: the follow-up's few configurations x seeds would
    # only restate how they differ.
    explored = search if not search.empty else trials
    imp_factors = (varying_factors(search) if not search.empty else
                   factors + (["augment.method"] if used["augment.method"].nunique() > 1 else []))
    mode = _sweep_mode(path)
    importance, importance_note = factor_importance(explored, imp_factors, mode)
    tables["importance"] = importance
    early_note = ""
    if importance.empty and mode == "search":
        # Too few ran to the end: what early stopping decided on is still worth knowing.
        frame, reached, column, epoch = rung_target(explored, epochs)
        if epoch:
            early, early_note = factor_importance(
                frame, imp_factors, mode, target=column, rows=reached,
                population=f"trials that reached epoch {epoch}")
            if not early.empty:
                tables["importance_early"] = early
    tables["left_out"] = left
    skipped = list(res.skipped)
    if skipped:
        tables["skipped_files"] = pd.DataFrame(skipped, columns=["file", "reason"])

    remote = "://" in out and not out.startswith("file://")
    if out.startswith("file://"):
        out_dir = Path(_resolve(out)[1])
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="hardmix-report-")) if remote else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    family_text = _family_text(contrasts, family, correction, margin, primary)
    secondary_text = {name: _family_text(items, family, correction, None, name)
                      for name, items in families.items()}
    epochs_used = epochs.merge(used[["sweep", "trial_id", "variant"]], on=["sweep", "trial_id"])
    colors = plots.variant_colors(list(table["variant"]) if not table.empty else [])
    made: dict[str, str] = {}
    members = [c for c in contrasts if not c.excluded]
    for name, fn in (("error_by_variant", lambda p: plots.error_by_variant(table, colors, p)),
                     ("contrasts", lambda p: plots.contrast_forest(
                         members, family_text, p, margin, OUTCOMES[primary])),
                     ("learning_curves", lambda p: plots.learning_curves(used, epochs_used,
                                                                         colors, p)),
                     ("hardness_over_epochs", lambda p: plots.hardness_dynamics(
                         used, epochs_used, colors, p)),
                     ("source_classes", lambda p: plots.source_classes(used, epochs_used, p))):
        if used.empty:
            break
        target = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.tmp.png"
        if fn(tmp) is not None:
            os.replace(tmp, target)
            made[name] = str(target)

    for name, df in tables.items():
        _atomic_write(out_dir / f"{name}.csv", lambda p, df=df: df.to_csv(p, index=False))

    shown = display_table(table)
    summary = _left_out_summary(left, skipped)
    sweeps = ", ".join(res.sweeps)
    verdict_lines = []
    for title, items, text in ([("primary family", members, family_text)]
                               + [("secondary family", [c for c in families[n]
                                                        if not c.excluded], secondary_text[n])
                                  for n in families]):
        if items:
            rows = _comparison_rows(items)
            verdict_lines += ["", f"{title}: {text}",
                              rows.map(lambda v: _fmt(v, 3)).to_string(index=False)]
    terminal = "\n".join([
        f"hardmix report: {sweeps} — {len(used)} of {len(trials)} trials used; left out: {summary}"
        + (f"; {len(search)} of the search phase (see Search)" if not search.empty else ""),
        shown.to_string(index=False) if not shown.empty else "(no completed trials yet)",
        *verdict_lines, *[f"note: {n}" for n in notes],
        f"report: {out.rstrip('/')}/report.md"])

    md = _markdown(dict(path=path, sweeps=sweeps, trials=trials, used=used, left=left,
                        skipped=skipped, factors=factors, shown=shown, same=same,
                        contrasts=contrasts, family_text=family_text, diffs=diffs,
                        diff_notes=diff_notes, tables=tables, importance_note=importance_note,
                        early_note=early_note,
                        search_seeds=search["seed"] if not search.empty else pd.Series([]),
                        made=made, baseline=baseline, primary=primary, secondary=families,
                        secondary_text=secondary_text, class_note=class_note, notes=notes))
    _atomic_write(out_dir / "report.md", lambda p: p.write_text(md))
    written = ["report.md"] + [f"{n}.csv" for n in tables] + [Path(p).name for p in made.values()]
    _atomic_write(out_dir / MANIFEST, lambda p: p.write_text(json.dumps({"files": written})))
    if remote:
        _publish(out_dir, out)
        shutil.rmtree(out_dir, ignore_errors=True)
        made = {k: f"{out.rstrip('/')}/{Path(v).name}" for k, v in made.items()}
    return Report(out=out, path=f"{out.rstrip('/')}/report.md", text=md, main_table=table,
                  tables=tables, plots=made, contrasts=contrasts, differences=diffs,
                  left_out=left, skipped_files=skipped, factors=factors, family=family_text,
                  n_trials=len(trials), n_used=len(used), terminal=terminal,
                  secondary=families, margin=margin, trials=per_trial, notes=notes)


def report_from_cli(path: str, out: str | None = None, baseline: str = "cutmix",
                    family: Optional[str] = None, correction: str = "bonferroni",
                    margin: Optional[float] = None) -> int:
    """``hardmix report``: build the report and print the main table. Exit code 0.

    A missing or empty sweep raises ConfigError (the CLI prints one line and exits 2).
    """
    fam = [f.strip() for f in family.split(",") if f.strip()] if family else None
    report = build_report(path, out=out, baseline=baseline, family=fam, correction=correction,
                          margin=margin)
    print(report.terminal)
    return 0
