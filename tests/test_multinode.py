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
#: data-parallel reference run put both its workers on node a (next to a slot's worker).
CLUSTER = {"head": {"num_cpus": 2, "resources": {"head": 1}},
           "workers": {"a": {"num_cpus": 4, "resources": {"slot": 1, "pair": 2}},
                       "b": {"num_cpus": 2, "resources": {"slot": 1}}}}
SPARE = {"num_cpus": 2, "resources": {"slot": 1}}  # added where a node was removed
PROTOCOL = "MN:"  # prefix of the owner's replies on stdout (Ray may print there too)

pytestmark = [pytest.mark.multinode]


# --------------------------------------------------------------------------------------------
# The owner process (this file as a script): one Cluster, commands on stdin, replies on stdout
# --------------------------------------------------------------------------------------------


#: The GCS declares a node dead after failure_threshold missed health checks: 15 s by default,
#: 3 s here, so a removed node's trials are retried while the test watches (a real cloud keeps
#: the defaults; detection time is the only difference).
SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False,
                 "health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                 "health_check_failure_threshold": 3}


def _node_args(spec: dict, head: bool) -> dict:
    """``Cluster.add_node`` arguments: loopback only, small object store, no prestarted workers
    (each would import Ray on a 2-core machine for nothing), quick failure detection."""
    args = {"num_cpus": spec["num_cpus"], "resources": dict(spec.get("resources", {})),
            "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 ** 2}
    if head:
        args.update(include_dashboard=False, _system_config=SYSTEM_CONFIG)
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


def _keep_address_file():
    """Undo what starting a head does to ``/tmp/ray/ray_current_cluster``: it writes its own
    address there, and ``ray.init()`` without an address (the ``ray_local`` fixture, anyone's
    script) then joins this cluster instead of starting its own. Returns the function that puts
    the file back as it was."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.is_file() else None

    def restore() -> None:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)

    return restore


def _serve(spec: dict) -> int:
    """Start the cluster, print its address and node ids, then obey commands until ``quit``."""
    from ray.cluster_utils import Cluster

    t0 = time.time()
    restore_address_file = _keep_address_file()
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(spec["head"], head=True))
    restore_address_file()
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
                                     "node_id": a["Address"]["NodeID"], "state": a["State"],
                                     "job_id": a["JobID"]}
                                    for a in table.values()]}
            elif op == "autoscaler_log":
                # What the autoscaler (the head's monitor process) decided, in its own words.
                logs = Path(cluster.head_node.get_logs_dir_path())
                lines = [line.strip() for f in sorted(logs.glob("monitor*.log"))
                         for line in f.read_text(errors="replace").splitlines()]
                reply = {"lines": [x for x in lines if any(w in x for w in req["words"])]}
            elif op == "nodes":
                reply = {"nodes": [{"node_id": n["NodeID"], "alive": n["Alive"],
                                    "resources": n.get("Resources", {})}
                                   for n in cluster.global_state.node_table()]}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _say({**reply, "seconds": time.time() - t0})
    # Node by node, not Cluster.shutdown(): that also deletes /tmp/ray/ray_current_cluster,
    # which may name another Ray instance of the machine (see _keep_address_file).
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
               PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1",
               # Ray rewrites 127.0.0.1 (a node's IP, an address to join) to the machine's
               # external IP unless this is off, and the nodes here listen on loopback only.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
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


#: One GCS request from a fresh interpreter: prints the number of alive nodes or the error.
_ASK_GCS = r"""
import sys
from ray._raylet import GcsClient
try:
    print(len(GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5)))
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0])
"""


def test_cluster_refuses_requests_without_its_token(cluster, token):
    """Token authentication is on (RAY_AUTH_MODE=token, as cluster.yaml starts Ray): a client
    without the token, or with another one, is refused; with it, it is served."""
    def ask(env: dict) -> str:
        proc = subprocess.run([sys.executable, "-c", _ASK_GCS, cluster.address], env=env,
                              capture_output=True, text=True, timeout=60)
        return proc.stdout.strip()

    base = {k: v for k, v in ray_env(token).items() if not k.startswith("RAY_AUTH")}
    assert ask({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) == str(
        len(cluster.nodes))
    for env in ({**base, "RAY_AUTH_MODE": "disabled"},
                {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}):
        answer = ask(env)
        assert answer.startswith("AuthenticationError") and "InvalidAuthToken" in answer, answer


def sweep_cli(address: str, storage: str, name: str, *overrides: str) -> list[str]:
    """The ``hardmix sweep`` command line that joins the cluster at ``address``."""
    args = [sys.executable, "-m", "hardmix.cli", "sweep", "--set", f"address={address}",
            "--set", f"storage={storage}", "--set", f"name={name}"]
    for o in (*TINY, *overrides):
        args += ["--set", o]
    return args


def results(sweep: str):
    from ablations.store import read_results

    return read_results(sweep).to_pandas()


def raw_trial_rows(sweep_dir: Path):
    """Every trial row ever written (one per attempt start and end), not deduplicated."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(sweep_dir / "trials"), format="parquet", partitioning="hive")
    return table.to_table(columns=["trial_id", "attempt", "status", "node_id"]).to_pandas()


