"""``hardmix report``: turn a sweep's Parquet results into the tables and plots of a paper.

:func:`build_report` reads a sweep folder (or a folder of sweeps, local or URI), keeps the
completed trials, groups them into variants (``augment.method`` + the config columns that vary
within the sweep, seed excluded; see :mod:`ablations.factors`) and writes into
``<sweep>/report/`` (or ``out``):

* ``report.md`` — everything below, with the verdicts in plain words;
* ``main_table.csv`` — the paper's Table-1 shape: one row per variant, mean ± std final test
  top-1 / top-5 error over seeds, n, and how often the fallback fired / how hard the batches were;
* ``differences.csv`` — each variant minus the baseline method (default ``cutmix``), paired by
  seed where seeds match, 95% CI Holm-corrected over the comparisons (:mod:`ablations.stats`);
* ``contrasts.csv`` — every pair of variants that differ in exactly one factor (the method
  included): the effect of that one change, paired by seed, Holm-corrected over the family;
* ``factor_<name>.csv`` per varying factor, ``criterion_x_fallback.csv``, ``alpha_by_criterion.csv``;
* ``importance.csv`` — Optuna factor importance over full-length trials (:mod:`ablations.importance`);
* ``left_out.csv`` — every trial not in the tables and why (running, failed, pruned, ...), and
  ``skipped_files.csv`` for corrupt files;
* PNG plots (:mod:`ablations.plots`).

Works on a running or partly failed sweep: only completed trials enter the tables and the report
says how many it left out and why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ablations import plots
from ablations.factors import (HARD_SOURCE, INERT, factor_frame, fmt_value, hashable, is_relevant,
                               method_order, relevance, short_names, variant_labels,
                               varying_factors)
from ablations.importance import factor_importance
from ablations.stats import (Difference, as_record, difference, holm, mean_std_text, summarize,
                             verdict)
from ablations.store import _resolve, read_results
from hardmix.config import METHODS, ConfigError, RunConfig, flatten

#: Why a trial is not in the tables, by status.
LEFT_OUT_REASONS = {"running": "still running", "failed": "failed", "pruned": "pruned (stopped early)"}

#: Files a report writes (a re-run removes its own earlier outputs, nothing else).
_OWN_PATTERNS = ("report.md", "*.csv", "*.png")


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
    differences: list[Difference] = field(default_factory=list)
    left_out: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    factors: list[str] = field(default_factory=list)
    n_trials: int = 0
    n_used: int = 0
    terminal: str = ""


# --------------------------------------------------------------------------------------------
# Selecting trials
# --------------------------------------------------------------------------------------------


def split_trials(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(used, left_out)``: completed trials with a final error, and the rest with a reason."""
    finite = np.isfinite(pd.to_numeric(trials["final_top1_err"], errors="coerce").astype(float))
    used_mask = (trials["status"] == "completed") & finite
    left = trials.loc[~used_mask, ["sweep", "trial_id", "status", "error"]].copy()
    left["reason"] = [
        LEFT_OUT_REASONS.get(s, f"status {s}") if s != "completed"
        else "completed without a final test error"
        for s in left["status"]]
    left["error"] = [(str(e).splitlines() or [""])[0] if isinstance(e, str) else "" for e in left["error"]]
    return trials.loc[used_mask].copy(), left[["sweep", "trial_id", "status", "reason", "error"]]


def _epoch_means(epochs: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("fallback_rate", "hard_share", "mixed_rate", "distinct_sources")
            if c in epochs]
    if epochs.empty:
        return pd.DataFrame(columns=["sweep", "trial_id", *cols])
    return epochs.groupby(["sweep", "trial_id"], as_index=False)[cols].mean()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _seeds_text(seeds: pd.Series) -> str:
    return ",".join(str(s) for s in sorted({hashable(s) for s in seeds}, key=str))


