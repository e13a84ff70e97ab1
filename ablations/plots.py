"""PNG plots of a sweep (matplotlib, Agg backend: no display needed), made for a paper.

Every variant keeps one colour across every figure of a report (:func:`variant_colors`, in the
main table's order); legends sit outside the axes, below them, so they never cover a curve or
get clipped; every band and error bar says what it is (mean ± std or a 95% interval, over how
many seeds). Each function writes one PNG and returns its path, or None when the plot has
nothing to show.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats as sps  # noqa: E402

from ablations.factors import HARD_SOURCE  # noqa: E402

#: Curves get unreadable beyond this many variants: learning curves show the best ones.
MAX_LINES = 10
#: Runs shorter than this get no panel zoomed on their last 20% of epochs.
MIN_ZOOM_EPOCHS = 10
TITLES = {"error_by_variant": "Final test error per variant",
          "contrasts": "One-factor contrasts",
          "learning_curves": "Learning curves",
          "hardness_over_epochs": "Hard share, fallback rate (where it applies) and source "
                                  "diversity over epochs",
          "source_classes": "How often each class served as a source"}


def variant_colors(variants: Sequence[str]) -> dict[str, tuple]:
    """One colour per variant, in the given (main table) order."""
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def _wrap(text: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _save(fig, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps outside legends in the image
    plt.close(fig)
    return path


def _legend_below(fig, handles, labels, ncol: int = 2) -> None:
    if handles:
        fig.legend(handles, [_wrap(lab, 55) for lab in labels], loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(ncol, len(labels)), fontsize=8,
                   frameon=False)


def _t_half(std: float, n: int) -> float:
    return float(sps.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n >= 2 and np.isfinite(std) \
        else float("nan")


def error_by_variant(table: pd.DataFrame, colors: dict, path: Path) -> Path | None:
    """Final test top-1 error per variant: mean with its 95% t-interval over seeds (points, not
    box plots: a handful of seeds per variant), n beside each point."""
    if table.empty:
        return None
    t = table.iloc[::-1].reset_index(drop=True)  # first variant on top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(t) + 1.6))
    for i, r in t.iterrows():
        half = _t_half(r["top1_std"], int(r["n"]))
        # An error rate is never below 0: the interval is cut there, not drawn past it.
        xerr = None if math.isnan(half) else [[min(half, r["top1_mean"])], [half]]
        ax.errorbar(r["top1_mean"], i, xerr=xerr, fmt="o",
                    color=colors.get(r["variant"]), capsize=3, ms=5)
        ax.annotate(f"n={int(r['n'])}", (r["top1_mean"], i), xytext=(6, 4),
                    textcoords="offset points", fontsize=7, color="0.3")
    ax.set_yticks(range(len(t)), [_wrap(v, 55) for v in t["variant"]], fontsize=8)
    ax.set(xlabel="final test top-1 error (%): mean and 95% interval over seeds",
           title="Final test error per variant")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue",
                  "undetermined": "0.45", "continue": "tab:purple"}


def contrast_forest(contrasts: Sequence, family: str, path: Path, margin: float | None = None,
                    outcome=None, sequential: dict | None = None) -> Path | None:
    """Δ of every compared pair with its family's interval, named in the title (simultaneous
    or per-comparison), coloured by verdict; with a margin, the band ±margin and, thick, the
    (1 − 2·level) interval the equivalence test reads. A line at 0. ``sequential``
    (:func:`ablations.looks.sequential_finals`): for the contrasts an until-resolved sweep
    decided, the repeated confidence interval of their last look, dashed just below, coloured
    by the sequential verdict, which stands."""
    items = [c for c in contrasts if c.difference.tested]
    if not items:
        return None
    title_metric = getattr(outcome, "title", "top-1 error")
    unit = getattr(outcome, "unit", "points")
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(items) + 2.2))
    labels, dashed = [], []
    if margin:
        ax.axvspan(-margin, margin, color="tab:blue", alpha=0.10, lw=0,
                   label=f"±{margin:g} {unit}: the declared margin")
    for i, c in enumerate(reversed(items)):
        d = c.difference
        color = VERDICT_COLORS.get(d.verdict, "0.45")
        ax.errorbar(d.diff, i, xerr=[[d.diff - d.ci_low], [d.ci_high - d.diff]], fmt="o",
                    color=color, capsize=3, ms=5, lw=1.2)
        if margin and np.isfinite(d.eq_low):
            ax.plot([d.eq_low, d.eq_high], [i, i], color=color, lw=4, alpha=0.55,
                    solid_capstyle="butt")
        name = c.factor.rsplit(".", 1)[-1]
        label = _wrap(f"{name}: {c.change}  [vs {d.baseline}], n={d.n}", 60)
        seq = (sequential or {}).get(f"{d.baseline} → {d.variant}")
        if seq is not None and np.isfinite(seq.get("low", np.nan)):
            dashed.append((i - 0.22, seq, VERDICT_COLORS.get(seq["verdict"], "0.45")))
            label += (f"\nsequential (dashed): {seq['verdict']} at look {seq['look']}, "
                      f"n={seq['n']}, [{seq['low']:+.2f}, {seq['high']:+.2f}]")
        labels.append(label)
    ax.axvline(0, color="0.2", lw=0.8)
    if dashed:  # early repeated intervals are wide: drawn up to the axes, arrows past them
        lo, hi = ax.get_xlim()
        pad = 0.25 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        for y, seq, color in dashed:
            a, b = max(seq["low"], lo), min(seq["high"], hi)
            ax.plot([a, b], [y, y], color=color, lw=1.6, ls=(0, (4, 2)))
            ax.plot([seq["delta"]], [y], marker="D", ms=4, color=color)
            for end, clipped, mark in ((a, seq["low"] < lo, "<"), (b, seq["high"] > hi, ">")):
                if clipped:
                    ax.plot([end], [y], marker=mark, ms=6, color=color, clip_on=False)
        ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.set_ylim(-0.7, len(items) - 0.3)
    label = items[0].difference.interval_label
    ax.set(xlabel=f"Δ final test {title_metric} ({unit}), variant − reference (lower: better)")
    seq_any = any(f"{c.difference.baseline} → {c.difference.variant}" in (sequential or {})
                  for c in items)
    ax.set_title(_wrap(f"Δ with {label} intervals" + (" (thin) and the TOST's "
                       f"{_pct_text(1 - 2 * items[0].difference.level)} intervals (thick)"
                       if margin else "") + (" at the final n as if fixed; dashed: the "
                       "sequential design's repeated interval at its last look (arrows: it "
                       "goes on past the axes), whose verdict stands" if seq_any else ""), 95)
                 + "\n" + _wrap(family, 120), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    shown = {c.difference.verdict for c in items}
    if seq_any:
        shown |= {v["verdict"] for v in sequential.values()}
    handles = [plt.Line2D([], [], color=col, marker="o", lw=1.2, label=v)
               for v, col in VERDICT_COLORS.items() if v in shown]
    if margin:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.10,
                                     label=f"±{margin:g} {unit}: the declared margin"))
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=5)
    return _save(fig, path)


def _pct_text(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + "%"


def _best_variants(trials: pd.DataFrame, k: int = MAX_LINES) -> list[str]:
    means = trials.groupby("variant")["final_top1_err"].mean().sort_values()
    return list(means.index[:k])


def _mean_band(ax, epochs: pd.DataFrame, column: str, variants: list[str], colors: dict,
               since: float = 0, marker: str | None = None) -> bool:
    """Mean ± std over seeds per epoch of ``column`` for each variant (epochs ≥ ``since``), the
    band clipped to what some seed showed (a rate or an error is never drawn below 0)."""
    drawn = False
    for v in variants:
        sub = epochs[(epochs["variant"] == v) & (epochs["epoch"] >= since)]
        sub = sub[np.isfinite(pd.to_numeric(sub[column], errors="coerce").astype(float))]
        if sub.empty:
            continue
        g = sub.groupby("epoch")[column]
        mean, std, n = g.mean(), g.std().fillna(0.0), g.count()
        ax.plot(mean.index, mean.values, label=f"{v} (n={int(n.max())})", lw=1.4,
                color=colors.get(v), marker=marker or ("." if len(mean) < 12 else None),
                ms=3 if marker else None)
        low, high = np.maximum(mean - std, g.min()), np.minimum(mean + std, g.max())
        ax.fill_between(mean.index, low.values, high.values, alpha=0.15, color=colors.get(v))
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _eval_ticks(ax, epochs: pd.DataFrame, column: str, variants: list[str]) -> list[int]:
    """Minor ticks at the epochs that evaluated ``column`` (the curve's points)."""
    sub = epochs[epochs["variant"].isin(variants)]
    ok = np.isfinite(pd.to_numeric(sub[column], errors="coerce").astype(float))
    ticks = sorted({int(e) for e in sub.loc[ok, "epoch"]})
    if ticks:
        ax.xaxis.remove_overlapping_locs = False  # an evaluated epoch on a major tick counts
        ax.set_xticks(ticks, minor=True)
        ax.tick_params(axis="x", which="minor", length=5, width=1, color="0.35")
    return ticks


def learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame, colors: dict,
                    path: Path) -> Path | None:
    """Test error (all epochs, and zoomed on the last 20% of them, where the gaps are),
    validation error and training loss, mean ± std over seeds, for the best variants; the
    epochs that evaluated test / validation error are the minor ticks of those panels."""
    if epochs.empty or trials.empty:
        return None
    variants = _best_variants(trials)
    last = int(pd.to_numeric(epochs["epoch"], errors="coerce").max())
    since = math.ceil(0.8 * last) if last >= MIN_ZOOM_EPOCHS else 0
    if since:
        fig, grid = plt.subplots(2, 2, figsize=(13, 8.4))
        fig.subplots_adjust(wspace=0.25, hspace=0.35, top=0.87, bottom=0.08)
        (full, zoom), (val, loss) = grid
    else:  # too few epochs for the last fifth to show anything the first panel does not
        fig, grid = plt.subplots(1, 3, figsize=(15, 4.4))
        fig.subplots_adjust(wspace=0.3, top=0.8)
        (full, val, loss), zoom = grid, None
    if not _mean_band(full, epochs, "test_top1_err", variants, colors):
        plt.close(fig)
        return None
    if zoom is not None:
        _mean_band(zoom, epochs, "test_top1_err", variants, colors, since=since, marker="o")
        _eval_ticks(zoom, epochs[epochs["epoch"] >= since], "test_top1_err", variants)
        full.axvspan(since, last, color="0.5", alpha=0.08, lw=0)
        zoom.set(xlabel="epoch (minor ticks: evaluated)", ylabel="test top-1 error (%)",
                 title=f"Test error, last 20% of epochs ({since}–{last}, shaded left)")
    _mean_band(val, epochs, "val_top1_err", variants, colors)
    _mean_band(loss, epochs, "train_loss", variants, colors)
    _eval_ticks(full, epochs, "test_top1_err", variants)
    _eval_ticks(val, epochs, "val_top1_err", variants)
    full.set(xlabel="epoch (minor ticks: evaluated)", ylabel="test top-1 error (%)",
             title="Test error")
    val.set(xlabel="epoch (minor ticks: evaluated)", ylabel="validation top-1 error (%)",
            title="Validation error")
    loss.set(xlabel="epoch", ylabel="training loss (mixed loss on mixed steps)",
             title="Training loss")
    for ax in np.ravel(grid):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Mean ± std over seeds (n per variant in the legend); best {len(variants)} "
                 "variants by final test error" + ("" if zoom is not None else
                                                  f"; no zoom panel below {MIN_ZOOM_EPOCHS} "
                                                  "epochs"), fontsize=9, y=0.96)
    handles, labels = full.get_legend_handles_labels()
    _legend_below(fig, handles, labels)
    return _save(fig, path)


