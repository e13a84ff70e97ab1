"""Each fact in one place, and layers that point one way.

A toy method (one method-table entry plus its mixing function) and a toy metric (one metric
entry) registered here reach validation, the sweep space, the store and the report without any
other file knowing them; the library imports neither ``tune`` nor ``ablations`` (but for the
command line's lazy imports); the analysis never imports torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_method():
    """``toy_mix``: hard sources, its own mixer (the sources' images averaged in whole)."""
    from hardmix import methods
    from hardmix.mix import MIXERS

    def mix_toy(x, source_index, draws, opt):
        lam = torch.full((x.shape[0],), 0.5, device=x.device)
        return 0.5 * x + 0.5 * x.index_select(0, source_index), lam

    methods.register_method(methods.MethodSpec("toy_mix", "toy", "hard", ("alpha", "prob"),
                                               summary="a toy"))
    MIXERS["toy"] = mix_toy
    yield "toy_mix"
    del methods.METHODS["toy_mix"], MIXERS["toy"]


@pytest.fixture
def toy_metric():
    from hardmix.metrics import EPOCH_METRICS, Metric, register_epoch_metric

    register_epoch_metric(Metric("toy_epoch_share", "float", "a toy: the epoch / 10",
                                 group="toy", diagnostic=True,
                                 compute=lambda run: run.epoch / 10.0))
    yield "toy_epoch_share"
    del EPOCH_METRICS["toy_epoch_share"]


def test_a_toy_method_and_metric_reach_validation_space_store_and_report(tmp_path, toy_method,
                                                                         toy_metric):
    from ablations.report import build_report
    from ablations.store import read_results
    from hardmix.commands import run_callbacks
    from hardmix.config import ConfigError, RunConfig, SweepConfig, load_config
    from hardmix.train import train
    from tune.space import grid_points
    from tune.trainable import tune_metrics

    # validation: a valid value, and its fields act as the table says
    base = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
            "optim.epochs=2", "output.progress=false", f"output.dir={tmp_path}"]
    cfg = load_config(RunConfig, overrides=base + ["augment.method=toy_mix"])
    assert cfg.augment.method == "toy_mix"
    with pytest.raises(ConfigError):
        load_config(RunConfig, overrides=base + ["augment.method=toy_mixx"])
    # the sweep space: a hard-source method, so criterion exists for it and not for CutMix
    sweep = load_config(SweepConfig, overrides=[
        "mode=grid", f"storage={tmp_path}",
        "space={augment.method: {values: [cutmix, toy_mix]},"
        " augment.criterion: {values: [misclassified, topk_loss]}}"])
    points = grid_points(sweep)
    assert {"augment.method": "cutmix"} in points and len(points) == 3
    # the store and the report
    store = tmp_path / "study"
    for method in ("cutmix", "toy_mix"):
        for seed in (0, 1):
            run = load_config(RunConfig, overrides=base + [f"augment.method={method}",
                                                           f"seed={seed}"])
            name = f"{method}-s{seed}"
            train(run, run_callbacks(run, str(store), name), tmp_path / name)
    trials, epochs = read_results(str(store)).to_pandas()
    toy = trials[trials["augment.method"] == "toy_mix"]
    assert len(toy) == 2 and toy["augment.criterion"].notna().all()
    assert trials.loc[trials["augment.method"] == "cutmix", "augment.criterion"].isna().all()
    assert sorted(epochs["toy_epoch_share"]) == [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2]
    assert tune_metrics({"epoch": 1, "toy_epoch_share": 0.1}, {}, 1, 2)["toy_epoch_share"] == 0.1
    rep = build_report(str(store))
    assert "toy_epoch_share" in rep.main_table.columns
    assert any(c.factor == "augment.method" and c.value == "toy_mix" for c in rep.contrasts)


def test_the_library_never_imports_tune_or_ablations_but_from_the_command_line():
    allowed = {"cli.py", "commands.py"}
    for path in (REPO / "hardmix").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in ("tune", "ablations"):
                    assert path.name in allowed, f"{path.relative_to(REPO)} imports {name}"
                    # ... and only lazily, inside a function
                    assert node.col_offset > 0, f"{path.name} imports {name} at module level"


def test_analysis_and_config_checks_import_no_torch():
    code = ("import sys; import ablations.report, ablations.store, hardmix.config, "
            "hardmix.methods, hardmix.metrics, hardmix.datasets, hardmix.cli; "
            "from hardmix.config import load_config, RunConfig, check_run_environment; "
            "cfg = load_config(RunConfig, overrides=['data.name=digits']); "
            "check_run_environment(cfg, outputs=False); "
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_every_method_field_and_metric_has_one_home():
    """Which fields a method reads is the method table's; the schema's choices are the tables
    themselves (a registry, not a copy)."""
    import dataclasses

    from hardmix.config import AugmentConfig, DataConfig
    from hardmix.datasets import DATASETS
    from hardmix.methods import CRITERIA, FALLBACKS, METHODS, SIGNALS

    meta = {f.name: f.metadata for f in dataclasses.fields(AugmentConfig)}
    assert meta["method"]["choices"] is METHODS and meta["criterion"]["choices"] is CRITERIA
    assert meta["fallback"]["choices"] is FALLBACKS and meta["signal"]["choices"] is SIGNALS
    assert {f.name: f.metadata for f in dataclasses.fields(DataConfig)}["name"]["choices"] \
        is DATASETS
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    from hardmix.methods import SALIENCY, Switch
    read = set()
    for m in METHODS.values():
        read |= set(m.reads)
    for table in (CRITERIA, FALLBACKS, SIGNALS, SALIENCY):
        for sw in table.values():
            assert isinstance(sw, Switch)
            read |= set(sw.reads)
    # every augment field is a switch or read by some entry of the table
    assert fields - read <= {"method", "criterion", "fallback", "min_hard", "signal"}
