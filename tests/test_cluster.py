"""Cluster configs (cluster.yaml, cluster-local.yaml), the cluster presets and the pre-launch
resource check: everything about running on a real cluster that can be checked without a cloud
account. Ray's own cluster-config preparation and schema validation run offline here."""

from __future__ import annotations

import copy
import io
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

from hardmix.config import ConfigError, SweepConfig, load_config, with_overrides
from tune import cluster as tc

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ("cluster.yaml", "cluster-local.yaml")
CLUSTER_PRESETS = ("cluster-cifar10-ablation", "cluster-cifar100-ablation", "cluster-imagenet-ddp")


def _raw(name: str = "cluster.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _ray_validate(config: dict) -> dict:
    """Ray's own offline path, exactly as `ray up` starts: prepare, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def no_network(monkeypatch):
    """Any DNS lookup or socket connect fails the test: validation must make no cloud calls."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access during offline validation: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return calls


# ------------------------------------------------------------------------------------------------
# cluster.yaml
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_rays_validation_offline(name, no_network):
    before = set(sys.modules)
    prepared = _ray_validate(_raw(name))
    assert tc.validate_cluster_file(REPO / name) == prepared
    assert not no_network
    # The AWS SDK is what would talk to the cloud; validation must not even load it.
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("boto3", "botocore")}


def test_cluster_yaml_has_head_and_autoscaling_gpu_worker_types():
    prepared = _ray_validate(_raw())
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 1) == 0, \
        "the CPU head must keep trials off itself"
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1, "one single-GPU type and one multi-GPU type"
    for spec in workers.values():
        assert 0 == spec["min_workers"] < spec["max_workers"], "autoscaling from zero"
        assert spec["node_config"]["InstanceType"]
    assert sum(t["max_workers"] for t in workers.values()) >= prepared["max_workers"] > 0
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_pins_a_current_image_and_says_how_to_refresh_it():
    text = (REPO / "cluster.yaml").read_text()
    images = {spec["node_config"].get("ImageId")
              for spec in _raw()["available_node_types"].values()}
    assert len(images) == 1 and re.fullmatch(r"ami-[0-9a-f]{17}", images.pop())
    assert "aws ssm get-parameter" in text and "/aws/service/deeplearning/ami/" in text
    # Ray's built-in default images (an old Ubuntu 18.04 DLAMI) are not what the nodes get.
    # Read from the source: importing that module needs boto3, which tests do not install.
    import ray.autoscaler
    source = (Path(ray.autoscaler.__file__).parent / "_private/aws/config.py").read_text()
    defaults = set(re.findall(r"ami-[0-9a-f]{8,17}", source))
    assert defaults and not any(ami in text for ami in defaults)


def test_cluster_yaml_installs_this_project_with_pinned_dependencies():
    prepared = _ray_validate(_raw())
    assert prepared["file_mounts"].get("~/hardmix") == "."
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = " ; ".join(prepared[role])  # prepare_config prepends setup_commands
        assert re.search(r"pip install .*-c ~/hardmix/requirements-cluster\.txt .*-e ~/hardmix", commands)
    pins = dict(line.split("==") for line in (REPO / "requirements-cluster.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    import ray
    import torch
    import pyarrow
    # The cluster runs the versions this test suite runs with (and the job client's Ray).
    assert pins["ray"] == ray.__version__
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert pins["pyarrow"] == pyarrow.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    for dep in ("torch", "torchvision", "ray", "optuna", "pyarrow", "pandas", "numpy"):
        assert f'"{dep}' in pyproject and dep in pins


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_dashboard_is_bound_to_localhost_only(name):
    prepared = _ray_validate(_raw(name))
    hosts = tc.dashboard_hosts(prepared)
    assert hosts and set(hosts) <= {"127.0.0.1", "localhost"}
    started = " ".join(prepared["head_start_ray_commands"])
    assert "0.0.0.0" not in started and "--dashboard-host=127.0.0.1" in started


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_turn_token_authentication_on(name):
    """Every `ray start` runs with RAY_AUTH_MODE=token, and every node gets the same token (the
    launching machine's ~/.ray/auth_token) before Ray starts; the file says how to make it and
    which ports the firewall opens to whom."""
    prepared = _ray_validate(_raw(name))
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in prepared[key] if "ray start" in c]
    assert len(starts) == 2 and tc.start_commands_without_token_auth(prepared) == []
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in prepared["setup_commands"])
    text = (REPO / name).read_text()
    assert "ray get-auth-token --generate" in text and "export RAY_AUTH_MODE=token" in text
    for port in ("6379", "8076", "8265", "SSH 22", "10002-19999"):
        assert port in text, port  # the firewall rules name Ray's ports
    assert "Firewall" in text or "firewall" in text