def hardness_dynamics(trials: pd.DataFrame, epochs: pd.DataFrame, colors: dict,
                      path: Path) -> Path | None:
    """Hard share, fallback rate and source diversity per epoch for the hard-source variants,
    mean ± std over seeds."""
    cols = [("hard_share", "hard share of the batch"), ("fallback_rate", "fallback rate (share "
            "of mixed steps)"), ("distinct_sources", "distinct source images per batch")]
    hard = trials[trials["augment.method"].isin(HARD_SOURCE)]
    if epochs.empty or hard.empty:
        return None
    variants = _best_variants(hard)
    shown = epochs[epochs["variant"].isin(variants)]
    # A panel only for what these variants recorded: a top-k criterion has no fallback, and an
    # empty axis would read as a rate of nothing rather than as "does not apply".
    present = [(c, label) for c, label in cols
               if c in shown and pd.to_numeric(shown[c], errors="coerce").notna().any()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4.2), squeeze=False)
    axes = axes[0]
    fig.subplots_adjust(wspace=0.3)  # room for each panel's y label beside its neighbour
    for ax, (col, label) in zip(axes, present):
        _mean_band(ax, shown, col, variants, colors)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    missing = [label.split(" (")[0] for c, label in cols if (c, label) not in present]
    note = f"; not recorded for these variants: {', '.join(missing)}" if missing else ""
    fig.suptitle(f"Hard-source variants: mean ± std over seeds (n in the legend){note}",
                 fontsize=9, y=1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend_below(fig, handles, labels)
    return _save(fig, path)


def source_classes(trials: pd.DataFrame, epochs: pd.DataFrame, path: Path) -> Path | None:
    """How often each class served as a mixing source: share per class, per variant, with the
    data set's class names."""
    if epochs.empty or "source_class_counts" not in epochs:
        return None
    rows: dict[str, np.ndarray] = {}
    for v, sub in epochs.groupby("variant", sort=False):
        counts = [np.asarray(c, dtype=float) for c in sub["source_class_counts"]
                  if c is not None and not (isinstance(c, float) and math.isnan(c)) and len(c)]
        if not counts:
            continue
        width = max(c.size for c in counts)
        total = np.zeros(width)
        for c in counts:
            total[:c.size] += c
        if total.sum() > 0:
            rows[v] = total
    if not rows:
        return None
    width = max(r.size for r in rows.values())
    mat = np.zeros((len(rows), width))
    for i, r in enumerate(rows.values()):
        mat[i, :r.size] = r / r.sum()
    names = None
    if "classes" in trials:
        for c in trials["classes"]:
            if c is not None and not (isinstance(c, float)) and len(c) == width:
                names = [str(x) for x in c]
                break
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * width + 4), 0.45 * len(rows) + 2.2))
    # Centred on the uniform share 1/C, on a scale of at least +-2 points: random sources read
    # as uniform (white), not as a pattern blown up from noise.
    uniform = 1.0 / width
    spread = max(float(np.abs(mat - uniform).max()), 0.02)
    im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=uniform - spread,
                   vmax=uniform + spread)
    ax.set_yticks(range(len(rows)), [_wrap(v, 55) for v in rows], fontsize=7)
    ax.set_xticks(range(width), names or [str(i) for i in range(width)], rotation=45,
                  ha="right", fontsize=8)
    ax.set(xlabel="class of the source image", title="Share of mixing sources per class "
           f"(all mixed steps of all seeds; white = uniform, 1/{width})")
    fig.colorbar(im, ax=ax, label="share of sources")
    return _save(fig, path)
