"""Statistics of a sweep: mean ± std over seeds, differences against a reference, and a
four-valued verdict with its power for every difference.

Differences are ``variant − reference`` in the metric's units (points of error for top-1 /
top-5 error and ECE, nats for NLL); **lower is better** for every metric a report tests.

* **paired by seed** when the two share at least two seeds: the per-seed differences (runs that
  share a seed within one side are averaged first), t with n − 1 degrees of freedom;
* **Welch** otherwise, over all runs of each side (needs at least two runs per side);
* otherwise **n too small**: no interval, no verdict.

:func:`correct` tests a family of differences at one level each: ``alpha / m`` (Bonferroni over
the m tested differences) or ``alpha`` (``method="none"``). At that level L a difference gets:

* the two-sided t-test of Δ = 0 and the (1 − L) interval. Under Bonferroni the m intervals are
  **simultaneous**: all of them cover their true Δ together with probability ≥ 1 − alpha;
  uncorrected, each is a **per-comparison** (1 − L) interval, and is labelled so;
* with a ``margin`` m > 0: the one-sided **non-inferiority** test (H0: Δ ≥ +m, the variant is
  worse by at least m), the one-sided **non-superiority** test (H0: Δ ≤ −m, better by at least
  m) and the paired **TOST** (both, p = the larger p-value: statsmodels ``ttost_paired`` for
  paired differences), each at level L; the TOST reads the (1 − 2L) interval;
* **power** from the observed SD of the differences (paired) or the pooled SD (Welch) and n:
  the minimum detectable effect at 80% power at level L (two-sided), the seeds needed to
  detect the margin, and the seeds that would resolve an undetermined verdict (statsmodels
  ``TTestPower`` / ``TTestIndPower``).

**Verdict** (one of :data:`VERDICTS`): ``better`` / ``worse`` when the two-sided test rejects
Δ = 0 at L (the interval excludes 0), else ``equivalent`` when the TOST rejects |Δ| ≥ m at L,
else ``undetermined``. For a true Δ the false verdicts that can occur are nested in one test at
level L (a false "better" or "equivalent" when Δ ≥ m implies the non-inferiority test rejected
falsely, and so on), so each difference gets a false verdict with probability ≤ L, and a
Bonferroni family of m with probability ≤ alpha in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.80
CORRECTIONS = ("bonferroni", "none")
VERDICTS = ("better", "worse", "equivalent", "undetermined")
#: Seed counts searched for the seeds needed (beyond: "more than" this many).
MAX_SEEDS = 10_000


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
    """``variant − baseline``: its test and, after :func:`correct`, its level, interval, the
    margin tests, power figures and verdict."""

    variant: str
    baseline: str
    kind: str                  # "paired", "welch" or "too_small"
    n: int                     # pairs (paired) or variant runs (welch / too_small)
    n_baseline: int            # pairs (paired) or baseline runs
    diff: float                # mean difference (paired) or difference of means (welch)
    se: float = math.nan
    df: float = math.nan
    p: float = math.nan        # two-sided, uncorrected
    sd: float = math.nan       # SD of the paired differences, or the pooled SD (welch)
    values: tuple = ()         # the per-seed differences (paired)
    seeds: tuple = field(default_factory=tuple)
    # ---- after correct() ----
    m: int = 0                 # differences tested in the family
    correction: str = ""       # "bonferroni" or "none"
    alpha: float = math.nan    # the family's level
    level: float = math.nan    # the level this difference is tested at (two-sided)
    p_adjusted: float = math.nan  # min(1, m·p) under Bonferroni, p uncorrected
    ci_low: float = math.nan   # (1 − level) interval
    ci_high: float = math.nan
    margin: float = math.nan   # smallest effect of interest (NaN: none declared)
    p_noninf: float = math.nan  # H0: Δ ≥ +margin (one-sided)
    p_nonsup: float = math.nan  # H0: Δ ≤ −margin (one-sided)
    p_tost: float = math.nan   # max of the two
    eq_low: float = math.nan   # (1 − 2·level) interval: what the TOST reads
    eq_high: float = math.nan
    mde: float = math.nan      # minimum detectable effect at POWER, level (two-sided)
    seeds_margin: float = math.nan   # seeds (pairs / runs per side) to detect the margin
    seeds_resolve: float = math.nan  # seeds that would resolve an undetermined verdict
    power: float = POWER
    verdict: str = ""          # one of VERDICTS ("" before correct() or untested)
    distinguishable: Optional[bool] = None  # better or worse

    @property
    def tested(self) -> bool:
        return self.kind != "too_small"

    @property
    def interval_label(self) -> str:
        """What the (1 − level) interval is, in words the tables print."""
        return interval_label(self.correction, self.alpha, self.m)


def interval_label(correction: str, alpha: float, m: int) -> str:
    """``simultaneous 95% (Bonferroni over 3: each 98.3%)`` or ``per-comparison 95%``."""
    conf = _pct(1 - alpha)
    if correction == "bonferroni" and m > 1:
        return f"simultaneous {conf} (Bonferroni over {m}: each {_pct(1 - alpha / m)})"
    if correction == "bonferroni":
        return conf
    return f"per-comparison {conf} (uncorrected)"


def _pct(x: float) -> str:
    text = f"{100 * x:.1f}".rstrip("0").rstrip(".")
    return f"{text}%"


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
        return _tested(Difference(variant, baseline, "paired", n, n, diff, se, df, sd=sd,
                                  values=tuple(float(v) for v in d), seeds=tuple(common)))
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    y = np.array([v for v in base_values if v is not None and np.isfinite(v)], dtype=float)
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    if x.size < 2 or y.size < 2:
        return Difference(variant, baseline, "too_small", int(x.size), int(y.size), diff)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / ((vx ** 2 / (x.size - 1)) + (vy ** 2 / (y.size - 1))) if se > 0 else \
        float(x.size + y.size - 2)
    pooled = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1))
                       / (x.size + y.size - 2))
    return _tested(Difference(variant, baseline, "welch", int(x.size), int(y.size), diff, se,
                              df, sd=pooled))


def _tested(d: Difference) -> Difference:
    if d.se > 0:
        p = _p_two_sided(d.diff / d.se, d.df)
    else:  # identical differences in every pair: no noise at all
        p = 0.0 if d.diff != 0 else 1.0
    return replace(d, p=p)


# --------------------------------------------------------------------------------------------
# Margin tests
# --------------------------------------------------------------------------------------------


def margin_tests(d: Difference, margin: float) -> tuple[float, float, float]:
    """``(p_noninf, p_nonsup, p_tost)`` of ``d`` against ±``margin``: one-sided tests of
    H0: Δ ≥ +margin and H0: Δ ≤ −margin, and their TOST (the larger p). Paired differences go
    through statsmodels ``ttost_paired``; Welch ones through the same t with Welch's df."""
    if not d.tested or not margin > 0:
        return math.nan, math.nan, math.nan
    if not d.se > 0:  # no noise: the difference is what it is
        ni, ns = float(d.diff >= margin), float(d.diff <= -margin)
        return ni, ns, max(ni, ns)
    if d.kind == "paired" and d.values:
        from statsmodels.stats.weightstats import ttost_paired

        v = np.asarray(d.values, dtype=float)
        p, lower, upper = ttost_paired(v, np.zeros_like(v), -margin, margin)
        return float(upper[1]), float(lower[1]), float(p)
    ni = float(sps.t.cdf((d.diff - margin) / d.se, d.df))
    ns = float(sps.t.sf((d.diff + margin) / d.se, d.df))
    return ni, ns, max(ni, ns)


