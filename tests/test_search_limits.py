"""What a search can and cannot tell (#23 item 6): whether ASHA's early rungs predict the end,
and the noise of the single runs that chose the follow-up.

Synthetic ASHA searches written through the real store, with the validation error of every
epoch set here: in one the ranking at every rung is the ranking at the end (no warning), in the
other it reverses by the end (warning). Spearman's ρ and its interval are recomputed here with
scipy and the textbook formula.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablations.report import build_report
from ablations.search_limits import predicts, spearman_interval
from ablations.store import ResultStore
from results_fixtures import config

EPOCHS = 9
RUNGS = (1, 3)  # grace 1, reduction 3 below 9 epochs
ASHA_YAML = ("mode: search\nname: {name}\nmetric: val_top1_err\nseeds: [100]\n"
             "scheduler:\n  type: asha\n  grace_period: 1\n  reduction_factor: 3\n")


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """The figures are not what these tests check (tests/test_report.py does): drawing them
    would double each report's time."""
    import ablations.report

    monkeypatch.setattr(ablations.report, "_figures", lambda *a, **k: {})


def _write(st: ResultStore, tid: str, cfg: dict, vals: dict[int, float], status: str,
           test: float = 20.0) -> None:
    """A trial's epochs (one file) and final row, with ``vals``: epoch -> validation top-1
    error."""
    base = {**cfg, "trial_id": tid, "attempt": 1, "device": "cpu", "versions": {"torch": "x"},
            "git_commit": "abc"}
    st.write_epochs(tid, [dict(epoch=e, train_loss=1.0, val_top1_err=v, test_top1_err=test,
                               test_top5_err=test / 4, lr=0.1) for e, v in vals.items()])
    last = max(vals)
    st.write_trial({**base, "status": status, "error": "", "final_top1_err": test,
                    "final_top5_err": test / 4, "final_val_top1_err": vals[last],
                    "epochs_run": last, "wall_seconds": 1.0})


#: Configurations c000..c011: their validation error at the first rung ranks by quality; c008
#: and c009 are cut at epoch 3, c010 and c011 at epoch 1.
QUALITIES = [0.5, 1.0, 2.0, 2.6, 3.5, 4.1, 5.0, 6.2, 7.0, 7.5, 8.0, 9.0]
LATE = [0.0, 0.0, 1.2, 0.0, 0.0, 0.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0]  # two swaps by the end
STOP = {8: 3, 9: 3, 10: 1, 11: 1}


def _curve(i: int, reverse: bool, epochs: int) -> dict[int, float]:
    """Validation error per epoch of configuration ``i``: its quality at the first rung, moving
    to a nonlinear function of it at the end (so that ranks, not values, agree) plus its late
    change. ``reverse``: by the end the early leaders are last."""
    q, out = QUALITIES[i], {}
    end = -q if reverse else q ** 1.5 / 2
    for e in range(1, epochs + 1):
        t = (e - 1) / (EPOCHS - 1)
        out[e] = 60.0 - 3.0 * e + (1 - t) * q + t * (end + LATE[i])
    return out


def asha_search(root: Path, reverse: bool, stop: dict[int, int] = STOP
                ) -> dict[str, dict[int, float]]:
    """12 configurations over alpha: those in ``stop`` cut at that epoch (by default 2 at
    each rung), the rest ran every epoch."""
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(ASHA_YAML.format(name=root.name))
    st = ResultStore(str(root))
    written = {}
    for i in range(len(QUALITIES)):
        tid = f"c{i:03d}-s100"
        vals = _curve(i, reverse, stop.get(i, EPOCHS))
        _write(st, tid, config(augment__method="hardmix", augment__alpha=0.2 + 0.1 * i,
                               seed=100, optim__epochs=EPOCHS), vals,
               "pruned" if i in stop else "completed")
        written[tid] = vals
    return written


def _expected(written: dict, rung: int) -> tuple[float, float, float]:
    full = [v for v in written.values() if len(v) == EPOCHS]
    x, y = [v[rung] for v in full], [v[EPOCHS] for v in full]
    rho = sps.spearmanr(x, y)[0]
    se = math.sqrt(1.06 / (len(full) - 3))  # Fieller's variance of Fisher's z for Spearman
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    return rho, math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)


