"""`hardmix report` on synthetic sweeps with known answers.

Expected means, standard deviations, differences, Bonferroni levels, simultaneous intervals and
verdicts are recomputed here with numpy/scipy, and the main table once more with DuckDB straight
from the Parquet files (independently of the project's reader).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablations.importance import importance_study
from ablations.report import build_report, report_from_cli
from ablations.store import ResultStore
from hardmix.cli import main
from hardmix.config import ConfigError
from results_fixtures import config, write_run

SEEDS = [0, 1, 2, 3]
# (method, alpha, criterion) -> final top-1 error per seed, fallback rate of those runs.
KNOWN = {
    ("cutmix", 1.0, None): ([4.10, 3.95, 4.20, 4.05], 0.0),
    ("hardmix", 1.0, "misclassified"): ([3.80, 3.70, 3.95, 3.72], 0.20),
    ("hardmix", 0.5, "misclassified"): ([3.90, 4.00, 3.85, 4.10], 0.30),
    ("hardmix", 1.0, "topk_loss"): ([4.00, 3.96, 4.18, 4.01], 0.0),
}
WELCH = ("hardmix", 2.0, "misclassified", [10, 11, 12], [3.6, 3.9, 3.7])  # no shared seed
SINGLE = ("hardmix", 4.0, "misclassified", [0], [5.0])                   # n = 1
EPOCHS = 3


def _cfg(method, alpha, criterion, seed):
    # CutMix trials carry either criterion: it has no effect on CutMix and must not split it.
    crit = criterion or ("misclassified" if seed % 2 else "topk_loss")
    return config(augment__method=method, augment__alpha=alpha, augment__criterion=crit,
                  seed=seed, optim__epochs=EPOCHS)


def make_sweep(root: Path, *, left_out: bool = True, corrupt: bool = True) -> ResultStore:
    st = ResultStore(str(root))
    for (method, alpha, crit), (errs, fb) in KNOWN.items():
        for seed, err in zip(SEEDS, errs):
            write_run(st, f"{method}-{alpha}-{crit}-s{seed}", _cfg(method, alpha, crit, seed),
                      top1=err, top5=err / 4, fallback_rate=fb)
    for method, alpha, crit, seeds, errs in (WELCH, SINGLE):
        for seed, err in zip(seeds, errs):
            write_run(st, f"{method}-{alpha}-s{seed}", _cfg(method, alpha, crit, seed),
                      top1=err, top5=err / 4)
    if left_out:
        cfg = _cfg("hardmix", 1.0, "misclassified", 9)
        write_run(st, "still-running", cfg, top1=None, status="running", n_epochs=1)
        write_run(st, "crashed", cfg, top1=None, status="failed", n_epochs=2,
                  error="FloatingPointError: loss is NaN\nTraceback ...")
        write_run(st, "asha-stopped", cfg, top1=0.5, status="pruned", n_epochs=1)
    if corrupt:
        (Path(st.folder("trials")) / "torn-upload.parquet").write_bytes(b"PAR1 torn")
    return st


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("r") / "ablation"
    make_sweep(root)
    return root


@pytest.fixture(scope="module")
def report(sweep):
    return build_report(str(sweep))


def _row(table: pd.DataFrame, method: str, alpha: float, criterion: str | None) -> pd.Series:
    crit = "—" if criterion is None or pd.isna(criterion) else criterion
    sel = table[(table["method"] == method) & (table["augment.alpha"].astype(float) == alpha)
                & (table["augment.criterion"] == crit)]
    assert len(sel) == 1, (method, alpha, criterion, table)
    return sel.iloc[0]


def test_main_table_means_and_stds(report):
    table = report.main_table
    assert report.factors == ["augment.alpha", "augment.criterion"]
    assert len(table) == len(KNOWN) + 2
    for (method, alpha, crit), (errs, fb) in KNOWN.items():
        row = _row(table, method, alpha, crit)
        assert row["n"] == 4 and row["seeds"] == "0,1,2,3"
        assert row["top1_mean"] == pytest.approx(np.mean(errs))
        assert row["top1_std"] == pytest.approx(np.std(errs, ddof=1))
        assert row["top5_mean"] == pytest.approx(np.mean(errs) / 4)
        assert row["top5_std"] == pytest.approx(np.std(np.divide(errs, 4), ddof=1))
        if method == "hardmix" and crit == "misclassified":
            assert row["fallback_rate"] == pytest.approx(fb)
        else:  # CutMix has no fallback, and a top-k set is never short: NULL, not 0
            assert math.isnan(row["fallback_rate"])
        if method == "cutmix":
            assert math.isnan(row["hard_share"])  # no hard samples for random sources
    single = _row(table, "hardmix", 4.0, "misclassified")
    assert single["n"] == 1 and math.isnan(single["top1_std"])
    # CutMix's inert criterion did not split it; the table's first row is the baseline method.
    assert table.iloc[0]["variant"] == "cutmix (alpha=1)"
    assert "best_top1_mean" not in table  # a minimum over epochs of *test* error: never shown


def _variants():
    """(method, alpha, criterion) -> {seed: error} of the synthetic sweep (criterion None for
    CutMix, where it does not act)."""
    out = {k: dict(zip(SEEDS, errs)) for k, (errs, _) in KNOWN.items()}
    for method, alpha, crit, seeds, errs in (WELCH, SINGLE):
        out[(method, alpha, crit)] = dict(zip(seeds, errs))
    return out


def _test(var: dict, ref: dict):
    common = sorted(set(var) & set(ref))
    if len(common) >= 2:
        d = np.array([var[s] - ref[s] for s in common])
        return "paired", d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1, \
            sps.ttest_1samp(d, 0.0).pvalue
    x, y = np.array(list(var.values())), np.array(list(ref.values()))
    if len(x) < 2 or len(y) < 2:
        return "too_small", None, None, None, None
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    df = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
    return "welch", x.mean() - y.mean(), math.sqrt(va + vb), df, \
        sps.ttest_ind(x, y, equal_var=False).pvalue


def test_contrasts_are_every_one_factor_pair_with_one_bonferroni_family(report):
    """Recomputed here: the pairs of variants that differ in exactly one factor both have
    (CutMix has no criterion), their paired or Welch tests, Bonferroni over the tested ones:
    each at 0.05/m with its (1 - 0.05/m) interval, better / worse exactly when it excludes 0."""
    variants = _variants()
    keys = list(variants)
    expected = {}
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            shared = ["method", "alpha"] + (["criterion"] if a[0] == b[0] == "hardmix" else [])
            idx = {"method": 0, "alpha": 1, "criterion": 2}
            diff = [f for f in shared if a[idx[f]] != b[idx[f]]]
            if len(diff) != 1:
                continue
            f = diff[0]
            # reference: the earlier method, the default alpha (1), the default criterion
            if f == "method":
                ref, var = (a, b) if a[0] == "cutmix" else (b, a)
            elif f == "alpha":
                # the default (1), else the value more trials use
                ref, var = (a, b) if a[1] == 1.0 else (b, a) if b[1] == 1.0 else \
                    ((a, b) if len(variants[a]) > len(variants[b]) else (b, a))
            else:
                ref, var = (a, b) if a[2] == "misclassified" else (b, a)
            expected[(f, ref, var)] = _test(variants[var], variants[ref])
    def label(k):
        return "cutmix (alpha=1)" if k[0] == "cutmix" else \
            f"hardmix (alpha={k[1]:g}, criterion={k[2]})"

    got = {(c.difference.baseline, c.difference.variant): c for c in report.contrasts
           if not c.excluded}
    want = {(label(ref), label(var)): v for (_, ref, var), v in expected.items()}
    assert set(got) == set(want)
    tested = [k for k, v in want.items() if v[0] != "too_small"]
    m = len(tested)
    for key, c in got.items():
        d = c.difference
        kind, mean, se, df, p = want[key]
        assert d.kind == kind, key
        if kind == "too_small":
            assert d.distinguishable is None
            continue
        assert d.m == m and d.p == pytest.approx(p) and d.diff == pytest.approx(mean)
        assert d.p_adjusted == pytest.approx(min(1.0, m * p))
        assert d.verdict == ("better" if p <= 0.05 / m and mean < 0 else
                             "worse" if p <= 0.05 / m else "undetermined")  # no margin
        half = sps.t.ppf(1 - 0.05 / m / 2, df) * se
        assert (d.ci_low, d.ci_high) == pytest.approx((mean - half, mean + half))
        assert d.interval_label == f"simultaneous 95% (Bonferroni over {m}: each " \
            f"{100 * (1 - 0.05 / m):.1f}%)"


def test_differences_are_the_matched_method_contrasts(report):
    """Against CutMix: only variants that match a CutMix variant on every shared factor (α
    here), with the very interval of the contrasts table; the others are listed unmatched."""
    by_pair = {(c.difference.variant, c.difference.baseline): c for c in report.contrasts}
    got = {c.difference.variant: c for c in report.differences}
    assert set(got) == {"hardmix (alpha=1, criterion=misclassified)",
                        "hardmix (alpha=1, criterion=topk_loss)"}
    for v, c in got.items():
        assert c.difference.baseline == "cutmix (alpha=1)"
        same = by_pair[(v, "cutmix (alpha=1)")].difference
        assert (c.difference.ci_low, c.difference.ci_high) == (same.ci_low, same.ci_high)
    assert got["hardmix (alpha=1, criterion=misclassified)"].difference.distinguishable
    md = report.text
    assert "hardmix (alpha=0.5, criterion=misclassified): no `cutmix` variant matches" in md


def test_files_and_markdown(report, sweep):
    out = sweep / "report"
    assert Path(report.out) == out and Path(report.path) == out / "report.md"
    for name in ("report.md", "main_table.csv", "differences.csv", "contrasts.csv",
                 "factor_alpha.csv", "factor_criterion.csv", "importance.csv", "left_out.csv",
                 "skipped_files.csv", "learning_curves.png", "error_by_variant.png",
                 "contrasts.png", "hardness_over_epochs.png", "source_classes.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Main table" in md and "cutmix (alpha=1)" in md
    assert "**better**" in md and "n too small" in md and "**undetermined**" in md
    assert "the 6 comparisons of all one-factor contrasts of this report; Bonferroni" in md
    assert "simultaneous 95% (Bonferroni over 6: each 99.2%) interval" in md
    assert "95% CI" not in md and "## Factor importance" in md
    for png in report.plots.values():
        assert f"]({Path(png).name})" in md
    csv = pd.read_csv(out / "main_table.csv")
    assert len(csv) == len(report.main_table)


def test_left_out_trials_and_corrupt_file_are_reported(report, sweep):
    left = report.left_out.set_index("trial_id")
    assert left.loc["still-running", "reason"] == "still running"
    assert left.loc["crashed", "reason"] == "failed"
    assert left.loc["crashed", "error"] == "FloatingPointError: loss is NaN"
    assert left.loc["asha-stopped", "reason"] == "pruned (stopped early)"
    assert len(report.skipped_files) == 1 and report.skipped_files[0][0].endswith(
        "torn-upload.parquet")
    assert report.n_used == 4 * len(KNOWN) + 4 and report.n_trials == report.n_used + 3
    md = (sweep / "report" / "report.md").read_text()
    assert ("Left out: 1 still running, 1 failed, 1 pruned (stopped early), "
            "1 corrupt file(s) skipped") in md
    assert "torn-upload.parquet" in md


def test_factor_tables(report):
    t = report.tables["factor_alpha"]
    hard = t[t["method"] == "hardmix"].set_index("augment.alpha")
    errs_1 = KNOWN[("hardmix", 1.0, "misclassified")][0] + KNOWN[("hardmix", 1.0, "topk_loss")][0]
    assert hard.loc["1", "n"] == 8
    assert hard.loc["1", "top1_mean"] == pytest.approx(np.mean(errs_1))
    crit = report.tables["factor_criterion"].set_index("augment.criterion")
    assert set(crit["method"]) == {"hardmix"}  # CutMix has no criterion


def test_duckdb_recomputes_the_main_table_from_raw_parquet(tmp_path, capsys):
    duckdb = pytest.importorskip("duckdb")
    root = tmp_path / "acceptance"
    make_sweep(root, left_out=True, corrupt=False)
    assert main(["report", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "cutmix (alpha=1)" in printed and "top-1 err" in printed
    table = pd.read_csv(root / "report" / "main_table.csv", dtype={"augment.alpha": str})
    sql = f"""
        WITH latest AS (
            SELECT * FROM read_parquet('{root}/trials/*/*.parquet', union_by_name = true,
                                       hive_partitioning = true)
            QUALIFY row_number() OVER (PARTITION BY sweep, trial_id ORDER BY written_at DESC) = 1)
        SELECT "augment.method" AS method, "augment.alpha" AS alpha,
               "augment.criterion" AS criterion,  -- NULL where it does not act (CutMix)
               count(*) AS n, avg(final_top1_err) AS top1_mean,
               stddev_samp(final_top1_err) AS top1_std, avg(final_top5_err) AS top5_mean,
               stddev_samp(final_top5_err) AS top5_std
        FROM latest WHERE status = 'completed' AND final_top1_err IS NOT NULL
        GROUP BY ALL ORDER BY ALL"""
    ref = duckdb.sql(sql).df()
    assert len(ref) == len(table)
    for r in ref.itertuples():
        row = _row(table, r.method, r.alpha, r.criterion)
        assert row["n"] == r.n
        for col in ("top1_mean", "top1_std", "top5_mean", "top5_std"):
            want, got = getattr(r, col), row[col]
            if pd.isna(want):
                assert pd.isna(got)
            else:
                assert got == pytest.approx(want, rel=1e-9)


def test_running_sweep_reports_what_it_has(tmp_path):
    st = ResultStore(str(tmp_path / "live"))
    for i in range(2):
        write_run(st, f"r{i}", config(seed=i, optim__epochs=EPOCHS), top1=None, status="running",
                  n_epochs=1)
    rep = build_report(str(tmp_path / "live"))
    assert rep.n_used == 0 and rep.main_table.empty
    assert "No completed trials yet" in rep.text and "2 still running" in rep.text
    assert "(no completed trials yet)" in rep.terminal


def test_empty_or_missing_sweep_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "trials" / "sweep=empty").mkdir(parents=True)
    with pytest.raises(ConfigError, match="empty sweep"):
        report_from_cli(str(tmp_path / "empty"))
    for path in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hardmix: error: path = ")
    assert main(["report", str(tmp_path / "empty"), "--baseline", "cutmixx"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_importance_uses_full_length_completed_trials_only():
    rows = []
    for i, (alpha, crit, status, ran) in enumerate([
            (0.5, "misclassified", "completed", 4), (1.0, "misclassified", "completed", 4),
            (2.0, "topk_loss", "completed", 4), (1.0, "topk_loss", "completed", 4),
            (0.5, "topk_loss", "pruned", 1), (2.0, "misclassified", "completed", 2),
            (1.0, "misclassified", "failed", 3), (1.0, "misclassified", "running", 1)]):
        rows.append({**config(augment__alpha=alpha, augment__criterion=crit, optim__epochs=4,
                              augment__k=0.1 * (i + 1)),
                     "status": status, "epochs_run": ran, "final_val_top1_err": 3.0 + i})
    study, note = importance_study(pd.DataFrame(rows), ["augment.alpha", "augment.criterion",
                                                        "augment.k"])
    values = sorted(t.value for t in study.trials)
    assert values == [3.0, 4.0, 5.0, 6.0]  # completed and full length: the first four rows
    assert "4 full-length completed trials (of 8)" in note
    for t in study.trials:  # k is a conditional parameter: only topk_loss trials have it
        assert ("augment.k" in t.params) == (t.params["augment.criterion"] == "topk_loss")


def test_report_to_an_object_store_uri(tmp_path, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    import ablations.report as report_mod

    mem = fsspec.filesystem("memory")
    fs = PyFileSystem(FSSpecHandler(mem))
    real = report_mod._resolve
    monkeypatch.setattr(report_mod, "_resolve",
                        lambda p, f=None: (fs, p.split("://", 1)[1]) if p.startswith("s3://")
                        else real(p, f))
    make_sweep(tmp_path / "sw", left_out=False, corrupt=False)
    rep = build_report(str(tmp_path / "sw"), out="s3://bucket/reports/sw")
    names = {p.rsplit("/", 1)[-1] for p in mem.find("/bucket/reports/sw")}
    assert {"report.md", "main_table.csv", "learning_curves.png"} <= names
    assert rep.path == "s3://bucket/reports/sw/report.md"
    assert mem.cat("/bucket/reports/sw/report.md").decode() == rep.text


def test_arms_contrasts_name_the_settings_that_come_with_a_switch(tmp_path):
    """An arms-style study: every pair that differs in one shared factor is a contrast; the
    settings only one side has (HardMix's fallback against CutMix) come with the change and
    are named in it, so a contrast never hides a second change."""
    seeds = [0, 1, 2]
    arms = {  # name: (config changes, errors per seed)
        "none": (dict(augment__method="none"), [30.0, 31.0, 29.5]),
        "cutmix": (dict(augment__method="cutmix"), [28.0, 28.4, 27.9]),
        "hardmix": (dict(augment__method="hardmix"), [27.0, 27.9, 27.5]),
        "random40": (dict(augment__method="hardmix", augment__min_hard=40), [27.2, 28.0, 27.1]),
        "skip40": (dict(augment__method="hardmix", augment__min_hard=40,
                        augment__fallback="skip"), [29.0, 29.3, 28.8]),
        "skip40b": (dict(augment__method="hardmix", augment__min_hard=40,
                         augment__fallback="skip", augment__alpha=0.5), [29.5, 29.1, 29.0]),
        "topk": (dict(augment__method="hardmix", augment__criterion="topk_loss"),
                 [26.5, 27.0, 26.9]),
    }
    st = ResultStore(str(tmp_path / "study"))
    for name, (changes, errs) in arms.items():
        for seed, err in zip(seeds, errs):
            write_run(st, f"{name}-s{seed}", config(seed=seed, optim__epochs=EPOCHS, **changes),
                      top1=err)
    rep = build_report(str(tmp_path / "study"))

    def acting(changes):  # written out independently of the method table
        c = {k.replace("augment__", ""): v for k, v in changes.items()}
        method = c.get("method")
        out = {"method": method}
        if method in ("cutmix", "hardmix"):
            out["alpha"] = c.get("alpha", 1.0)
        if method == "hardmix":
            out["criterion"] = c.get("criterion", "misclassified")
            if out["criterion"] == "misclassified":
                out.update(fallback=c.get("fallback", "random"), min_hard=c.get("min_hard", 1))
        return out

    names = list(arms)
    want = set()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            fa, fb = acting(arms[a][0]), acting(arms[b][0])
            shared = set(fa) & set(fb)
            if sum(fa[f] != fb[f] for f in shared) == 1:
                want.add(frozenset((a, b)))
    label = {}  # arm name -> variant label, through the errors (unique per arm)
    for v, g in rep.main_table.set_index("variant")["top1_mean"].items():
        label[next(n for n, (_, e) in arms.items() if np.mean(e) == pytest.approx(g))] = v
    got = {frozenset((c.difference.variant, c.difference.baseline)) for c in rep.contrasts}
    assert got == {frozenset(label[n] for n in pair) for pair in want}
    m = len(want)
    raw_p = []
    for c in rep.contrasts:
        d = c.difference
        assert d.n == 3 and d.kind == "paired" and d.m == m
        raw_p.append(d.p)
    assert min(rep.tables["contrasts"]["p_adjusted"]) == pytest.approx(min(1.0, m * min(raw_p)))
    changes = set(rep.tables["contrasts"]["change"])
    assert "cutmix → hardmix (criterion=misclassified, fallback=skip, min_hard=40)" in changes
    assert "1 → 40" in changes and "random → skip" in changes
    assert "## Comparisons" in rep.text
    assert (tmp_path / "study" / "report" / "contrasts.csv").exists()


def test_a_rate_that_is_small_but_not_zero_never_prints_as_zero():
    """A fallback that fired on one step in 5,000 must not read as "never fired"."""
    import pandas as pd

    from ablations.report import md_table

    table = md_table(pd.DataFrame({"fallback rate": [0.0002, 0.0, 0.25]}), digits=3)
    assert table.splitlines()[2:] == ["| <0.001 |", "| 0.000 |", "| 0.250 |"]


def test_a_contrast_reads_the_same_in_the_tables_and_the_plot(tmp_path, monkeypatch):
    """Parquet hands integers of a mixed column back as floats (min_hard 1.0): the change is
    printed once, as the tables print values, and the forest plot's labels use that text."""
    from ablations import plots
    from ablations.report import Contrast, contrast_table
    from ablations.stats import Difference

    d = Difference("hardmix (min_hard=16)", "hardmix", "paired", 5, 5, diff=-0.2, se=0.1,
                   df=4.0, p=0.1, p_adjusted=0.2, ci_low=-0.5, ci_high=0.1, m=2,
                   correction="bonferroni", alpha=0.05, level=0.025, verdict="undetermined",
                   distinguishable=False)
    c = Contrast("augment.min_hard", 1.0, 16.0, d, dependents="fallback=random")
    assert c.change == "1 → 16 (fallback=random)"
    assert contrast_table([c])["change"].tolist() == [c.change]
    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(
        [t.get_text() for t in fig.axes[0].get_yticklabels()]) or path)
    plots.contrast_forest([c], "family", tmp_path / "c.png")
    assert len(seen) == 1 and "1 → 16 (fallback=random)" in seen[0][0].replace("\n", " ")
    assert "1.0" not in seen[0][0]


