"""ablations.stats: mean/std, paired and Welch differences, Holm-corrected intervals, verdicts.

Every expected number is recomputed here with numpy/scipy, independently of the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ablations.stats import Difference, difference, holm, summarize, verdict


def test_summarize_matches_numpy():
    x = [3.1, 3.7, 3.4, 3.9]
    s = summarize(x)
    assert s.n == 4
    assert s.mean == pytest.approx(np.mean(x))
    assert s.std == pytest.approx(np.std(x, ddof=1))
    one = summarize([2.0, float("nan")])
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.std)
    assert summarize([]).n == 0


def test_paired_difference_matches_scipy_ttest_rel():
    a = [3.62, 3.55, 3.70, 3.58, 3.66]
    b = [3.78, 3.69, 3.81, 3.74, 3.77]
    d = difference("hardmix", a, [0, 1, 2, 3, 4], "cutmix", b, [0, 1, 2, 3, 4])
    ref = sps.ttest_rel(a, b)
    diffs = np.subtract(a, b)
    assert d.kind == "paired" and d.n == 5
    assert d.diff == pytest.approx(diffs.mean())
    assert d.se == pytest.approx(diffs.std(ddof=1) / math.sqrt(5))
    assert d.df == 4
    assert d.p == pytest.approx(ref.pvalue)


def test_pairing_uses_seeds_not_order_and_averages_repeats():
    # Baseline listed in another order; the variant ran seed 1 twice (its runs are averaged).
    a, sa = [10.0, 11.0, 13.0, 12.0], [0, 1, 1, 2]
    b, sb = [9.0, 8.0, 11.0], [2, 0, 1]
    d = difference("v", a, sa, "b", b, sb)
    expected = np.array([10.0 - 8.0, 12.0 - 11.0, 12.0 - 9.0])
    assert d.kind == "paired" and d.n == 3
    assert d.diff == pytest.approx(expected.mean())
    assert d.p == pytest.approx(sps.ttest_1samp(expected, 0.0).pvalue)


def test_welch_when_seeds_do_not_match():
    a, b = [3.1, 3.5, 3.3, 3.9], [4.0, 4.4, 3.8]
    d = difference("v", a, [10, 11, 12, 13], "b", b, [0, 1, 2])
    ref = sps.ttest_ind(a, b, equal_var=False)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert d.kind == "welch" and (d.n, d.n_baseline) == (4, 3)
    assert d.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert d.df == pytest.approx(df)
    assert d.p == pytest.approx(ref.pvalue)


def test_too_small_gets_no_interval_and_says_so():
    d = holm([difference("v", [3.0], [0], "cutmix", [3.5, 3.6], [0, 1])])[0]
    assert d.kind == "too_small" and math.isnan(d.ci_low) and d.distinguishable is None
    assert "n too small" in verdict(d)


def _holm_reference(p: list[float], alpha: float = 0.05):
    """Textbook Holm: adjusted p-values and rejections, written independently."""
    m = len(p)
    order = np.argsort(p)
    adj = np.empty(m)
    reject = np.zeros(m, bool)
    prev, still = 0.0, True
    for rank, i in enumerate(order):
        prev = max(prev, min(1.0, (m - rank) * p[i]))
        adj[i] = prev
        still = still and p[i] <= alpha / (m - rank)
        reject[i] = still
    return adj, reject


def test_holm_adjusted_p_levels_and_intervals():
    ps = [0.004, 0.04, 0.011, 0.3, 0.012]
    diffs = [Difference(f"v{i}", "b", "paired", 5, 5, diff=-1.0 - i, se=0.4, df=4.0, p=p)
             for i, p in enumerate(ps)]
    out = holm(diffs)
    adj, reject = _holm_reference(ps)
    assert [d.p_holm for d in out] == pytest.approx(list(adj))
    assert [d.distinguishable for d in out] == list(reject)
    # Sorted p: 0.004 (0.05/5), 0.011 (0.05/4), 0.012 (0.05/3), 0.04 fails at 0.05/2 -> 0.3 too.
    levels = {0: 0.05 / 5, 2: 0.05 / 4, 4: 0.05 / 3, 1: 0.05 / 2, 3: 0.05 / 2}
    for i, d in enumerate(out):
        assert d.m == 5
        assert d.level == pytest.approx(levels[i])
        half = sps.t.ppf(1 - levels[i] / 2, 4) * 0.4
        assert (d.ci_low, d.ci_high) == pytest.approx((d.diff - half, d.diff + half))


def test_interval_excludes_zero_exactly_when_distinguishable():
    rng = np.random.default_rng(7)
    for _ in range(40):
        k = rng.integers(1, 6)
        diffs = []
        for j in range(k):
            base = rng.normal(10, 0.3, 4)
            var = base + rng.normal(rng.choice([0.0, -0.4]), 0.2, 4)
            diffs.append(difference(f"v{j}", var, range(4), "b", base, range(4)))
        out = holm(diffs)
        adj, reject = _holm_reference([d.p for d in diffs])
        for d, r, a in zip(out, reject, adj):
            excludes = d.ci_high < 0 or d.ci_low > 0
            assert excludes == bool(r) == d.distinguishable
            assert d.p_holm == pytest.approx(a)


def test_verdict_words():
    d = holm([difference("hardmix", [3.0, 3.1, 2.9, 3.05], range(4), "cutmix",
                         [4.0, 4.1, 3.95, 4.1], range(4))])[0]
    text = verdict(d)
    assert d.distinguishable and "distinguishable from noise (better)" in text
    assert "lower" in text and "cutmix" in text and "paired over 4 seeds" in text
    noisy = holm([difference("hardmix", [3.0, 4.0, 2.0], range(3), "cutmix",
                             [3.1, 3.0, 3.2], range(3))])[0]
    assert not noisy.distinguishable and "not distinguishable from noise" in verdict(noisy)


def test_identical_pairs_have_zero_width_interval():
    d = holm([difference("v", [2.0, 3.0, 4.0], range(3), "b", [3.0, 4.0, 5.0], range(3))])[0]
    assert d.diff == -1.0 and d.ci_low == d.ci_high == -1.0 and d.distinguishable
