"""The report in words: ``report.md``, one function per section, and the summary that
``hardmix report`` prints.

Every section is a function of :class:`Context` (the per-trial table's sections, already
computed by :func:`ablations.report.build_report`) that returns its Markdown lines; the document
is the sections in :data:`SECTIONS` order. No section computes a number: each prints what the
tables hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pandas as pd

from ablations import plots
from ablations.contrasts import Contrast
from ablations.factors import INERT, short_names
from ablations.looks import looks_section, sequential_finals
from ablations.tables import seeds_text
from ablations.text import DIAG_TITLES, fmt_number, left_out_summary, md_table
from ablations.verdicts_text import comparison_rows, family_section
from hardmix.metrics import OUTCOMES, diagnostics


@dataclass
class Context:
    """What the document shows: the trials (``trials`` all read, ``used`` in the tables,
    ``left`` left out with why, ``skipped`` corrupt files), the variants (``factors``, the
    main table as ``shown``, ``same`` identical ones), the families (``contrasts`` primary,
    ``secondary`` by outcome, with the sentences ``family_text`` / ``secondary_text``), the
    baseline's view (``diffs``, ``diff_notes``), every table by its file name, the notes and
    the plots made."""

    path: str
    sweeps: str
    trials: pd.DataFrame
    used: pd.DataFrame
    left: pd.DataFrame
    skipped: list[tuple[str, str]]
    factors: list[str]
    shown: pd.DataFrame
    same: dict[str, str]
    contrasts: list[Contrast]
    family_text: str
    diffs: list[Contrast]
    diff_notes: list[str]
    tables: dict[str, pd.DataFrame]
    importance_note: str
    early_note: str
    search_seeds: pd.Series
    made: dict[str, str]
    baseline: str
    primary: str
    secondary: dict[str, list[Contrast]]
    secondary_text: dict[str, str]
    class_note: str = ""
    notes: list[str] = field(default_factory=list)
    search_limits: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _search_count(search: Optional[pd.DataFrame]) -> str:
    if search is None:
        return ""
    return (f" The {len(search)} trials of the search phase are under \"Search\": the "
            "comparisons use the follow-up's re-runs of the configurations it chose.")


def head(ctx: Context) -> list[str]:
    """Title, source, how many trials were used, and how to read the numbers."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = short_names(ctx.factors)
    lines = [f"# HardMix report: {ctx.sweeps}", "",
             f"Source: `{ctx.path}` · generated {now}", "",
             f"**{len(ctx.used)} of {len(ctx.trials)} trials used.** Left out: "
             f"{left_out_summary(ctx.left, ctx.skipped)} (details at the end and in "
             "`left_out.csv`)." + _search_count(ctx.tables.get("search")), ""]
    lines += ["Errors are final test errors in percent (lower is better) at the last epoch, "
              "mean ± sample std over the seeds of a variant (n). No number in this report is "
              "selected on the test set. A variant is the method plus the factors that vary in "
              "this sweep" + (f" ({', '.join(names.values())})" if ctx.factors else "") +
              f"; a factor that has no effect on a method shows as {INERT} and does not split "
              "it.", ""]
    return lines


def main_section(ctx: Context) -> list[str]:
    """The main table, the diagnostics' meaning, identical variants, what is held fixed."""
    lines = ["## Main table", "", md_table(ctx.shown) if not ctx.shown.empty else
             "_No completed trials yet._", ""]
    diag = [DIAG_TITLES.get(c, c) for c in diagnostics()]
    lines += [f"Diagnostics ({', '.join(diag)}): means over epochs, then over seeds; — where "
              "they do not apply to the method. Fallback rate: share of mixed steps where the "
              "batch had fewer than min_hard hard samples; hard share: share of the batch that "
              "was hard.", ""]
    if ctx.same:
        lines += ["**Identical variants.** These trained exactly like another variant on every "
                  "seed, so the setting that tells them apart did nothing here; they are left "
                  "out of every comparison:", ""]
        lines += [f"- {v} = {w}" for v, w in ctx.same.items()] + [""]
    settings = ctx.tables.get("settings")
    if settings is not None and not settings.empty:
        lines += ["**Held fixed** (shared by every trial used, so the variant names leave it "
                  "out; `settings.csv`):", ""]
        for scope, sub in settings.groupby("scope", sort=False):
            pairs = ", ".join(f"{f.removeprefix('augment.')}={v}"
                              for f, v in zip(sub["field"], sub["value"]))
            lines.append(f"- {scope}: {pairs}")
        lines.append("")
    return lines