#: The command lists Ray's launcher runs on a node, each entry in a shell of its own.
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def _node_scripts(name: str) -> list[tuple[str, str]]:
    """(key, script) for every command of a cluster file, as the node's shell receives it: the
    YAML parsed, Ray's defaults merged in (prepare_config, where the provider has them), then
    wrapped by Ray's command runner (``bash --login -c -i '<script>'`` over SSH)."""
    import shlex

    from ray.autoscaler._private.command_runner import _with_interactive

    raw = _raw(name)
    try:
        config = _ray_validate(raw)
    except FileNotFoundError:  # the fake provider: the file is complete as it stands
        config = raw
    scripts = []
    for key in COMMAND_KEYS:
        for command in config.get(key) or []:
            argv = _with_interactive(command)
            assert argv[:4] == ["bash", "--login", "-c", "-i"]
            scripts.append((key, shlex.split(argv[4])[0]))
    return scripts


def test_every_command_of_every_cluster_file_parses_in_bash():
    """`bash -n` on each command of each cluster file at the repository root, as the node runs
    it. A YAML comment that cuts a command (` #` in a plain scalar) leaves an open quote or a
    dangling `||`, which bash refuses here instead of on the first real node."""
    import subprocess

    files = sorted(p.name for p in REPO.glob("*.yaml")
                   if set(COMMAND_KEYS) & set(yaml.safe_load(p.read_text()) or {}))
    assert {"cluster.yaml", "cluster-local.yaml", "cluster-fake-multinode.yaml"} <= set(files)
    checked = 0
    for name in files:
        for key, script in _node_scripts(name):
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True,
                                  timeout=30)
            assert proc.returncode == 0, f"{name} {key}: {script!r}: {proc.stderr.strip()}"
            checked += 1
    assert checked >= 2 * 9  # both launcher files' setup and start commands were seen


def _commented_block(text: str, key: str) -> dict:
    """A commented-out YAML block (``# key:`` and the ``#`` lines under it), uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# {key}:")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#") or line.index("#") != indent:
            break
        block.append(line[indent + 2:])
    return yaml.safe_load("\n".join(block))


def test_imagenet_staging_block_parses_and_keeps_the_gpu_check():
    """The commented ImageNet staging of gpu-4x, once uncommented: a list that passes bash -n
    and, since a node type's list replaces the global one, still starts with the GPU check."""
    import shlex
    import subprocess

    from ray.autoscaler._private.command_runner import _with_interactive

    commands = _commented_block((REPO / "cluster.yaml").read_text(),
                                "worker_setup_commands")["worker_setup_commands"]
    assert commands[0] == _raw()["worker_setup_commands"][0]
    assert "s3://BUCKET/imagenet" in commands[-1] and "~/data/imagenet" in commands[-1]
    for command in commands:
        script = shlex.split(_with_interactive(command)[4])[0]
        assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0
    # As the file says: a node type's own list replaces the global one (Ray's autoscaler).
    cfg = _raw()
    cfg["available_node_types"]["gpu-4x"]["worker_setup_commands"] = commands
    assert _ray_validate(cfg)["available_node_types"]["gpu-4x"]["worker_setup_commands"] == commands


def test_every_aws_node_is_in_the_security_group_of_ones_own():
    """SSH is narrowed by a group the docs create (all traffic from itself, SSH from one
    network): every node type names it, so Ray creates no group with SSH open to 0.0.0.0/0."""
    prepared = _ray_validate(_raw())
    groups = {n: t["node_config"].get("SecurityGroupIds")
              for n, t in prepared["available_node_types"].items()}
    assert set(map(tuple, groups.values())) == {("SECURITY_GROUP",)}, groups
    setup = (REPO / "docs" / "cluster-setup.md").read_text()
    assert "SECURITY_GROUP" in setup and "--port 22" in setup and "--cidr" in setup


def test_bash_check_catches_a_command_cut_by_a_yaml_comment():
    """The check above on the line that once reached the nodes cut in half."""
    import subprocess

    line = "grep -q 'hardmix venv' ~/.bashrc || echo 'source ~/venv/bin/activate  # hardmix venv' >> ~/.bashrc"
    cut = yaml.safe_load(f"- {line}\n")[0]
    assert cut == "grep -q 'hardmix venv' ~/.bashrc || echo 'source ~/venv/bin/activate"
    assert subprocess.run(["bash", "-n", "-c", cut], capture_output=True).returncode != 0
    whole = yaml.safe_load(f'- "{line}"\n')[0]
    assert whole == line
    assert subprocess.run(["bash", "-n", "-c", whole], capture_output=True).returncode == 0


def test_fake_multinode_variant_is_complete_and_valid_offline(no_network):
    """cluster-fake-multinode.yaml: read by Ray's autoscaler as it is (the wheel has no defaults
    file for this provider, so prepare_config cannot run), so it must pass Ray's schema alone."""
    from ray.autoscaler._private.util import validate_config

    raw = _raw("cluster-fake-multinode.yaml")
    with pytest.raises(FileNotFoundError):  # why Ray's usual offline path cannot be used here
        _ray_validate(raw)
    validate_config(copy.deepcopy(raw))
    assert tc.validate_cluster_file(REPO / "cluster-fake-multinode.yaml") == raw
    assert raw["provider"]["type"] == "fake_multinode" and raw["provider"]["disable_node_updaters"]
    # The provider calls the node it runs on ray.head.default; it holds no trial.
    assert raw["head_node_type"] == "ray.head.default"
    view = tc.view_from_cluster_config(raw, "fake")
    groups = {g.name: g for g in view.groups}
    assert groups["ray.head.default"].resources == {"CPU": 0} and not groups["ray.head.default"].worker
    assert groups["cpu-1x"].resources == {"CPU": 1} and groups["cpu-1x"].count == 2
    assert 0 < raw["idle_timeout_minutes"] < 1  # a test watches idle nodes go
    assert tc.find_secrets((REPO / "cluster-fake-multinode.yaml").read_text()) == []
    assert not no_network


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_no_credentials_in_cluster_files(name):
    text = (REPO / name).read_text()
    assert tc.find_secrets(text) == []
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    # The ECR login pipes a short-lived token from `aws ecr get-login-password` to
    # `docker login --password-stdin`: command names, no credential in the file.
    words = text.replace("secrets", "").replace("get-login-password", "").replace(
        "--password-stdin", "")
    assert not re.search(r"(?i)secret|aws_access_key_id|password", words)
    assert "BEGIN" not in text


