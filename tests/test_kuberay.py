"""The KubeRay RayJob manifests (deploy/kuberay/), checked offline.

* Strictly against KubeRay's own CRD schemas (../shared/kuberay/, v1.7.0): the API server prunes
  unknown fields silently, so a misspelt field would vanish instead of failing; here every object
  schema that lists its properties (and does not preserve unknown fields) refuses any other.
* Against the preset each one runs (derived from the entrypoint, not copied): the head holds no
  trial and offers what the preset's driver asks for, each GPU group offers the resource named
  after it that the preset's trials ask for, Ray's autoscaler scoring picks that group, the image
  is cluster.yaml's, token authentication, S3 through a service account, /dev/shm, clean-up.
"""

from __future__ import annotations

import copy
import functools
import json
import shlex
from pathlib import Path

import pytest
import yaml

from hardmix.config import SweepConfig, load_config
from tune import cluster as tc

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay"
MANIFESTS = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    """The stored version's schema of a KubeRay CRD (parsed once: 1-2 MB of YAML)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def strict(schema):
    """A copy of an OpenAPI schema in which every object that lists ``properties`` and does not
    carry ``x-kubernetes-preserve-unknown-fields`` refuses properties it does not list."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "properties" else {p: strict(s) for p, s in v.items()}
           for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def validator(kind: str, strictly: bool = True):
    import jsonschema

    schema = _crd_schema(kind)
    return jsonschema.Draft7Validator(strict(schema) if strictly else copy.deepcopy(schema))