def test_a_matched_baseline_outside_the_family_is_named_not_called_missing(sweep, tmp_path):
    """With ``--family criterion`` the method contrasts are not tested, but the CutMix variant
    that matches HardMix is there: the report says why it is not compared, never that no
    CutMix variant matches."""
    rep = build_report(str(sweep), out=str(tmp_path / "r"), family=["criterion"])
    assert rep.differences == []
    md = rep.text
    matched = "hardmix (alpha=1, criterion=misclassified): matched by cutmix (alpha=1), " \
              "but not tested here (outside the family; `--family method` tests it)."
    assert matched in md
    assert "hardmix (alpha=1, criterion=misclassified): no `cutmix` variant" not in md
    assert "hardmix (alpha=0.5, criterion=misclassified): no `cutmix` variant matches" in md


def test_a_mean_of_equal_numbers_prints_as_zero_not_as_a_small_value():
    """Equal errors on every seed leave a rounding residue (1e-15), which is zero, not <0.001."""
    import pandas as pd

    from ablations.report import md_table

    residue = float(np.mean(np.array([22.81, 23.07, 22.69]) - np.array([22.81, 23.07, 22.69])
                            + 1e-15))
    table = md_table(pd.DataFrame({"Δ": [residue, -residue]}), digits=3)
    assert table.splitlines()[2:] == ["| 0.000 |", "| 0.000 |"]


