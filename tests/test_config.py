"""Config: YAML round trip, presets, overrides and every validation path (one line, field named)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from hardmix import config as C
from hardmix.config import ConfigError, RunConfig, SweepConfig, load_config


def _leaf_fields(cls, prefix=""):
    """(dotted name, dataclasses.Field, type) for every leaf field of a config class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _bad_values(f: dataclasses.Field):
    """Values that the field's declared constraints must reject."""
    m = f.metadata
    if m.get("choices") or m.get("check"):
        yield "definitely-not-a-choice"
    for key in ("gt", "ge"):
        if m.get(key) is not None:
            yield m[key] - (1 if key == "ge" else 0)
    for key in ("lt", "le"):
        if m.get(key) is not None:
            yield m[key] + (1 if key == "le" else 0)


RUN_CASES = [(name, bad) for name, f, _ in _leaf_fields(RunConfig) for bad in _bad_values(f)]
SWEEP_CASES = [(name, bad) for name, f, _ in _leaf_fields(SweepConfig)
               if not name.startswith("run.") for bad in _bad_values(f)]


def test_every_constrained_field_is_covered():
    # choices and bounds exist on these; the generated cases must reach each of them
    names = {n for n, _ in RUN_CASES}
    for expected in ("augment.alpha", "augment.prob", "augment.method", "augment.criterion",
                     "augment.fallback", "augment.signal", "augment.bn_mode", "augment.box",
                     "augment.min_hard", "augment.k", "data.batch_size", "optim.lr", "model.name"):
        assert expected in names


@pytest.mark.parametrize("name,bad", RUN_CASES, ids=[f"{n}={b}" for n, b in RUN_CASES])
def test_run_field_rejects_out_of_range(name, bad, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, overrides=[f"{name}={bad}", f"output.dir={tmp_path}"])
    assert info.value.field == name
    message = str(info.value)
    assert name in message and "\n" not in message and ("must" in message)


@pytest.mark.parametrize("name,bad", SWEEP_CASES, ids=[f"{n}={b}" for n, b in SWEEP_CASES])
def test_sweep_field_rejects_out_of_range(name, bad, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, overrides=[f"{name}={bad}", f"storage={tmp_path}",
                                            f"run.output.dir={tmp_path}"])
    assert info.value.field == name