# --------------------------------------------------------------------------------------------
# Power
# --------------------------------------------------------------------------------------------


def _power_engine(d: Difference) -> Callable[..., float]:
    """``power(effect_size, n, level, alternative)`` of the test of ``d`` (statsmodels
    ``TTestPower`` paired, ``TTestIndPower`` Welch with the observed ratio). Where scipy's
    noncentral t underflows to NaN (a huge noncentrality: power ~1) the normal approximation
    with the t critical value stands in."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    ratio = d.n_baseline / d.n if d.n else 1.0

    def power(es: float, n: int, level: float, alt: str = "two-sided") -> float:
        if d.kind == "paired":
            got = TTestPower().power(effect_size=es, nobs=n, alpha=level, alternative=alt)
            df, ncp = n - 1, es * math.sqrt(n)
        else:
            got = TTestIndPower().power(effect_size=es, nobs1=n, alpha=level, ratio=ratio,
                                        alternative=alt)
            df, ncp = n * (1 + ratio) - 2, es / math.sqrt(1 / n + 1 / (n * ratio))
        got = float(got)
        if math.isnan(got):
            crit = sps.t.isf(level / 2 if alt == "two-sided" else level, df)
            got = float(sps.norm.cdf(ncp - crit))
        return got

    return power


def first_n(power_at: Callable[[int], float], target: float, low: int = 2,
            high: int = MAX_SEEDS) -> float:
    """The smallest n in [low, high] with ``power_at(n) >= target`` (power grows with n):
    doubling, then bisection. ``inf`` when even ``high`` falls short."""
    if power_at(low) >= target:
        return float(low)
    lo, hi = low, low
    while power_at(hi) < target:
        if hi >= high:
            return math.inf
        lo, hi = hi, min(2 * hi, high)
    while hi - lo > 1:  # power_at(lo) < target <= power_at(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_at(mid) >= target else (mid, hi)
    return float(hi)


def mde(d: Difference, level: float, power: float = POWER) -> float:
    """The smallest |Δ| the test of ``d`` (its n and SD) detects with ``power`` at two-sided
    ``level``, in the metric's units. NaN when the SD is unknown."""
    if not d.tested or not d.sd > 0 or d.n < 2:
        return math.nan
    pw = _power_engine(d)
    f = lambda es: float(pw(es, d.n, level)) - power
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(f, 1e-9, hi, xtol=1e-6)) * d.sd