def main_table(used: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """One row per variant: mean ± std over seeds of final test top-1 / top-5 error, n, and
    the mean per-trial fallback rate, hard share and source diversity."""
    frame = factor_frame(used, factors)
    rows = []
    for variant, g in used.groupby("variant", sort=False):
        top1, top5 = summarize(g["final_top1_err"]), summarize(g["final_top5_err"])
        best = summarize(g["best_top1_err"])
        row: dict[str, Any] = {"variant": variant, "method": g["augment.method"].iloc[0]}
        row.update({f: frame.loc[g.index[0], f] for f in factors})
        row.update(n=top1.n, seeds=_seeds_text(g["seed"]) if "seed" in g else "",
                   top1_mean=top1.mean, top1_std=top1.std, top5_mean=top5.mean,
                   top5_std=top5.std, best_top1_mean=best.mean)
        for col in ("fallback_rate", "hard_share", "distinct_sources"):
            row[col] = float(g[col].mean()) if col in g and g[col].notna().any() else np.nan
        rows.append(row)
    cols = ["variant", "method", *factors, "n", "seeds", "top1_mean", "top1_std", "top5_mean",
            "top5_std", "best_top1_mean", "fallback_rate", "hard_share", "distinct_sources"]
    table = pd.DataFrame(rows, columns=cols)
    if table.empty:
        return table
    order = table["method"].map(method_order)
    return table.assign(_o=order).sort_values(["_o", "variant"]).drop(columns="_o") \
        .reset_index(drop=True)


def _cell(values: pd.Series) -> str:
    s = summarize(values)
    return f"{mean_std_text(s)} (n={s.n})"


def factor_tables(used: pd.DataFrame, factors: list[str]) -> dict[str, pd.DataFrame]:
    """Marginal tables: per factor (by method), criterion × fallback, α per criterion."""
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

    hard = used[used["augment.method"].isin(HARD_SOURCE)]
    if ({"augment.criterion", "augment.fallback"} & set(factors)) and not hard.empty:
        frame = factor_frame(hard, ["augment.criterion", "augment.fallback"])
        pivot = (hard.assign(criterion=frame["augment.criterion"], fallback=frame["augment.fallback"])
                 .groupby(["criterion", "fallback"])["final_top1_err"].apply(_cell)
                 .unstack("fallback").fillna(""))
        out["criterion_x_fallback"] = pivot.reset_index()

    if "augment.alpha" in factors:
        t = used[relevance(used, "augment.alpha")]
        line = np.where(t["augment.method"].isin(HARD_SOURCE),
                        t["augment.method"] + " / " + t["augment.criterion"].astype(str),
                        t["augment.method"])
        pivot = (t.assign(line=line).groupby(["augment.alpha", "line"])["final_top1_err"]
                 .apply(_cell).unstack("line").fillna(""))
        pivot.index = [fmt_value(a) for a in pivot.index]
        out["alpha_by_criterion"] = pivot.rename_axis("alpha").reset_index()
    return out


def _mode(values: pd.Series) -> Any:
    vals = [hashable(v) for v in values]
    return max(set(vals), key=lambda v: (vals.count(v), str(v)))


def compare_to_baseline(used: pd.DataFrame, factors: list[str], baseline: str
                        ) -> tuple[list[Difference], list[str]]:
    """Holm-corrected differences of every variant against its baseline-method variant.

    With one baseline variant every variant is compared with it; with several (the baseline
    method's own factors vary), each variant is compared with the baseline variant that has
    the same values of those factors. Returns ``(differences, notes)``.
    """
    notes: list[str] = []
    base = used[used["augment.method"] == baseline]
    if base.empty:
        return [], [f"No completed `{baseline}` trials: no differences against the baseline."]
    base_variants = {v: g for v, g in base.groupby("variant", sort=False)}
    diffs: list[Difference] = []
    others = used[used["augment.method"] != baseline]
    for variant, g in sorted(others.groupby("variant", sort=False),
                             key=lambda kv: (method_order(kv[1]["augment.method"].iloc[0]), kv[0])):
        if len(base_variants) == 1:
            (bname, bg), = base_variants.items()
        else:
            matches = []
            for bname, bg in base_variants.items():
                brow = bg.iloc[0]
                cols = [f for f in factors if is_relevant(f, brow)]
                if all(_mode(g[f]) == hashable(brow[f]) for f in cols):
                    matches.append((bname, bg))
            if len(matches) != 1:
                notes.append(f"{variant}: no single matching `{baseline}` variant "
                             f"({len(matches)} candidates); not compared.")
                continue
            bname, bg = matches[0]
        seeds = g["seed"] if "seed" in g else pd.Series(range(len(g)))
        bseeds = bg["seed"] if "seed" in bg else pd.Series(range(len(bg)))
        diffs.append(difference(variant, g["final_top1_err"].tolist(), seeds.tolist(),
                                bname, bg["final_top1_err"].tolist(), bseeds.tolist()))
    return holm(diffs), notes


@dataclass
class Contrast:
    """One-factor contrast: ``variant − reference`` where the two differ in ``factor`` only."""

    factor: str
    reference_value: Any
    value: Any
    difference: Difference


#: The paper's HardMix as the library's defaults: the setting an ablation departs from.
_DEFAULTS = {k: hashable(v) for k, v in flatten(RunConfig()).items()}


def _reference_first(factor: str, a: Any, b: Any, counts: dict[Any, int]) -> bool:
    """Whether ``a`` is the reference side of a contrast over ``factor``: for the method, the
    one earlier in :data:`METHODS` (none < CutMix < HardMix); otherwise the library's default
    (the paper's setting: fallback random, min_hard 1, signal forward, ...), else the factor's
    most common value in the sweep."""
    if factor == "augment.method":
        return method_order(a) <= method_order(b)
    default = _DEFAULTS.get(factor)
    if default in (a, b) and a != b:
        return a == default
    return (-counts.get(a, 0), str(a)) <= (-counts.get(b, 0), str(b))


def one_factor_contrasts(used: pd.DataFrame, factors: list[str]) -> list[Contrast]:
    """Every pair of variants whose configurations differ in exactly one factor (the method
    counts as one), as ``variant − reference``, Holm-corrected over the whole family.

    This is what an ablation asks: the effect of changing one thing with the rest held fixed
    (HardMix − CutMix, skip − random at the same min_hard, cached − forward at the same prob),
    instead of marginal means that average over the other factors. A factor that acts on both
    sides must have the same value; one that acts on neither is ignored; one that acts on one
    side only (the fallback of HardMix against CutMix) counts as held fixed only where that
    side keeps the library's default (the paper's setting), so a pair never hides a second
    change.
    """
    cols = ["augment.method"] + [f for f in factors if f != "augment.method"]
    if used.empty:
        return []
    groups = dict(tuple(used.groupby("variant", sort=False)))
    reps = {v: {c: _mode(g[c]) for c in cols} for v, g in groups.items()}
    acts = {v: {c: is_relevant(c, g.iloc[0]) for c in cols} for v, g in groups.items()}
    counts = {c: used.loc[relevance(used, c), c].map(hashable).value_counts().to_dict()
              for c in cols}

    def changed(a: str, b: str, c: str) -> bool:
        if acts[a][c] and acts[b][c]:
            return reps[a][c] != reps[b][c]
        if acts[a][c] or acts[b][c]:  # factors are config columns, so each has a default
            side = a if acts[a][c] else b
            return reps[side][c] != _DEFAULTS[c]
        return False

    names = sorted(groups, key=lambda v: (method_order(reps[v]["augment.method"]), v))
    found: list[tuple[str, Any, Any, str, str]] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = [c for c in cols if changed(a, b, c)]
            if len(diff) != 1 or not (acts[a][diff[0]] and acts[b][diff[0]]):
                continue
            c = diff[0]
            ref, var = (a, b) if _reference_first(c, reps[a][c], reps[b][c], counts[c]) else (b, a)
            found.append((c, reps[ref][c], reps[var][c], ref, var))
    diffs = []
    for _, _, _, ref, var in found:
        g, bg = groups[var], groups[ref]
        diffs.append(difference(var, g["final_top1_err"].tolist(), g["seed"].tolist(),
                                ref, bg["final_top1_err"].tolist(), bg["seed"].tolist()))
    diffs = holm(diffs)
    return [Contrast(c, rv, v, d) for (c, rv, v, _, _), d in zip(found, diffs)]


def contrast_table(contrasts: list[Contrast]) -> pd.DataFrame:
    names = short_names(sorted({c.factor for c in contrasts}))
    rows = []
    for c in contrasts:
        d = c.difference
        rows.append({"factor": names.get(c.factor, c.factor),
                     "change": f"{fmt_value(c.reference_value)} → {fmt_value(c.value)}",
                     "reference": d.baseline, "n": d.n, "delta_top1": d.diff,
                     "ci_low": d.ci_low, "ci_high": d.ci_high, "p_holm": d.p_holm,
                     "distinguishable": d.distinguishable, "test": d.kind})
    return pd.DataFrame(rows, columns=["factor", "change", "reference", "n", "delta_top1",
                                       "ci_low", "ci_high", "p_holm", "distinguishable", "test"])


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
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


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The main table as shown: ``mean ± std`` text columns."""
    if table.empty:
        return table
    out = pd.DataFrame({"variant": table["variant"], "n": table["n"]})
    out["top-1 err (%)"] = [_ms(m, s, n) for m, s, n in
                            zip(table["top1_mean"], table["top1_std"], table["n"])]
    out["top-5 err (%)"] = [_ms(m, s, n) for m, s, n in
                            zip(table["top5_mean"], table["top5_std"], table["n"])]
    out["fallback rate"] = table["fallback_rate"].map(lambda v: _fmt(v, 3))
    out["hard share"] = table["hard_share"].map(lambda v: _fmt(v, 3))
    out["seeds"] = table["seeds"]
    return out


def _ms(mean: float, std: float, n: int) -> str:
    if not n or not np.isfinite(mean):
        return "—"
    return f"{mean:.2f}" if n < 2 or not np.isfinite(std) else f"{mean:.2f} ± {std:.2f}"


def _left_out_summary(left: pd.DataFrame, skipped: list[tuple[str, str]]) -> str:
    counts = left["reason"].value_counts()
    known = list(LEFT_OUT_REASONS.values())
    order = sorted(counts.index, key=lambda r: (known.index(r) if r in known else len(known), r))
    parts = [f"{counts[reason]} {reason}" for reason in order]
    if skipped:
        parts.append(f"{len(skipped)} corrupt file(s) skipped")
    return ", ".join(parts) if parts else "none"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _default_out(path: str) -> str:
    return path.rstrip("/") + "/report" if "://" in path else str(Path(path) / "report")


def _clear_previous(folder: Path) -> None:
    """Remove this report's own earlier outputs (stale plots must not linger)."""
    if not (folder / "report.md").exists():
        return
    for pattern in _OWN_PATTERNS:
        for p in folder.glob(pattern):
            p.unlink()


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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def build_report(path: str, out: str | None = None, baseline: str = "cutmix") -> Report:
    """Read the sweep at ``path`` and write report.md, CSV tables and PNGs into ``out``
    (default ``<path>/report``). Raises ConfigError on a missing or empty sweep."""
    if baseline not in METHODS:
        raise ConfigError("--baseline", baseline, f"must be one of {', '.join(METHODS)}")
    path = str(path)
    res = read_results(path, on_corrupt="skip")
    trials, epochs = res.to_pandas()
    if trials.empty:
        extra = ""
        if res.skipped:
            f, why = res.skipped[0]
            extra = f"; {len(res.skipped)} corrupt file(s), e.g. {f}: {why}"
        raise ConfigError("path", path, "holds no trial results yet (empty sweep)" + extra)

    used, left = split_trials(trials)
    used = used.merge(_epoch_means(epochs), on=["sweep", "trial_id"], how="left")
    used.index = range(len(used))
    factors = varying_factors(used) if not used.empty else []
    used["variant"] = variant_labels(used, factors) if not used.empty else []

    table = main_table(used, factors)
    tables: dict[str, pd.DataFrame] = {"main_table": table}
    diffs, diff_notes = compare_to_baseline(used, factors, baseline) if not used.empty else ([], [])
    tables["differences"] = pd.DataFrame([as_record(d) for d in diffs],
                                         columns=list(as_record(Difference("", "", "too_small", 0,
                                                                           0, np.nan)).keys()))
    contrasts = one_factor_contrasts(used, factors)
    tables["contrasts"] = contrast_table(contrasts)
    tables.update(factor_tables(used, factors) if not used.empty else {})
    imp_factors = factors + (["augment.method"] if used["augment.method"].nunique() > 1 else [])
    importance, importance_note = factor_importance(trials, imp_factors)
    tables["importance"] = importance
    tables["left_out"] = left
    skipped = list(res.skipped)
    if skipped:
        tables["skipped_files"] = pd.DataFrame(skipped, columns=["file", "reason"])

    out = out or _default_out(path)
    remote = "://" in out and not out.startswith("file://")
    if out.startswith("file://"):
        out_dir = Path(_resolve(out)[1])
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="hardmix-report-")) if remote else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    epochs_used = epochs.merge(used[["sweep", "trial_id", "variant"]], on=["sweep", "trial_id"])
    made: dict[str, str] = {}
    for name, fn in (("learning_curves", lambda p: plots.learning_curves(used, epochs_used, p)),
                     ("error_vs_alpha", lambda p: plots.error_vs_alpha(used, p)),
                     ("fallback_box", lambda p: plots.box_per_fallback(used, p)),
                     ("hardness_over_epochs", lambda p: plots.hardness_dynamics(used, epochs_used, p)),
                     ("source_classes", lambda p: plots.source_classes(epochs_used, p))):
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
    terminal = "\n".join([
        f"hardmix report: {sweeps} — {len(used)} of {len(trials)} trials used; left out: {summary}",
        shown.to_string(index=False) if not shown.empty else "(no completed trials yet)",
        f"report: {out.rstrip('/')}/report.md"])

    md = _markdown(path, sweeps, trials, used, left, skipped, factors, table, shown, diffs,
                   diff_notes, tables, importance_note, made, baseline, contrasts)
    _atomic_write(out_dir / "report.md", lambda p: p.write_text(md))
    if remote:
        _publish(out_dir, out)
        shutil.rmtree(out_dir, ignore_errors=True)
        made = {k: f"{out.rstrip('/')}/{Path(v).name}" for k, v in made.items()}
    return Report(out=out, path=f"{out.rstrip('/')}/report.md", text=md, main_table=table, tables=tables, plots=made,
                  differences=diffs, left_out=left, skipped_files=skipped, factors=factors,
                  n_trials=len(trials), n_used=len(used), terminal=terminal)