def test_a_followed_up_search_compares_only_the_re_runs(tmp_path):
    """The search's exploration chose the follow-up's configurations by one run's validation
    error, so that run must not count as evidence for its own configuration: the tables use the
    follow-up's re-runs only, the exploration gets its own section, and the importance model
    sees the exploration alone (not the follow-up's 2 configurations x seeds)."""
    root = tmp_path / "search"
    st = ResultStore(str(root))
    root.mkdir()
    (root / "sweep.yaml").write_text("mode: search\nname: search\n")
    alphas = np.linspace(0.2, 2.0, 22)
    crits = ["misclassified", "topk_loss"]
    for i, alpha in enumerate(alphas):
        top1 = 10.0 if i == 5 else 30.0 + i  # c005 is the lucky, chosen one
        write_run(st, f"c{i:03d}-s100",
                  config(augment__method="hardmix", augment__alpha=float(alpha),
                         augment__criterion=crits[i % 2], seed=100, optim__epochs=EPOCHS),
                  top1=top1)
    for i in range(22, 25):  # stopped by ASHA at the first rung
        write_run(st, f"c{i:03d}-s100",
                  config(augment__method="hardmix", augment__alpha=0.3, seed=100,
                         augment__criterion="misclassified", optim__epochs=EPOCHS),
                  top1=60.0, status="pruned", n_epochs=1)
    chosen = dict(augment__alpha=float(alphas[5]), optim__epochs=EPOCHS)
    for seed, (hm, cm) in enumerate([(20.0, 21.0), (21.0, 22.0), (22.0, 23.5)]):
        write_run(st, f"f000-s{seed}", config(augment__method="hardmix", seed=seed,
                                              augment__criterion=crits[1], **chosen), top1=hm)
        write_run(st, f"f001-s{seed}", config(augment__method="cutmix", seed=seed, **chosen),
                  top1=cm)

    rep = build_report(str(root), out=str(tmp_path / "r"))
    assert set(rep.main_table["n"]) == {3}  # the chosen run (10.0) is not in its variant
    hm = rep.main_table[rep.main_table["method"] == "hardmix"].iloc[0]
    assert hm["top1_mean"] == pytest.approx(21.0)
    (diff,) = rep.differences
    assert diff.difference.n == 3 and diff.difference.diff == pytest.approx(-3.5 / 3)
    assert rep.left_out.empty  # the exploration is not "left out": it has its own section

    search = rep.tables["search"]
    assert len(search) == 25 and set(search["trial"]) == {f"c{i:03d}-s100" for i in range(25)}
    assert search.iloc[0]["trial"] == "c005-s100" and search.iloc[0]["followed up"] == "yes"
    assert (search["followed up"] == "yes").sum() == 1
    assert list(search["epochs"])[-3:] == ["1", "1", "1"]  # early stops after full runs
    assert "## Search" in rep.text and "The 25 trials of the search phase" in rep.text
    assert (tmp_path / "r" / "search.csv").exists()
    # A follow-up that has only started re-runs its configuration all the same.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sweep.yaml").write_text("mode: search\nname: fresh\n")
    st2 = ResultStore(str(fresh))
    for i in (4, 5):
        write_run(st2, f"c{i:03d}-s100",
                  config(augment__method="hardmix", augment__alpha=float(alphas[i]),
                         augment__criterion=crits[1], seed=100, optim__epochs=EPOCHS), top1=30.0)
    write_run(st2, "f000-s0", config(augment__method="hardmix", seed=0,
                                     augment__criterion=crits[1], **chosen), top1=None,
              status="running")
    again = build_report(str(fresh), out=str(tmp_path / "r2")).tables["search"]
    assert (again["followed up"] == "yes").sum() == 1
    assert again.set_index("trial").loc["c005-s100", "followed up"] == "yes"

    imp = rep.tables["importance"]
    assert not imp.empty and set(imp["n"]) == {22}  # the exploration's full-length runs only
    assert "augment.method" not in set(imp["factor"]) and "method" not in set(imp["factor"])