@pytest.mark.parametrize("reverse", [False, True], ids=["rungs-predict", "rungs-reverse"])
def test_rung_correlations_and_the_warning(tmp_path, reverse):
    written = asha_search(tmp_path / ("rev" if reverse else "keep"), reverse)
    rep = build_report(str(tmp_path / ("rev" if reverse else "keep")), out=str(tmp_path / "r"))
    table = rep.tables["rungs"]
    assert list(table["rung"]) == list(RUNGS)
    assert list(table["stopped_here"]) == [2, 2]
    assert set(table["n"]) == {8}  # the full-length trials: they reached both
    for row in table.itertuples():
        rho, low, high = _expected(written, row.rung)
        assert row.rho == pytest.approx(rho)
        assert row.ci_low == pytest.approx(low, abs=1e-6)
        assert row.ci_high == pytest.approx(high, abs=1e-6)
    assert (tmp_path / "r" / "rungs.csv").exists()
    assert "### Early stopping: do the rungs predict the end?" in rep.text
    if reverse:
        assert set(table["predicts"]) == {"no"} and (table["rho"] < -0.5).all()
        rho = _expected(written, 1)[0]
        assert "**Warning:** the early rungs do not predict the end" in rep.text
        assert f"epoch 1 ρ = {rho:.2f}" in rep.text and "The 4 trials cut there" in rep.text
        assert "warning: the early rungs do not predict the end" in rep.terminal
    else:
        assert set(table["predicts"]) == {"yes"} and (table["rho"] < 1).all()
        assert "Warning" not in rep.text and "warning:" not in rep.terminal
        assert "Every rung predicts the end by this rule." in rep.text


def test_the_rule_at_its_edges():
    """ρ ≥ 0.5 and an interval above 0 predict; below 0.5, or an interval reaching 0, or too
    few trials, do not (the last: unknown)."""
    assert predicts(8, 0.5, 0.01) == "yes"
    assert predicts(8, 0.49, 0.01) == "no"
    assert predicts(8, 0.7, 0.0) == "no"
    assert predicts(3, 0.9, 0.5) == "unknown" and predicts(8, math.nan, math.nan) == "unknown"
    # An interval from 5 trials with ρ = 0.6 reaches below 0: not predictive at that n.
    x = np.array([1, 2, 3, 4, 5.0])
    rho, low, high, _ = spearman_interval(x, np.array([2, 1, 4, 5, 3.0]))
    assert rho == pytest.approx(0.6) and low < 0 < high
    assert predicts(5, rho, low) == "no"
    assert math.isnan(spearman_interval(x, np.ones(5))[0])  # no spread: no ranking


def test_too_few_trials_at_the_end_is_a_warning_not_a_pass(tmp_path):
    """3 configurations ran to the end: ρ has no interval, so whether the rung predicts the
    end is unknown, and that is warned about too (the ranking there agrees, but on 3 runs)."""
    asha_search(tmp_path / "few", reverse=False, stop={i: 1 for i in range(3, 12)})
    rep = build_report(str(tmp_path / "few"), out=str(tmp_path / "r"))
    (row,) = rep.tables["rungs"].itertuples()
    assert (row.rung, row.n, row.stopped_here, row.predicts) == (1, 3, 9, "unknown")
    assert "at epoch 1 whether it does is unknown" in rep.text
    assert "warning: whether the early rungs predict the end is unknown" in rep.terminal


def test_a_grid_or_a_search_without_asha_gets_no_rung_section(tmp_path):
    root = tmp_path / "plain"
    asha_search(root, reverse=True)
    (root / "sweep.yaml").write_text("mode: search\nname: plain\n")  # no early stopping declared
    rep = build_report(str(root), out=str(tmp_path / "r"))
    assert "rungs" not in rep.tables and "Early stopping" not in rep.text