# ------------------------------------------------------------------------------------------------
# IAM policies of the AWS setup (deploy/)
# ------------------------------------------------------------------------------------------------

DEPLOY = REPO / "deploy"


def _policy(name: str) -> dict:
    import json

    return json.loads((DEPLOY / name).read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _allows(policy: dict, action: str, resource: str, context: dict | None = None) -> bool:
    """IAM's decision for a policy of Allow statements only: some statement names the action
    and the resource (IAM wildcards) and every one of its conditions holds; a condition whose key
    the request lacks does not hold."""
    import fnmatch

    context = context or {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {
            "Sid", "Effect", "Action", "Resource", "Condition"}
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower())
                   for a in _as_list(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
            continue
        conditions = statement.get("Condition", {})
        assert set(conditions) <= {"StringEquals"}, conditions  # what this evaluator knows
        if all(context.get(key) in _as_list(values)
               for values_by_key in conditions.values() for key, values in values_by_key.items()):
            return True
    return False


POLICIES = ("iam-policy-hardmix.json", "iam-policy-hardmix-head.json", "ec2-trust.json")


@pytest.mark.parametrize("name", POLICIES)
def test_iam_policies_are_valid_and_scoped(name):
    """Policy JSON as IAM reads it; S3 only ever on the sweep bucket (never "Resource": "*");
    no action wildcard; only the placeholders the docs fill in (ACCOUNT, BUCKET)."""
    policy = _policy(name)
    assert policy["Version"] == "2012-10-17" and policy["Statement"]
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = _as_list(statement["Action"])
        assert actions and all(re.fullmatch(r"[a-z0-9]+:[A-Za-z]+", a) for a in actions), actions
        if any(a.startswith("s3:") for a in actions):
            assert set(_as_list(statement["Resource"])) <= {"arn:aws:s3:::BUCKET",
                                                            "arn:aws:s3:::BUCKET/*"}, statement
        if statement.get("Resource") == "*":  # only actions that IAM cannot scope to a resource
            assert all(a.startswith("ec2:Describe") or a == "ecr:GetAuthorizationToken"
                       for a in actions), statement
    text = (DEPLOY / name).read_text()
    assert set(re.findall(r"\b[A-Z]{4,}\b", text)) <= {"ACCOUNT", "BUCKET"}


def test_sweep_policy_reaches_the_bucket_and_nothing_else():
    policy = _policy("iam-policy-hardmix.json")
    obj = "arn:aws:s3:::BUCKET/hardmix/quickstart/trials/part-0.parquet"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert _allows(policy, action, obj), action  # pyarrow writes, Tune prunes checkpoints
    assert _allows(policy, "s3:ListBucket", "arn:aws:s3:::BUCKET")
    for action, resource in [("s3:GetObject", "arn:aws:s3:::other-bucket/x"),
                             ("s3:ListBucket", "arn:aws:s3:::other-bucket"),
                             ("s3:DeleteBucket", "arn:aws:s3:::BUCKET"),
                             ("s3:PutBucketPolicy", "arn:aws:s3:::BUCKET"),
                             ("s3:ListAllMyBuckets", "*"),
                             ("ec2:RunInstances", "arn:aws:ec2:us-east-2:ACCOUNT:instance/i-1")]:
        assert not _allows(policy, action, resource), (action, resource)


def test_head_policy_launches_and_ends_only_this_clusters_workers():
    """What Ray 2.60's AWS node provider does from the head (launch a worker type with the
    cluster's tag and the worker role, retag and terminate its nodes) is allowed; other
    instance types, other instances and other roles are not. Instance types, the cluster tag,
    the roles and the region are those of cluster.yaml."""
    head = _policy("iam-policy-hardmix-head.json")
    cfg = _ray_validate(_raw())
    region = cfg["provider"]["region"]
    types = cfg["available_node_types"]
    workers = {n: t["node_config"] for n, t in types.items() if n != cfg["head_node_type"]}
    head_node = types[cfg["head_node_type"]]["node_config"]
    instance = f"arn:aws:ec2:{region}:ACCOUNT:instance/i-0123"
    ours = {"aws:RequestTag/ray-cluster-name": cfg["cluster_name"]}
    for node in workers.values():
        assert _allows(head, "ec2:RunInstances", instance,
                       {**ours, "ec2:InstanceType": node["InstanceType"]})
    for uses in (f"arn:aws:ec2:{region}::image/{head_node['ImageId']}",
                 f"arn:aws:ec2:{region}:ACCOUNT:subnet/subnet-1",
                 f"arn:aws:ec2:{region}:ACCOUNT:security-group/sg-1",
                 f"arn:aws:ec2:{region}:ACCOUNT:volume/vol-1"):
        assert _allows(head, "ec2:RunInstances", uses)
    assert not _allows(head, "ec2:RunInstances", instance,
                       {**ours, "ec2:InstanceType": "p5.48xlarge"})
    assert not _allows(head, "ec2:RunInstances", instance, {"ec2:InstanceType": "g5.2xlarge"})
    assert not _allows(head, "ec2:RunInstances", instance.replace(region, "eu-west-1"),
                       {**ours, "ec2:InstanceType": "g5.2xlarge"})
    assert _allows(head, "ec2:CreateTags", instance, {"ec2:CreateAction": "RunInstances"})
    tagged = {"ec2:ResourceTag/ray-cluster-name": cfg["cluster_name"]}
    for action in ("ec2:TerminateInstances", "ec2:CreateTags"):
        assert _allows(head, action, instance, tagged)
        assert not _allows(head, action, instance, {"ec2:ResourceTag/ray-cluster-name": "other"})
        assert not _allows(head, action, instance)
    assert _allows(head, "ec2:DescribeInstances", "*", {"aws:RequestedRegion": region})
    worker_roles = {n["IamInstanceProfile"]["Name"] for n in workers.values()}
    assert len(worker_roles) == 1
    role = f"arn:aws:iam::ACCOUNT:role/{worker_roles.pop()}"
    assert _allows(head, "iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"})
    admin = f"arn:aws:iam::ACCOUNT:role/{head_node['IamInstanceProfile']['Name']}"
    assert not _allows(head, "iam:PassRole", admin, {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not _allows(head, "s3:GetObject", "arn:aws:s3:::BUCKET/x")  # the sweep policy's job
    # Where the nodes run Ray in an image from ECR, both policies' pull rights name its repository.
    image = (cfg.get("docker") or {}).get("image", "")
    if ".dkr.ecr." in image:
        registry, _, repo = image.partition("/")
        repo_arn = (f"arn:aws:ecr:{registry.split('.')[3]}:ACCOUNT:repository/"
                    f"{repo.split(':')[0]}")
        assert _allows(_policy("iam-policy-hardmix.json"), "ecr:BatchGetImage", repo_arn)


def test_setup_docs_use_the_policy_files_not_account_wide_access():
    text = (REPO / "docs" / "cluster-setup.md").read_text()
    for name in POLICIES:
        assert f"file://deploy/{name}" in text or f"deploy/{name}" in text, name
    # Managed policies reach every bucket, instance or repository of the account.
    for managed in ("AmazonS3FullAccess", "AmazonEC2FullAccess",
                    "AmazonEC2ContainerRegistryReadOnly"):
        assert managed not in text, managed
    # SSH is narrowed by a group of one's own, named in every node_config of cluster.yaml.
    assert "authorize-security-group-ingress" in text and "SecurityGroupIds" in text


def _drop(path):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _set(path, value):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


# (description, edit, rejected by Ray's own schema too?)
BROKEN = [
    ("worker type without node_config", _drop(["available_node_types", "gpu-1x", "node_config"]), True),
    ("worker type without resources", _drop(["available_node_types", "gpu-4x", "resources"]), True),
    ("negative global max_workers", _set(["max_workers"], -1), True),
    ("unknown top-level key", _set(["max_worker"], 3), True),
    ("unknown key in a node type", _set(["available_node_types", "gpu-1x", "max_nodes"], 3), True),
    ("non-integer resources", _set(["available_node_types", "gpu-1x", "resources"], {"GPU": 0.5}), True),
    ("head type that does not exist", _set(["head_node_type"], "cpu-head"), True),
    ("negative max_workers of a node type", _set(["available_node_types", "gpu-1x", "max_workers"], -2), False),
    ("min_workers above max_workers", _set(["available_node_types", "gpu-4x", "min_workers"], 5), False),
    ("dashboard on all interfaces", _set(["head_start_ray_commands"], [
        "ray stop", "ray start --head --port=6379 --dashboard-host=0.0.0.0"]), False),
    # Without its own start commands the file inherits Ray's AWS defaults, which open the dashboard.
    ("head start commands left to Ray's defaults", _drop(["head_start_ray_commands"]), False),
    ("workers started without token auth", _set(["worker_start_ray_commands"], [
        "ray stop", "ray start --address=$RAY_HEAD_IP:6379"]), False),
    # Each entry runs in a shell of its own: an export one entry earlier does not reach ray start.
    ("token auth exported by an earlier command", _set(["head_start_ray_commands"], [
        "export RAY_AUTH_MODE=token", "ray start --head --port=6379 --dashboard-host=127.0.0.1"]),
     False),
    ("token auth set after ray start", _set(["head_start_ray_commands"], [
        "ray start --head --dashboard-host=127.0.0.1; export RAY_AUTH_MODE=token"]), False),
]


@pytest.mark.parametrize("what, edit, ray_rejects", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_cluster_variants_are_rejected(what, edit, ray_rejects, no_network):
    cfg = _raw()
    edit(cfg)
    if ray_rejects:
        with pytest.raises(Exception):
            _ray_validate(cfg)
    with pytest.raises(ConfigError) as info:
        tc.validate_cluster_config(cfg, yaml.safe_dump(cfg))
    assert "cluster.yaml" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not no_network


# Built at run time so that no credential-shaped string sits in the repository.
PLANTED = [
    ("access key id", "AKIA" + "Q" * 16),
    ("secret env var", "export AWS_SECRET_ACCESS_KEY=$X"),
    ("40-char secret", "k" * 20 + "/" + "Z9" * 9 + "+"),
    ("private key", "-----BEGIN OPENSSH " + "PRIVATE KEY-----"),
]


@pytest.mark.parametrize("what, secret", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_credentials_are_found(what, secret, tmp_path):
    text = (REPO / "cluster.yaml").read_text().replace(
        "head_setup_commands: []", f"head_setup_commands:\n  - echo '{secret}' > /dev/null")
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="credentials"):
        tc.validate_cluster_file(path)


def test_credentials_entry_in_config_is_found():
    cfg = _raw()
    cfg["provider"]["aws_credentials"] = {"aws_session_token": "x"}
    with pytest.raises(ConfigError, match="credentials"):
        tc.validate_cluster_config(cfg, yaml.safe_dump(cfg))


def test_local_variant_rejects_node_types():
    cfg = _raw("cluster-local.yaml")
    assert cfg["provider"]["type"] == "local" and cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    cfg["available_node_types"] = _raw()["available_node_types"]
    with pytest.raises(ConfigError, match="rejected by Ray"):
        tc.validate_cluster_config(cfg, "", "cluster-local.yaml")
    broken = _raw("cluster-local.yaml")
    del broken["provider"]["head_ip"]
    with pytest.raises(ConfigError):
        tc.validate_cluster_config(broken, "", "cluster-local.yaml")


def test_cli_validates_files(capsys, tmp_path):
    assert tc.main([str(REPO / "cluster.yaml")]) == 0
    assert "gpu-4x" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: aws, region: us-east-2}\nmax_workers: -1\n")
    assert tc.main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith("hardmix: error: bad.yaml")


# ------------------------------------------------------------------------------------------------
# Presets sized for the cluster
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", CLUSTER_PRESETS[:2])
def test_cifar_cluster_presets_load_and_pack_trials(preset):
    cfg = load_config(SweepConfig, preset=preset)
    assert cfg.run.data.name == preset.split("-")[1]
    assert cfg.run.model.name == "resnet18" and cfg.run.optim.epochs == 200
    assert (cfg.run.optim.milestones, cfg.run.optim.gamma, cfg.run.optim.weight_decay) == ([60, 120, 160], 0.2, 5e-4)
    assert len(cfg.seeds) == 5
    assert {"augment.alpha", "augment.criterion", "augment.fallback"} <= set(cfg.space)
    assert 0 < cfg.resources.gpus < 1 and 2 <= cfg.resources.cpus <= 4 and cfg.resources.workers == 1
    assert cfg.run.data.download and cfg.run.data.path is None  # nodes prefetch into the default


def test_imagenet_preset_needs_a_data_path_and_uses_data_parallel_workers(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_config(SweepConfig, preset="cluster-imagenet-ddp")
    cfg = load_config(SweepConfig, preset="cluster-imagenet-ddp",
                      overrides=[f"run.data.path={tmp_path}"])
    assert cfg.resources.workers > 1 and cfg.resources.gpus == 1
    assert cfg.run.data.name == "folder" and cfg.run.optim.milestones == [75, 150, 225]
    assert cfg.run.data.batch_size * cfg.resources.workers == 256  # the paper's global batch


def test_cluster_yaml_can_hold_every_cluster_preset(tmp_path):
    view = tc.view_from_cluster_config(_ray_validate(_raw()), "cluster.yaml")
    for preset in CLUSTER_PRESETS:
        cfg = load_config(SweepConfig, preset=preset, overrides=[f"run.data.path={tmp_path}"]
                          if "imagenet" in preset else [])
        tc.check_cluster_resources(cfg, view)
        assert tc.max_placeable(tc.trial_bundle(cfg), view) >= cfg.resources.workers
    # CIFAR packs 4 trials per single-GPU node; ImageNet fills exactly the two 4-GPU nodes.
    cifar = load_config(SweepConfig, preset=CLUSTER_PRESETS[0])
    assert tc.per_node(tc.trial_bundle(cifar), {"CPU": 8, "GPU": 1, "gpu-1x": 1}) == 4


# ------------------------------------------------------------------------------------------------
# Pre-launch resource check on fake clusters (no Ray)
# ------------------------------------------------------------------------------------------------


def _cfg(cpus=1.0, gpus=0.0, workers=1, address=None, custom=None) -> SweepConfig:
    base = load_config(SweepConfig, overrides=["run.data.name=synthetic"])
    return with_overrides(base, {"resources.cpus": cpus, "resources.gpus": gpus,
                                 "resources.workers": workers, "address": address,
                                 "resources.custom": custom or {}})


def _view(*groups, max_workers=None, complete=True, max_resources=None):
    return tc.ClusterView(tuple(groups), "test", complete, max_workers, max_resources)


HEAD = tc.NodeGroup("head", {"CPU": 0}, 1, worker=False)
ONE_GPU = tc.NodeGroup("gpu-1x", {"CPU": 8, "GPU": 1}, 8)
FOUR_GPU = tc.NodeGroup("gpu-4x", {"CPU": 48, "GPU": 4}, 2)


def test_four_gpus_per_worker_is_refused_where_no_node_has_four():
    cfg = _cfg(cpus=8, gpus=4, workers=2)
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(cfg, _view(HEAD, ONE_GPU))
    assert info.value.field == "resources.gpus" and info.value.value == 4
    assert "gpu-1x {CPU: 8, GPU: 1}" in str(info.value)
    # Once the 4-GPU type exists (up to two nodes), the same request fits: one worker per node.
    tc.check_cluster_resources(cfg, _view(HEAD, ONE_GPU, FOUR_GPU))
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=8, gpus=4, workers=3), _view(HEAD, ONE_GPU, FOUR_GPU))
    assert info.value.field == "resources.workers" and "at most 2" in str(info.value)


def test_cpu_shortage_names_cpus():
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=64, gpus=1), _view(HEAD, ONE_GPU, FOUR_GPU))
    assert info.value.field == "resources.cpus"