def test_a_search_asha_cut_short_gets_its_importance_at_an_early_rung_labelled_so(tmp_path):
    """3 of 25 configurations ran to the end: no importance of the final error (n < 20), but
    every trial reached epoch 1, so the importance of the epoch-1 validation error is shown,
    labelled as what early stopping decided on, over the 25 trials that have it."""
    root = tmp_path / "asha"
    root.mkdir()
    (root / "sweep.yaml").write_text("mode: search\nname: asha\n")
    st = ResultStore(str(root))
    rng = np.random.default_rng(0)
    for i in range(25):
        # three history trials, spread over alpha, are far ahead at epoch 1
        crit = "history" if i in (4, 12, 20) else ["misclassified", "topk_loss"][i % 2]
        top1 = (10.0 if crit == "history" else 40.0) + rng.normal(0, 0.5)
        full = i < 3
        write_run(st, f"c{i:03d}-s100",
                  config(augment__method="hardmix", augment__alpha=float(0.2 + 0.07 * i),
                         augment__criterion=crit, seed=100, optim__epochs=EPOCHS),
                  top1=top1, status="completed" if full else "pruned",
                  n_epochs=EPOCHS if full else 1)
    rep = build_report(str(root), out=str(tmp_path / "r"))
    assert rep.tables["importance"].empty
    assert "Not computed: 3 full-length completed trials" in rep.text
    early = rep.tables["importance_early"]
    assert set(early["n"]) == {25}
    assert early.iloc[0]["factor"] == "augment.criterion"  # what separates the epoch-1 errors
    assert "### At an early rung" in rep.text
    assert "25 trials that reached epoch 1 (of 25); target: val_top1_err at epoch 1" in rep.text
    assert (tmp_path / "r" / "importance_early.csv").exists()


