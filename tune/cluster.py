"""Cluster checks that run before any work: does the cluster config make sense, and can the
cluster ever hold one trial of this sweep?

Two checks, both raising :class:`hardmix.config.ConfigError` (one line: field, value, allowed):

* :func:`validate_cluster_file` — offline validation of a Ray cluster launcher file
  (``cluster.yaml``): Ray's own ``prepare_config`` + ``validate_config`` (the installed
  ``ray-schema.json``; no cloud calls, since there is no ``ray up --dry-run``) plus the rules this
  project adds: no negative worker counts (Ray's schema only bounds the global one), the dashboard
  bound to localhost, token authentication on in every ``ray start``, no credentials in the file.
  ``python -m tune.cluster cluster.yaml``.
* :func:`check_cluster_resources` — after ``ray.init``, before the first trial: a trial asks for
  ``resources.workers`` bundles of ``{CPU: resources.cpus, GPU: resources.gpus, **resources.custom}``;
  if no node that exists or that the autoscaler may start can ever place them, say so now (and
  which node type falls short of what) instead of leaving Tune pending forever.

Where the autoscaler's limits come from, in order: the cluster config the autoscaler reported to
the GCS (KubeRay, autoscaler v2), the launcher's bootstrap file on the head node
(``~/ray_bootstrap_config.yaml``, written by ``ray up``; a ``ray job submit`` driver runs on the
head, so it is there), else only the nodes alive now. A Ray instance the sweep starts itself
(no ``address``) is only its nodes alive now, whatever files lie around. Limits of the check: it
counts CPU, GPU and custom resources (not memory), it checks that some node type can hold the
driver of a Ray Train trial (:func:`driver_bundle`) but not that it has room for it next to the
workers, and it checks that *one* trial fits (how many run at once is Tune's business). On a remote
cluster whose autoscaler limits it cannot read, and where a node type's resources are unknown
(``resources: {}`` not yet filled in), it cannot prove a request infeasible and only prints a
warning.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from hardmix.config import ConfigError, ResourcesConfig, SweepConfig

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Built-in resources a trial asks for (plus its custom ones, resources.custom); Ray's own
# bookkeeping on a node (memory, object_store_memory, node:<ip>, accelerator_type:*) is ignored.
TRIAL_RESOURCES = ("CPU", "GPU")
_IGNORED = ("memory", "object_store_memory")
_IGNORED_PREFIXES = ("node:", "accelerator_type:")
UNBOUNDED = -1
_EPS = 1e-9  # Ray stores resources in fixed point (1e-4); 0.25 * 4 must count as 1.0


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one shape: ``resources`` per node and how many of them can exist at once
    (``count``; :data:`UNBOUNDED` when the config gives no limit). ``known`` is False when the
    autoscaler config leaves a type's resources to be detected at launch (we cannot tell then)."""

    name: str
    resources: Mapping[str, float]
    count: int
    worker: bool = True  # counts against the autoscaler's global max_workers
    known: bool = True


@dataclass(frozen=True)
class ClusterView:
    """What the check knows about the cluster: node groups, the autoscaler's global limits and
    whether the view is complete (no node can appear beyond it)."""

    groups: tuple[NodeGroup, ...]
    source: str
    complete: bool
    max_worker_nodes: Optional[int] = None
    max_resources: Optional[Mapping[str, float]] = None


# ------------------------------------------------------------------------------------------------
# Resource arithmetic (pure: unit-tested with fake resource dicts, no Ray)
# ------------------------------------------------------------------------------------------------


def trial_bundle(cfg: SweepConfig) -> dict[str, float]:
    """The resources of one worker of one trial (the whole trial when ``resources.workers`` is 1):
    CPUs, GPUs and the custom resources of ``resources.custom``."""
    bundle = {"CPU": float(cfg.resources.cpus)}
    if cfg.resources.gpus > 0:
        bundle["GPU"] = float(cfg.resources.gpus)
    for name, amount in sorted(cfg.resources.custom.items()):
        if amount > 0:
            bundle[name] = float(amount)
    return bundle


