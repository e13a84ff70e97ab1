"""The cluster path on one machine: a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a
head and worker nodes, each a raylet of its own with its own CPUs and custom resources), driven
by ``hardmix sweep --set address=...`` exactly as on a real cluster, with the storage a shared
folder given as a ``file://`` URI (the NFS case).

Why a subprocess owns the cluster: a test session has one Ray driver (the ``ray_local`` fixture)
and a Cluster's nodes must be removable while sweeps run, so the cluster lives in its own
process (:class:`Owner`, this file run as a script) and answers a few commands over a pipe
(remove or add a node, list nodes and actors). Sweeps are separate driver processes joining it by
address. Every wait has a deadline and the owner's whole process group is killed at the end, so
a hang fails a test instead of stalling the suite. Token authentication is on throughout (a
token in the environment, nothing written to ``~/.ray``).

Run only these: ``python -m pytest -m multinode`` (docs/cluster.md).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=8",
        "run.data.batch_size=64", "run.device=cpu", "run.output.checkpoint_every=1",
        "run.output.image_grid=false", "run.output.tensorboard=false", "report=false",
        "mode=grid", "seeds=[0]"]
#: Each node: logical CPUs (more than this machine's cores is fine) and custom resources. One
#: "slot" per worker node and trials asking for one: at most one trial (or one data-parallel
#: worker) per worker node, so placement is decided by the resources, not by luck. "pair" lets a
#: data-parallel reference run put both its workers on node a.
CLUSTER = {"head": {"num_cpus": 2, "resources": {"head": 1}},
           "workers": {"a": {"num_cpus": 3, "resources": {"slot": 1, "pair": 2}},
                       "b": {"num_cpus": 2, "resources": {"slot": 1}}}}
SPARE = {"num_cpus": 2, "resources": {"slot": 1}}  # added where a node was removed
PROTOCOL = "MN:"  # prefix of the owner's replies on stdout (Ray may print there too)

pytestmark = [pytest.mark.multinode]


# --------------------------------------------------------------------------------------------
# The owner process (this file as a script): one Cluster, commands on stdin, replies on stdout
# --------------------------------------------------------------------------------------------


def _node_args(spec: dict, head: bool) -> dict:
    """``Cluster.add_node`` arguments: loopback only, small object store, no prestarted workers
    (each would import Ray on a 2-core machine for nothing)."""
    args = {"num_cpus": spec["num_cpus"], "resources": dict(spec.get("resources", {})),
            "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 ** 2}
    if head:
        args.update(include_dashboard=False, _system_config={
            "prestart_worker_first_driver": False, "enable_worker_prestart": False})
        if spec.get("autoscaling_config"):
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            # The fake provider knows its head by this id (ray start does the same).
            args.update(autoscaling_config=spec["autoscaling_config"],
                        gcs_server_port=spec["port"],
                        env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                                  "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID})
    return args


def _say(obj: Any) -> None:
    print(PROTOCOL + json.dumps(obj), flush=True)


def _serve(spec: dict) -> int:
    """Start the cluster, print its address and node ids, then obey commands until ``quit``."""
    from ray.cluster_utils import Cluster

    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(spec["head"], head=True))
    nodes = {"head": cluster.head_node}
    for name, node in spec.get("workers", {}).items():
        nodes[name] = cluster.add_node(**_node_args(node, head=False))
    cluster.wait_for_nodes()
    _say({"address": cluster.address, "nodes": {n: v.node_id for n, v in nodes.items()},
          "seconds": time.time() - t0})
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.time()
        try:
            op = req["op"]
            if op == "quit":
                break
            if op == "remove":
                cluster.remove_node(nodes.pop(req["name"]))
                reply: dict = {}
            elif op == "add":
                nodes[req["name"]] = cluster.add_node(**_node_args(req["node"], head=False))
                cluster.wait_for_nodes()
                reply = {"node_id": nodes[req["name"]].node_id}
            elif op == "actors":
                table = cluster.global_state.actor_table(None)
                reply = {"actors": [{"id": a["ActorID"], "class": a["ActorClassName"],
                                     "node_id": a["Address"]["NodeID"], "state": a["State"]}
                                    for a in table.values()]}
            elif op == "nodes":
                reply = {"nodes": [{"node_id": n["NodeID"], "alive": n["Alive"],
                                    "resources": n.get("Resources", {})}
                                   for n in cluster.global_state.node_table()]}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _say({**reply, "seconds": time.time() - t0})
    # Node by node, not Cluster.shutdown(): that also resets this process's internal KV and
    # deletes /tmp/ray/ray_current_cluster, which other Ray users on the machine may rely on.
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    if cluster.head_node is not None:
        cluster.remove_node(cluster.head_node)
    return 0


# --------------------------------------------------------------------------------------------
# The test side
# --------------------------------------------------------------------------------------------


def ray_env(token: str, **extra: str) -> dict:
    """The environment of every process of these tests: token auth on (the token in the
    environment, so nothing is written to ~/.ray), one torch thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