CPU_HEAD = tc.NodeGroup("head", {"CPU": 0}, 1, worker=False)
ONE_CPU = tc.NodeGroup("cpu-1x", {"CPU": 1}, 4)


def test_cpus_no_node_type_has_are_refused_naming_the_short_type():
    """Item 5: 4 CPUs per worker on 1-CPU nodes: one line, the field, and which node type has
    how much of what is missing."""
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=4, workers=2), _view(CPU_HEAD, ONE_CPU))
    err = info.value
    assert (err.field, err.value) == ("resources.cpus", 4)
    text = str(err)
    assert len(text.splitlines()) == 1
    assert "4 CPUs per worker but head has 0 CPUs, cpu-1x has 1 CPU" in text
    assert "cpu-1x {CPU: 1} x <= 4" in text and "(from test)" in text
    # The GPU that no type has is named first when both are short.
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=4, gpus=1), _view(CPU_HEAD, ONE_CPU))
    assert info.value.field == "resources.gpus"
    assert str(info.value).index("1 GPU per worker") < str(info.value).index("4 CPUs per worker")
    tc.check_cluster_resources(_cfg(cpus=1, workers=4), _view(CPU_HEAD, ONE_CPU))  # fits


def test_custom_resources_are_part_of_the_request_and_of_the_check():
    cfg = _cfg(cpus=1, custom={"slot": 1, "unused": 0})
    assert tc.trial_bundle(cfg) == {"CPU": 1.0, "slot": 1.0}
    assert tc.per_node({"CPU": 1, "slot": 1}, {"CPU": 8, "slot": 2}) == 2
    assert tc.per_node({"CPU": 1, "slot": 1}, {"CPU": 8}) == 0
    with pytest.raises(ConfigError) as info:  # no node type has the resource
        tc.check_cluster_resources(cfg, _view(CPU_HEAD, ONE_CPU))
    assert (info.value.field, info.value.value) == ("resources.custom.slot", 1)
    assert "1 slot per worker but head has 0 slot, cpu-1x has 0 slot" in str(info.value)
    slotted = tc.NodeGroup("cpu-slot", {"CPU": 2, "slot": 1}, 2)
    tc.check_cluster_resources(_cfg(cpus=1, workers=2, custom={"slot": 1}), _view(CPU_HEAD, slotted))
    with pytest.raises(ConfigError) as info:  # one slot per node, two nodes: not three workers
        tc.check_cluster_resources(_cfg(cpus=1, workers=3, custom={"slot": 1}),
                                   _view(CPU_HEAD, slotted))
    assert info.value.field == "resources.workers" and "at most 2" in str(info.value)
    # Alive nodes are grouped by their custom resources too; Ray's bookkeeping is left out.
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "slot": 1.0, "node:127.0.0.1": 1.0,
                                           "memory": 1e9, "object_store_memory": 1e8}},
             {"Alive": True, "Resources": {"CPU": 2.0, "node:127.0.0.2": 1.0}}]
    view = tc.view_from_nodes(nodes, "nodes", complete=True)
    assert sorted(g.resources.get("slot", 0) for g in view.groups) == [0, 1]
    assert all("node:" not in k and "memory" not in k for g in view.groups for k in g.resources)
    assert tc.max_placeable({"CPU": 1, "slot": 1}, view) == 1


