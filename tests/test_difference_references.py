"""Every number of a difference against an independent reference (:mod:`ablations.stats`).

The tests, intervals, margin tests and power figures of a difference are recomputed here from
their textbook definitions with scipy and statsmodels calls of their own (Welch's t-test and
interval, the two one-sided tests, the noncentral t for power) and by brute force over the seed
count, on random data of several shapes; the verdict follows the tests at the family's level;
the words say what was tested.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.weightstats import ttost_ind

from ablations.stats import (MAX_SEEDS, Summary, correct, difference, first_n, margin_tests,
                             mde, mean_std_text, seeds_to_detect, seeds_to_show_equivalence,
                             verdict)


def welch_case(seed: int, nx: int, ny: int, shift: float = 0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0 + shift, 0.5, nx)
    y = rng.normal(1.0, 1.2, ny)
    d = difference("v", list(x), [f"a{i}" for i in range(nx)], "b", list(y),
                   [f"b{i}" for i in range(ny)])  # no shared seed: Welch
    return x, y, d


@pytest.mark.parametrize("seed,nx,ny", [(0, 5, 9), (1, 12, 4), (2, 3, 3)])
def test_welch_test_and_interval_are_scipys(seed, nx, ny):
    x, y, d = welch_case(seed, nx, ny)
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert d.kind == "welch" and (d.n, d.n_baseline) == (nx, ny)
    assert d.diff == pytest.approx(x.mean() - y.mean())
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert d.df == pytest.approx(ref.df, rel=1e-9)
    pooled = math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    assert d.sd == pytest.approx(pooled)
    for alpha, m in ((0.05, 1), (0.05, 3)):
        (c, *_) = correct([d] * m, alpha=alpha)
        lo, hi = ref.confidence_interval(1 - alpha / m)
        assert (c.ci_low, c.ci_high) == (pytest.approx(lo), pytest.approx(hi))
        assert c.level == pytest.approx(alpha / m) and c.m == m
        assert c.p_adjusted == pytest.approx(min(1.0, m * ref.pvalue))


def test_paired_test_is_scipys_on_the_shared_seeds():
    rng = np.random.default_rng(4)
    a, b = rng.normal(2, 1, 8), rng.normal(2.4, 1, 8)
    d = difference("v", list(a) + [9.0], list(range(8)) + ["only-v"], "b", list(b), list(range(8)))
    ref = sps.ttest_rel(a, b)
    assert d.kind == "paired" and d.n == 8 and d.p == pytest.approx(ref.pvalue)
    assert d.sd == pytest.approx(np.std(a - b, ddof=1)) and d.df == 7
    # no noise at all: identical differences are exactly what they are
    same = difference("v", [1.5, 2.5, 3.5], [0, 1, 2], "b", [1.0, 2.0, 3.0], [0, 1, 2])
    assert same.p == 0.0 and margin_tests(same, 1.0) == (0.0, 0.0, 0.0)
    assert margin_tests(same, 0.4) == (1.0, 0.0, 1.0)
    zero = difference("v", [1.0, 2.0], [0, 1], "b", [1.0, 2.0], [0, 1])
    assert zero.p == 1.0 and zero.kind == "paired"  # two shared seeds are enough to pair


@pytest.mark.parametrize("seed,nx,ny,margin", [(0, 6, 8, 0.8), (5, 10, 10, 0.5), (7, 4, 9, 2.0)])
def test_welch_margin_tests_are_statsmodels_two_one_sided_tests(seed, nx, ny, margin):
    x, y, d = welch_case(seed, nx, ny, shift=0.1)
    p, lower, upper = ttost_ind(x, y, -margin, margin, usevar="unequal")
    ni, ns, tost = margin_tests(d, margin)
    assert ni == pytest.approx(upper[1], rel=1e-7)  # H0: Δ ≥ +margin
    assert ns == pytest.approx(lower[1], rel=1e-7)  # H0: Δ ≤ −margin
    assert tost == pytest.approx(p, rel=1e-7)
    assert margin_tests(d, 0) == margin_tests(d, -1.0)
    assert all(math.isnan(v) for v in margin_tests(d, 0))


def nct_power(es: float, n: int, level: float, alt: str, ratio: float | None = None) -> float:
    """Power of a t-test from the noncentral t: one-sample/paired (ratio None) or Welch-like
    two-sample with ``ratio`` = n2 / n1 (pooled df)."""
    if ratio is None:
        df, ncp = n - 1, es * math.sqrt(n)
    else:
        df, ncp = n * (1 + ratio) - 2, es / math.sqrt(1 / n + 1 / (n * ratio))
    if alt == "larger":
        return float(sps.nct.sf(sps.t.isf(level, df), df, ncp))
    c = sps.t.isf(level / 2, df)
    return float(sps.nct.sf(c, df, ncp) + sps.nct.cdf(-c, df, ncp))


def smallest_n(ok) -> float:
    for n in range(2, 5000):
        if ok(n):
            return float(n)
    return math.inf


def paired_case(seed: int, n: int = 6, shift: float = 0.2):
    rng = np.random.default_rng(seed)
    a = rng.normal(1.0 + shift, 1.0, n)
    b = rng.normal(1.0, 1.0, n)
    return difference("v", list(a), list(range(n)), "b", list(b), list(range(n)))


@pytest.mark.parametrize("case", ["paired", "welch"])
def test_power_figures_are_the_noncentral_t_by_brute_force(case):
    d = paired_case(3) if case == "paired" else welch_case(3, 5, 10)[2]
    ratio = None if case == "paired" else d.n_baseline / d.n
    level = 0.05 / 3
    # the MDE is the effect whose power is exactly 80% at this n
    got = mde(d, level)
    assert nct_power(got / d.sd, d.n, level, "two-sided", ratio) == pytest.approx(0.8, abs=1e-4)
    assert mde(d, level, power=0.9) > got  # more power, larger detectable effect
    for effect in (0.3, 1.0, 2.5):
        want = smallest_n(lambda n: nct_power(effect / d.sd, n, level, "two-sided", ratio) >= 0.8)
        assert seeds_to_detect(d, effect, level) == want, effect
    for delta, margin in ((0.0, 1.0), (0.2, 0.9), (-0.3, 1.5)):
        want = smallest_n(lambda n: nct_power((margin - abs(delta)) / d.sd, n, level, "larger",
                                              ratio)
                          + nct_power((margin + abs(delta)) / d.sd, n, level, "larger", ratio)
                          - 1 >= 0.8)
        assert seeds_to_show_equivalence(d, delta, margin, level) == want, (delta, margin)
    assert seeds_to_show_equivalence(d, 1.0, 1.0, level) == math.inf  # |Δ| at the margin
    assert math.isnan(seeds_to_show_equivalence(d, 0.1, 0.0, level))
    assert math.isnan(seeds_to_detect(d, 0.0, level))


def test_first_n_is_the_smallest_n_whatever_the_threshold():
    rng = np.random.default_rng(0)
    for threshold in [2, 3, 4, 5, 17, 64, 65, 1000, 4097, MAX_SEEDS]:
        steps = lambda n, t=threshold: 1.0 if n >= t else 0.5 * n / t
        assert first_n(steps, 0.99) == threshold
    assert first_n(lambda n: 0.0, 0.5) == math.inf
    assert first_n(lambda n: 1.0, 0.5) == 2  # the least it ever says is 2 seeds
    for _ in range(20):
        t = int(rng.integers(2, 3000))
        assert first_n(lambda n, t=t: float(n >= t), 1.0, high=3000) == t


def test_the_verdict_follows_the_tests_at_the_family_level():
    clear = paired_case(1, n=12, shift=-1.5)  # clearly lower error
    close = paired_case(2, n=40, shift=0.0)   # no difference, many seeds
    vague = paired_case(3, n=3, shift=0.4)    # too few seeds to tell
    fam = correct([clear, close, vague], alpha=0.05, margin=1.0)
    by = {d.variant + str(i): d for i, d in enumerate(fam)}
    c, e, u = fam
    assert c.p <= c.level and c.verdict == "better" and c.distinguishable
    assert e.p > e.level and e.p_tost <= e.level and e.verdict == "equivalent"
    assert u.verdict == "undetermined" and not u.distinguishable and u.seeds_resolve > u.n
    # the TOST reads the (1 − 2·level) interval: inside ±margin exactly when it rejects
    for d in fam:
        inside = -d.margin < d.eq_low and d.eq_high < d.margin
        assert inside == (d.p_tost <= d.level), by
    # without a margin nothing is equivalent and no equivalence interval exists
    (no_margin,) = correct([close], alpha=0.05)
    assert no_margin.verdict == "undetermined" and math.isnan(no_margin.eq_low)
    assert math.isnan(no_margin.seeds_margin)


def test_the_sentence_says_what_was_tested():
    u = correct([paired_case(3, n=3, shift=0.4)], margin=1.0)[0]
    text = verdict(u)
    assert "**undetermined**" in text and "TOST of |Δ| ≥ 1" in text
    assert "one-sided tests" in text and "not shown within ±1" in text
    assert f"≈ {int(u.seeds_resolve)} seeds would resolve it" in text
    # a difference of 0.00003 with an SD of 0.5 and a margin of 0.001: nothing resolves it
    a = [1.0, 2.0, 3.0, 4.0]
    hopeless = correct([difference("v", a, range(4), "b",
                                   [v - e for v, e in zip(a, (0.5, -0.5, 0.5, -0.4999))],
                                   range(4))], margin=1e-3)[0]
    assert math.isinf(hopeless.seeds_resolve) and hopeless.verdict == "undetermined"
    assert f"not even {MAX_SEEDS:,} seeds" in verdict(hopeless)
    b = correct([paired_case(1, n=12, shift=-1.5)], margin=0.5)[0]
    assert "**better**: lower top-1 error" in verdict(b)


def test_mean_and_spread_text():
    assert mean_std_text(Summary(3, 3.6234, 0.0812)) == "3.62 ± 0.08"
    assert mean_std_text(Summary(3, 3.6234, 0.0812), digits=1) == "3.6 ± 0.1"
    assert mean_std_text(Summary(1, 3.6234, math.nan)) == "3.62"
    assert mean_std_text(Summary(2, 3.6234, math.inf)) == "3.62"
    assert mean_std_text(Summary(0, math.nan, math.nan)) == "—"