#: What a data-parallel trial's driver asks for when ``resources.driver`` names nothing: it only
#: starts its Ray Train workers and waits for them.
DRIVER_CPUS = 0.5


def driver_bundle(resources: ResourcesConfig) -> dict[str, float]:
    """The request of a data-parallel trial's driver (``resources.workers > 1``: the Tune trial
    that starts a ``TorchTrainer``): the custom resources of ``resources.driver`` when it names
    any, and no CPU then (the node type offering them, cluster.yaml's head, hosts the drivers),
    else :data:`DRIVER_CPUS` CPUs wherever they are free."""
    custom = {name: float(amount) for name, amount in sorted(resources.driver.items())
              if amount > 0}
    return custom or {"CPU": DRIVER_CPUS}


def requestable(resources: Mapping[str, Any]) -> dict[str, float]:
    """A node's resources that a trial can ask for (Ray's bookkeeping entries dropped)."""
    return {k: float(v) for k, v in resources.items()
            if k not in _IGNORED and not k.startswith(_IGNORED_PREFIXES)}


def per_node(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many ``bundle``s one node with ``node`` resources holds at once."""
    fits = []
    for key, need in bundle.items():
        if need <= 0:
            continue
        fits.append(math.floor(float(node.get(key, 0.0)) / need + _EPS))
    return min(fits) if fits else 0


def max_placeable(bundle: Mapping[str, float], view: ClusterView) -> int | float:
    """The most ``bundle``s the cluster can ever hold at once (``math.inf`` when unbounded).

    Every bundle of a trial is the same, so the best use of a limited number of worker nodes is
    to take the nodes that hold the most bundles first: exact, no bin-packing heuristic needed.
    """
    fixed = [g for g in view.groups if not g.worker]
    total: float = sum(per_node(bundle, g.resources) * max(g.count, 0) for g in fixed)
    slots: list[tuple[int, int]] = []  # (bundles per node, nodes of that kind)
    for g in view.groups:
        if not g.worker:
            continue
        fit = per_node(bundle, g.resources)
        if fit <= 0:
            continue
        if g.count == UNBOUNDED and view.max_worker_nodes is None:
            return math.inf
        count = g.count if g.count != UNBOUNDED else view.max_worker_nodes
        slots.append((fit, count))
    budget = view.max_worker_nodes
    for fit, count in sorted(slots, reverse=True):
        take = count if budget is None else min(count, budget)
        total += fit * take
        if budget is not None:
            budget -= take
            if budget <= 0:
                break
    if view.max_resources:
        for key, need in bundle.items():
            cap = view.max_resources.get(key)
            if need > 0 and cap is not None:
                total = min(total, math.floor(cap / need + _EPS))
    return total


def _fmt(res: Mapping[str, float]) -> str:
    res = requestable(res)
    keys = [k for k in TRIAL_RESOURCES if k in res] + sorted(k for k in res
                                                            if k not in TRIAL_RESOURCES)
    return "{" + ", ".join(f"{k}: {res.get(k, 0):g}" for k in keys) + "}"


def _amount(name: str, value: float) -> str:
    """``4 CPUs``, ``1 GPU``, ``0 ssd``: a quantity of one resource in words."""
    plural = name in TRIAL_RESOURCES and abs(value - 1) > _EPS
    return f"{value:g} {name}{'s' if plural else ''}"


def shortfalls(bundle: Mapping[str, float], groups: Iterable[NodeGroup],
               first: str | None = None) -> str:
    """Which node type is short of what for one ``bundle``, e.g. ``4 CPUs per worker but
    cpu-1x has 1 CPU, head has 0 CPUs``: per resource (``first`` first), the node types that
    have less of it than one worker needs."""
    groups = list(groups)
    parts = []
    for key in sorted(bundle, key=lambda k: k != first):
        need = bundle[key]
        short = [g for g in groups if need > 0 and float(g.resources.get(key, 0.0)) + _EPS < need]
        if short:
            have = ", ".join(f"{g.name} has {_amount(key, float(g.resources.get(key, 0.0)))}"
                             for g in short)
            parts.append(f"{_amount(key, need)} per worker but {have}")
    return "; ".join(parts)


def _describe(view: ClusterView) -> str:
    parts = []
    for g in view.groups:
        if not g.known:
            parts.append(f"{g.name} {{resources detected at launch}}")
            continue
        count = "unbounded" if g.count == UNBOUNDED else (f"<= {g.count}" if g.worker else str(g.count))
        parts.append(f"{g.name} {_fmt(g.resources)} x {count}")
    text = "; ".join(parts) or "no nodes"
    if view.max_worker_nodes is not None:
        text += f"; at most {view.max_worker_nodes} worker nodes in all"
    return f"{text} (from {view.source})"


def assess(cfg: SweepConfig, view: ClusterView) -> Optional[ConfigError]:
    """The ConfigError a sweep's resource request earns on this cluster, or None when it fits
    (or when the view is too incomplete to prove that it cannot)."""
    bundle = trial_bundle(cfg)
    workers = cfg.resources.workers
    known = [g for g in view.groups if g.known]
    if workers > 1:
        driver = driver_bundle(cfg.resources)
        if (not any(per_node(driver, g.resources) > 0 for g in known) and view.complete
                and len(known) == len(view.groups)):
            short = _blocking_resource(driver, known) or next(iter(driver))
            field = "resources.driver" + ("" if short == "CPU" else f".{short}")
            value = cfg.resources.driver.get(short) if short != "CPU" else cfg.resources.driver
            lacks = shortfalls(driver, known, short).replace("per worker", "per driver")
            return ConfigError(field, value, f"no node type can ever hold the driver of a "
                               f"data-parallel trial, {_fmt(driver)}: {lacks}; nodes: "
                               f"{_describe(view)}")
    if not any(per_node(bundle, g.resources) > 0 for g in known):
        if not view.complete or len(known) < len(view.groups):
            return None
        short = _blocking_resource(bundle, known)
        field, value = _field_of(short, cfg)
        return ConfigError(field, value, f"no node type can ever hold one trial worker of "
                           f"{_fmt(bundle)}: {shortfalls(bundle, known, short)}; nodes: "
                           f"{_describe(view)}")
    possible = max_placeable(bundle, ClusterView(tuple(known), view.source, view.complete,
                                                 view.max_worker_nodes, view.max_resources))
    if possible >= workers:
        return None
    if not view.complete or len(known) < len(view.groups):
        return None
    return ConfigError("resources.workers", workers,
                       f"a trial needs {workers} workers of {_fmt(bundle)} at once but the cluster "
                       f"can place at most {possible}; nodes: {_describe(view)}; lower "
                       f"resources.workers/cpus/gpus or raise max_workers in cluster.yaml")


def _blocking_resource(bundle: Mapping[str, float], groups: Iterable[NodeGroup]) -> str | None:
    """The resource that keeps the bundle off every node (GPU, then custom ones, then CPU when
    several do); None when no single one does (each node type lacks something else)."""
    groups = list(groups)
    custom = sorted(k for k in bundle if k not in TRIAL_RESOURCES)
    for key in ("GPU", *custom, "CPU"):
        need = bundle.get(key, 0.0)
        if need > 0 and all(float(g.resources.get(key, 0.0)) + _EPS < need for g in groups):
            return key
    return None


def _field_of(resource: str | None, cfg: SweepConfig) -> tuple[str, Any]:
    """The config field (and its value) that asks for ``resource``."""
    if resource == "GPU":
        return "resources.gpus", cfg.resources.gpus
    if resource == "CPU":
        return "resources.cpus", cfg.resources.cpus
    if resource is not None:
        return f"resources.custom.{resource}", cfg.resources.custom.get(resource)
    return "resources", trial_bundle(cfg)


# ------------------------------------------------------------------------------------------------
# Where the view comes from
# ------------------------------------------------------------------------------------------------


def view_from_cluster_config(config: Mapping[str, Any], source: str) -> ClusterView:
    """Node groups of a Ray cluster launcher config (``cluster.yaml`` or its prepared bootstrap
    copy): one group per ``available_node_types`` entry, the head type counted once."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    groups = []
    for name, spec in types.items():
        resources = requestable(spec.get("resources") or {})
        known = any(k in resources for k in TRIAL_RESOURCES)
        if name == head:
            groups.append(NodeGroup(name, resources, 1, worker=False, known=known))
            continue
        groups.append(NodeGroup(name, resources, int(spec.get("max_workers",
                                                                 config.get("max_workers", 0))),
                                known=known))
    max_workers = config.get("max_workers")
    return ClusterView(tuple(groups), source, complete=True,
                       max_worker_nodes=int(max_workers) if max_workers is not None else None)


def view_from_nodes(nodes: Iterable[Mapping[str, Any]], source: str, complete: bool) -> ClusterView:
    """Alive nodes (``ray.nodes()`` entries), grouped by their shape (CPU, GPU and custom
    resources)."""
    shapes: dict[tuple, int] = {}
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = requestable(node.get("Resources", {}))
        shape = tuple((k, float(res.get(k, 0.0))) for k in TRIAL_RESOURCES) + tuple(
            sorted((k, v) for k, v in res.items() if k not in TRIAL_RESOURCES))
        shapes[shape] = shapes.get(shape, 0) + 1
    groups = tuple(NodeGroup(f"node {_fmt(dict(shape))}", dict(shape), n, worker=False)
                   for shape, n in shapes.items())
    return ClusterView(groups, source, complete)


def _view_from_gcs() -> Optional[ClusterView]:
    """The autoscaler config reported to the GCS (KubeRay / autoscaler v2), if any."""
    try:
        from ray._private import state  # private: ray is pinned (requirements-cluster.txt)
        cluster_config = state.state.get_cluster_config()
    except Exception:  # Ray Client, old GCS, no autoscaler: fall back to the next source
        return None
    if cluster_config is None or not cluster_config.node_group_configs:
        return None
    groups = []
    for ngc in cluster_config.node_group_configs:
        resources = requestable(dict(ngc.resources))
        groups.append(NodeGroup(ngc.name or "node group", resources, int(ngc.max_count),
                                known=bool(resources)))
    max_resources = {k: float(v) for k, v in cluster_config.max_resources.items()} or None
    return ClusterView(tuple(groups), "the autoscaler config in the GCS", True,
                       max_resources=max_resources)


def _view_from_bootstrap(path: str | None = None) -> Optional[ClusterView]:
    """The launcher's prepared config on the head node (JSON, written by ``ray up``)."""
    p = Path(os.path.expanduser(path or BOOTSTRAP_CONFIG))
    if not p.is_file():
        return None
    try:
        config = yaml.safe_load(p.read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not config.get("available_node_types"):
        return None
    return view_from_cluster_config(config, str(p))


def discover_view(address: Optional[str]) -> ClusterView:
    """What the connected Ray cluster is and may become. Call after ``ray.init``."""
    import ray

    # A Ray instance the sweep started itself (address null, no RAY_ADDRESS of a job) cannot
    # grow: its nodes are the whole story, even on a machine that once was a cluster's head
    # (a stale ~/ray_bootstrap_config.yaml there describes another cluster).
    if address in (None, "", "local") and not os.environ.get("RAY_ADDRESS"):
        return view_from_nodes(ray.nodes(), "the nodes alive now", complete=True)
    for view in (_view_from_gcs(), _view_from_bootstrap()):
        # A node type whose resources are detected at launch (on-premise clusters: one type
        # with `resources: {}`) tells nothing; the alive nodes tell more.
        if view is not None and all(g.known for g in view.groups):
            return view
    # No autoscaler limits: the nodes alive now; a remote cluster may autoscale beyond them.
    return view_from_nodes(ray.nodes(), "the nodes alive now", complete=False)


def check_cluster_resources(cfg: SweepConfig, view: ClusterView | None = None,
                            stream=None) -> None:
    """Raise ConfigError when no trial of ``cfg`` can ever be placed on the cluster.

    Call it after ``ray.init`` and before ``Tuner.fit`` (``view`` defaults to
    :func:`discover_view`). When the cluster may hold nodes it cannot see, a request that does
    not fit the visible nodes prints one warning line to ``stream`` (stderr) instead.
    """
    view = view if view is not None else discover_view(cfg.address)
    error = assess(cfg, view)
    if error is not None:
        raise error
    bundle = trial_bundle(cfg)
    visible = ClusterView(tuple(g for g in view.groups if g.known), view.source, view.complete,
                          view.max_worker_nodes, view.max_resources)
    if max_placeable(bundle, visible) < cfg.resources.workers:
        print(f"hardmix: warning: a trial needs {cfg.resources.workers} x {_fmt(bundle)}; the "
              f"visible cluster ({_describe(view)}) cannot hold it yet: trials stay pending until "
              f"the autoscaler adds nodes", file=stream or sys.stderr)


# ------------------------------------------------------------------------------------------------
# Offline validation of a cluster launcher file
# ------------------------------------------------------------------------------------------------

# Credential shapes that must never sit in a committed cluster file.
SECRET_PATTERNS = (
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b")),
    ("an AWS secret key setting", re.compile(r"(?i)aws_secret_access_key|aws_session_token")),
    ("a 40-character secret key", re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{39}[A-Za-z0-9/+=]"
                                             r"(?![A-Za-z0-9/+=])")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a credentials entry", re.compile(r"(?im)^\s*[\w.-]*(password|passwd|secret|api_key|apikey|"
                                       r"token)[\w.-]*\s*:\s*\S")),
)
_ALL_INTERFACES = ("0.0.0.0", "::", "[::]")
#: Providers whose files Ray's autoscaler reads as they are: the wheel ships no defaults file for
#: them (``prepare_config`` would fail to open ``fake_multi_node/example.yaml``).
COMPLETE_PROVIDERS = ("fake_multinode",)
_TOKEN_MODE = re.compile(r"\bRAY_AUTH_MODE=['\"]?token\b")


def find_secrets(text: str) -> list[str]:
    """Names of the credential shapes found in ``text`` (comments included)."""
    return [name for name, pattern in SECRET_PATTERNS if pattern.search(text)]


def dashboard_hosts(config: Mapping[str, Any]) -> list[str]:
    """The ``--dashboard-host`` of every ``ray start --head`` command (``localhost`` when a
    command leaves it out: Ray's own default)."""
    hosts = []
    for command in config.get("head_start_ray_commands") or []:
        if "ray start" not in command or "--head" not in command:
            continue
        match = re.search(r"--dashboard-host[= ]\s*['\"]?([^\s'\";]+)", command)
        hosts.append(match.group(1) if match else "localhost")
    return hosts


def start_commands_without_token_auth(config: Mapping[str, Any]) -> list[str]:
    """The ``ray start`` commands (head and workers) that do not set ``RAY_AUTH_MODE=token``
    before it in the same command: each entry of a command list runs in its own shell, so an
    ``export`` in an earlier entry does not reach it."""
    bad = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key) or []:
            start = command.find("ray start")
            if start >= 0 and not _TOKEN_MODE.search(command[:start]):
                bad.append(command)
    return bad