@pytest.mark.parametrize("bad, field", [
    ("resources.custom={CPU: 1}", "resources.custom.CPU"),
    ("resources.custom={node:127.0.0.1: 1}", "resources.custom.node:127.0.0.1"),
    ("resources.custom={slot: -1}", "resources.custom.slot"),
    ("resources.custom={slot: .inf}", "resources.custom.slot"),
    ("resources.custom={slot: .nan}", "resources.custom.slot"),
    ("resources.custom={slot: 0.00001}", "resources.custom.slot"),
    ("resources.custom={slot: many}", "resources.custom.slot"),
    ("resources.custom=[slot]", "resources.custom"),
])
def test_bad_custom_resources_are_one_line_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, overrides=["run.data.name=synthetic", bad])
    assert info.value.field == field and len(str(info.value).splitlines()) == 1


def test_custom_resources_reach_the_trial_and_each_data_parallel_worker(monkeypatch, tmp_path):
    """tune.sweep._trainable (a plain trial) and tune.trainable._fit_data_parallel (every Ray
    Train worker) ask Ray for the custom resources; zero amounts are left out."""
    import ray.train.torch

    from tune.sweep import _trainable
    from tune.trainable import SweepContext, _fit_data_parallel

    def ctx(*overrides):
        cfg = load_config(SweepConfig, overrides=["run.data.name=synthetic", *overrides])
        return SweepContext(sweep_dir=str(tmp_path), run=cfg.run, seeds=[0],
                            metric="val_top1_err", resources=cfg.resources)

    plain = _trainable(ctx("resources.cpus=2", "resources.custom={slot: 1, none: 0}"))
    assert plain._resources.bundles == [{"CPU": 2.0, "slot": 1.0}]
    # A data-parallel trial's own process asks for a little CPU only; its workers ask for more.
    ddp = ctx("resources.workers=2", "resources.custom={slot: 1, none: 0}")
    assert _trainable(ddp)._resources.bundles == [{"CPU": 0.5}]
    seen = {}

    class FakeTrainer:
        def __init__(self, *args, scaling_config, **kwargs):
            seen["scaling"] = scaling_config

        def fit(self):
            return None

    import ray.tune.integration.ray_train as tune_train

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    # The real one needs a Tune session; any Train callback stands in for it.
    monkeypatch.setattr(tune_train, "TuneReportCallback", ray.train.UserCallback)
    _fit_data_parallel(ddp, ddp.run, "c000-s0", tmp_path / "run", 1, "t0")
    scaling = seen["scaling"]
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 1.0, "slot": 1.0}


