"""Checks before the first trial: everything that needs no Ray on the driver
(:func:`prepare`), then, once Ray is up, what only the cluster can tell (:func:`check_cluster`):
can a node ever hold one trial, does a GPU cluster get trials that ask for GPUs, and do the
data and the device check out on a node where trials run.

Each check raises :class:`hardmix.config.ConfigError` (one line: field, value, allowed) before
any trial starts.
"""

from __future__ import annotations

import os
from typing import TextIO

from ablations.storage import is_uri
from hardmix.config import ConfigError, SweepConfig, check_sweep_environment
from tune.plan import joins_cluster
from tune.space import check_space, with_default_space


def prepare(cfg: SweepConfig, plan: bool = False) -> SweepConfig:
    """Every check that needs no Ray, and paths made absolute (Tune runs trials in their own
    working directories). Raises ConfigError. ``plan`` (``--dry-run``): data that are not here
    pass (the plan says so and sizes them where their shape is known, :mod:`tune.plan`)."""
    cfg = with_default_space(cfg)
    check_space(cfg)
    data = cfg.run.data
    if data.path and not is_uri(data.path):
        data.path = os.path.abspath(os.path.expanduser(data.path))
    # On a cluster the driver's machine may never read the data nor hold a GPU: what depends on
    # the node is checked on a trial's node once Ray is up (check_on_trial_node).
    check_sweep_environment(cfg, node=not joins_cluster(cfg), plan=plan)
    if cfg.mode == "grid" and cfg.followup.top:
        raise ConfigError("followup.top", cfg.followup.top,
                          "follow-up runs re-run the best of a search: use mode=search "
                          "(a grid already runs every configuration)")
    return cfg


def check_cluster(cfg: SweepConfig, out: TextIO) -> None:
    """The checks that need Ray (called once it is up): a trial no node can ever hold would
    wait forever (:func:`tune.cluster.check_cluster_resources`); on a cluster, the GPU request
    and the node's half of the environment check."""
    from tune.cluster import check_cluster_resources

    check_cluster_resources(cfg)
    if joins_cluster(cfg):
        import ray

        check_gpu_request(cfg, ray.cluster_resources())
        check_on_trial_node(cfg, out)


def check_gpu_request(cfg: SweepConfig, cluster: dict) -> None:
    """A cluster with GPUs and trials that ask for none while ``device=auto``: each trial would
    take whatever GPU its node shows it (Ray reserves none for it; Ray 2.60 leaves
    ``CUDA_VISIBLE_DEVICES`` alone for a zero-GPU task) or train on the CPU of a node without
    one. One line, before any trial."""
    gpus = float(cluster.get("GPU", 0) or 0)
    if gpus <= 0 or cfg.resources.gpus > 0:
        return
    devices = {cfg.run.device, *(arm["device"] for arm in cfg.arms if "device" in arm)}
    if "device" in cfg.space:
        devices |= set(cfg.space["device"].values or [])
    if "auto" not in devices:
        return
    raise ConfigError("resources.gpus", cfg.resources.gpus,
                      f"the cluster has {gpus:g} GPU{'s' if gpus != 1 else ''} but each trial "
                      "asks for none, so with run.device=auto a trial would use a GPU Ray has "
                      "not reserved for it, or the CPU on a node without one: ask for GPUs "
                      "(e.g. resources.gpus=0.25 puts four trials on one GPU) or set "
                      "run.device=cpu to train on CPUs on purpose")


def _check_here(cfg: SweepConfig) -> dict:
    """The node's half of the environment check (:func:`check_sweep_node`), inside a Ray task
    on a node where trials run; the error's fields and where it ran, as plain values."""
    import socket

    import ray

    from hardmix.config.environment import check_sweep_node

    where = {"node_id": ray.get_runtime_context().get_node_id() or "",
             "ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}
    try:
        check_sweep_node(cfg)
    except ConfigError as exc:
        return {**where, "error": [exc.field, exc.value, exc.allowed]}
    return {**where, "error": None}


def check_on_trial_node(cfg: SweepConfig, out: TextIO) -> None:
    """Run the node's half of the environment check in a Ray task that asks for what one trial
    worker asks (CPUs, GPUs, custom resources: Ray places it where it would place a trial), so
    a CPU head accepts a GPU sweep and data staged only on the workers. One line naming the
    node when it fails. Every trial checks again at its start (:func:`hardmix.train.train`);
    a trial that lands on a node that differs fails with that line as its error."""
    import ray

    from tune.cluster import trial_bundle

    bundle = trial_bundle(cfg)
    options: dict = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0),
                     "max_retries": 0}
    if bundle:
        options["resources"] = bundle
    print("checking the data and the device on a node where trials run ...", file=out,
          flush=True)
    seen = ray.get(ray.remote(_check_here).options(**options).remote(cfg))
    node = f"node {seen['host']} ({seen['ip']}, Ray node {seen['node_id'][:12]})"
    if seen["error"]:
        field, value, allowed = seen["error"]
        raise ConfigError(field, value, f"{allowed} (checked on {node}, where this sweep's "
                                        "trials run)")
    print(f"  data and device are fine on {node}", file=out)