def seeds_to_detect(d: Difference, effect: float, level: float, power: float = POWER) -> float:
    """Seeds (pairs, or runs per side for Welch with the same ratio) for which the two-sided
    test at ``level`` detects a true |Δ| = ``effect`` with ``power``, at the observed SD.
    ``inf`` beyond :data:`MAX_SEEDS`, NaN without an SD."""
    if not d.tested or not d.sd > 0 or not effect > 0:
        return math.nan
    pw = _power_engine(d)
    return first_n(lambda n: float(pw(abs(effect) / d.sd, n, level)), power)


def seeds_to_show_equivalence(d: Difference, delta: float, margin: float, level: float,
                              power: float = POWER) -> float:
    """Seeds for which the TOST at ``level`` shows |Δ| < ``margin`` with ``power`` when the
    true difference is ``delta`` (|delta| < margin), at the observed SD: the power of the two
    one-sided tests, P1 + P2 − 1 ≥ power. ``inf`` if never within :data:`MAX_SEEDS`."""
    if not d.tested or not d.sd > 0 or not margin > 0:
        return math.nan
    if abs(delta) >= margin:
        return math.inf
    pw = _power_engine(d)
    tost = lambda n: (float(pw((margin - abs(delta)) / d.sd, n, level, "larger"))
                      + float(pw((margin + abs(delta)) / d.sd, n, level, "larger")) - 1)
    return first_n(tost, power)


# --------------------------------------------------------------------------------------------
# A family
# --------------------------------------------------------------------------------------------