def test_fractional_gpus_pack_several_trials_per_node():
    assert tc.per_node({"CPU": 2, "GPU": 0.25}, {"CPU": 8, "GPU": 1}) == 4
    assert tc.per_node({"CPU": 1, "GPU": 0.1}, {"CPU": 16, "GPU": 1}) == 10  # no float shortfall
    assert tc.per_node({"CPU": 3, "GPU": 0.25}, {"CPU": 8, "GPU": 1}) == 2   # CPU-bound
    assert tc.per_node({"CPU": 1, "GPU": 1}, {"CPU": 8}) == 0


def test_global_max_workers_caps_the_nodes_counted():
    view = _view(HEAD, ONE_GPU, FOUR_GPU, max_workers=2)
    bundle = {"CPU": 4, "GPU": 1}
    assert tc.max_placeable(bundle, view) == 8           # the two 4-GPU nodes, not 8 + 8
    tc.check_cluster_resources(_cfg(cpus=4, gpus=1, workers=8), view)
    with pytest.raises(ConfigError, match="at most 8"):
        tc.check_cluster_resources(_cfg(cpus=4, gpus=1, workers=9), view)
    unbounded = _view(HEAD, tc.NodeGroup("any", {"CPU": 4, "GPU": 1}, tc.UNBOUNDED))
    assert tc.max_placeable(bundle, unbounded) == math.inf


