"""Boundary values the config rules must accept or refuse (:mod:`hardmix.config.rules`).

Every bound declared on a field (``gt``, ``ge``, ``lt``, ``le`` in the schema) is tried exactly
at the bound and one step past it, for every bounded field of a run and of a sweep (the list is
read from the schema, not copied): an inclusive bound accepts the bound itself, an exclusive one
refuses it, and a refusal names the field. The rules between fields are tried the same way at
their edges: ``k`` against the batch, ``min_hard`` against the batch, the validation split
against the subset, warm-up against the epochs, ASHA's grace period against the epochs,
folder names at exactly 100 bytes, 64-bit integers, seeds at 0, workers and resources.
"""

from __future__ import annotations

import pytest

from hardmix.config import ConfigError, RunConfig, SweepConfig, flatten, from_dict, load_config
from hardmix.config.rules import (INT_LIMIT, MAX_FOLDER_NAME, check_folder_name, check_k,
                                  topk_count, with_overrides)
from hardmix.config.schema import field_meta, field_type, strip_optional

BOUNDS = ("gt", "ge", "lt", "le")


def default(cls):
    """The default config, built without the rules (they are what the tests try)."""
    return from_dict(cls, {} if cls is RunConfig else {"storage": "/tmp"})


def bounded_fields(cls, skip: tuple[str, ...] = ()) -> list[tuple[str, str, float, type]]:
    cfg = default(cls)
    out = []
    for name in flatten(cfg):
        if name.startswith(skip):
            continue
        meta = field_meta(cls, name)
        tp = strip_optional(field_type(cls, name))
        for key in BOUNDS:
            if meta.get(key) is not None and tp in (int, float):
                out.append((name, key, meta[key], tp))
    return out


RUN_BOUNDS = bounded_fields(RunConfig)
SWEEP_BOUNDS = bounded_fields(SweepConfig, skip=("run.",))


def edge_values(key: str, bound: float, tp: type) -> tuple[object, object]:
    """(a value at the edge that must pass, one that must fail)."""
    step = 1 if tp is int else max(abs(bound), 1.0) * 1e-9
    at = tp(bound)
    if key == "ge":
        return at, at - step
    if key == "le":
        return at, at + step
    if key == "gt":
        return at + step, at
    return at - step, at  # lt


def test_the_bounds_are_read_from_the_schema():
    names = {n for n, *_ in RUN_BOUNDS}
    assert {"augment.alpha", "augment.prob", "augment.history_window", "data.batch_size",
            "optim.label_smoothing"} <= names
    assert len(SWEEP_BOUNDS) > 0


@pytest.mark.parametrize("cls,name,key,bound,tp",
                         [(RunConfig, *b) for b in RUN_BOUNDS]
                         + [(SweepConfig, *b) for b in SWEEP_BOUNDS],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_declared_bound_accepts_its_edge_and_refuses_one_step_past(cls, name, key, bound, tp):
    base = default(cls)
    ok, bad = edge_values(key, bound, tp)
    got = with_overrides(base, {name: ok}, rules=False)
    assert flatten(got)[name] == ok
    with pytest.raises(ConfigError) as err:
        with_overrides(base, {name: bad}, rules=False)
    assert err.value.field == name


def run(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, None, list(overrides))


def refused(field: str, *overrides: str, cls=RunConfig) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, None, list(overrides))
    assert err.value.field == field, err.value


def test_k_against_the_batch():
    assert check_k(8, 8) == 8 and check_k(1, 8) == 1 and check_k(2.0, 8) == 2
    assert check_k(0.3, 10) == 3 and check_k(0.01, 10) == 1  # a fraction: at least one
    assert check_k(0.999, 10) == 10 and topk_count(0.5, 8) == 4
    assert check_k(0.5) is None  # no batch: the form only
    for k, batch in ((9, 8), (0, 8), (-1, 8), (1.5, 8), (1.0000001, 8)):
        with pytest.raises(ConfigError) as err:
            check_k(k, batch)
        assert err.value.field == "augment.k"
    hard_k = ("augment.method=hardmix", "augment.criterion=topk_loss")
    assert run(*hard_k, "data.batch_size=16", "augment.k=16").augment.k == 16
    refused("augment.k", *hard_k, "data.batch_size=16", "augment.k=17")