def _contrast_lines(contrasts: list[Contrast], table: pd.DataFrame,
                    limit: int = 60) -> list[str]:
    """The Markdown section of :func:`one_factor_contrasts` (``table``: its
    :func:`contrast_table`)."""
    lines = ["## One-factor contrasts", ""]
    if not contrasts:
        return lines + ["_No two variants differ in exactly one factor._", ""]
    shown = pd.DataFrame({
        "factor": table["factor"], "change": table["change"], "with the rest as in": table["reference"],
        "n": table["n"], "Δ top-1 (points)": table["delta_top1"],
        "95% CI (Holm)": [("—" if not c.difference.tested else
                           f"[{c.difference.ci_low:+.2f}, {c.difference.ci_high:+.2f}]")
                          for c in contrasts],
        "distinguishable": [("n too small" if not c.difference.tested else
                             "yes" if c.difference.distinguishable else "no")
                            for c in contrasts]})
    lines += ["Pairs of variants that differ in exactly one factor: the effect of that change "
              "with everything else held fixed. Δ = after − before (negative: the change lowers "
              "the error); the reference side is the earlier method (none < CutMix < HardMix) or "
              "the library's default (the paper's setting). Paired by seed, Holm-corrected over "
              f"all {len(contrasts)} contrasts.", ""]
    lines += [md_table(shown.head(limit), 3), ""]
    if len(contrasts) > limit:
        lines += [f"... {len(contrasts) - limit} more in `contrasts.csv`.", ""]
    return lines


