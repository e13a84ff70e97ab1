"""ablations.stats: mean/std, paired and Welch differences, Bonferroni levels and simultaneous
intervals, the margin tests (TOST, non-inferiority, non-superiority), power figures and the
four-valued verdict.

Every expected number is recomputed here with numpy/scipy (a hand-computed case included),
independently of the module and of statsmodels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ablations.stats import (Difference, correct, difference, first_n, interval_label, summarize,
                             verdict)


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
    d = correct([difference("v", [3.0], [0], "cutmix", [3.5, 3.6], [0, 1])])[0]
    assert d.kind == "too_small" and math.isnan(d.ci_low) and d.distinguishable is None
    assert d.verdict == "" and "n too small" in verdict(d)


def _power(es: float, n: int, level: float, two_sided: bool = True) -> float:
    """Power of the one-sample t-test from the noncentral t (not statsmodels)."""
    df, ncp = n - 1, es * math.sqrt(n)
    if two_sided:
        c = sps.t.isf(level / 2, df)
        return sps.nct.sf(c, df, ncp) + sps.nct.cdf(-c, df, ncp)
    return sps.nct.sf(sps.t.isf(level, df), df, ncp)


def test_hand_computed_case():
    """Five paired differences d = (-0.30, -0.10, -0.20, 0.00, -0.15), margin 0.5, alone in
    its family. By hand: mean -0.15, SD 0.1118, SE 0.05, t = -3.0 on 4 df (p = 0.0399);
    non-inferiority t = (-0.15 - 0.5)/0.05 = -13.0, non-superiority t = (-0.15 + 0.5)/0.05 =
    7.0; TOST p = P(T4 > 7.0) = 0.001096."""
    var = [3.70, 3.80, 3.60, 3.90, 3.65]
    base = [4.00, 3.90, 3.80, 3.90, 3.80]
    (d,) = correct([difference("hardmix", var, range(5), "cutmix", base, range(5))],
                   margin=0.5)
    assert d.diff == pytest.approx(-0.15) and d.sd == pytest.approx(math.sqrt(0.0125))
    assert d.se == pytest.approx(0.05) and d.p == pytest.approx(2 * sps.t.sf(3.0, 4))
    assert d.p == pytest.approx(0.03994, abs=1e-5)
    assert d.p_noninf == pytest.approx(sps.t.cdf(-13.0, 4))
    assert d.p_nonsup == pytest.approx(sps.t.sf(7.0, 4))
    assert d.p_tost == pytest.approx(0.001096, abs=1e-6)
    half = sps.t.ppf(0.975, 4) * 0.05
    assert (d.ci_low, d.ci_high) == pytest.approx((-0.15 - half, -0.15 + half))
    eq = sps.t.ppf(0.95, 4) * 0.05
    assert (d.eq_low, d.eq_high) == pytest.approx((-0.15 - eq, -0.15 + eq))
    # Both hold: lower error, and by less than the margin; "better" names the direction.
    assert d.verdict == "better" and d.distinguishable
    # MDE: the |Δ| the 5-pair test detects with 80% power at 0.05, from the noncentral t.
    assert _power(d.mde / d.sd, 5, 0.05) == pytest.approx(0.8, abs=1e-4)
    # Seeds to detect the margin: the first n with power >= 0.8.
    n = int(d.seeds_margin)
    assert _power(0.5 / d.sd, n, 0.05) >= 0.8 > _power(0.5 / d.sd, n - 1, 0.05)
    text = verdict(d)
    assert "**better**" in text and "by less than the margin" in text
    assert "paired over 5 seeds" in text and "Δ = -0.15 points" in text
    assert "TOST of |Δ| ≥ 0.5: p = 0.001 ≤ 0.05" in text


def test_bonferroni_family_levels_and_simultaneous_intervals():
    rng = np.random.default_rng(5)
    diffs = [difference(f"v{i}", rng.normal(10 + mu, 0.3, 6), range(6), "b",
                        rng.normal(10, 0.3, 6), range(6)) for i, mu in enumerate([0, -0.5, 0.2])]
    out = correct(diffs, margin=0.4)
    for d in out:
        assert d.m == 3 and d.level == pytest.approx(0.05 / 3)
        half = sps.t.ppf(1 - 0.05 / 6, d.df) * d.se
        assert (d.ci_low, d.ci_high) == pytest.approx((d.diff - half, d.diff + half))
        assert d.p_adjusted == pytest.approx(min(1.0, 3 * d.p))
        assert d.interval_label == "simultaneous 95% (Bonferroni over 3: each 98.3%)"
        assert "simultaneous 95% (Bonferroni over 3" in verdict(d)
    plain = correct(diffs, method="none")
    assert all(d.level == 0.05 and d.interval_label == "per-comparison 95% (uncorrected)"
               for d in plain)
    assert interval_label("bonferroni", 0.05, 1) == "95%"
    with pytest.raises(ValueError):
        correct(diffs, method="holm")


def test_verdict_is_read_off_the_tests_at_the_contrast_level():
    """Property over random families: better / worse exactly when the interval excludes 0,
    equivalent exactly when it does not and the (1 - 2L) interval lies within ±margin (the
    TOST at L), undetermined otherwise; an undetermined verdict names the seeds to resolve it."""
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(60):
        k = int(rng.integers(1, 4))
        margin = float(rng.choice([0.2, 0.6]))
        diffs = []
        for j in range(k):
            n = int(rng.integers(3, 9))
            base = rng.normal(10, 0.3, n)
            var = base + rng.normal(rng.choice([0.0, -0.5, 0.1]), rng.choice([0.05, 0.3]), n)
            diffs.append(difference(f"v{j}", var, range(n), "b", base, range(n)))
        for d in correct(diffs, margin=margin):
            eq = sps.t.ppf(1 - d.level, d.df) * d.se
            inside = -margin < d.diff - eq and d.diff + eq < margin
            expect = ("better" if d.ci_high < 0 else "worse" if d.ci_low > 0 else
                      "equivalent" if inside else "undetermined")
            assert d.verdict == expect
            assert (d.p_tost <= d.level) == inside
            if d.verdict == "undetermined":
                assert d.seeds_resolve > d.n and "seeds would resolve it" in verdict(d)
            seen.add(d.verdict)
    assert seen == {"better", "worse", "equivalent", "undetermined"}


def test_tost_agrees_with_a_textbook_two_one_sided_tests():
    rng = np.random.default_rng(2)
    for _ in range(20):
        d = rng.normal(0.05, 0.2, 7)
        (r,) = correct([difference("v", d, range(7), "b", np.zeros(7), range(7))], margin=0.25)
        t_low = (d.mean() + 0.25) / (d.std(ddof=1) / math.sqrt(7))
        t_up = (d.mean() - 0.25) / (d.std(ddof=1) / math.sqrt(7))
        assert r.p_nonsup == pytest.approx(sps.t.sf(t_low, 6))
        assert r.p_noninf == pytest.approx(sps.t.cdf(t_up, 6))
        assert r.p_tost == pytest.approx(max(sps.t.sf(t_low, 6), sps.t.cdf(t_up, 6)))


def test_no_margin_no_equivalence():
    d = correct([difference("hardmix", [3.0, 4.0, 2.0], range(3), "cutmix",
                            [3.1, 3.0, 3.2], range(3))])[0]
    assert d.verdict == "undetermined" and math.isnan(d.p_tost)
    assert "equivalence not tested (no margin declared)" in verdict(d)


def test_seeds_needed_match_the_issue_figures():
    """Paired SD 0.52 at n = 10 (the study's CutMix -> HardMix contrast): MDE ~0.52 points at
    80% power, ~85 seeds to detect a 0.16-point gain, both at a two-sided 0.05."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(10)
    dv = (z - z.mean()) / z.std(ddof=1) * 0.52
    (d,) = correct([difference("h", dv, range(10), "c", np.zeros(10), range(10))], margin=0.16)
    assert d.mde == pytest.approx(0.52, abs=0.01)
    assert d.seeds_margin == pytest.approx(85, abs=1)


def test_first_n_is_the_smallest_n_reaching_the_target():
    for target in (3, 17, 64, 1000):
        assert first_n(lambda n: float(n >= target), 1.0) == target
    assert first_n(lambda n: 0.0, 1.0, high=50) == math.inf


def test_identical_pairs_have_zero_width_interval():
    d = correct([difference("v", [2.0, 3.0, 4.0], range(3), "b", [3.0, 4.0, 5.0], range(3))])[0]
    assert d.diff == -1.0 and d.ci_low == d.ci_high == -1.0 and d.verdict == "better"


# --------------------------------------------------------------------------------------------
# ECE and per-class errors (hardmix.metrics, computed on the device by evaluate())
# --------------------------------------------------------------------------------------------


def _ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Textbook ECE (Guo et al. 2017): equal-width bins (b/B, (b+1)/B] of the top
    probability, Σ_b |B_b|/n · |acc_b − conf_b|, in %."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if sel.any():
            total += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return 100 * total


def test_ece_and_class_errors_match_a_numpy_reference_over_batches():
    torch = pytest.importorskip("torch")
    from hardmix.metrics import ECE_BINS, evaluation_details, evaluation_sums

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.5, (300, 7)).astype(np.float32)
    labels = rng.integers(0, 6, 300)  # class 6 never appears: NaN, not 0
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    sums = sum(evaluation_sums(t_logits[i:i + 64], t_labels[i:i + 64], 7)
               for i in range(0, 300, 64))
    got = evaluation_details(sums.tolist(), 7)
    probs = torch.softmax(t_logits, 1).numpy()
    assert ECE_BINS == 15
    assert got["ece"] == pytest.approx(_ece_reference(probs, labels), abs=1e-6)
    pred = probs.argmax(1)
    for c in range(6):
        assert got["class_err"][c] == pytest.approx(100 * np.mean(pred[labels == c] != c))
    assert math.isnan(got["class_err"][6])


