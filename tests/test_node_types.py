"""Trials land on the node types meant for them: Ray's own autoscaler scoring
(``ResourceDemandScheduler.get_nodes_to_launch``, what the head's monitor runs) with cluster.yaml's
node types after ``prepare_config`` and the requests the sweep really makes for each cluster
preset (Tune's placement group of a trial, Ray Train's worker group, a data-parallel trial's
driver). Offline: no Ray instance, no cloud.

The intended node type is derived from the GPU counts of cluster.yaml, not from names: packed
single-worker trials (a fraction of a GPU) go to the type with the fewest GPUs per node,
data-parallel workers to the type with the most, and a driver starts no node at all (the head
holds it). Each check also runs against the same cluster without the custom resources that steer
the placement, where Ray chooses otherwise: the steering is what makes the difference.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from hardmix.config import SweepConfig, load_config
from tune import cluster as tc

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "hardmix/presets").glob("cluster-*.yaml"))
PENDING_TRIALS = 16  # packed trials waiting at once (Tune asks for every pending trial's group)


def _prepared(strip_custom: bool = False) -> dict:
    from ray.autoscaler._private.util import prepare_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    if strip_custom:
        for spec in config["available_node_types"].values():
            spec["resources"] = {k: v for k, v in spec["resources"].items() if k in ("CPU", "GPU")}
    return prepare_config(copy.deepcopy(config))


class _HeadOnly:
    """The provider's view of a cluster that has just been started: the head node alone."""

    def __init__(self, head_type: str):
        self.head_type = head_type

    def non_terminated_nodes(self, tag_filters):
        return ["head"]

    def node_tags(self, node_id):
        from ray.autoscaler.tags import (NODE_KIND_HEAD, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND,
                                         TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)

        return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: self.head_type,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}

    def internal_ip(self, node_id):
        return "10.0.0.1"


def _placement_group(bundles: list[dict], strategy: str):
    from ray._private.gcs_utils import PlacementGroupTableData
    from ray.core.generated.common_pb2 import Bundle, PlacementStrategy

    pg = PlacementGroupTableData(strategy=getattr(PlacementStrategy, strategy))
    for bundle in bundles:
        pg.bundles.append(Bundle(unit_resources={k: float(v) for k, v in bundle.items() if v}))
    return pg