class Owner:
    """The owner process of one cluster, and its commands (each with a deadline)."""

    def __init__(self, spec: dict, env: dict, log: Path, timeout: float = 120):
        self.log = log
        self._err = open(log, "w")
        # Its own session (process group): the nodes and every worker they start stay in it,
        # so close() can end them all without touching any other process.
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, start_new_session=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._next(timeout)
        self.address: str = hello["address"]
        self.nodes: dict[str, str] = hello["nodes"]
        self.start_seconds: float = hello["seconds"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                self._replies.put(json.loads(line[len(PROTOCOL):]))
        self._replies.put(None)  # the owner ended

    def _next(self, timeout: float) -> dict:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise AssertionError(f"cluster owner silent for {timeout:.0f} s; log: "
                                 f"{self.log.read_text()[-3000:]}") from None
        if reply is None:
            raise AssertionError(f"cluster owner died; log: {self.log.read_text()[-3000:]}")
        if "error" in reply:
            raise AssertionError(f"cluster owner: {reply['error']}")
        return reply

    def request(self, op: str, timeout: float = 60, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._next(timeout)

    def remove(self, name: str) -> float:
        """Kill a worker node (its raylet and every process on it); seconds it took."""
        self.nodes.pop(name)
        return self.request("remove", name=name)["seconds"]

    def add(self, name: str, node: dict) -> str:
        self.nodes[name] = self.request("add", name=name, node=node)["node_id"]
        return self.nodes[name]

    def actors(self, cls: str) -> dict[str, dict]:
        return {a["id"]: a for a in self.request("actors")["actors"] if a["class"] == cls}

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.request("nodes")["nodes"] if n["alive"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:  # whatever is left of the owner's process group (orphaned workers, a hung owner)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """The shared storage folder (every node sees it: the NFS case)."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def token() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, token):
    """Head + worker nodes a and b on localhost, started once for the session."""
    log = tmp_path_factory.mktemp("owner") / "owner.log"
    owner = Owner(CLUSTER, ray_env(token), log)
    yield owner
    owner.close()


def sweep_cli(address: str, storage: str, name: str, *overrides: str, token: str,
              env_extra: dict | None = None) -> list[str]:
    """The ``hardmix sweep`` command line that joins the cluster at ``address``."""
    args = [sys.executable, "-m", "hardmix.cli", "sweep", "--set", f"address={address}",
            "--set", f"storage={storage}", "--set", f"name={name}"]
    for o in (*TINY, *overrides):
        args += ["--set", o]
    return args


def run_sweep(owner_address: str, storage: str, name: str, *overrides: str, token: str,
              timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cli(owner_address, storage, name, *overrides, token=token),
                          cwd=REPO, env=ray_env(token), capture_output=True, text=True,
                          timeout=timeout)
    return proc


def results(sweep: str):
    from ablations.store import read_results

    return read_results(sweep).to_pandas()


def raw_trial_rows(sweep_dir: Path):
    """Every trial row ever written (one per attempt start and end), not deduplicated."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(sweep_dir / "trials"), format="parquet", partitioning="hive")
    return table.to_table(columns=["trial_id", "attempt", "status", "node_id"]).to_pandas()


def test_grid_trials_are_placed_on_different_nodes(cluster, shared, token):
    sweep = f"file://{shared}/grid"
    t0 = time.time()
    proc = run_sweep(cluster.address, f"file://{shared}", "grid", "run.optim.epochs=2",
                     "space={optim.lr: {values: [0.05, 0.1]}}", "resources.custom={slot: 1}",
                     token=token)
    print(f"grid sweep on the cluster: {time.time() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials, epochs = results(sweep)
    assert sorted(trials.trial_id) == ["c000-s0", "c001-s0"]
    assert set(trials.status) == {"completed"}
    # One slot per worker node: the two trials ran side by side on a and on b.
    assert set(trials.node_id) == {cluster.nodes["a"], cluster.nodes["b"]}
    assert trials.hostname.str.len().gt(0).all()
    assert sorted(epochs.groupby("trial_id").epoch.apply(list).tolist()) == [[1, 2], [1, 2]]


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