def _docs(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


def _errors(v, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.fixture
def rayjob_validator():
    return validator("RayJob")


def test_there_is_a_manifest_for_the_cluster_presets():
    presets = {_preset_args(_docs(p)["RayJob"])[0] for p in MANIFESTS}
    assert {"cluster-cifar10-ablation", "cluster-imagenet-ddp"} <= presets


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_kuberays_crd(path, rayjob_validator):
    doc = _docs(path)["RayJob"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(rayjob_validator, doc) == []
    # The embedded RayCluster is a RayCluster spec as its own CRD defines it.
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
               "spec": doc["spec"]["rayClusterSpec"]}
    assert _errors(validator("RayCluster"), cluster) == []


@pytest.mark.parametrize("where, key", [
    ((), "shutdownAfterJobFinish"),                                     # misspelt
    (("rayClusterSpec",), "enableInTreeAutoScaling"),                   # wrong case
    (("rayClusterSpec", "autoscalerOptions"), "idleTimeout"),
    (("rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0), "volumeMount"),
    (("rayClusterSpec", "workerGroupSpecs", 0), "maxReplica"),
])
def test_a_misspelt_field_is_refused_strictly_though_kubernetes_would_drop_it(where, key,
                                                                            rayjob_validator):
    doc = copy.deepcopy(_docs(MANIFESTS[0])["RayJob"])
    node = doc["spec"]
    for step in where:
        node = node[step]
    node[key] = node.get(key, 1)
    assert _errors(validator("RayJob", strictly=False), doc) == []  # what the API server does
    errors = _errors(rayjob_validator, doc)
    assert errors and any(key in e for e in errors), errors


# ------------------------------------------------------------------------------------------------
# What the manifests say, against the presets they run
# ------------------------------------------------------------------------------------------------


def _preset_args(job: dict) -> tuple[str, list[str], list[str]]:
    """(preset, ``--set`` overrides, the whole command) of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["hardmix", "sweep"], argv
    preset = argv[argv.index("--preset") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return preset, sets, argv


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_containers(pod_spec: dict) -> list[dict]:
    return [c for c in pod_spec["containers"] if c["name"].startswith("ray-")]


def _node_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay starts a group's pods with: num-cpus / the CPU limit, the
    GPU limit, and rayStartParams' custom resources."""
    params = group["rayStartParams"]
    (container,) = _ray_containers(group["template"]["spec"])
    limits = container.get("resources", {}).get("limits", {})
    res = {"CPU": float(params["num-cpus"]) if "num-cpus" in params else _cpu(limits["cpu"])}
    if "nvidia.com/gpu" in limits:
        res["GPU"] = float(limits["nvidia.com/gpu"])
    if "resources" in params:
        res.update(json.loads(json.loads(params["resources"])))  # a JSON string, quoted
    return res


def _as_cluster_config(spec: dict) -> dict:
    """The RayCluster as the autoscaler sees it: a head type and one type per worker group."""
    types = {"head": {"resources": _node_resources(spec["headGroupSpec"]), "max_workers": 0,
                      "min_workers": 0}}
    for group in spec["workerGroupSpecs"]:
        types[group["groupName"]] = {"resources": _node_resources(group),
                                     "min_workers": group["minReplicas"],
                                     "max_workers": group["maxReplicas"]}
    return {"available_node_types": types, "head_node_type": "head",
            "max_workers": sum(g["maxReplicas"] for g in spec["workerGroupSpecs"]),
            "upscaling_speed": 1.0}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_its_preset_on_the_nodes_meant_for_it(path, tmp_path, monkeypatch):
    from test_node_types import nodes_to_launch, requests

    job = _docs(path)["RayJob"]
    preset, sets, argv = _preset_args(job)
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--storage") + 1].startswith("s3://")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trial on the head
    config = _as_cluster_config(spec)
    cfg, phases = requests(preset, tmp_path, monkeypatch, *sets)
    # The sweep's own pre-launch check agrees that the cluster can hold a trial and its driver.
    view = tc.view_from_cluster_config(config, path.name)
    assert tc.assess(cfg, view) is None
    assert tc.max_placeable(tc.trial_bundle(cfg), view) >= cfg.resources.workers
    steering = [k for k, v in cfg.resources.custom.items() if v > 0]
    assert steering, "the preset asks for no node-type resource"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name in steering:  # offered by the group named after it, one per GPU
        assert name in groups, (name, sorted(groups))
        res = config["available_node_types"][name]["resources"]
        assert res[name] == res["GPU"]
    for phase, groups_asked in phases:  # Ray's autoscaler scoring on these node types
        launched = nodes_to_launch(config, groups_asked)
        if phase == "driver":
            assert launched == {}, launched
        else:
            assert set(launched) == set(steering), (phase, launched)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_autoscales_authenticates_and_cleans_up(path):
    docs = _docs(path)
    job = docs["RayJob"]["spec"]
    spec = job["rayClusterSpec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
    assert spec["rayVersion"] == __import__("ray").__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:  # from zero, bounded
        assert group["replicas"] == group["minReplicas"] == 0 < group["maxReplicas"]
    # Token authentication: the operator sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the
    # named Secret on every Ray container; no token is written into the manifest.
    assert spec["authOptions"] == {"mode": "token", "secretName": spec["authOptions"]["secretName"]}
    assert spec["authOptions"]["secretName"]
    # No credential in the file (the Secret's name is not one).
    text = "\n".join(line for line in path.read_text().splitlines() if "secretName:" not in line)
    assert not tc.find_secrets(text), tc.find_secrets(text)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    account = docs["ServiceAccount"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.startswith("arn:aws:iam::") and ":role/" in role
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    for pod in pods:
        assert pod["serviceAccountName"] == account["metadata"]["name"]  # S3 via IRSA, no keys
        shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == image, container["name"]  # the image of docker/
            for env in container.get("env", []):
                assert not env["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "RAY_AUTH_TOKEN"))
        for container in _ray_containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/dev/shm") in shm, container["name"]
    for group in spec["workerGroupSpecs"]:  # torch sees the GPUs before Ray starts there
        init = group["template"]["spec"]["initContainers"]
        assert any("hardmix.gpucheck" in " ".join(c["command"]) for c in init)