def comparisons(ctx: Context) -> list[str]:
    """The families: how to read a verdict, the primary family, what was left out of it, the
    secondary families and the per-class table."""
    lines = ["## Comparisons", ""]
    members = [c for c in ctx.contrasts if not c.excluded]
    o = OUTCOMES[ctx.primary]
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
    if ctx.notes:
        lines += [f"**Note.** {n}" for n in ctx.notes] + [""]
    finals = sequential_finals(ctx.tables)
    if finals:
        lines += ["**Sequential seeds: these verdicts stand.** The seeds are added in rounds "
                  "until each primary contrast is resolved (the design and its path: "
                  "Sequential seeds, below). The tables of this section test the final seeds "
                  "as if their number had been fixed in advance; it was not, so for the "
                  "primary contrasts the sequential verdicts are the answer:", ""]
        lines += [f"- {v['text']}." for v in finals.values()] + [""]
    lines += family_section(f"### Primary family: {o.title}", members, ctx.family_text)
    if not members:
        lines[-2:-2] = ["_No two variants differ in exactly one factor (or every such pair was "
                        "left out below)._"]
    out = [c for c in ctx.contrasts if c.excluded and c.excluded != "outside the family"]
    if out:
        lines += ["Left out of the family (they cannot show a difference by construction):", ""]
        lines += [f"- {c.difference.variant} vs {c.difference.baseline}: {c.excluded}"
                  for c in out] + [""]
    for name, items in ctx.secondary.items():
        lines += family_section(f"### Secondary family: {OUTCOMES[name].title}",
                                [c for c in items if not c.excluded], ctx.secondary_text[name])
        lines += [f"- Left out: {c.difference.variant} vs {c.difference.baseline}: {c.excluded}."
                  for c in items if c.excluded]
        lines += [""] if any(c.excluded for c in items) else []
    if ctx.class_note:
        lines += ["### Per-class test error of the primary method contrast", "",
                  ctx.class_note, ""]
        if "class_errors" in ctx.tables:
            lines += [md_table(ctx.tables["class_errors"], 2), ""]
    return lines


def against_baseline(ctx: Context) -> list[str]:
    """Each variant against its matched baseline-method variant."""
    lines = [f"## Against {ctx.baseline}", ""]
    if ctx.diffs:
        lines += [f"Each variant against the `{ctx.baseline}` variant that matches it on "
                  "every shared factor: the method comparisons of the primary family, with the "
                  f"same intervals and verdicts ({ctx.family_text}).", ""]
        lines += [md_table(comparison_rows(ctx.diffs, with_factor=False), 3), ""]
    lines += [f"- {n}" for n in ctx.diff_notes]
    if not ctx.diffs and not ctx.diff_notes:
        lines += ["_Nothing to compare._"]
    return lines + [""]


def factors_section(ctx: Context) -> list[str]:
    """Marginal means per factor (descriptive)."""
    factor_names = [n for n in ctx.tables if n.startswith("factor_")]
    if not factor_names:
        return []
    lines = ["## Factors (descriptive)", "", "Marginal means over the other factors "
             "(top-1 error, %). In a sweep of arms they mix settings; the comparisons "
             "above are what answer an ablation.", ""]
    for name in factor_names:
        lines += [f"### {name.replace('factor_', '').replace('_', ' ')}", "",
                  md_table(ctx.tables[name]), ""]
    return lines