def _followed_up(root: Path, followup_seeds: list[int]) -> dict:
    """An ASHA search (rungs predict) whose best configuration (c000) and the runner-up's
    neighbour (c001) were re-run with ``followup_seeds``; returns the follow-up's val errors."""
    asha_search(root, reverse=False)
    st = ResultStore(str(root))
    again: dict[str, list[float]] = {}
    for j, i in enumerate((0, 1)):
        vals_by_seed = {s: 33.0 + j + 0.4 * k for k, s in enumerate(followup_seeds)}
        for s, v in vals_by_seed.items():
            vals = {e: v + 3.0 * (EPOCHS - e) for e in range(1, EPOCHS + 1)}
            _write(st, f"f{j:03d}-s{s}", config(augment__method="hardmix",
                                                augment__alpha=0.2 + 0.1 * i, seed=s,
                                                optim__epochs=EPOCHS), vals, "completed")
        again[f"c{i:03d}"] = list(vals_by_seed.values())
    return again


def test_the_follow_ups_choice_states_the_noise_of_a_single_run(tmp_path):
    """The chosen configuration has 3 follow-up re-runs: the noise of one run is their SD,
    named as such, and set against the search's lead of the chosen over the runner-up."""
    again = _followed_up(tmp_path / "fu", [1, 2, 3])
    rep = build_report(str(tmp_path / "fu"), out=str(tmp_path / "r"))
    sd = float(np.std(again["c000"], ddof=1))
    ends = sorted(v[EPOCHS] for v in (_curve(i, False, EPOCHS) for i in range(8)))
    lead = ends[1] - ends[0]  # the runner-up: the next best full-length configuration
    assert "### The follow-up's choice" in rep.text
    assert "ranked best by val_top1_err (validation" in rep.text and "one run each" in rep.text
    assert f"SD {sd:.2f} points of val_top1_err (the seed-to-seed SD of the chosen " \
           "configuration's val_top1_err over its 3 follow-up re-runs)" in rep.text
    assert f"lead over the runner-up in the search was {lead:.2f} points" in rep.text
    assert lead < sd * math.sqrt(2)  # as written: the noise of one run covers the lead
    assert f"within the {sd * math.sqrt(2):.2f} points by which a difference of two such " \
           "values varies from noise alone: the search cannot tell the two apart." in rep.text


def test_without_re_runs_of_the_chosen_one_the_pooled_sd_is_named(tmp_path):
    """One follow-up seed: the chosen configuration has no seed-to-seed SD of its own, so the
    report pools the configurations that ran more than one seed, and says so; with none, it
    says the noise is not measured."""
    root = tmp_path / "one"
    _followed_up(root, [1])
    st = ResultStore(str(root))
    # a second search seed of a configuration that was not chosen: one degree of freedom
    vals = {e: 40.0 + 3.0 * (EPOCHS - e) for e in range(1, EPOCHS + 1)}
    _write(st, "c005-s101", config(augment__method="hardmix", augment__alpha=0.2 + 0.1 * 5,
                                   seed=101, optim__epochs=EPOCHS), vals, "completed")
    rep = build_report(str(root), out=str(tmp_path / "r"))
    c005 = [_curve(5, False, EPOCHS)[EPOCHS], 40.0]
    pooled = float(np.std(c005, ddof=1))
    assert f"SD {pooled:.2f} points of val_top1_err (the pooled within-configuration SD over " \
           "the 1 configurations that ran more than one seed" in rep.text
    bare = tmp_path / "bare"
    _followed_up(bare, [1])
    text = build_report(str(bare), out=str(tmp_path / "r2")).text
    assert "The noise of a single run is not measured here" in text


def test_rung_table_is_a_function_of_the_trials_and_epochs_alone(tmp_path):
    """The section without the report around it: the same table from the store's frames."""
    from ablations.search_limits import rung_correlations
    from ablations.store import read_results

    asha_search(tmp_path / "s", reverse=True)
    trials, epochs = read_results(str(tmp_path / "s")).to_pandas()
    table = rung_correlations(trials, epochs)
    rep = build_report(str(tmp_path / "s"), out=str(tmp_path / "r"))
    pd.testing.assert_frame_equal(table.reset_index(drop=True),
                                  rep.tables["rungs"].reset_index(drop=True))