def test_autoscaler_max_resources_cap_the_total():
    view = _view(tc.NodeGroup("gpu", {"CPU": 8, "GPU": 1}, 16), max_resources={"GPU": 3})
    assert tc.max_placeable({"CPU": 1, "GPU": 1}, view) == 3


def test_incomplete_or_unknown_views_warn_instead_of_failing():
    cfg = _cfg(cpus=8, gpus=4, workers=2)
    stream = io.StringIO()
    tc.check_cluster_resources(cfg, _view(HEAD, ONE_GPU, complete=False), stream=stream)
    assert "warning" in stream.getvalue() and "pending" in stream.getvalue()
    unknown = tc.NodeGroup("local.cluster.node", {}, 2, known=False)
    stream = io.StringIO()
    tc.check_cluster_resources(cfg, _view(HEAD, unknown), stream=stream)
    assert "warning" in stream.getvalue()
    quiet = io.StringIO()
    tc.check_cluster_resources(_cfg(cpus=2, gpus=0.25), _view(HEAD, ONE_GPU, complete=False), stream=quiet)
    assert quiet.getvalue() == ""


def test_views_from_nodes_and_from_the_bootstrap_file(tmp_path):
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 1e9}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 4.0}}]
    view = tc.view_from_nodes(nodes, "nodes", complete=True)
    assert sorted((g.count, g.resources.get("GPU", 0)) for g in view.groups) == [(1, 0), (2, 1)]
    assert tc.max_placeable({"CPU": 1, "GPU": 1}, view) == 2
    # `ray up` writes the prepared config as JSON to ~/ray_bootstrap_config.yaml on the head.
    import json
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps(_ray_validate(_raw())))
    boot = tc._view_from_bootstrap(str(path))
    assert boot is not None and boot.complete and boot.max_worker_nodes == 10
    assert {g.name: g.count for g in boot.groups} == {"head": 1, "gpu-1x": 8, "gpu-4x": 2}
    assert tc._view_from_bootstrap(str(tmp_path / "absent.yaml")) is None