def search_section(ctx: Context) -> list[str]:
    """A followed-up search's exploration, and what its early stopping and its choice can and
    cannot tell (:mod:`ablations.search_limits`)."""
    search = ctx.tables.get("search")
    lines = []
    if search is not None:
        lines += ["## Search", "", f"The configurations the search tried, one run each "
                  f"(seed {seeds_text(ctx.search_seeds)}), longest-running first, then by "
                  "validation error at the epoch each reached: ASHA stops most of them early, "
                  "and an error at an early rung is not comparable with a final one. No test "
                  "error is shown: these runs chose the follow-up's configurations (by the "
                  "validation error of the full-length runs), and the tables above use only "
                  "the follow-up's re-runs, which took no part in that choice.", "",
                  md_table(search, 2), ""]
    if ctx.search_limits:
        lines += ([] if search is not None else ["## Search", ""]) + ctx.search_limits
    return lines


def importance_section(ctx: Context) -> list[str]:
    """Factor importance, and at an early rung where too few trials ran to the end."""
    lines = ["## Factor importance", "", ctx.importance_note, ""]
    if not ctx.tables["importance"].empty:
        lines += [md_table(ctx.tables["importance"], 3), ""]
    if ctx.early_note:
        lines += ["### At an early rung", "", "What early stopping decided on, not the final "
                  "error: the validation error at the latest epoch that enough trials reached. "
                  "A factor that slows early learning but pays off by the end (stronger "
                  "mixing often does) counts against itself here.", "", ctx.early_note, ""]
        if "importance_early" in ctx.tables:
            lines += [md_table(ctx.tables["importance_early"], 3), ""]
    return lines


def plots_section(ctx: Context) -> list[str]:
    if not ctx.made:
        return []
    lines = ["## Plots", ""]
    for name, p in ctx.made.items():
        lines += [f"### {plots.TITLES.get(name, name)}", "", f"![{name}]({Path(p).name})", ""]
    return lines


def left_out_section(ctx: Context) -> list[str]:
    lines = ["## Left out", ""]
    lines += [md_table(ctx.left) if not ctx.left.empty else "_No trial left out._", ""]
    if ctx.skipped:
        lines += ["Corrupt files (skipped):", ""]
        lines += [f"- `{f}`: {why}" for f, why in ctx.skipped] + [""]
    return lines


#: report.md, top to bottom.
SECTIONS = (head, main_section, comparisons, looks_section, against_baseline, factors_section,
            search_section, importance_section, plots_section, left_out_section)


def markdown(ctx: Context) -> str:
    """report.md: the sections of :data:`SECTIONS` in order."""
    return "\n".join(line for section in SECTIONS for line in section(ctx))


def terminal(ctx: Context, out: str, n_search: int) -> str:
    """What ``hardmix report`` prints: how many trials were used, the main table, every
    family's comparison rows, the notes and where report.md is."""
    members = [c for c in ctx.contrasts if not c.excluded]
    verdict_lines = []
    for title, items, text in ([("primary family", members, ctx.family_text)]
                               + [("secondary family", [c for c in ctx.secondary[n]
                                                        if not c.excluded], ctx.secondary_text[n])
                                  for n in ctx.secondary]):
        if items:
            rows = comparison_rows(items)
            verdict_lines += ["", f"{title}: {text}",
                              rows.map(lambda v: fmt_number(v, 3)).to_string(index=False)]
    return "\n".join([
        f"hardmix report: {ctx.sweeps} — {len(ctx.used)} of {len(ctx.trials)} trials used; "
        f"left out: {left_out_summary(ctx.left, ctx.skipped)}"
        + (f"; {n_search} of the search phase (see Search)" if n_search else ""),
        ctx.shown.to_string(index=False) if not ctx.shown.empty else "(no completed trials yet)",
        *verdict_lines, *[f"note: {n}" for n in ctx.notes],
        *[f"warning: {w}" for w in ctx.warnings],
        f"report: {out.rstrip('/')}/report.md"])
