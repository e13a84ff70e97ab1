"""A family of contrasts in words: the sentence that states the family (outcome, size,
correction, interval, margin), the comparison rows the terminal and report.md print, and a
family's Markdown section."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ablations.contrasts import Contrast
from ablations.factors import short_names
from ablations.stats import ALPHA, Difference, interval_label, verdict
from ablations.text import md_table
from hardmix.metrics import OUTCOMES


def _ci_text(d: Difference) -> str:
    return "—" if not d.tested else f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"


def family_text(contrasts: list[Contrast], family: Optional[Sequence[str]],
                 correction: str, margin: Optional[float] = None, outcome: str = "top1") -> str:
    """The family in one sentence: outcome, which contrasts, how many, the correction, the
    interval's meaning and the margin."""
    members = sum(1 for c in contrasts if not c.excluded)
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
    elif m == 1:
        how = f"one contrast, tested at {ALPHA:g}"
    else:
        how = "none tested yet (a test needs 2 seeds paired)"
    marg = (f"; margin ±{margin:g} {o.unit} (declared smallest effect of interest)" if margin
            else "; no margin declared: no equivalence verdicts")
    shown = m or members  # before any test: the comparisons the family will hold
    return (f"{o.title}, the {shown} comparison{'s' if shown != 1 else ''} of {which}; "
            f"{how}{marg}")


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


def comparison_rows(items: list[Contrast], with_factor: bool = True) -> pd.DataFrame:
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


def family_section(title: str, items: list[Contrast], family_text: str,
                    limit: int = 80) -> list[str]:
    """A family's Markdown: what it is, its table, one sentence per verdict."""
    lines = [title, "", f"Family: {family_text}.", ""]
    if not items:
        return lines + ["_No contrast in this family._", ""]
    lines += [md_table(comparison_rows(items[:limit]), 3), ""]
    if len(items) > limit:
        lines += [f"... {len(items) - limit} more in the CSV.", ""]
    lines += [f"- {verdict(c.difference, OUTCOMES[c.outcome].title, OUTCOMES[c.outcome].unit)}"
              for c in items if c.difference.tested][:40]
    return lines + [""]