def raw_epoch_rows(sweep_dir: Path):
    """Every epoch row ever written, with when (a retried trial writes some epochs again)."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(sweep_dir / "epochs"), format="parquet", partitioning="hive")
    return table.to_table(columns=["trial_id", "epoch", "written_at", "epoch_seconds"]
                          ).to_pandas()


def assert_continued_from_a_checkpoint(rows, killed_at, last_epoch: int) -> None:
    """The rows of one trial (``raw_epoch_rows``) show a retry that continued from a checkpoint
    of epoch k >= 1: after the kill it recorded epoch k again, from the checkpoint (the very
    row of the first attempt, its timing included: a restart would have measured its own),
    then trained k+1 ... ``last_epoch``, each once; k is at most one past the last row seen
    before the kill (a checkpoint is written just before its epoch's row)."""
    before = rows[rows.written_at <= killed_at]
    again = rows[rows.written_at > killed_at].sort_values("epoch")
    k = int(again.epoch.min())
    assert 1 <= k <= before.epoch.max() + 1
    assert list(again.epoch) == list(range(k, last_epoch + 1))
    first = before[before.epoch == k]
    if len(first):  # the first attempt had written it: the replay is that row
        assert first.epoch_seconds.iloc[0] == again.epoch_seconds.iloc[0]


def progress(sweep: str):
    """``(trials, epochs)`` written so far, or None before the first row."""
    try:
        return results(sweep)
    except Exception:  # noqa: BLE001 - no store yet
        return None


def kill_node_under_trial(cluster: Owner, proc: subprocess.Popen, sweep: str, node: str,
                          spare: str, epochs_done: int = 2, timeout: float = 150) -> dict:
    """Wait until a trial that runs on worker node ``node`` has ``epochs_done`` epochs (so Ray
    holds a checkpoint of a later epoch than the first), add node ``spare`` (so the retry has
    somewhere to go at once), then remove ``node``. What happened, for the assertions."""
    import pandas as pd

    deadline = time.time() + timeout
    node_id = cluster.nodes[node]
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended first: {proc.stdout.read()[-3000:]}"
        seen = progress(sweep)
        if seen is not None:
            trials, epochs = seen
            running = trials[(trials.status == "running") & (trials.node_id == node_id)]
            on_node = set(running.trial_id)
            done = epochs[epochs.trial_id.isin(on_node)].groupby("trial_id").epoch.max()
            ready = done[done >= epochs_done]
            if len(ready):
                victim = ready.index[0]
                cluster.add(spare, SPARE)
                seconds = cluster.remove(node)
                # The trial trains on while the node is being removed: the last epoch it wrote
                # is the one the store holds once every process of the node is gone.
                killed_at = pd.Timestamp.now(tz="UTC")
                at_epoch = int(progress(sweep)[1].query("trial_id == @victim").epoch.max())
                return {"victim": victim, "at_epoch": at_epoch, "killed_at": killed_at,
                        "dead_node": node_id, "spare_node": cluster.nodes[spare],
                        "remove_seconds": seconds}
        time.sleep(1.0)
    raise AssertionError(f"no trial reached epoch {epochs_done} on node {node} in {timeout} s")


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def start_sweep(cluster: Owner, shared: Path, name: str, token: str,
                *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(sweep_cli(cluster.address, f"file://{shared}", name, *overrides),
                            cwd=REPO, env=ray_env(token), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


GRID_EPOCHS = 80


@pytest.fixture(scope="session")
def grid_node_death(cluster, shared, token):
    """A grid of two trials, one slot each, so one runs on node a and one on node b; node b is
    removed while its trial runs, just after node c is added for its retry. One sweep serves the
    placement and the node-failure tests (each costs a minute on two busy cores)."""
    name = "grid"
    t0 = time.time()
    proc = start_sweep(cluster, shared, name, token, f"run.optim.epochs={GRID_EPOCHS}",
                       "space={optim.lr: {values: [0.05, 0.1]}}", "resources.custom={slot: 1}",
                       "max_failures=2")
    event = kill_node_under_trial(cluster, proc, f"file://{shared}/{name}", "b", "c")
    out = finish(proc, timeout=240)
    event.update(returncode=proc.returncode, output=out, seconds=time.time() - t0,
                 sweep=f"file://{shared}/{name}", dir=shared / name)
    print(f"grid sweep with a node removed at epoch {event['at_epoch']} of {event['victim']}: "
          f"{event['seconds']:.1f} s (remove_node {event['remove_seconds']:.2f} s)")
    return event


def test_grid_trials_are_placed_on_different_nodes(grid_node_death, cluster):
    ev = grid_node_death
    assert ev["returncode"] == 0, ev["output"][-3000:]
    trials, _ = results(ev["sweep"])
    raw = raw_trial_rows(ev["dir"])
    first = raw[raw.attempt == 1].groupby("trial_id").node_id.first()
    # One slot per worker node: the two trials started side by side on a and on b ...
    assert set(first) == {cluster.nodes["a"], ev["dead_node"]}
    assert trials.hostname.str.len().gt(0).all()


def test_trial_of_a_removed_node_is_retried_elsewhere_from_its_checkpoint(grid_node_death,
                                                                          cluster):
    ev = grid_node_death
    assert ev["returncode"] == 0, ev["output"][-3000:]
    trials, epochs = results(ev["sweep"])
    rows = trials.set_index("trial_id")
    assert set(rows.status) == {"completed"} and len(rows) == 2
    victim = rows.loc[ev["victim"]]
    survivor = rows.drop(index=ev["victim"]).iloc[0]
    # Retried on a live slot node: the spare c, or a if a's own trial had already ended.
    assert victim.attempt == 2 and victim.node_id in {ev["spare_node"], cluster.nodes["a"]}
    assert survivor.attempt == 1 and survivor.node_id == cluster.nodes["a"]
    # Every epoch of every trial exactly once, none lost ...
    for trial, group in epochs.groupby("trial_id"):
        assert sorted(group.epoch) == list(range(1, GRID_EPOCHS + 1)), trial
    assert (rows.epochs_run == GRID_EPOCHS).all()
    # ... and the retry continued from a checkpoint, not from epoch 1.
    raw = raw_epoch_rows(ev["dir"])
    victim_rows = raw[raw.trial_id == ev["victim"]]
    assert_continued_from_a_checkpoint(victim_rows, ev["killed_at"], GRID_EPOCHS)
    again = victim_rows[victim_rows.written_at > ev["killed_at"]]
    if victim.node_id == cluster.nodes["a"]:
        # One slot per node: the retry went to a only after a's own trial had written its last
        # epoch (Ray's choice between a and c is free; the one-slot rule is not).
        survivor_rows = raw[raw.trial_id == survivor.name]
        assert survivor_rows.written_at.max() <= again.written_at.min()
    attempts = raw_trial_rows(ev["dir"])
    attempts = attempts[attempts.trial_id == ev["victim"]].groupby("attempt").node_id.first()
    assert attempts.to_dict() == {1: ev["dead_node"], 2: victim.node_id}


METRICS = ("train_loss", "val_loss", "val_top1_err", "test_loss", "test_top1_err")
DDP_EPOCHS = 16
DDP = ["resources.workers=2", "resources.cpus=1", f"run.optim.epochs={DDP_EPOCHS}",
       "max_failures=2", "run.output.tensorboard=true"]


def train_workers_by_job(cluster: Owner, since: dict) -> dict[str, list[dict]]:
    """The Ray Train worker actors started after ``since`` (an earlier actor listing), by job
    (one job per sweep driver), oldest first."""
    jobs: dict[str, list[dict]] = {}
    for key, actor in cluster.actors("RayTrainWorker").items():
        if key not in since:
            jobs.setdefault(actor["job_id"], []).append(actor)
    return jobs


@pytest.fixture(scope="session")
def ddp_runs(cluster, shared, token):
    """Two data-parallel sweeps of the same seed at once: "single" with both workers on node a
    ("pair" resources), "spread" with one worker per worker node ("slot"); while "spread"
    trains, the node of one of its workers (not a) is removed. A spare slot node is added first,
    so the retry has two nodes to go to."""
    spare = f"spare{len(cluster.nodes)}"
    cluster.add(spare, SPARE)
    before = cluster.actors("RayTrainWorker")
    t0 = time.time()
    single = start_sweep(cluster, shared, "ddp-single", token, *DDP, "resources.custom={pair: 1}")
    spread = start_sweep(cluster, shared, "ddp-spread", token, *DDP, "resources.custom={slot: 1}")
    try:
        ev = kill_train_worker_node(cluster, spread, shared / "ddp-spread", before)
        ev["out_spread"] = finish(spread, timeout=300)
        ev["out_single"] = finish(single, timeout=120)
    finally:
        for proc in (single, spread):
            if proc.poll() is None:
                proc.kill()
    ev.update(rc_spread=spread.returncode, rc_single=single.returncode, seconds=time.time() - t0,
              jobs=train_workers_by_job(cluster, before),
              slot_nodes={cluster.nodes[n] for n in cluster.nodes if n != "head"})
    print(f"two data-parallel sweeps, a worker's node removed at epoch {ev['at_epoch']} "
          f"(checkpoint of epoch {ev['ckpt_epoch']}): {ev['seconds']:.1f} s")
    return ev


def registered_checkpoint_epoch(sweep_dir: Path, trial: str = "c000-s0") -> int:
    """The epoch of the checkpoint Ray Train would resume the trial from: the latest one its
    controller has registered (it does so a poll interval after the report, so the newest
    epoch row can be ahead of it). 0 when none. Ray Train's own file in the storage."""
    snapshot = sweep_dir / "train" / trial / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int((latest.get("metrics") or {}).get("epoch", 0))


def kill_train_worker_node(cluster: Owner, proc: subprocess.Popen, sweep_dir: Path,
                           since: dict, epochs_done: int = 2, timeout: float = 240) -> dict:
    """Once Ray Train holds a checkpoint of epoch ``epochs_done`` or later of the trial of the
    sweep in ``sweep_dir``, remove a worker node (not node a, where the other sweep's workers
    are) that holds one of the trial's workers."""
    import pandas as pd

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended first: {proc.stdout.read()[-3000:]}"
        ckpt_epoch = registered_checkpoint_epoch(sweep_dir)
        if ckpt_epoch >= epochs_done:
            workers = cluster.actors("RayTrainWorker")
            alive = {w["node_id"] for k, w in workers.items()
                     if k not in since and w["state"] == "ALIVE"}
            names = [n for n, i in cluster.nodes.items() if i in alive and n not in ("head", "a")]
            assert names, f"no live Train worker outside node a: {workers}"
            dead = cluster.nodes[names[0]]
            seconds = cluster.remove(names[0])
            # Stamped once the node is gone: the rows before it are the first attempt's.
            killed_at = pd.Timestamp.now(tz="UTC")
            at_epoch = int(progress(f"file://{sweep_dir}")[1].epoch.max())
            return {"at_epoch": at_epoch, "ckpt_epoch": ckpt_epoch, "killed_at": killed_at,
                    "dead_node": dead, "remove_seconds": seconds, "workers_before": workers}
        time.sleep(0.5)
    raise AssertionError(f"the data-parallel trial did not reach epoch {epochs_done}")


def _jobs(ev: dict) -> tuple[list[dict], list[dict]]:
    """The single run's workers (2, both on one node) and the spread run's (2 + 2 retried)."""
    jobs = sorted(ev["jobs"].values(), key=len)
    assert [len(j) for j in jobs] == [2, 4], ev["jobs"]
    return jobs[0], jobs[1]


def test_data_parallel_workers_sit_one_per_worker_node(ddp_runs, cluster):
    ev = ddp_runs
    assert ev["rc_single"] == 0 and ev["rc_spread"] == 0, ev["out_spread"][-3000:]
    single, spread = _jobs(ev)
    assert [w["node_id"] for w in single] == [cluster.nodes["a"]] * 2
    first = {w["id"]: w["node_id"] for w in spread if w["id"] in ev["workers_before"]}
    assert len(first) == 2 and len(set(first.values())) == 2  # one worker per node, gloo between
    assert set(first.values()) <= ev["slot_nodes"] | {ev["dead_node"]}


def test_data_parallel_metrics_match_the_single_node_run(ddp_runs, shared):
    ev = ddp_runs
    assert ev["rc_single"] == 0 and ev["rc_spread"] == 0, ev["out_spread"][-3000:]
    import pyarrow.dataset as ds

    _, single = results(f"file://{shared}/ddp-single")
    rows = ds.dataset(str(shared / "ddp-spread" / "epochs"), format="parquet",
                      partitioning="hive").to_table().to_pandas()
    # The spread run's first attempt, before its node died: epochs 1..k of the same seed.
    spread = rows[rows.written_at < ev["killed_at"]].drop_duplicates("epoch").sort_values("epoch")
    assert len(spread) >= 2
    single = single.set_index("epoch").loc[spread.epoch]
    # Same seed, same shard per rank, and gloo's all-reduce of two ranks adds in the same order
    # wherever the ranks run: equal up to float rounding.
    for metric in METRICS:
        assert spread[metric].tolist() == pytest.approx(single[metric].tolist(), rel=1e-6,
                                                        abs=1e-9), metric


def test_node_removed_under_a_data_parallel_worker(ddp_runs, cluster, shared):
    """The removed node held a live worker; Ray Train's worker group failed as a whole, Tune
    retried the trial, and Ray Train resumed from its latest checkpoint on the other nodes."""
    ev = ddp_runs
    assert ev["rc_spread"] == 0, ev["out_spread"][-3000:]
    _, spread = _jobs(ev)
    first = [w for w in spread if w["id"] in ev["workers_before"]]
    assert ev["dead_node"] in {w["node_id"] for w in first}
    retried = [w for w in spread if w["id"] not in ev["workers_before"]]
    assert len({w["node_id"] for w in retried}) == 2
    assert ev["dead_node"] not in {w["node_id"] for w in retried}
    trials, epochs = results(f"file://{shared}/ddp-spread")
    row = trials.iloc[0]
    assert (len(trials), row.status, row.attempt, row.epochs_run) == (1, "completed", 2,
                                                                      DDP_EPOCHS)
    assert sorted(epochs.epoch) == list(range(1, DDP_EPOCHS + 1))  # none lost, none twice
    raw = raw_epoch_rows(shared / "ddp-spread")
    # Resumed from the checkpoint Ray Train held (or a newer one), not restarted.
    assert_continued_from_a_checkpoint(raw, ev["killed_at"], DDP_EPOCHS)
    assert raw[raw.written_at > ev["killed_at"]].epoch.min() >= ev["ckpt_epoch"]


def tensorboard_epochs(run_dir: Path, tag: str = "loss/train_loss") -> list[int]:
    """The epochs of ``tag`` in a run folder's TensorBoard events (every event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}  # <trial>/<name>/
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return sorted(e.step for e in acc.Scalars(tag))


def test_data_parallel_run_folder_reaches_the_storage_from_a_worker_node(ddp_runs, cluster,
                                                                         shared):
    """A data-parallel trial's run folder is written by Ray Train's rank 0 on a worker node,
    into a temporary folder of that node which is deleted when the run ends (on a real cluster
    it would stay on that node's disk and go with the node). What is in <sweep>/runs/<trial>
    can only have come through the storage (the file:// URI, pyarrow's filesystem): it must
    hold the run's TensorBoard events, run.json and config.yaml. The nodes here share one disk,
    so the old path (the Tune trial folder, which Ray syncs from the trial driver's node) must
    hold none of it. In the spread sweep the first attempt died with a node: its epochs reached
    the storage as they ran (a copy after every epoch), so the events cover every epoch."""
    import tempfile

    ev = ddp_runs
    assert ev["rc_single"] == 0 and ev["rc_spread"] == 0, ev["out_spread"][-3000:]
    trials, _ = results(f"file://{shared}/ddp-single")
    assert trials.iloc[0].node_id == cluster.nodes["a"]  # rank 0 wrote from worker node a
    for name in ("ddp-single", "ddp-spread"):
        run = shared / name / "runs" / "c000-s0"
        assert json.loads((run / "run.json").read_text())["world_size"] == 2, name
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
        assert set(tensorboard_epochs(run)) == set(range(1, DDP_EPOCHS + 1)), name
        assert not list((shared / name).glob("tune*/**/run.json")), name
    # Rank 0's node-local folder of the completed runs is gone: nothing else held the files.
    assert not list(Path(tempfile.gettempdir()).glob("hardmix-ddp-single-c000-s0-rank*"))
    spread = shared / "ddp-spread" / "runs" / "c000-s0"
    assert len(list(spread.glob("*/events.out.tfevents.*"))) >= 2  # one per attempt


# --------------------------------------------------------------------------------------------
# Autoscaling: Ray's fake multi-node provider, driven by a sweep's resource requests
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory, token):
    """A head node whose autoscaler runs cluster-fake-multinode.yaml (its GCS port made free),
    the file placed where `ray up` leaves it on a head, ~/ray_bootstrap_config.yaml, with HOME
    a temporary folder so the sweep's pre-launch check reads it from there."""
    import yaml

    home = tmp_path_factory.mktemp("home")
    port = _free_port()
    config = yaml.safe_load((REPO / "cluster-fake-multinode.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    path = home / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = ray_env(token, HOME=str(home), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    spec = {"head": {"num_cpus": 0, "autoscaling_config": str(path), "port": port}}
    owner = Owner(spec, env, home / "owner.log")
    owner.env = env
    yield owner
    owner.close()


def workers_alive(owner: Owner) -> int:
    return sum(1 for n in owner.alive_nodes() if n["node_id"] != owner.nodes["head"])


def test_sweep_no_node_type_can_hold_is_refused_before_any_trial(autoscaling, shared, token):
    cli = sweep_cli(autoscaling.address, f"file://{shared}", "too-big", "resources.cpus=4",
                    "run.optim.epochs=1")
    proc = subprocess.run(cli, cwd=REPO, env=autoscaling.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardmix: error: resources.cpus = 4.0"), lines
    assert "4 CPUs per worker but" in lines[0] and "cpu-1x has 1 CPU" in lines[0]
    assert "ray_bootstrap_config.yaml" in lines[0]  # the autoscaler's own limits were read
    assert not (shared / "too-big" / "trials").exists()  # no trial started
    assert workers_alive(autoscaling) == 0  # and nothing was asked of the autoscaler


def test_autoscaler_adds_nodes_for_pending_trials_and_removes_them_when_idle(autoscaling,
                                                                             shared, token):
    name = "autoscaled"
    assert workers_alive(autoscaling) == 0
    t0 = time.time()
    proc = subprocess.Popen(sweep_cli(autoscaling.address, f"file://{shared}", name,
                                      "run.optim.epochs=2",
                                      "space={optim.lr: {values: [0.05, 0.1]}}"),
                            cwd=REPO, env=autoscaling.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    counts = []  # (seconds, worker nodes alive) while the sweep runs
    try:
        while proc.poll() is None and time.time() - t0 < 240:
            counts.append((time.time() - t0, workers_alive(autoscaling)))
            time.sleep(1.0)
    finally:
        out = finish(proc, timeout=60)
    assert proc.returncode == 0, out[-3000:]
    ended = time.time() - t0
    while workers_alive(autoscaling) and time.time() - t0 < ended + 90:
        time.sleep(1.0)
    idle_after = time.time() - t0 - ended
    print(f"autoscaled sweep: {ended:.1f} s, worker nodes over time {counts}, all idle nodes "
          f"gone {idle_after:.1f} s after the sweep")
    # The head has no CPU for trials: the autoscaler had to start worker nodes for them ...
    assert max(n for _, n in counts) >= 1
    trials, _ = results(f"file://{shared}/{name}")
    assert set(trials.status) == {"completed"} and len(trials) == 2
    # The fake provider numbers the nodes it starts: fff...f00001, fff...f00002, ...
    assert all(n.startswith("f" * 40) and n != autoscaling.nodes["head"] for n in trials.node_id)
    # ... and removed them once idle (idle_timeout_minutes: 0.1).
    assert workers_alive(autoscaling) == 0
    log = autoscaling.request("autoscaler_log", words=["Adding", "Removing", "Terminating"])
    print("\n".join(log["lines"][-8:]))
    assert any("Adding" in x and "cpu-1x" in x for x in log["lines"])


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