def test_a_grid_never_gets_an_early_rung_importance(report):
    assert "importance_early" not in report.tables and "At an early rung" not in report.text


def test_an_importance_outside_its_own_interval_is_flagged():
    from ablations.importance import outside_interval

    table = pd.DataFrame({"factor": ["a", "b", "c"], "importance": [0.945, 0.03, 0.02],
                          "ci_low": [0.002, 0.01, 0.03], "ci_high": [0.943, 0.6, 0.5]})
    assert outside_interval(table) == ["a", "c"]


# --------------------------------------------------------------------------------------------
# Four-valued verdicts, declared families, the per-trial CSV, seeds reused / avoided
# --------------------------------------------------------------------------------------------

CLASSES = ["plane", "car", "bird", "cat"]
STUDY_SEEDS = list(range(8))


def _study_runs(st: ResultStore, arms: dict, seeds=STUDY_SEEDS, prefix: str = "") -> dict:
    """Arms ``name -> (config changes, top-1 shift)``: per seed a top-1 error, a top-5 error,
    a final test NLL and ECE, per-class errors and (mixing arms) source counts, written as a run
    writes them. Returns ``{(arm, seed): row}`` with the numbers written."""
    rng = np.random.default_rng(len(prefix))
    written = {}
    for name, (changes, shift) in arms.items():
        for seed in seeds:
            noise = np.random.default_rng(1000 + seed).normal(0, 0.3)  # shared by seed: paired
            top1 = 30.0 + shift + noise + rng.normal(0, 0.05)
            row = dict(top1=top1, top5=top1 / 4 + rng.normal(0, 0.02),
                       nll=top1 / 30 + rng.normal(0, 0.001), ece=2.0 + shift + rng.normal(0, 0.1),
                       cls=[top1 + d for d in (-5.0, -10.0, 8.0, 7.0)],
                       src=[int(x) for x in rng.integers(10, 60, 4)])
            tid = f"{prefix}{name}-s{seed}"
            cfg = config(seed=seed, optim__epochs=2, **changes)
            base = {**cfg, "trial_id": tid, "attempt": 1, "device": "cpu",
                    "versions": {"torch": "x"}, "git_commit": "abc", "classes": CLASSES}
            st.write_trial({**base, "status": "running", "error": ""})
            mixes = changes.get("augment__method", "hardmix") != "none"
            for e in (1, 2):
                last = e == 2
                st.write_epochs(tid, [dict(
                    epoch=e, train_loss=1.0, test_top1_err=top1 + (0 if last else 5),
                    test_top5_err=row["top5"], test_loss=row["nll"] + (0 if last else 0.3),
                    test_ece=row["ece"] + (0 if last else 3.0), lr=0.1,
                    test_class_err=row["cls"] if last else [50.0] * 4,
                    source_class_counts=row["src"] if mixes else None)])
            st.write_trial({**base, "status": "completed", "error": "", "final_top1_err": top1,
                            "final_top5_err": row["top5"], "final_val_top1_err": top1 + 1,
                            "epochs_run": 2, "wall_seconds": 6.0})
            written[(name, seed)] = row
    return written


