"""Optimisers from one registry (``optim.name``: the paper's Nesterov SGD by default, AdamW):
each builds with its own fields, the other optimiser's fields are inert everywhere at once
(NULL in the Parquet rows, ``null`` in HParams, never a varying factor, never searched), and bad
values are one line + exit 2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ablations.factors import varying_factors
from ablations.store import ResultStore, read_results
from hardmix.cli import main
from hardmix.config import ConfigError, OptimConfig, RunConfig, SweepConfig, flatten, load_config
from hardmix.config.acts import CONDITIONAL, SWITCH_COLUMNS, as_run, field_acts
from hardmix.optimizers import OPTIMIZERS
from hardmix.tensorboard import run_hparams
from hardmix.train import build_optimizer
from tune.space import check_space, grid_points

#: A value other than the default of each optimiser field some optimiser reads on its own.
_OTHER = {"momentum": 0.5, "nesterov": False, "betas": [0.8, 0.99], "eps": 1e-4}


def _step(o: OptimConfig) -> torch.Tensor:
    """The parameters after three optimiser steps of a fixed problem under ``o``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt, sched = build_optimizer(model, o, steps_per_epoch=10)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sgd_is_the_papers_default_and_adamw_takes_its_own_fields():
    o = OptimConfig()
    opt, _ = build_optimizer(torch.nn.Linear(2, 2), o, 1)
    group = opt.param_groups[0]
    assert (o.name, type(opt)) == ("sgd", torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    o = OptimConfig(name="adamw", lr=1e-3, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.05)
    opt, _ = build_optimizer(torch.nn.Linear(2, 2), o, 1)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_optimizer_field_changes_training_exactly_where_the_registry_says_it_is_read(name):
    """One optimiser field changed at a time: the trained parameters change if and only if the
    optimiser reads it (what the store, the space and the report trust)."""
    conditional = {f[len("optim."):] for f in CONDITIONAL if f.startswith("optim.")}
    own = set().union(*(o.reads for o in OPTIMIZERS.values()))
    assert own <= conditional and own == set(_OTHER)  # a new field needs a value here
    base = OptimConfig(name=name, lr=0.05)
    ref = _step(base)
    for field, other in _OTHER.items():
        changed = not torch.equal(_step(dataclasses.replace(base, **{field: other})), ref)
        assert changed == (field in OPTIMIZERS[name].reads), (name, field)
        assert field_acts(f"optim.{field}", {"optim.name": name}) == changed


def _row(**optim) -> dict:
    cfg = RunConfig()
    cfg.optim = dataclasses.replace(cfg.optim, **optim)
    return flatten(cfg)


def test_inert_optimizer_fields_are_null_in_rows_hparams_and_never_vary(tmp_path):
    store = ResultStore(str(tmp_path / "sw"))
    rows = {"c000-s0": _row(momentum=0.9), "c001-s0": _row(name="adamw", momentum=0.5),
            "c002-s0": _row(name="adamw", momentum=0.7, betas=[0.8, 0.9])}
    for trial_id, row in rows.items():
        store.write_trial({**row, "trial_id": trial_id, "status": "completed", "error": ""})
    trials = read_results(str(tmp_path / "sw")).trials.to_pandas().set_index("trial_id")
    assert trials.loc["c000-s0", "optim.momentum"] == 0.9
    assert trials.loc["c000-s0", ["optim.betas", "optim.eps"]].isna().all()
    assert trials.loc["c001-s0", ["optim.momentum", "optim.nesterov"]].isna().all()
    assert list(trials.loc["c002-s0", "optim.betas"]) == [0.8, 0.9]
    # AdamW's different momentum values never act: not a factor; its betas are.
    assert {c for c in varying_factors(trials.reset_index()) if c.startswith("optim.")} == {
        "optim.name", "optim.betas"}
    cfg = RunConfig()
    cfg.optim.name = "adamw"
    names = ["optim.name", "optim.momentum", "optim.betas", "optim.lr"]
    assert run_hparams(cfg, names) == {"optim.name": "adamw", "optim.momentum": "null",
                                       "optim.betas": "[0.9, 0.999]", "optim.lr": 0.1}
    assert as_run(_row())["optim.betas"] is None  # the default run is the paper's SGD


def _sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, None, ["mode=grid", *overrides])


def test_an_optimizer_field_is_searched_only_where_its_optimizer_runs():
    assert "optim.name" in SWITCH_COLUMNS
    with pytest.raises(ConfigError, match=r"space\.optim\.betas.*acts in no trial"):
        check_space(_sweep("space={optim.betas: {values: [[0.9, 0.99], [0.8, 0.9]]}}"))
    cfg = _sweep("space={optim.name: {values: [sgd, adamw]}, optim.eps: {values: [1.0e-8, 1.0e-6]}, "
                 "optim.momentum: {values: [0.9, 0.5]}}")
    check_space(cfg)
    assert {frozenset(p.items()) for p in grid_points(cfg)} == {frozenset(p.items()) for p in [
        {"optim.name": "sgd", "optim.momentum": 0.9}, {"optim.name": "sgd", "optim.momentum": 0.5},
        {"optim.name": "adamw", "optim.eps": 1e-8}, {"optim.name": "adamw", "optim.eps": 1e-6}]}


@pytest.mark.parametrize("override,field", [
    ("optim.name=adam", "optim.name"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.eps=0", "optim.eps"),
    ("optim.momentum=0", "optim.nesterov"),  # SGD's own rule
])
def test_bad_optimizer_values_are_one_line_and_exit_2(override, field, tmp_path, capsys):
    code = main(["train", "--set", override, "--set", f"output.dir={tmp_path}",
                 "--set", "data.name=synthetic"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"hardmix: error: {field} = ")
    assert not list(tmp_path.iterdir())  # nothing written


def test_adamw_ignores_sgds_rule_and_trains(tmp_path):
    """nesterov=true with momentum=0 is refused for SGD only: for AdamW both are inert."""
    from hardmix.train import train

    # In a file (a base may hold a field one optimiser does not read); set by hand, refused.
    (tmp_path / "base.yaml").write_text("optim: {momentum: 0, nesterov: true}\n")
    cfg = load_config(RunConfig, None, str(tmp_path / "base.yaml"), [
        "data.name=synthetic", "data.subset=256", "model.name=smallnet", "model.width=8",
        "data.batch_size=64", "optim.epochs=1", "optim.name=adamw", "optim.lr=0.003",
        "device=cpu", "output.progress=false", "output.image_grid=false",
        "output.tensorboard=false"])
    summary = train(cfg, [], tmp_path / "run")
    assert summary["status"] == "completed" and summary["final_top1_err"] is not None
