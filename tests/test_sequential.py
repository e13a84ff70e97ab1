"""ablations.sequential: LD-OBF bounds, their t mapping, the per-look decision, and the simulation
benchmark's smoke mode (error rate under no effect, seeds saved at the margin)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats as sps

from ablations.sequential import (CONTINUE, NAMES, Design, crossing_probability, decide,
                                  fixed_seeds, rule, simulate, z_bounds)
from ablations.stats import correct, difference


def test_ld_obf_bounds_match_published_values():
    """Reference values (gsDesign's LD-OBF, two-sided 0.05): looks at 5..30 of 30 seeds and
    five equally spaced looks."""
    six = z_bounds(tuple(n / 30 for n in (5, 10, 15, 20, 25, 30)), 0.025)
    assert six == pytest.approx((5.367, 3.710, 2.970, 2.538, 2.252, 2.045), abs=1.5e-3)
    five = z_bounds(tuple(i / 5 for i in range(1, 6)), 0.025)
    assert five == pytest.approx((4.877, 3.357, 2.680, 2.290, 2.031), abs=1e-3)
    # They spend exactly alpha under no effect; one look is the plain z-test.
    assert crossing_probability([n / 30 for n in (5, 10, 15, 20, 25, 30)], six) == \
        pytest.approx(0.05, abs=1e-6)
    assert z_bounds((1.0,), 0.025) == pytest.approx((sps.norm.isf(0.025),))


def test_z_bounds_mapped_to_t_with_the_same_nominal_p():
    d = Design(looks=(5, 10, 15, 20, 25, 30), calibrate=False)
    got = [d.bounds(k)[0] for k in range(6)]
    assert got == pytest.approx([92.97, 5.98, 3.59, 2.81, 2.40, 2.14], abs=6e-3)
    for k, n in enumerate(d.looks):  # same one-sided nominal p as the z-bound
        assert sps.t.sf(got[k], n - 1) == pytest.approx(sps.norm.sf(d.z_efficacy[k]), rel=1e-6)


def test_calibrated_bounds_hold_the_level_where_the_plain_mapping_overshoots():
    """Under no effect, with few seeds per look, the nominal-p mapping crosses a little more
    often than alpha; the calibrated design crosses at alpha. Checked on 100,000 simulated
    raw sequences (not the calibration's own sufficient-statistic draws)."""
    rng = np.random.default_rng(5)
    rates = {}
    for cal in (False, True):
        d = (Design(looks=(3, 6, 9, 12), futility=0.0) if cal else  # calibrated by default
             Design(looks=(3, 6, 9, 12), futility=0.0, calibrate=False))
        codes, _ = simulate(d, 0.0, 1.0, 100_000, rng)
        rates[cal] = float(np.mean(codes <= 1))  # better or worse
    se = math.sqrt(0.05 * 0.95 / 100_000)
    assert abs(rates[True] - 0.05) < 3 * se
    assert rates[False] > 0.05 + 2 * se
    # One look is never calibrated: the t-test itself.
    assert Design(looks=(9,)).z_efficacy == pytest.approx((sps.norm.isf(0.025),))


def test_one_look_is_the_fixed_t_test_and_tost():
    """A design with one look decides exactly like the fixed-n report: better / worse from
    the two-sided t-test at alpha, equivalent from the TOST at alpha."""
    rng = np.random.default_rng(3)
    design = Design(looks=(8,), margin=0.3, futility=0.0)
    seen = set()
    for _ in range(100):
        d = rng.normal(rng.choice([-0.4, 0.0, 0.1]), rng.choice([0.1, 0.3]), 8)
        look = decide(design, {"c": d}, 0)["c"]
        (ref,) = correct([difference("v", d, range(8), "b", np.zeros(8), range(8))],
                         margin=0.3)
        assert look.verdict == ref.verdict and look.stop
        assert (look.low, look.high) == pytest.approx((ref.ci_low, ref.ci_high))
        assert (look.eq_low, look.eq_high) == pytest.approx((ref.eq_low, ref.eq_high))
        seen.add(look.verdict)
    assert seen == {"better", "worse", "equivalent", "undetermined"}


def test_decide_goes_on_stops_and_ends_at_the_budget():
    design = Design(looks=(5, 10, 15), margin=0.5)
    rng = np.random.default_rng(0)
    strong = -2.0 + 0.1 * rng.standard_normal(15)
    noisy = rng.normal(0.0, 3.0, 15)
    out = decide(design, {"strong": strong[:10], "noisy": noisy[:10]}, 1)
    assert out["strong"].verdict == "better" and out["strong"].stop
    assert out["strong"].high < 0 and out["strong"].n == 10
    assert out["noisy"].verdict in ("continue", "undetermined")
    last = decide(design, {"noisy": noisy}, 2)["noisy"]
    assert last.stop and last.verdict != "continue"
    one = decide(design, {"x": [0.3]}, 0)["x"]
    assert one.verdict == "continue" and not one.stop
    with pytest.raises(ValueError):
        decide(design, {"x": noisy}, 3)
    with pytest.raises(ValueError):
        Design(looks=(10, 5))


def test_futility_stops_what_cannot_reach_a_verdict():
    """Tiny effect, huge noise, no margin: no verdict is within reach by the last look."""
    design = Design(looks=(5, 10, 15, 20), futility=0.2)
    mean, sd = np.array([0.0, -3.0]), np.array([5.0, 1.0])
    got = rule(design, 1, 10, mean, sd)
    assert NAMES[got[0]] == "undetermined"  # futile
    assert NAMES[got[1]] == "better"  # a clear effect still crosses the efficacy bound
    assert NAMES[rule(Design(looks=(5, 10, 15, 20), futility=0.0), 1, 10, mean, sd)[0]] \
        == "continue"


def test_simulation_runs_the_same_rule_as_decide():
    """The vectorised simulation and the per-contrast decision agree sequence by sequence."""
    design = Design(looks=(4, 8, 12), margin=0.4)
    rng = np.random.default_rng(11)
    state = rng.bit_generator.state
    codes, used = simulate(design, -0.2, 0.5, 60, rng)
    rng.bit_generator.state = state
    x = rng.normal(-0.2, 0.5, size=(60, 12))
    for i in range(60):
        for k, n in enumerate(design.looks):
            v = decide(design, {0: x[i, :n]}, k)[0]
            if v.stop:
                break
        assert (NAMES[codes[i]], used[i]) == (v.verdict, n)


def test_plan_powers_the_last_look_like_the_fixed_design():
    d = Design.plan(margin=0.25, sd=0.5, rounds=5)
    n_fixed = fixed_seeds(0.25, 0.5)
    assert n_fixed == 34  # statsmodels' paired t power for effect size 0.5
    assert len(d.looks) == 5 and d.looks[-1] >= n_fixed
    assert all(b - a == d.looks[0] for a, b in zip(d.looks, d.looks[1:]))


def test_benchmark_smoke_line(capsys):
    """The benchmark's smoke mode: the last line's format, false better/worse ≤ alpha under
    no effect (2,000 sequences: 3 binomial SEs of slack), fewer mean seeds than the fixed
    design at the margin, and equivalence reached under exact equivalence."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sequential.py"
    spec = importlib.util.spec_from_file_location("bench_sequential", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"seq_false_verdict_rate=(\S+) seq_mean_seeds=(\S+) fixed_seeds=(\d+) "
                     r"equivalence_reached=(\S+)", last)
    assert m, last
    x, y, z, w = float(m[1]), float(m[2]), int(m[3]), float(m[4])
    assert x <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 2000)
    assert y < z
    assert w > 0.5