# ------------------------------------------------------------------------------------------------
# Against the session's local Ray
# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_check_against_local_ray(ray_local, monkeypatch, tmp_path):
    # A machine that once was a cluster's head keeps that cluster's bootstrap file: a sweep's
    # own local Ray instance must not take its limits from it.
    import json
    stale = tmp_path / "ray_bootstrap_config.yaml"
    stale.write_text(json.dumps(_ray_validate(_raw())))
    monkeypatch.setattr(tc, "BOOTSTRAP_CONFIG", str(stale))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    view = tc.discover_view(None)
    assert view.complete and view.source == "the nodes alive now"
    monkeypatch.setattr(tc, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))
    cpus = ray_local.cluster_resources()["CPU"]
    assert sum(g.resources["CPU"] * g.count for g in view.groups) == cpus
    tc.check_cluster_resources(_cfg(cpus=cpus / 2, workers=2))
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=1, gpus=1))
    assert info.value.field == "resources.gpus"
    with pytest.raises(ConfigError) as info:
        tc.check_cluster_resources(_cfg(cpus=cpus / 2 + 1, workers=2))
    assert info.value.field == "resources.workers"
    # Joined by address, the same cluster may autoscale: a warning, not an error.
    stream = io.StringIO()
    tc.check_cluster_resources(_cfg(cpus=1, gpus=1, address="auto"), stream=stream)
    assert "warning" in stream.getvalue()


#: Run in a fresh interpreter: start Ray the way a local sweep does, run one task (so a worker
#: process listens too), and list every listening TCP socket of this process and its
#: descendants (read from /proc: no psutil, no ss).
_LISTENERS = r"""
import json, os, socket, sys
from hardmix.config import SweepConfig, load_config
from tune.sweep import _start_ray

def listening():
    inodes = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, port = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            inodes[f[9]] = f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [str(os.getpid())]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    found = []
    for pid in tree:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                found.append(inodes[link[8:-1]])
    return sorted(set(found))

cfg = load_config(SweepConfig, None, None, ["run.data.name=synthetic", "local_cpus=1"])
assert _start_ray(cfg)
import ray
ray.get(ray.remote(lambda: os.getpid()).remote())
import time; time.sleep(3)  # the agents open their ports a moment later
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening()}))
"""


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_local_sweep_ray_listens_on_loopback_only(tmp_path):
    """Issue 15 item 4: the Ray instance a local sweep starts (GCS, raylet, agents, workers,
    the driver) is reachable from this machine only."""
    import json
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", _LISTENERS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["gcs"].startswith("127.0.0.1:")
    ports = seen["listening"]
    assert len(ports) >= 4, ports  # GCS, raylet (2), the driver, a worker: really looked
    loopback = ("127.", "::1:", "::ffff:127.")
    assert [p for p in ports if not p.startswith(loopback)] == []


# ------------------------------------------------------------------------------------------------
# The README's cluster steps refer to things that exist
# ------------------------------------------------------------------------------------------------


def _readme_section(name: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- section:{name} -->")
    return text[start:text.index(f"<!-- /section:{name} -->")]


def _commands(section: str) -> list[str]:
    """Shell commands of the section's code blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return out


def test_readme_cluster_commands_match_the_cli_and_files():
    import shlex

    from hardmix.cli import build_parser
    from hardmix.config import preset_names

    section = (REPO / "docs" / "cluster-setup.md").read_text()
    commands = _commands(section)
    hardmix_calls = [c[c.index("hardmix "):] for c in commands if re.search(r"\bhardmix (sweep|report)", c)]
    assert len(hardmix_calls) >= 4
    parser = build_parser()
    for call in hardmix_calls:
        argv = shlex.split(call.replace("$BUCKET", "bucket").replace("$AWS_REGION", "us-east-2"))[1:]
        args = parser.parse_args(argv)  # exits (fails the test) on an option the CLI lacks
        if getattr(args, "preset", None):
            assert args.preset in preset_names()
    steps = " ".join(commands)
    for needed in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit",
                   "--address http://127.0.0.1:8265", "--address auto", "--storage s3://",
                   "--resume s3://", "ray down cluster.yaml", "python -m tune.cluster cluster.yaml"):
        assert needed in steps, needed
    for path in re.findall(r"`((?:cluster|cluster-local)\.yaml|requirements-cluster\.txt)`", section):
        assert (REPO / path).is_file()
    # The SSM parameter the README and cluster.yaml use is the same.
    ssm = re.findall(r"/aws/service/deeplearning/ami/\S+/ami-id", section)
    assert ssm and set(ssm) <= set(re.findall(r"/aws/service/deeplearning/ami/\S+/ami-id",
                                              (REPO / "cluster.yaml").read_text()))