def test_min_hard_against_the_batch_where_it_acts():
    hard = ("augment.method=hardmix", "augment.criterion=misclassified")
    assert run(*hard, "data.batch_size=16", "augment.min_hard=16").augment.min_hard == 16
    refused("augment.min_hard", *hard, "data.batch_size=16", "augment.min_hard=17")
    # a top-k criterion has no fallback: min_hard does not act, so the batch rule does not
    # bind it; set by hand it is refused as a field nothing reads
    with pytest.raises(ConfigError, match="does not act with augment.method=hardmix, "
                                          "augment.criterion=topk_loss"):
        run("augment.method=hardmix", "augment.criterion=topk_loss", "data.batch_size=16",
            "augment.min_hard=17")


def test_validation_split_subset_warmup_and_milestones_at_their_edges():
    assert run("data.subset=100", "data.val_size=99").data.val_size == 99
    refused("data.val_size", "data.subset=100", "data.val_size=100")
    assert run("data.subset=2", "data.val_size=1").data.val_size == 1
    refused("data.val_size", "data.subset=1", "data.val_size=1")
    refused("data.val_size", "data.val_size=1.5")
    assert run("data.val_size=0.999").data.val_size == 0.999
    assert run("optim.epochs=5", "optim.warmup_epochs=4").optim.warmup_epochs == 4
    refused("optim.warmup_epochs", "optim.epochs=5", "optim.warmup_epochs=5")
    assert run("optim.epochs=5", "optim.milestones=[1, 4]").optim.milestones == [1, 4]
    refused("optim.milestones", "optim.milestones=[0, 4]")
    refused("optim.milestones", "optim.milestones=[4, 1]")
    assert run("optim.nesterov=true", "optim.momentum=0.01").optim.nesterov
    refused("optim.nesterov", "optim.nesterov=true", "optim.momentum=0")


def test_folder_names_of_exactly_the_limit_and_one_byte_more():
    assert MAX_FOLDER_NAME == 100
    for name in ("a" * 100, "é" * 50, "x"):
        check_folder_name("output.name", name)
    for name in ("a" * 101, "é" * 50 + "a", "", " ", ".hidden", "a/b", "a\\b", "a\x00b"):
        with pytest.raises(ConfigError) as err:
            check_folder_name("output.name", name)
        assert err.value.field == "output.name"
    assert run("output.name=" + "n" * 100).output.name == "n" * 100
    refused("output.name", "output.name=" + "n" * 101)


def test_integers_must_fit_64_bits():
    assert INT_LIMIT == 2 ** 63 - 1
    got = load_config(SweepConfig, None, None, ["storage=/tmp", f"seeds=[0, {INT_LIMIT}]"])
    assert got.seeds == [0, INT_LIMIT]
    refused("seeds[1]", "storage=/tmp", f"seeds=[0, {INT_LIMIT + 1}]", cls=SweepConfig)
    refused("seeds[0]", "storage=/tmp", f"seeds=[{-INT_LIMIT - 1}]", cls=SweepConfig)


def sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, None, ["storage=/tmp", *overrides])