def _markdown(path, sweeps, trials, used, left, skipped, factors, table, shown, diffs,
              diff_notes, tables, importance_note, made, baseline, contrasts=()) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = short_names(factors)
    lines = [f"# HardMix report: {sweeps}", "",
             f"Source: `{path}` · generated {now}", "",
             f"**{len(used)} of {len(trials)} trials used.** Left out: "
             f"{_left_out_summary(left, skipped)} (details at the end and in `left_out.csv`).", ""]
    lines += ["Errors are final test errors in percent (lower is better), mean ± sample std over "
              "the trials of a variant (n). A variant is the method plus the factors that vary in "
              "this sweep" + (f" ({', '.join(names.values())})" if factors else "") +
              "; a factor that has no effect on a method (e.g. the criterion of CutMix) shows "
              f"as {INERT} and does not split it.", ""]
    lines += ["## Main table", "", md_table(shown) if not shown.empty else
              "_No completed trials yet._", ""]
    lines += [f"Full precision, best-epoch error and source diversity: `main_table.csv`. "
              "Fallback rate: share of steps where the batch had too few hard samples and the "
              "fallback fired (mean over epochs and seeds); hard share: share of the batch that "
              "was hard.", ""]

    lines += [f"## Differences against {baseline}", ""]
    if diffs:
        rows = pd.DataFrame([{"variant": d.variant, "vs": d.baseline, "test": d.kind,
                              "n": d.n, "Δ top-1 (points)": d.diff,
                              "95% CI (Holm)": ("—" if not d.tested else
                                                f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"),
                              "p (Holm)": d.p_holm,
                              "distinguishable": ("n too small" if not d.tested else
                                                  "yes" if d.distinguishable else "no")}
                             for d in diffs])
        lines += [md_table(rows, 3), ""]
        lines += [f"- {verdict(d)}" for d in diffs]
        lines += ["", "Δ = variant − baseline. Paired by seed where the two share at least two "
                  "seeds, Welch otherwise; intervals use Holm's step-down levels, so an interval "
                  "excludes 0 exactly when the difference is distinguishable from noise at a "
                  "family-wise 5%.", ""]
    lines += [f"- {n}" for n in diff_notes]
    if not diffs and not diff_notes:
        lines += ["_Nothing to compare._"]
    lines += [""]

    lines += _contrast_lines(list(contrasts), tables["contrasts"])

    factor_names = [n for n in tables if n.startswith("factor_") or n in
                    ("criterion_x_fallback", "alpha_by_criterion")]
    if factor_names:
        lines += ["## Factors", "", "Marginal means over the other factors (top-1 error, %).", ""]
        for name in factor_names:
            lines += [f"### {name.replace('factor_', '').replace('_', ' ')}", "",
                      md_table(tables[name]), ""]

    lines += ["## Factor importance", "", importance_note + ".", ""]
    if not tables["importance"].empty:
        lines += [md_table(tables["importance"], 3), ""]

    if made:
        lines += ["## Plots", ""]
        titles = {"learning_curves": "Learning curves", "error_vs_alpha": "Error against α",
                  "fallback_box": "Error per fallback", "hardness_over_epochs":
                  "Hard share, fallback rate and source diversity over epochs",
                  "source_classes": "How often each class served as a source"}
        for name, p in made.items():
            lines += [f"### {titles.get(name, name)}", "", f"![{name}]({Path(p).name})", ""]

    lines += ["## Left out", ""]
    lines += [md_table(left) if not left.empty else "_No trial left out._", ""]
    if skipped:
        lines += ["Corrupt files (skipped):", ""]
        lines += [f"- `{f}`: {why}" for f, why in skipped] + [""]
    return "\n".join(lines)


def report_from_cli(path: str, out: str | None = None, baseline: str = "cutmix") -> int:
    """``hardmix report``: build the report and print the main table. Exit code 0.

    A missing or empty sweep raises ConfigError (the CLI prints one line and exits 2).
    """
    report = build_report(path, out=out, baseline=baseline)
    print(report.terminal)
    return 0
