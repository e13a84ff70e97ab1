"""Statistics of a sweep: mean ± std over seeds, differences against a baseline with 95%
confidence intervals corrected for multiple comparisons (Holm), and plain-language verdicts.

Differences are ``variant − baseline`` in error points (lower error = better):

* **paired by seed** when the two share at least two seeds: the per-seed differences (runs that
  share a seed within one side are averaged first), t-interval with n − 1 degrees of freedom;
* **Welch** otherwise, over all runs of each side (needs at least two runs per side);
* otherwise **n too small**: no interval, no verdict.

Holm's step-down procedure over the m comparisons that have a test: the i-th smallest p-value
(i = 0, 1, ...) is tested at level α/(m − i) until the first one that fails; that one and every
later one are reported at the failing step's level. Each interval is the t-interval at its level,
so an interval excludes 0 exactly when Holm calls the difference distinguishable from noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """``n`` values, their mean and sample standard deviation (ddof=1; NaN when n < 2)."""

    n: int
    mean: float
    std: float


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan)


def mean_std_text(s: Summary, digits: int = 2) -> str:
    """``"3.62 ± 0.08"``; ``"3.62"`` when n = 1, ``"—"`` when n = 0."""
    if s.n == 0:
        return "—"
    if s.n == 1 or not np.isfinite(s.std):
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """``variant − baseline``: its test and, after :func:`holm`, its corrected interval."""

    variant: str
    baseline: str
    kind: str                  # "paired", "welch" or "too_small"
    n: int                     # pairs (paired) or variant runs (welch / too_small)
    n_baseline: int            # pairs (paired) or baseline runs
    diff: float                # mean difference (paired) or difference of means (welch)
    se: float = math.nan
    df: float = math.nan
    p: float = math.nan        # two-sided, uncorrected
    p_holm: float = math.nan   # Holm-adjusted
    level: float = math.nan    # per-comparison level of the interval (α/(m − step))
    ci_low: float = math.nan
    ci_high: float = math.nan
    m: int = 0                 # number of comparisons corrected for
    distinguishable: bool | None = None
    seeds: tuple = field(default_factory=tuple)

    @property
    def tested(self) -> bool:
        return self.kind != "too_small"


def _by_seed(values: Sequence[float], seeds: Sequence[Hashable]) -> dict[Hashable, float]:
    acc: dict[Hashable, list[float]] = {}
    for v, s in zip(values, seeds):
        if v is not None and np.isfinite(v):
            acc.setdefault(s, []).append(float(v))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def _p_two_sided(t: float, df: float) -> float:
    return float(2 * sps.t.sf(abs(t), df))


def difference(variant: str, values: Sequence[float], seeds: Sequence[Hashable],
               baseline: str, base_values: Sequence[float], base_seeds: Sequence[Hashable]
               ) -> Difference:
    """Test ``variant − baseline`` (uncorrected); see the module docstring for the rules."""
    a, b = _by_seed(values, seeds), _by_seed(base_values, base_seeds)
    common = sorted(set(a) & set(b), key=lambda s: (str(type(s)), s))
    if len(common) >= 2:
        d = np.array([a[s] - b[s] for s in common])
        n = d.size
        diff, sd = float(d.mean()), float(d.std(ddof=1))
        se, df = sd / math.sqrt(n), float(n - 1)
        return _tested(Difference(variant, baseline, "paired", n, n, diff, se, df,
                                  seeds=tuple(common)))
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    y = np.array([v for v in base_values if v is not None and np.isfinite(v)], dtype=float)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    if x.size < 2 or y.size < 2:
        return Difference(variant, baseline, "too_small", int(x.size), int(y.size), diff)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / ((vx ** 2 / (x.size - 1)) + (vy ** 2 / (y.size - 1))) if se > 0 else \
        float(x.size + y.size - 2)
    return _tested(Difference(variant, baseline, "welch", int(x.size), int(y.size), diff, se, df))


def _tested(d: Difference) -> Difference:
    if d.se > 0:
        p = _p_two_sided(d.diff / d.se, d.df)
    else:  # identical differences in every pair: no noise at all
        p = 0.0 if d.diff != 0 else 1.0
    return replace(d, p=p)


def holm(diffs: Sequence[Difference], alpha: float = ALPHA, single: bool = False
         ) -> list[Difference]:
    """Holm-correct the tested differences; returns them (same order) with intervals.

    ``single=True``: no correction, each interval a plain ``1 - alpha`` interval answering its
    own question (``m`` is then 1 for every difference)."""
    if single:
        return [_interval(d, alpha, d.p, 1, d.p <= alpha) if d.tested else d for d in diffs]
    tested = [i for i, d in enumerate(diffs) if d.tested]
    m = len(tested)
    order = sorted(tested, key=lambda i: diffs[i].p)
    out = list(diffs)
    first_fail = m
    running = 0.0
    adjusted: dict[int, float] = {}
    for step, i in enumerate(order):
        running = max(running, min(1.0, (m - step) * diffs[i].p))
        adjusted[i] = running
        if first_fail == m and diffs[i].p > alpha / (m - step):
            first_fail = step
    for step, i in enumerate(order):
        level = alpha / (m - min(step, first_fail))
        out[i] = _interval(diffs[i], level, adjusted[i], m, step < first_fail)
    return out


def _interval(d: Difference, level: float, p_adj: float, m: int, distinguishable: bool
              ) -> Difference:
    half = float(sps.t.ppf(1 - level / 2, d.df)) * d.se if d.se > 0 else 0.0
    return replace(d, p_holm=p_adj, level=level, ci_low=d.diff - half, ci_high=d.diff + half,
                   m=m, distinguishable=distinguishable)


def verdict(d: Difference, metric: str = "top-1 error") -> str:
    """One plain sentence about ``d`` (after :func:`holm`)."""
    if not d.tested:
        return (f"{d.variant} vs {d.baseline}: n too small to tell (n={d.n} vs {d.n_baseline}; "
                f"needs 2 shared seeds or 2 runs on each side).")
    how = (f"paired over {d.n} seeds" if d.kind == "paired"
           else f"Welch, n={d.n} vs {d.n_baseline}")
    direction = "lower" if d.diff < 0 else "higher" if d.diff > 0 else "equal"
    family = (f"Holm-corrected over {d.m} comparisons" if d.m > 1 else "uncorrected")
    ci = f"95% CI [{d.ci_low:+.2f}, {d.ci_high:+.2f}] points, {family}; {how}"
    head = f"{d.variant}: {abs(d.diff):.2f} points {direction} {metric} than {d.baseline} ({ci})"
    if d.distinguishable:
        better = "better" if d.diff < 0 else "worse"
        return f"{head}: distinguishable from noise ({better})."
    return f"{head}: not distinguishable from noise."


def as_record(d: Difference) -> dict[str, Any]:
    """A flat row for CSV output."""
    return {"variant": d.variant, "baseline": d.baseline, "test": d.kind, "n": d.n,
            "n_baseline": d.n_baseline, "diff": d.diff, "ci_low": d.ci_low,
            "ci_high": d.ci_high, "p": d.p, "p_holm": d.p_holm, "level": d.level,
            "comparisons": d.m, "distinguishable": d.distinguishable, "verdict": verdict(d)}