@pytest.mark.parametrize("override,field", [
    ("augment.alpha=abc", "augment.alpha"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("optim.nesterov=maybe", "optim.nesterov"),
    ("optim.milestones=[a, b]", "optim.milestones[0]"),
    ("augment=3", "augment"),
])
def test_wrong_types_are_rejected(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, overrides=[override])
    assert info.value.field == field


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean augment\.alpha\?"):
        load_config(RunConfig, overrides=["augment.alpah=1"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(RunConfig, overrides=["nothing_like_it=1"])


@pytest.mark.parametrize("overrides,field", [
    (["augment.criterion=topk_loss", "augment.k=200", "data.batch_size=128"], "augment.k"),
    (["augment.fallback=topk_loss", "augment.k=2.5"], "augment.k"),
    (["augment.min_hard=300", "data.batch_size=128"], "augment.min_hard"),
    (["data.name=npz"], "data.path"),
    (["data.val_size=2.5"], "data.val_size"),
    (["data.subset=100", "data.val_size=100"], "data.val_size"),
    (["optim.milestones=[120, 60]"], "optim.milestones"),
    (["optim.epochs=5", "optim.warmup_epochs=5"], "optim.warmup_epochs"),
    (["augment.signal=cached", "augment.prob=1.0"], "augment.signal"),
    (["augment.criterion=history", "augment.history_window=2",
      "augment.history_min_wrong=3"], "augment.history_min_wrong"),
    (["augment.method=saliencymix", "augment.saliency=fine_grained", "augment.box=sample"],
     "augment.saliency"),
])
def test_rules_between_fields(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, overrides=overrides)
    assert info.value.field == field


@pytest.mark.parametrize("overrides,field", [
    (["data.name=npz", "data.path=/no/such/file.npz"], "data.path"),
    (["data.name=folder", "data.path=/no/such/folder"], "data.path"),
    (["data.name=cifar10", "data.path=/no/such/folder"], "data.path"),
    (["data.name=digits", "data.subset=5000"], "data.subset"),
    (["data.name=digits", "output.dir=/proc/hardmix-cannot-write-here"], "output.dir"),
])
def test_environment_checks_run_once_per_entry_point(overrides, field):
    """Loading a config probes no disk; the environment check (what train/sweep run once
    before any work) names the field that the machine cannot serve."""
    cfg = load_config(RunConfig, overrides=overrides)
    with pytest.raises(ConfigError) as info:
        C.check_run_environment(cfg)
    assert info.value.field == field


def test_rules_only_bind_fields_that_act(tmp_path):
    """A rule of the method table applies only where its fields act: the cached signal of a
    CutMix run, or a top-k criterion's min_hard above the batch, is no error in a config file
    (a base of several arms may hold fields one run does not read; set by hand they are
    refused, see test_hardening)."""
    def from_file(text: str) -> RunConfig:
        (tmp_path / "run.yaml").write_text(text)
        return load_config(RunConfig, file=str(tmp_path / "run.yaml"))

    from_file("augment: {method: cutmix, signal: cached, prob: 1.0}\n")
    from_file("augment: {criterion: topk_loss, min_hard: 500}\n")
    with pytest.raises(ConfigError):
        from_file("augment: {criterion: misclassified, min_hard: 500}\n")
    with pytest.raises(ConfigError, match="augment.signal = 'cached': does not act"):
        load_config(RunConfig, overrides=["augment.method=cutmix", "augment.signal=cached"])


def test_k_within_batch_and_fractions_are_fine(tmp_path):
    cfg = load_config(RunConfig, overrides=["augment.criterion=topk_loss", "augment.k=32",
                                            f"output.dir={tmp_path}"])
    assert C.topk_count(cfg.augment.k, cfg.data.batch_size) == 32
    assert C.topk_count(0.25, 128) == 32 and C.topk_count(0.001, 128) == 1


def test_yaml_round_trip(tmp_path):
    cfg = load_config(RunConfig, overrides=["augment.alpha=0.5", "augment.criterion=topk_loss",
                                            "optim.milestones=[10, 20]", f"output.dir={tmp_path}"])
    path = tmp_path / "run.yaml"
    path.write_text(C.to_yaml(cfg))
    again = load_config(RunConfig, file=str(path))
    assert again == cfg
    assert yaml.safe_load(C.to_yaml(again)) == C.to_dict(cfg)


def test_sweep_round_trip_keeps_conditional_space(tmp_path):
    raw = {
        "name": "s", "mode": "search", "storage": str(tmp_path),
        "space": {
            "augment.criterion": {"type": "choice", "values": ["misclassified", "topk_loss"]},
            "augment.k": {"type": "float", "low": 0.05, "high": 0.5,
                          "when": {"augment.criterion": ["topk_loss"]}},
        },
        "run": {"output": {"dir": str(tmp_path)}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(SweepConfig, file=str(path))
    assert cfg.space["augment.k"].when == {"augment.criterion": ["topk_loss"]}
    path.write_text(C.to_yaml(cfg))
    assert load_config(SweepConfig, file=str(path)) == cfg


@pytest.mark.parametrize("space,field", [
    ({"augment.alpah": {"type": "float", "low": 0.1, "high": 1}}, "augment.alpah"),
    ({"augment.alpha": {"type": "float", "low": 2, "high": 1}}, "space.augment.alpha"),
    ({"augment.alpha": {"type": "float", "low": 0, "high": 1, "log": True}}, "space.augment.alpha.low"),
    ({"augment.alpha": {"type": "choice", "values": [1.0, -1.0]}}, "space.augment.alpha"),
    ({"augment.criterion": {"type": "choice", "values": ["misclassified", "oops"]}},
     "space.augment.criterion"),
    ({"augment.criterion": {"type": "choice", "values": []}}, "space.augment.criterion.values"),
    ({"augment.k": {"type": "float", "low": 0.1, "high": 0.5, "when": {"augment.critrion": ["topk_loss"]}}},
     "augment.critrion"),
    ({"seed": {"type": "choice", "values": [1, 2]}}, "space.seed"),
])
def test_bad_sweep_space(space, field, tmp_path):
    raw = {"space": space, "storage": str(tmp_path), "run": {"output": {"dir": str(tmp_path)}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, file=str(path))
    assert info.value.field == field


def test_grid_needs_values_and_seeds_are_checked(tmp_path):
    base = [f"storage={tmp_path}", f"run.output.dir={tmp_path}"]
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, overrides=base + ["mode=grid", "space.augment.alpha.type=float",
                                                   "space.augment.alpha.low=0.1",
                                                   "space.augment.alpha.high=1"])
    assert info.value.field == "space.augment.alpha.values"
    with pytest.raises(ConfigError, match="repeat"):
        load_config(SweepConfig, overrides=base + ["seeds=[1, 1]"])
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, overrides=base + ["address=nowhere"])
    assert info.value.field == "address"


def test_every_preset_loads_and_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = C.preset_names()
    assert names, "presets ship with the package"
    for name in names:
        raw = C.read_preset(name)
        cls = SweepConfig if C.preset_kind(raw) == "sweep" else RunConfig
        try:
            cfg = load_config(cls, preset=name)
        except ConfigError as exc:
            # presets for data the user brings may name a path that is absent here; nothing else
            assert exc.field.endswith("data.path"), f"preset {name}: {exc}"
            continue
        assert isinstance(cfg, cls)
        assert raw.get("description"), f"preset {name} needs a description"


def test_unknown_preset_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, preset="no-such-preset")
    assert info.value.field == "preset"
    f = tmp_path / "c.yaml"
    f.write_text("base: no-such-base\n")
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, file=str(f))
    assert info.value.field == "base"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, file=str(tmp_path / "missing.yaml"))
    assert info.value.field == "--config"
    bad = tmp_path / "bad.yaml"
    bad.write_text("augment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, file=str(bad))
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, overrides=["novalue"])
    assert info.value.field == "--set"


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("augment: {alpha: 0.3, prob: 0.5}\noutput: {dir: %s}\n" % tmp_path)
    cfg = load_config(RunConfig, file=str(f), overrides=["augment.alpha=0.7"])
    assert cfg.augment.alpha == 0.7 and cfg.augment.prob == 0.5


def test_flatten_and_with_overrides(tmp_path):
    cfg = load_config(RunConfig, overrides=[f"output.dir={tmp_path}"])
    flat = C.flatten(cfg)
    assert flat["augment.alpha"] == 1.0 and flat["seed"] == 0 and "data" not in flat
    new = C.with_overrides(cfg, {"augment.alpha": 0.2, "seed": 3})
    assert new.augment.alpha == 0.2 and new.seed == 3 and cfg.augment.alpha == 1.0
    with pytest.raises(ConfigError):
        C.with_overrides(cfg, {"augment.alpha": -0.2})




def test_set_reaches_dotted_keys_of_the_space(tmp_path):
    cfg = load_config(SweepConfig, overrides=[
        f"storage={tmp_path}", f"run.output.dir={tmp_path}",
        "space.augment.k.type=float", "space.augment.k.low=0.1", "space.augment.k.high=0.4",
        "space.augment.k.when.augment.criterion=[topk_loss]", "run.augment.alpha=0.5"])
    assert cfg.space["augment.k"].high == 0.4
    assert cfg.space["augment.k"].when == {"augment.criterion": ["topk_loss"]}
    assert cfg.run.augment.alpha == 0.5