def nodes_to_launch(config: dict, groups: list) -> dict[str, int]:
    """What Ray's autoscaler starts for these pending placement groups, the head idle."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary)
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    head = config["head_node_type"]
    types = config["available_node_types"]
    scheduler = ResourceDemandScheduler(_HeadOnly(head), types, config["max_workers"], head,
                                        config["upscaling_speed"])
    head_res = {k: float(v) for k, v in types[head]["resources"].items()}
    launch, _ = scheduler.get_nodes_to_launch(
        nodes=["head"], launching_nodes={}, resource_demands=[],
        unused_resources_by_ip={"10.0.0.1": dict(head_res)}, pending_placement_groups=groups,
        max_resources_by_ip={"10.0.0.1": dict(head_res)}, ensure_min_cluster_size=[],
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    return dict(launch)


def requests(preset: str, tmp_path: Path, monkeypatch, *overrides: str):
    """The placement groups a sweep of ``preset`` asks Ray for, in the order they appear:
    ``[("trials", [pg, ...])]`` for single-worker trials; ``[("driver", [pg]), ("workers",
    [pg])]`` for a data-parallel trial (its driver must run before it asks for workers)."""
    import ray.train
    import ray.train.torch
    import ray.tune.integration.ray_train as tune_train

    from tune.sweep import _trainable
    from tune.trainable import SweepContext, _fit_data_parallel

    extra = [f"run.data.path={tmp_path}"] if "imagenet" in preset else []
    cfg = load_config(SweepConfig, preset=preset, overrides=[*extra, *overrides])
    ctx = SweepContext(sweep_dir=str(tmp_path), run=cfg.run, seeds=[0], metric=cfg.metric,
                       resources=cfg.resources)
    trial = _trainable(ctx)._resources  # Tune's PlacementGroupFactory of one trial
    trial_pg = _placement_group(trial.bundles, trial.strategy)
    if cfg.resources.workers == 1:
        return cfg, [("trials", [copy.deepcopy(trial_pg) for _ in range(PENDING_TRIALS)])]
    seen = {}

    class Capture:
        def __init__(self, *args, scaling_config, **kwargs):
            seen["scaling"] = scaling_config

        def fit(self):
            return None

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Capture)
    monkeypatch.setattr(tune_train, "TuneReportCallback", ray.train.UserCallback)
    _fit_data_parallel(ctx, ctx.run, "c000-s0", tmp_path / "run", 1, "t0")
    scaling = seen["scaling"]
    workers = _placement_group([scaling.resources_per_worker] * scaling.num_workers,
                               scaling.placement_strategy)
    return cfg, [("driver", [trial_pg]), ("workers", [workers])]


def _gpus(config: dict, name: str) -> float:
    return float(config["available_node_types"][name]["resources"].get("GPU", 0))


def intended(config: dict, cfg: SweepConfig) -> str:
    """The worker type meant for a preset's trials, from cluster.yaml's GPU counts."""
    workers = [n for n in config["available_node_types"] if n != config["head_node_type"]
               and _gpus(config, n) > 0]
    pick = max if cfg.resources.workers > 1 else min
    return pick(workers, key=lambda n: _gpus(config, n))


@pytest.mark.parametrize("preset", PRESETS)
def test_autoscaler_starts_the_intended_node_type_for_each_cluster_preset(preset, tmp_path,
                                                                          monkeypatch):
    config = _prepared()
    cfg, phases = requests(preset, tmp_path, monkeypatch)
    want = intended(config, cfg)
    node = {k: float(v) for k, v in config["available_node_types"][want]["resources"].items()}
    for phase, groups in phases:
        launched = nodes_to_launch(config, groups)
        if phase == "driver":
            assert launched == {}, f"{preset}: a driver started {launched} (the head holds it)"
            continue
        bundles = [dict(b.unit_resources) for pg in groups for b in pg.bundles]
        per_node = tc.per_node(bundles[0], node)
        assert per_node >= 1, (preset, want, bundles[0], node)
        assert launched == {want: math.ceil(len(bundles) / per_node)}, (preset, phase, launched)


@pytest.mark.parametrize("preset", PRESETS)
def test_without_the_steering_resources_ray_chooses_otherwise(preset, tmp_path, monkeypatch):
    """The control: the same requests without the node types' custom resources (and without
    them in the presets) let Ray's scoring pick by size, which fills a 4-GPU node with packed
    trials and starts a GPU node for a driver's 0.5 CPU. If this ever stops failing over, the
    custom resources are no longer needed and the main test proves nothing."""
    config = _prepared(strip_custom=True)
    cfg = load_config(SweepConfig, preset=preset,
                      overrides=[f"run.data.path={tmp_path}"] if "imagenet" in preset else [])
    clear = [f"resources.custom.{k}=0" for k in cfg.resources.custom]
    clear += [f"resources.driver.{k}=0" for k in cfg.resources.driver]
    cfg, phases = requests(preset, tmp_path, monkeypatch, *clear)
    want = intended(config, cfg)
    differs = []
    for phase, groups in phases:
        launched = nodes_to_launch(config, groups)
        if phase == "driver":
            differs.append(bool(launched) and all(_gpus(config, n) > 0 for n in launched))
        elif phase == "trials":
            differs.append(set(launched) != {want})
    assert any(differs), (preset, "Ray picks the intended node type by itself")


def test_every_cluster_preset_asks_only_for_resources_cluster_yaml_offers(tmp_path):
    """The presets' custom resources and drivers exist in cluster.yaml (the pre-launch check
    agrees), and each steering resource is offered by exactly one worker type, one per GPU."""
    config = _prepared()
    types = config["available_node_types"]
    view = tc.view_from_cluster_config(config, "cluster.yaml")
    for preset in PRESETS:
        cfg = load_config(SweepConfig, preset=preset,
                          overrides=[f"run.data.path={tmp_path}"] if "imagenet" in preset else [])
        assert tc.assess(cfg, view) is None, preset
        steering = [k for k, v in cfg.resources.custom.items() if v > 0]
        assert steering, f"{preset} asks for no node-type resource"
        for name in steering:
            offering = [n for n, t in types.items() if t["resources"].get(name)]
            assert offering == [name], (preset, name, offering)
            assert types[name]["resources"][name] == types[name]["resources"]["GPU"]
            assert cfg.resources.custom[name] == cfg.resources.gpus  # one per GPU used
        if cfg.resources.workers > 1:
            driver = tc.driver_bundle(cfg.resources)
            holders = [n for n, t in types.items() if tc.per_node(driver, t["resources"]) > 0]
            assert holders == [config["head_node_type"]], (preset, holders)


def test_a_driver_resource_no_node_offers_is_refused_before_any_trial(tmp_path):
    from hardmix.config import ConfigError

    config = _prepared()
    del config["available_node_types"][config["head_node_type"]]["resources"]["driver"]
    view = tc.view_from_cluster_config(config, "cluster.yaml")
    cfg = load_config(SweepConfig, preset="cluster-imagenet-ddp",
                      overrides=[f"run.data.path={tmp_path}"])
    error = tc.assess(cfg, view)
    assert isinstance(error, ConfigError) and error.field == "resources.driver.driver"
    assert len(str(error).splitlines()) == 1 and "1 driver per driver but head has 0" in str(error)
    # Without resources.driver the driver takes half a CPU, which the GPU types have.
    plain = load_config(SweepConfig, preset="cluster-imagenet-ddp",
                        overrides=[f"run.data.path={tmp_path}", "resources.driver.driver=0"])
    assert tc.driver_bundle(plain.resources) == {"CPU": tc.DRIVER_CPUS}
    assert tc.assess(plain, view) is None


@pytest.mark.parametrize("bad, field", [
    ("resources.driver={CPU: 1}", "resources.driver.CPU"),
    ("resources.driver={driver: -1}", "resources.driver.driver"),
    ("resources.driver={driver: .nan}", "resources.driver.driver"),
    ("resources.driver=[driver]", "resources.driver"),
])
def test_bad_driver_resources_are_one_line_and_exit_2(bad, field, capsys):
    from hardmix.cli import main

    assert main(["sweep", "--dry-run", "--set", "run.data.name=synthetic", "--set", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
