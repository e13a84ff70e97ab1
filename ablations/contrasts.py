"""One-factor contrasts: which pairs of variants a report compares, in which direction, and
which of them form the family that is tested together.

:func:`one_factor_contrasts` finds every pair of variants that differ in exactly one factor
they share and tests the family (:mod:`ablations.stats`); :func:`retest` takes those contrasts
to a secondary outcome; :func:`differences_from` sees them from the baseline method;
:func:`contrast_table` is their CSV. All are functions of the per-trial table
(:mod:`ablations.trial_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ablations.factors import fmt_value, hashable, is_relevant, method_order, relevance, short_names
from ablations.stats import ALPHA, Difference, correct, difference, verdict
from hardmix.config import RunConfig, flatten
from hardmix.methods import SWITCHES
from hardmix.metrics import OUTCOMES, witness_of


#: The paper's HardMix as the library's defaults: the setting an ablation departs from.
_DEFAULTS = {k: hashable(v) for k, v in flatten(RunConfig()).items()}


_SWITCH_COLS = tuple(f"augment.{s}" for s in SWITCHES)


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


def _mode(values: pd.Series) -> Any:
    vals = [hashable(v) for v in values]
    return max(set(vals), key=lambda v: (vals.count(v), str(v)))


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