def test_evaluation_sums_never_sync_with_the_host():
    """No .item()/.tolist()/nonzero inside: every op stays a tensor op (what a CUDA stream
    needs to run ahead); checked by refusing the ops that copy a value to the host."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    from hardmix.metrics import evaluation_sums

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            assert "_local_scalar_dense" not in name and "nonzero" not in name, name
            return func(*args, **(kwargs or {}))

    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    with NoSync():
        out = evaluation_sums(logits, labels, 10)
    assert out.shape == (3 * 15 + 2 * 10,) and out.dtype == torch.float64


def test_evaluate_records_ece_and_class_errors():
    torch = pytest.importorskip("torch")
    from hardmix.train import Precision, evaluate

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    x, y = torch.randn(90, 5), torch.randint(0, 4, (90,))
    loader = [(x[i:i + 32], y[i:i + 32], None) for i in range(0, 90, 32)]
    prec = Precision("cpu", None, False, "fp32")
    details: dict = {}
    loss, top1, _ = evaluate(model, loader, 4, prec, details=details)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1).numpy()
    assert details["ece"] == pytest.approx(_ece_reference(probs, y.numpy()), abs=1e-4)
    err = [100 * np.mean(probs[y.numpy() == c].argmax(1) != c) for c in range(4)]
    assert details["class_err"] == pytest.approx(err)
    assert top1 == pytest.approx(100 * np.mean(probs.argmax(1) != y.numpy()))
    assert evaluate(model, loader, 4, prec) == (loss, top1, _)