MAIN_ARMS = {"none": (dict(augment__method="none"), 3.0),
             "cutmix": (dict(augment__method="cutmix"), 0.0),
             "hardmix": (dict(augment__method="hardmix"), -0.02)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "main"
    written = _study_runs(ResultStore(str(root)), MAIN_ARMS)
    (root / "sweep.yaml").write_text("name: main\nmode: grid\nanalysis:\n  margin: 0.5\n"
                                     "  family: [method]\n  avoid_seeds: [7]\n")
    return root, written, build_report(str(root))


def _paired(written, arm, ref, key):
    return np.array([written[(arm, s)][key] - written[(ref, s)][key] for s in STUDY_SEEDS])


def test_declared_margin_gives_four_valued_verdicts_with_power(study):
    """sweep.yaml declares margin 0.5 and the method family: cutmix -> hardmix (a true Δ of
    -0.02 with tiny noise) is equivalent within ±0.5; none -> cutmix is better; each verdict,
    TOST and MDE recomputed here with scipy."""
    root, written, rep = study
    assert rep.margin == 0.5
    members = {(c.difference.baseline.split()[0], c.difference.variant.split()[0]): c
               for c in rep.contrasts if not c.excluded}
    assert set(members) == {("none", "cutmix"), ("none", "hardmix"), ("cutmix", "hardmix")}
    m = 3
    for (ref, var), c in members.items():
        d = c.difference
        x = _paired(written, var, ref, "top1")
        se = x.std(ddof=1) / math.sqrt(x.size)
        assert d.diff == pytest.approx(x.mean()) and d.level == pytest.approx(0.05 / m)
        p_tost = max(sps.t.sf((x.mean() + 0.5) / se, x.size - 1),
                     sps.t.cdf((x.mean() - 0.5) / se, x.size - 1))
        assert d.p_tost == pytest.approx(p_tost)
        p = sps.ttest_1samp(x, 0).pvalue
        expect = ("better" if p <= 0.05 / m and x.mean() < 0 else "worse" if p <= 0.05 / m
                  else "equivalent" if p_tost <= 0.05 / m else "undetermined")
        assert d.verdict == expect
        # MDE: the effect the test detects with 80% power at 0.05/3, from the noncentral t.
        df, c_t = x.size - 1, sps.t.isf(0.05 / m / 2, x.size - 1)
        ncp = d.mde / x.std(ddof=1) * math.sqrt(x.size)
        assert sps.nct.sf(c_t, df, ncp) + sps.nct.cdf(-c_t, df, ncp) == pytest.approx(0.8, abs=1e-3)
    assert members[("cutmix", "hardmix")].difference.verdict == "equivalent"
    assert members[("none", "cutmix")].difference.verdict == "better"
    md = rep.text
    assert "equivalent within ±0.5" in md and "margin ±0.5 points" in md
    assert "TOST of |Δ| ≥ 0.5" in md and "MDE at 80% power" in md
    table = pd.read_csv(root / "report" / "contrasts.csv")
    assert {"verdict", "mde", "seeds_margin", "p_tost", "interval", "sentence"} <= set(table)
    assert set(table["verdict"]) == {"better", "equivalent"}
    # Printed on the terminal too: every contrast's verdict, MDE and seeds.
    assert "primary family: top-1 error" in rep.terminal
    assert rep.terminal.count("equivalent within ±0.5") == 1


def test_margin_on_the_command_line_overrides_the_declared_one(study, tmp_path, capsys):
    root, _, _ = study
    rep = build_report(str(root), out=str(tmp_path / "r"), margin=0.01)
    pair = [c.difference for c in rep.contrasts
            if c.difference.variant.startswith("hardmix") and
            c.difference.baseline.startswith("cutmix")][0]
    assert pair.margin == 0.01 and pair.verdict == "undetermined"
    assert pair.seeds_resolve > pair.n and "seeds would resolve it" in rep.text
    assert main(["report", str(root), "--out", str(tmp_path / "c"), "--margin", "0.01"]) == 0
    assert "undetermined (≈" in capsys.readouterr().out
    assert main(["report", str(root), "--out", str(tmp_path / "c"), "--margin", "-1"]) == 2
    assert "--margin" in capsys.readouterr().err


def test_secondary_families_are_corrected_on_their_own(study):
    """top-5 error, test NLL (the last epoch's mean cross-entropy) and ECE: the primary
    family's contrasts, each family at 0.05/3, each in its own section."""
    root, written, rep = study
    assert list(rep.secondary) == ["top5", "nll", "ece"]
    for name, key in (("top5", "top5"), ("nll", "nll"), ("ece", "ece")):
        items = rep.secondary[name]
        assert len(items) == 3
        for c in items:
            d = c.difference
            ref, var = d.baseline.split()[0], d.variant.split()[0]
            x = _paired(written, var, ref, key)
            assert d.diff == pytest.approx(x.mean()) and d.m == 3
            assert d.level == pytest.approx(0.05 / 3) and d.interval_label.startswith(
                "simultaneous 95% (Bonferroni over 3")
            assert d.p == pytest.approx(sps.ttest_1samp(x, 0).pvalue)
            assert math.isnan(d.margin) and d.verdict != "equivalent"
        assert (root / "report" / f"contrasts_{name}.csv").is_file()
    md = rep.text
    for title in ("### Secondary family: top-5 error", "### Secondary family: test NLL",
                  "### Secondary family: test ECE"):
        assert title in md
    assert md.index("### Primary family: top-1 error") < md.index("### Secondary family")


def test_per_trial_csv_reproduces_every_number(study):
    """trials.csv alone (no Parquet) gives back the main table's means and every contrast's Δ,
    p-value and interval."""
    root, written, rep = study
    trials = pd.read_csv(root / "report" / "trials.csv")
    assert len(trials) == 3 * len(STUDY_SEEDS) and trials["trial_id"].is_unique
    assert {"sweep", "trial_id", "arm", "seed", "final_top1_err", "final_top5_err",
            "final_test_loss", "final_test_ece", "mean_hard_share"} <= set(trials)
    for _, row in rep.main_table.iterrows():
        g = trials[trials["arm"] == row["variant"]]
        assert g["final_top1_err"].mean() == pytest.approx(row["top1_mean"])
        assert g["final_top1_err"].std(ddof=1) == pytest.approx(row["top1_std"])
    for c in rep.contrasts:
        d = c.difference
        a = trials[trials["arm"] == d.variant].set_index("seed")["final_top1_err"]
        b = trials[trials["arm"] == d.baseline].set_index("seed")["final_top1_err"]
        x = (a - b).dropna()
        assert d.diff == pytest.approx(x.mean()) and d.p == pytest.approx(
            sps.ttest_1samp(x, 0).pvalue)
        half = sps.t.ppf(1 - d.level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
        assert (d.ci_low, d.ci_high) == pytest.approx((x.mean() - half, x.mean() + half))
    # Per-class errors and source shares: the class table derives from the same rows.
    hard = trials[trials["arm"] == "hardmix"]
    cut = trials[trials["arm"] == "cutmix"]
    table = rep.tables["class_errors"].set_index("class")
    for name in CLASSES:
        assert table.loc[name, "hardmix (%)"] == pytest.approx(hard[f"class_err[{name}]"].mean())
        assert table.loc[name, "Δ (points)"] == pytest.approx(
            hard[f"class_err[{name}]"].mean() - cut[f"class_err[{name}]"].mean())
        assert table.loc[name, "share as hardmix source (%)"] == pytest.approx(
            100 * hard[f"source_share[{name}]"].mean())


def test_seeds_declared_to_avoid_and_seeds_reused_across_pooled_sweeps(study, tmp_path):
    root, _, rep = study
    assert any("declared to avoid (7" in n for n in rep.notes)
    pooled = tmp_path / "pool"
    _study_runs(ResultStore(str(pooled / "a")), {"cutmix": MAIN_ARMS["cutmix"]}, seeds=[0, 1, 2])
    _study_runs(ResultStore(str(pooled / "b")), {"hardmix": MAIN_ARMS["hardmix"]},
                seeds=[2, 3, 4], prefix="b-")
    rep2 = build_report(str(pooled))
    (note,) = [n for n in rep2.notes if "seeds reused" in n]
    assert "seed 2 in a, b" in note and "seed 3" not in note
    assert "seeds reused across the pooled sweeps" in rep2.text


def test_forest_plot_names_its_interval_and_draws_the_margin(study, monkeypatch, tmp_path):
    from ablations import plots

    _, _, rep = study
    members = [c for c in rep.contrasts if not c.excluded]
    seen = {}

    def grab(fig, path):
        ax = fig.axes[0]
        seen["title"] = ax.get_title()
        seen["spans"] = [p for p in ax.patches]
        seen["legend"] = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
        return path

    monkeypatch.setattr(plots, "_save", grab)
    plots.contrast_forest(members, rep.family, tmp_path / "f.png", 0.5)
    title = seen["title"].replace("\n", " ")
    assert "simultaneous 95% (Bonferroni over 3: each 98.3%) intervals" in title
    assert "TOST's 96.7% intervals" in title
    assert any(abs(p.get_x() + 0.5) < 1e-9 and abs(p.get_width() - 1.0) < 1e-9
               for p in seen["spans"])  # the band from -0.5 to +0.5
    assert "±0.5 points: the declared margin" in seen["legend"]
    assert {"better", "equivalent"} <= set(seen["legend"])


def test_forest_plot_draws_the_sequential_interval_of_an_until_resolved_sweep(
        study, monkeypatch, tmp_path):
    """With the sequential verdicts (ablations.looks.sequential_finals), each decided contrast
    gets its last look's repeated interval, dashed, in the sequential verdict's colour, its
    label says the verdict, and an interval wider than the axes ends in arrows."""
    from ablations import plots

    _, _, rep = study
    members = [c for c in rep.contrasts if not c.excluded]
    first = members[0].difference
    label = f"{first.baseline} → {first.variant}"
    seq = {label: {"verdict": "continue", "look": 1, "n": 3, "delta": first.diff,
                   "low": first.diff - 40.0, "high": first.diff + 40.0}}
    seen = {}

    def grab(fig, path):
        ax = fig.axes[0]
        seen["dashed"] = [ln for ln in ax.lines if ln.get_linestyle() not in ("-", "None")]
        seen["markers"] = [ln.get_marker() for ln in ax.lines]
        seen["ticks"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["xlim"] = ax.get_xlim()
        seen["legend"] = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
        return path

    monkeypatch.setattr(plots, "_save", grab)
    plots.contrast_forest(members, rep.family, tmp_path / "f.png", 0.5, sequential=seq)
    (line,) = seen["dashed"]
    assert line.get_color() == plots.VERDICT_COLORS["continue"]
    lo, hi = seen["xlim"]
    assert hi - lo < 40  # the axes keep the fixed-n intervals readable
    assert list(line.get_xdata()) == pytest.approx([lo, hi])
    assert "<" in seen["markers"] and ">" in seen["markers"]
    assert sum("sequential (dashed): continue at look 1, n=3" in t for t in seen["ticks"]) == 1
    assert "continue" in seen["legend"]


def test_a_sweep_that_lists_a_seed_it_declared_to_avoid_is_refused(tmp_path):
    """analysis.avoid_seeds (a pilot's seeds): the sweep's seeds, an arm's and the follow-up's
    are checked before anything runs; one error naming the field."""
    from hardmix.config import SweepConfig, load_config

    base = [f"storage={tmp_path}", f"run.output.dir={tmp_path}", "analysis.avoid_seeds=[3, 4]"]
    load_config(SweepConfig, overrides=base + ["seeds=[0, 1, 2]"])
    for extra, field in ((["seeds=[2, 3]"], "seeds"),
                         (["followup.top=2", "followup.seeds=[4]"], "followup.seeds"),
                         (["mode=grid", "arms=[{augment.method: cutmix, seeds: [1, 4]}]"],
                          "arms[0].seeds")):
        with pytest.raises(ConfigError) as err:
            load_config(SweepConfig, overrides=base + extra)
        assert err.value.field == field and "analysis.avoid_seeds" in str(err.value)


def _curves_fixture(n_epochs: int = 20):
    """Two variants x 3 seeds, test error evaluated every 5 epochs and at the last,
    validation every 2."""
    rows, trials = [], []
    for v, off in (("cutmix", 0.0), ("hardmix", -0.5)):
        for seed in range(3):
            tid = f"{v}-{seed}"
            trials.append({"trial_id": tid, "variant": v, "final_top1_err": 25 + off})
            for e in range(1, n_epochs + 1):
                test = e % 5 == 0 or e == n_epochs
                rows.append({"trial_id": tid, "variant": v, "epoch": e,
                             "test_top1_err": 25 + off + 20 / e + seed if test else np.nan,
                             "val_top1_err": 26 + off + 20 / e if e % 2 == 0 else np.nan,
                             "train_loss": 1 / e})
    return pd.DataFrame(trials), pd.DataFrame(rows)


def test_learning_curves_zoom_on_the_last_fifth_and_tick_the_evaluated_epochs(monkeypatch,
                                                                                tmp_path):
    from ablations import plots

    trials, epochs = _curves_fixture(20)
    seen = {}

    def grab(fig, path):
        seen["axes"] = fig.axes
        return path

    monkeypatch.setattr(plots, "_save", grab)
    colors = plots.variant_colors(["cutmix", "hardmix"])
    assert plots.learning_curves(trials, epochs, colors, tmp_path / "c.png") is not None
    full, zoom, val, loss = seen["axes"]
    assert "last 20% of epochs (16–20" in zoom.get_title()
    zoomed = [line.get_xdata() for line in zoom.get_lines()]
    assert zoomed and all(min(x) >= 16 for x in zoomed)  # only the last 20% of 20 epochs
    # The zoom's y range is the one of the last epochs, not of the whole run.
    last_test = epochs.loc[epochs["epoch"] >= 16, "test_top1_err"].dropna()
    assert zoom.get_ylim()[1] < epochs["test_top1_err"].max()
    assert zoom.get_ylim()[0] <= last_test.min()
    assert list(full.get_xticks(minor=True)) == [5, 10, 15, 20]
    assert list(val.get_xticks(minor=True)) == list(range(2, 21, 2))
    assert list(zoom.get_xticks(minor=True)) == [20]
    # A run of 4 epochs has no last fifth worth a panel: three panels, and the title says so.
    trials, epochs = _curves_fixture(4)
    plots.learning_curves(trials, epochs, colors, tmp_path / "s.png")
    assert len(seen["axes"]) == 3
    assert "no zoom panel below 10 epochs" in seen["axes"][0].figure._suptitle.get_text()


def test_error_bars_never_reach_below_zero(monkeypatch, tmp_path):
    from ablations import plots

    table = pd.DataFrame({"variant": ["a"], "top1_mean": [0.4], "top1_std": [2.0], "n": [3]})
    seen = {}

    def grab(fig, path):
        ax = fig.axes[0]
        seen["x"] = [seg[:, 0] for coll in ax.collections for seg in coll.get_segments()]
        return path

    monkeypatch.setattr(plots, "_save", grab)
    plots.error_by_variant(table, {"a": "tab:blue"}, tmp_path / "e.png")
    ends = np.concatenate(seen["x"])
    assert ends.min() == pytest.approx(0.0) and ends.max() > 0.4 + 1.0


def test_a_family_before_its_first_test_says_so_and_counts_its_comparisons():
    """One seed per arm (an until-resolved sweep's first trials): the family sentence names the
    comparisons it will hold and that none is tested yet, not "the 0 comparisons"."""
    from ablations.contrasts import Contrast
    from ablations.stats import difference
    from ablations.verdicts_text import family_text

    one = [Contrast("augment.method", "cutmix", v, difference(v, [22.5], [10], "cutmix", [22.4],
                                                               [10]))
           for v in ("hardmix", "hardmix (topup)")]
    text = family_text(one, ["method"], "bonferroni", 0.5)
    assert "the 2 comparisons of the one-factor contrasts over method; none tested yet" in text
    assert "the 0 comparisons" not in text and "tested at 0.05" not in text
