"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

Every function takes the report's frames (trials with a ``variant`` column, epochs with the
trial's ``variant`` merged in), writes one PNG and returns its path, or returns None when the
plot has nothing to show (e.g. α does not vary).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ablations.factors import HARD_SOURCE, relevance  # noqa: E402

#: Legends become unreadable beyond this: learning curves show the best variants only.
MAX_LINES = 10


def _save(fig, path: Path, rect: tuple = (0, 0, 1, 1)) -> Path:
    with warnings.catch_warnings():  # long variant names: a cramped layout is still a plot
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _best_variants(trials: pd.DataFrame, k: int = MAX_LINES) -> list[str]:
    means = trials.groupby("variant")["final_top1_err"].mean().sort_values()
    return list(means.index[:k])


def _mean_band(ax, epochs: pd.DataFrame, column: str, variants: list[str]) -> bool:
    drawn = False
    for v in variants:
        sub = epochs[(epochs["variant"] == v) & np.isfinite(epochs[column].astype(float))]
        if sub.empty:
            continue
        g = sub.groupby("epoch")[column]
        mean, std = g.mean(), g.std().fillna(0.0)
        ax.plot(mean.index, mean.values, label=v, lw=1.4)
        ax.fill_between(mean.index, (mean - std).values, (mean + std).values, alpha=0.15)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame, path: Path) -> Path | None:
    """Test top-1 error and training loss per epoch, mean ± std over seeds, per variant."""
    if epochs.empty or trials.empty:
        return None
    variants = _best_variants(trials)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = _mean_band(axes[0], epochs, "test_top1_err", variants)
    _mean_band(axes[1], epochs, "train_loss", variants)
    if not ok:
        plt.close(fig)
        return None
    axes[0].set(xlabel="epoch", ylabel="test top-1 error (%)", title="Test error")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="Training loss")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def error_vs_alpha(trials: pd.DataFrame, path: Path) -> Path | None:
    """Final top-1 error against α: one line per criterion (hard-source methods) and one per
    other α-using method; mean ± std over seeds."""
    if "augment.alpha" not in trials or trials["augment.alpha"].nunique() < 2:
        return None
    t = trials[relevance(trials, "augment.alpha")].copy()
    hard = t["augment.method"].isin(HARD_SOURCE)
    t["line"] = np.where(hard, t["augment.method"] + " / " + t["augment.criterion"].astype(str),
                         t["augment.method"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for line, sub in t.groupby("line"):
        g = sub.groupby("augment.alpha")["final_top1_err"]
        mean, std = g.mean(), g.std().fillna(0.0)
        ax.errorbar(mean.index, mean.values, yerr=std.values, marker="o", capsize=3, label=line)
    alphas = sorted(t["augment.alpha"].dropna().unique())
    ax.set_xscale("log")
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.minorticks_off()
    ax.set(xlabel="α (Beta(α, α))", ylabel="final test top-1 error (%)",
           title="Error against α per criterion")
    ax.legend(fontsize=7)
    return _save(fig, path)


def box_per_fallback(trials: pd.DataFrame, path: Path) -> Path | None:
    """Distribution of final top-1 error per fallback policy (where the fallback can fire)."""
    if "augment.fallback" not in trials:
        return None
    t = trials[relevance(trials, "augment.fallback")]
    groups = {k: g["final_top1_err"].dropna().to_numpy() for k, g in t.groupby("augment.fallback")}
    groups = {k: v for k, v in groups.items() if v.size}
    if len(groups) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.boxplot(list(groups.values()), tick_labels=list(groups.keys()))
    for i, v in enumerate(groups.values(), start=1):
        ax.scatter(np.full(v.size, i), v, s=10, alpha=0.6)
    ax.set(xlabel="fallback", ylabel="final test top-1 error (%)",
           title="Error per fallback (misclassified criterion)")
    return _save(fig, path)


def hardness_dynamics(trials: pd.DataFrame, epochs: pd.DataFrame, path: Path) -> Path | None:
    """Hard share, fallback rate and source diversity per epoch, mean over seeds per variant."""
    cols = [("hard_share", "hard share of the batch"), ("fallback_rate", "fallback rate"),
            ("distinct_sources", "distinct sources per batch")]
    if epochs.empty or not any(c in epochs and epochs[c].notna().any() for c, _ in cols):
        return None
    variants = _best_variants(trials)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (col, label) in zip(axes, cols):
        if col in epochs:
            _mean_band(ax, epochs, col, variants)
        ax.set(xlabel="epoch", ylabel=label, title=label)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)))
    rows = -(-len(labels) // 4) if handles else 0
    return _save(fig, path, rect=(0, min(0.45, 0.06 * rows + 0.02), 1, 1))


def source_classes(epochs: pd.DataFrame, path: Path) -> Path | None:
    """How often each class served as a mixing source: share per class, per variant."""
    if epochs.empty or "source_class_counts" not in epochs:
        return None
    rows: dict[str, np.ndarray] = {}
    for v, sub in epochs.groupby("variant"):
        counts = [np.asarray(c, dtype=float) for c in sub["source_class_counts"]
                  if c is not None and len(c)]
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
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * width + 4), 0.45 * len(rows) + 2))
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set(xlabel="class", title="Share of mixing sources per class")
    fig.colorbar(im, ax=ax, label="share of sources")
    return _save(fig, path)