def test_sweep_rules_at_their_edges():
    assert sweep("seeds=[0]").seeds == [0]
    refused("seeds", "storage=/tmp", "seeds=[-1, 2]", cls=SweepConfig)
    refused("seeds", "storage=/tmp", "seeds=[]", cls=SweepConfig)
    refused("seeds", "storage=/tmp", "seeds=[3, 3]", cls=SweepConfig)
    refused("followup.seeds", "storage=/tmp", "followup.seeds=[-1]", cls=SweepConfig)
    assert sweep("followup.seeds=[0]").followup.seeds == [0]
    asha = ("scheduler.type=asha", "run.optim.epochs=6")
    assert sweep(*asha, "scheduler.grace_period=6").scheduler.grace_period == 6
    refused("scheduler.grace_period", "storage=/tmp", *asha, "scheduler.grace_period=7",
            cls=SweepConfig)
    two = ("resources.workers=2",)
    assert sweep(*two, "resources.cpus=1").resources.cpus == 1
    refused("resources.cpus", "storage=/tmp", *two, "resources.cpus=0.5", cls=SweepConfig)
    assert sweep(*two, "resources.gpus=1").resources.gpus == 1
    assert sweep(*two, "resources.gpus=0").resources.gpus == 0
    refused("resources.gpus", "storage=/tmp", *two, "resources.gpus=0.5", cls=SweepConfig)
    assert sweep("resources.gpus=0.5").resources.gpus == 0.5  # one worker may share a GPU
    assert sweep("resources.cpus=0.5").resources.cpus == 0.5  # and a CPU


def test_search_space_ranges_at_their_edges():
    space = "space={{augment.alpha: {{type: float, low: {lo}, high: {hi}, log: {log}}}}}"
    assert sweep("mode=search", space.format(lo=0.1, hi=0.2, log="true")).space
    refused("space.augment.alpha", "storage=/tmp", "mode=search",
            space.format(lo=0.2, hi=0.2, log="false"), cls=SweepConfig)
    refused("space.augment.alpha.low", "storage=/tmp", "mode=search",
            space.format(lo=0, hi=0.2, log="true"), cls=SweepConfig)
    # the ends of a range must be valid values of the field: alpha's upper bound is inclusive
    assert sweep("mode=search", space.format(lo=1.0, hi=1e4, log="false")).space
    refused("space.augment.alpha", "storage=/tmp", "mode=search",
            space.format(lo=1.0, hi=2e4, log="false"), cls=SweepConfig)


def test_loggers_and_the_follow_up_baseline_name_what_exists():
    assert run("output.loggers=[wandb, mlflow]").output.loggers == ["wandb", "mlflow"]
    refused("output.loggers[1]", "output.loggers=[wandb, tensorboard]")
    refused("output.loggers[0]", "output.loggers=[neptune]")
    assert sweep("followup.baseline=cutmix").followup.baseline == "cutmix"
    refused("followup.baseline", "storage=/tmp", "followup.baseline=cutmixx", cls=SweepConfig)
    # arms are a grid's: a search or a space beside them is refused
    arm = "arms=[{augment.method: cutmix}]"
    assert sweep("mode=grid", arm).arms
    refused("arms", "storage=/tmp", "mode=search", arm, cls=SweepConfig)
    refused("space", "storage=/tmp", "mode=grid", arm,
            "space={augment.alpha: {type: choice, values: [0.5, 1.0]}}", cls=SweepConfig)


def test_an_arm_field_that_is_no_leaf_is_one_config_error():
    for arm, field in (("{augment.method.x: 3}", "arms[0].augment.method.x"),
                       ("{nope: 1}", "arms[0].nope"), ("{augment.methd: cutmix}",
                                                         "arms[0].augment.methd")):
        refused(field, "storage=/tmp", "mode=grid", f"arms=[{arm}]", cls=SweepConfig)


def test_report_options_at_their_edges(tmp_path):
    from ablations.report import build_report

    missing = str(tmp_path / "no-sweep")

    def field_of(**kw) -> str:
        with pytest.raises(ConfigError) as err:
            build_report(missing, out=str(tmp_path / "out"), **kw)
        return err.value.field

    for m in (0, -1.0, 100.001, 101):
        assert field_of(margin=m) == "--margin", m
    for m in (100, 1e-6):  # accepted: the report goes on and stops at the missing sweep
        assert field_of(margin=m) == "path", m
    assert field_of(baseline="cutmixx") == "--baseline"
    assert field_of(correction="holm") == "--correction"
    assert field_of(correction="none") == "path"
