"""A sweep joining a cluster hands the trials what the command set for them.

Workers of a cluster were started by ``ray start`` on their own nodes and inherit nothing from
the ``hardmix sweep`` process; a local sweep's workers inherit its environment. What the trials
need (``OMP_WAIT_POLICY=PASSIVE``, which the command sets before torch loads, among others)
must therefore travel in the runtime environment of ``ray.init(address=...)``.
"""

from __future__ import annotations

import ray

from hardmix.config import SweepConfig, load_config
from tune import sweep


def test_joining_a_cluster_passes_the_commands_environment_to_the_trials(monkeypatch):
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as hardmix.cli sets it
    cfg = load_config(SweepConfig, "quickstart", None, ["address=10.0.0.1:6379"])
    sweep._start_ray(cfg)
    env = seen["runtime_env"]["env_vars"]
    assert seen["address"] == "10.0.0.1:6379"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert set(env) <= set(sweep.CLUSTER_ENV)
