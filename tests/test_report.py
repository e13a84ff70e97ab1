"""`hardmix report` on synthetic sweeps with known answers.

Expected means, standard deviations, differences and Holm-corrected intervals are recomputed
here with numpy/scipy, and the main table once more with DuckDB straight from the Parquet files
(independently of the project's reader).
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
        assert row["fallback_rate"] == pytest.approx(fb)
    single = _row(table, "hardmix", 4.0, "misclassified")
    assert single["n"] == 1 and math.isnan(single["top1_std"])
    # CutMix's inert criterion did not split it; the table's first row is the baseline method.
    assert table.iloc[0]["variant"] == "cutmix (alpha=1)"


def _holm(ps):
    m, out, prev, ok = len(ps), {}, 0.0, True
    levels = {}
    fail_level = None
    for rank, i in enumerate(np.argsort(ps)):
        prev = max(prev, min(1.0, (m - rank) * ps[i]))
        ok = ok and ps[i] <= 0.05 / (m - rank)
        if not ok and fail_level is None:
            fail_level = 0.05 / (m - rank)
        levels[i] = 0.05 / (m - rank) if ok else fail_level
        out[i] = (prev, ok)
    return out, levels


def test_differences_against_cutmix_paired_welch_and_too_small(report):
    base = np.array(KNOWN[("cutmix", 1.0, None)][0])
    diffs = {d.variant: d for d in report.differences}
    assert len(diffs) == 5 and all(d.baseline == "cutmix (alpha=1)" for d in diffs.values())
    paired = {k: v for k, v in KNOWN.items() if k[0] != "cutmix"}
    labels = {("hardmix", 1.0, "misclassified"): "hardmix (alpha=1, criterion=misclassified)",
              ("hardmix", 0.5, "misclassified"): "hardmix (alpha=0.5, criterion=misclassified)",
              ("hardmix", 1.0, "topk_loss"): "hardmix (alpha=1, criterion=topk_loss)"}
    refs = []
    for key, (errs, _) in paired.items():
        refs.append((labels[key], np.array(errs) - base, "paired"))
    welch_x = np.array(WELCH[4])
    refs.append(("hardmix (alpha=2, criterion=misclassified)", welch_x, "welch"))
    ps = []
    for label, x, kind in refs:
        p = (sps.ttest_1samp(x, 0.0).pvalue if kind == "paired"
             else sps.ttest_ind(x, base, equal_var=False).pvalue)
        ps.append(p)
    holm, levels = _holm(ps)
    for i, (label, x, kind) in enumerate(refs):
        d = diffs[label]
        assert d.kind == kind and d.m == 4
        assert d.p == pytest.approx(ps[i])
        assert d.p_holm == pytest.approx(holm[i][0])
        assert d.distinguishable == holm[i][1]
        if kind == "paired":
            mean, se, df = x.mean(), x.std(ddof=1) / 2, 3
        else:
            va, vb = x.var(ddof=1) / x.size, base.var(ddof=1) / base.size
            mean, se = x.mean() - base.mean(), math.sqrt(va + vb)
            df = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (base.size - 1))
        half = sps.t.ppf(1 - levels[i] / 2, df) * se
        assert (d.ci_low, d.ci_high) == pytest.approx((mean - half, mean + half))
    single = diffs["hardmix (alpha=4, criterion=misclassified)"]
    assert single.kind == "too_small" and single.distinguishable is None
    # hardmix α=1 is clearly better in every seed: the data were built so.
    assert diffs[labels[("hardmix", 1.0, "misclassified")]].distinguishable


def test_files_and_markdown(report, sweep):
    out = sweep / "report"
    assert Path(report.out) == out and Path(report.path) == out / "report.md"
    for name in ("report.md", "main_table.csv", "differences.csv", "factor_alpha.csv",
                 "factor_criterion.csv", "criterion_x_fallback.csv", "alpha_by_criterion.csv",
                 "importance.csv", "left_out.csv", "skipped_files.csv", "learning_curves.png",
                 "error_vs_alpha.png", "hardness_over_epochs.png", "source_classes.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Main table" in md and "cutmix (alpha=1)" in md
    assert "distinguishable from noise" in md and "n too small" in md
    assert "Holm" in md and "## Factor importance" in md
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
    ab = report.tables["alpha_by_criterion"].set_index("alpha")
    errs = KNOWN[("hardmix", 0.5, "misclassified")][0]
    assert ab.loc["0.5", "hardmix / misclassified"] == \
        f"{np.mean(errs):.2f} ± {np.std(errs, ddof=1):.2f} (n=4)"


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
               CASE WHEN "augment.method" LIKE 'hard%' THEN "augment.criterion" END AS criterion,
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
                     "status": status, "epochs_run": ran, "final_top1_err": 3.0 + i})
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


def test_one_factor_contrasts_change_one_thing_and_hide_no_second_change(tmp_path):
    """An arms-style study: the contrasts are exactly the pairs that differ in one factor,
    oriented from the reference (earlier method, the paper's default), paired by seed, with
    one Holm family. min_hard 40 is the majority here, yet CutMix -> HardMix compares with the
    paper's HardMix (min_hard 1), not with a variant whose fallback can fire."""
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
    table = rep.tables["contrasts"]
    got = {(r.factor, r.change): r for r in table.itertuples()}
    expected = {("method", "none → cutmix"): ("cutmix", "none"),
                ("method", "none → hardmix"): ("hardmix", "none"),
                ("method", "cutmix → hardmix"): ("hardmix", "cutmix"),
                ("min_hard", "1 → 40"): ("random40", "hardmix"),
                ("fallback", "random → skip"): ("skip40", "random40"),
                ("alpha", "1 → 0.5"): ("skip40b", "skip40"),
                ("criterion", "misclassified → topk_loss"): ("topk", "hardmix")}
    assert set(got) == set(expected), table[["factor", "change", "reference"]]
    m = len(expected)
    raw_p = []
    for key, (after, before) in expected.items():
        d = np.array(arms[after][1]) - np.array(arms[before][1])
        r = got[key]
        assert r.n == 3 and r.test == "paired"
        assert r.delta_top1 == pytest.approx(d.mean())
        raw_p.append(sps.ttest_1samp(d, 0.0).pvalue)
    # Holm over the whole family: the smallest p is multiplied by m.
    assert min(table["p_holm"]) == pytest.approx(min(1.0, m * min(raw_p)))
    assert "## One-factor contrasts" in rep.text and "cutmix → hardmix" in rep.text
    assert (tmp_path / "study" / "report" / "contrasts.csv").exists()
