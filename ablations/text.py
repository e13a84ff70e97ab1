"""Numbers and tables as text: how the report prints a value, a Markdown table and the main
table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.trial_table import LEFT_OUT_REASONS
from hardmix.metrics import diagnostics


def fmt_number(v: Any, digits: int = 2) -> str:
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
    body = ["| " + " | ".join(fmt_number(v, digits).replace("|", "\\|") for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _ms(mean: float, std: float, n: int) -> str:
    if not n or not np.isfinite(mean):
        return "—"
    return f"{mean:.2f}" if n < 2 or not np.isfinite(std) else f"{mean:.2f} ± {std:.2f}"


DIAG_TITLES = {"hard_share": "hard share", "fallback_rate": "fallback rate",
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
            out[DIAG_TITLES.get(col, col)] = table[col].map(
                lambda v: fmt_number(v, 1 if col == "distinct_sources" else 3))
    out["seeds"] = table["seeds"]
    if table["identical_to"].astype(bool).any():
        out["note"] = [f"identical to {t}" if t else "" for t in table["identical_to"]]
    return out


def left_out_summary(left: pd.DataFrame, skipped: list[tuple[str, str]]) -> str:
    counts = left["reason"].value_counts()
    known = list(LEFT_OUT_REASONS.values())
    order = sorted(counts.index, key=lambda r: (known.index(r) if r in known else len(known), r))
    parts = [f"{counts[reason]} {reason}" for reason in order]
    if skipped:
        parts.append(f"{len(skipped)} corrupt file(s) skipped")
    return ", ".join(parts) if parts else "none"