def _prepare(config: dict) -> dict:
    """Ray's ``prepare_config`` (provider defaults merged in), except for providers whose file
    must be complete already (:data:`COMPLETE_PROVIDERS`)."""
    from ray.autoscaler._private.util import prepare_config

    provider = config.get("provider")
    if isinstance(provider, dict) and provider.get("type") in COMPLETE_PROVIDERS:
        return copy.deepcopy(config)
    return prepare_config(copy.deepcopy(config))


def validate_cluster_config(config: dict, text: str = "", name: str = "cluster.yaml") -> dict:
    """Validate a parsed cluster launcher config; return Ray's prepared config.

    Ray's ``prepare_config`` (merges the provider's defaults, which would otherwise inject
    ``--dashboard-host=0.0.0.0``) then ``validate_config`` (the JSON schema in the installed
    wheel), then this project's rules on the prepared result. No cloud calls.
    """
    from ray.autoscaler._private.util import validate_config

    if not isinstance(config, dict):
        raise ConfigError(name, type(config).__name__, "must hold a mapping (a Ray cluster config)")
    try:
        prepared = _prepare(config)
        validate_config(prepared)
    except SystemExit as exc:  # cli_logger.abort() on bad on-premise configs raises this
        raise ConfigError(name, "provider", f"rejected by Ray: {exc}") from None
    except Exception as exc:  # jsonschema.ValidationError, ValueError, click's exceptions
        first = str(getattr(exc, "message", None) or exc).strip().splitlines()[0]
        where = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
        value = getattr(exc, "instance", None)
        if isinstance(value, (dict, list)):
            value = f"<{type(value).__name__} of {len(value)}>"
        raise ConfigError(f"{name}:{where}" if where else name, value,
                          f"rejected by Ray's cluster schema: {first}") from None
    if prepared.get("max_workers", 0) < 0:
        raise ConfigError(f"{name}:max_workers", prepared["max_workers"], "must be >= 0")
    for type_name, spec in (prepared.get("available_node_types") or {}).items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers", 0)
        if lo < 0 or hi < 0:
            raise ConfigError(f"{name}:available_node_types/{type_name}",
                              {"min_workers": lo, "max_workers": hi}, "worker counts must be >= 0")
        if lo > hi:
            raise ConfigError(f"{name}:available_node_types/{type_name}/min_workers", lo,
                              f"must be <= max_workers ({hi})")
    for host in dashboard_hosts(prepared):
        if host in _ALL_INTERFACES:
            raise ConfigError(f"{name}:head_start_ray_commands", f"--dashboard-host={host}",
                              "must bind the dashboard to 127.0.0.1 (reach it with "
                              "`ray dashboard cluster.yaml`), never to all interfaces")
    for command in start_commands_without_token_auth(prepared)[:1]:
        raise ConfigError(f"{name}:start_ray_commands", command.strip()[:80],
                          "must start Ray with token authentication (RAY_AUTH_MODE=token in the "
                          "same command, e.g. `export RAY_AUTH_MODE=token; ray start ...`)")
    found = find_secrets(text or yaml.safe_dump(config))
    if found:
        raise ConfigError(name, found[0], "must not contain credentials: take them from the AWS "
                          "environment or an instance profile")
    return prepared


def validate_cluster_file(path: str | os.PathLike) -> dict:
    """Read and validate a cluster launcher YAML file (see :func:`validate_cluster_config`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("cluster file", str(path), "must be an existing YAML file")
    text = p.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("cluster file", str(path),
                          f"is not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_cluster_config(config, text, p.name)


def main(argv: list[str] | None = None) -> int:
    """``python -m tune.cluster cluster.yaml [...]``: validate cluster files offline."""
    from hardmix.config import fail

    paths = (argv if argv is not None else sys.argv[1:]) or ["cluster.yaml"]
    for path in paths:
        try:
            prepared = validate_cluster_file(path)
        except ConfigError as exc:
            return fail(exc)
        view = view_from_cluster_config(prepared, path)
        print(f"{path}: ok — {_describe(view)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