def correct(diffs: Sequence[Difference], alpha: float = ALPHA, method: str = "bonferroni",
            margin: Optional[float] = None, power: float = POWER) -> list[Difference]:
    """Test a family: each tested difference at ``alpha / m`` (``bonferroni``, m = tested
    differences) or ``alpha`` (``none``), with its interval, margin tests, power figures and
    verdict (module docstring). Returns the differences in the same order."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r} is not one of {CORRECTIONS}")
    m = sum(1 for d in diffs if d.tested)
    level = alpha / m if method == "bonferroni" and m else alpha
    marg = float(margin) if margin is not None and margin > 0 else math.nan
    out = []
    for d in diffs:
        d = replace(d, m=m, correction=method, alpha=alpha, margin=marg, power=power)
        out.append(_judge(d, level) if d.tested else d)
    return out


def _half(d: Difference, level: float) -> float:
    return float(sps.t.ppf(1 - level / 2, d.df)) * d.se if d.se > 0 else 0.0


def _judge(d: Difference, level: float) -> Difference:
    half, eq_half = _half(d, level), _half(d, 2 * level)
    p_adj = min(1.0, d.p * d.m) if d.correction == "bonferroni" else d.p
    ni, ns, tost = margin_tests(d, d.margin)
    if d.p <= level:
        verdict = "better" if d.diff < 0 else "worse"
    elif tost <= level:
        verdict = "equivalent"
    else:
        verdict = "undetermined"
    detect = seeds_to_detect(d, d.margin, level, d.power) if d.margin > 0 else math.nan
    resolve = math.nan
    if verdict == "undetermined":
        options = [seeds_to_detect(d, abs(d.diff), level, d.power)] if d.diff != 0 else []
        if d.margin > 0:
            options.append(seeds_to_show_equivalence(d, d.diff, d.margin, level, d.power))
        options = [o for o in options if not math.isnan(o)]
        resolve = min(options) if options else math.nan
    return replace(d, level=level, p_adjusted=p_adj, ci_low=d.diff - half,
                   ci_high=d.diff + half, p_noninf=ni, p_nonsup=ns, p_tost=tost,
                   eq_low=d.diff - eq_half if d.margin > 0 else math.nan,
                   eq_high=d.diff + eq_half if d.margin > 0 else math.nan,
                   mde=mde(d, level, d.power), seeds_margin=detect, seeds_resolve=resolve,
                   verdict=verdict, distinguishable=verdict in ("better", "worse"))


# --------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------


def _digits(unit: str) -> int:
    return 3 if unit == "nats" else 2


def _num(x: float, unit: str) -> str:
    return f"{x:.{_digits(unit)}f} {unit}".rstrip()


def _seeds(n: float) -> str:
    if math.isnan(n):
        return "?"
    return f"more than {MAX_SEEDS:,}" if math.isinf(n) else f"{int(n)}"


def _p(p: float) -> str:
    """``p = 0.067`` or ``p < 0.001``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def verdict(d: Difference, metric: str = "top-1 error", unit: str = "points") -> str:
    """The verdict of ``d`` (after :func:`correct`) in one sentence that says what was tested:
    the direction, the interval with its label, each test with its p-value against the level,
    and the power figures."""
    if not d.tested:
        return (f"{d.variant} vs {d.baseline}: n too small to tell (n={d.n} vs {d.n_baseline}; "
                f"needs 2 shared seeds or 2 runs on each side).")
    how = (f"paired over {d.n} seeds" if d.kind == "paired"
           else f"Welch, n={d.n} vs {d.n_baseline}")
    k = _digits(unit)
    head = (f"{d.variant} vs {d.baseline} ({metric}, {how}): Δ = {d.diff:+.{k}f} {unit}, "
            f"{d.interval_label} interval [{d.ci_low:+.{k}f}, {d.ci_high:+.{k}f}]")
    lvl = f"{d.level:.3g}"
    two = f"two-sided {_p(d.p)} {'≤' if d.p <= d.level else '>'} {lvl}"
    marg = d.margin > 0
    if marg:
        eq = (f"TOST of |Δ| ≥ {d.margin:g}: {_p(d.p_tost)} "
              f"{'≤' if d.p_tost <= d.level else '>'} {lvl} (the {_pct(1 - 2 * d.level)} "
              f"interval [{d.eq_low:+.{k}f}, {d.eq_high:+.{k}f}] "
              f"{'lies' if d.p_tost <= d.level else 'does not lie'} within ±{d.margin:g})")
        one = (f"one-sided tests: H0 'better by ≥ {d.margin:g}' {_p(d.p_nonsup)}, "
               f"H0 'worse by ≥ {d.margin:g}' {_p(d.p_noninf)}")
    power = f"MDE at {_pct(d.power)} power {_num(d.mde, unit)}"
    if marg:
        power += f"; {_seeds(d.seeds_margin)} seeds would detect ±{d.margin:g}"
    if d.verdict in ("better", "worse"):
        word = "lower" if d.verdict == "better" else "higher"
        tail = f"**{d.verdict}**: {word} {metric} ({two})"
        if marg and d.p_tost <= d.level:
            tail += f", and by less than the margin ({eq})"
        elif marg:
            tail += f"; {one}"
        return f"{head}: {tail}; {power}."
    if d.verdict == "equivalent":
        return (f"{head}: **equivalent within ±{d.margin:g} {unit}**: {eq}; not shown "
                f"different from 0 ({two}); {power}.")
    why = f"not shown different from 0 ({two})"
    if marg:
        why += f", not shown within ±{d.margin:g} ({eq}); {one}"
    else:
        why += "; equivalence not tested (no margin declared)"
    if math.isnan(d.seeds_resolve):
        need = "no seed count resolves it without a margin (Δ̂ = 0)"
    elif math.isinf(d.seeds_resolve):
        need = f"not even {MAX_SEEDS:,} seeds would resolve it at this Δ̂ and SD"
    else:
        need = f"≈ {int(d.seeds_resolve)} seeds would resolve it"
    return f"{head}: **undetermined**: {why}; {power}; {need}."


def as_record(d: Difference) -> dict[str, Any]:
    """A flat row for CSV output."""
    return {"variant": d.variant, "baseline": d.baseline, "test": d.kind, "n": d.n,
            "n_baseline": d.n_baseline, "diff": d.diff, "sd": d.sd, "ci_low": d.ci_low,
            "ci_high": d.ci_high, "interval": d.interval_label if d.tested else "",
            "level": d.level, "p": d.p, "p_adjusted": d.p_adjusted, "comparisons": d.m,
            "margin": d.margin, "p_noninf": d.p_noninf, "p_nonsup": d.p_nonsup,
            "p_tost": d.p_tost, "mde": d.mde, "seeds_margin": d.seeds_margin,
            "seeds_resolve": d.seeds_resolve, "verdict": d.verdict, "sentence": verdict(d)}
