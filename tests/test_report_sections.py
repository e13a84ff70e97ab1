"""Every section of a report is there when its data is, and its files are exactly those listed.

One small synthetic sweep (two methods x two alphas x three seeds, written through the real
store) is reported once. Then: the fixed settings list what every trial shares, with their
values; each factor gets its marginal table with the counts the sweep has; the differences
compare the method with its matched baseline, paired by seed; a margin given on the command
line reaches every verdict; every table is a CSV of the same rows; the manifest names exactly
the files in the folder.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ablations.report import MANIFEST, build_report
from ablations.store import ResultStore
from results_fixtures import config, write_run

ERRS = {("cutmix", 1.0): [4.1, 4.0, 4.2], ("cutmix", 0.5): [4.3, 4.4, 4.2],
        ("hardmix", 1.0): [3.7, 3.8, 3.6], ("hardmix", 0.5): [3.9, 4.0, 4.1]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("sections") / "sweep"
    st = ResultStore(str(root))
    for (method, alpha), errs in ERRS.items():
        for seed, err in enumerate(errs):
            cfg = config(augment__method=method, augment__alpha=alpha, seed=seed,
                         optim__epochs=2, optim__lr=0.05)
            write_run(st, f"{method}-{alpha}-s{seed}", cfg, top1=err, top5=err / 4)
    out = root.parent / "out"
    return build_report(str(root), out=str(out), margin=0.5), out


def test_fixed_settings_list_what_every_trial_shares(made):
    rep, _ = made
    s = rep.tables["settings"]
    assert {"field", "value"} <= set(s.columns)
    got = dict(zip(s["field"], s["value"].astype(str)))
    assert got.get("optim.lr") == "0.05" and got.get("optim.epochs") == "2"
    assert "augment.alpha" not in got and "augment.method" not in got  # factors, not settings


def test_each_factor_has_its_marginal_table(made):
    rep, _ = made
    names = [n for n in rep.tables if n.startswith("factor_")]
    assert names and any("alpha" in n for n in names)
    t = rep.tables[next(n for n in names if "alpha" in n)]
    assert sorted(t["method"].unique()) == ["cutmix", "hardmix"]
    assert (t["n"] == 3).all() and len(t) == 4
    row = t[(t["method"] == "hardmix") & (t.iloc[:, 1].astype(float) == 1.0)].iloc[0]
    assert row["top1_mean"] == pytest.approx(3.7)


def test_the_differences_compare_the_method_with_its_matched_baseline(made):
    rep, _ = made
    assert rep.differences
    for c in rep.differences:
        assert c.reference_value == "cutmix" and c.value == "hardmix", c.change
        assert c.difference.n == 3 and c.difference.kind == "paired"
    # the margin given reaches every verdict of the primary family
    tested = [c.difference for c in rep.contrasts if c.difference.tested and not c.excluded]
    assert tested and all(d.margin == 0.5 and d.verdict for d in tested)


def test_every_table_is_a_csv_and_the_manifest_names_exactly_the_files(made):
    rep, out = made
    files = sorted(p.name for p in out.iterdir())
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(listed + [MANIFEST]) == files
    for name, table in rep.tables.items():
        assert f"{name}.csv" in files
        if len(table.columns):
            assert len(pd.read_csv(out / f"{name}.csv")) == len(table), name
    assert (out / "report.md").read_text() == rep.text
