"""Checks where the work runs: a sweep that joins a cluster checks on its driver only what any
machine can tell (fields, packages, the storage), and the data and the device on a node where
its trials run (a Ray task with a trial's resource request), so a CPU head accepts a GPU sweep
and data staged only on the GPU workers. A local sweep still refuses all of it up front (its
machine is the trials' node). A cluster with GPUs and trials that ask for none under
``device=auto`` gets one line before any trial.

The cluster here is a local Ray instance with one *logical* GPU (``ray.init(num_gpus=1)``, no
hardware): Ray places a GPU request on it, torch finds no CUDA device there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardmix.config import ConfigError, SweepConfig, load_config
from tune.plan import plan_text
from tune.preflight import check_gpu_request, prepare

REPO = Path(__file__).resolve().parents[1]
TINY = ["run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=4",
        "run.optim.epochs=1", "run.data.batch_size=64", "run.output.checkpoint_every=0",
        "run.output.image_grid=false", "run.output.tensorboard=false", "report=false",
        "mode=grid", "seeds=[0]", "max_failures=0"]
CLUSTER = "address=127.0.0.1:6379"  # never contacted: prepare() runs before Ray


def config(tmp_path: Path, *overrides: str) -> SweepConfig:
    return load_config(SweepConfig, None, None,
                       [f"storage={tmp_path}", "name=w", *TINY, *overrides])


MISSING = ["run.data.name=npz", "run.data.path=/nonexistent/staged-on-the-workers.npz"]


def test_cluster_driver_accepts_what_only_a_trial_node_can_tell(tmp_path):
    """device=cuda on a CPU-only driver and a data path the driver cannot see: accepted when
    the sweep joins a cluster (checked on a trial's node later, the plan says so), refused up
    front on a local sweep, whose machine is the trials' node."""
    import torch

    assert not torch.cuda.is_available()  # this machine is the CPU head
    for case in (["run.device=cuda"], MISSING):
        cfg = prepare(config(tmp_path, CLUSTER, *case))  # no error
        assert "checked on a node where trials run" in plan_text(cfg)
        with pytest.raises(ConfigError) as exc:
            prepare(config(tmp_path, *case))
        assert exc.value.field in ("run.device", "run.data.path")
    assert "node checks" not in plan_text(prepare(config(tmp_path)))


def test_cluster_driver_still_checks_what_needs_no_node(tmp_path):
    """The config's own facts and the storage are checked on the driver, cluster or not."""
    with pytest.raises(ConfigError) as exc:
        prepare(config(tmp_path, CLUSTER, "run.data.name=npz"))
    assert exc.value.field == "run.data.path" and "required" in exc.value.allowed
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as exc:
        prepare(config(tmp_path, CLUSTER, f"storage={blocker}/sub"))
    assert exc.value.field == "storage"
    with pytest.raises(ConfigError) as exc:
        prepare(config(tmp_path, CLUSTER, "arms=[{data.name: npz}]"))
    assert exc.value.field == "arms[0].data.path"


def test_local_sweep_with_a_missing_data_folder_is_refused_before_ray(tmp_path):
    """What the README promises for local runs: one line, exit 2, nothing started."""
    proc = subprocess.run([sys.executable, "-m", "hardmix.cli", "sweep",
                           *[a for s in [f"storage={tmp_path}", "name=w", *TINY,
                                         "run.data.name=folder",
                                         f"run.data.path={tmp_path}/no-such-folder"]
                             for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardmix: error: run.data.path = "), lines
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("gpus, device, refused", [
    (0, "auto", True), (0.25, "auto", False), (0, "cpu", False), (1, "cuda", False)])
def test_gpu_cluster_with_trials_asking_for_no_gpu(tmp_path, gpus, device, refused):
    cfg = config(tmp_path, CLUSTER, f"resources.gpus={gpus}", f"run.device={device}")
    check_gpu_request(cfg, {"CPU": 16.0})  # no GPU in the cluster: nothing to say
    if not refused:
        check_gpu_request(cfg, {"CPU": 16.0, "GPU": 4.0})
        return
    with pytest.raises(ConfigError) as exc:
        check_gpu_request(cfg, {"CPU": 16.0, "GPU": 4.0})
    assert exc.value.field == "resources.gpus" and "4 GPUs" in exc.value.allowed
    assert "resources.gpus=0.25" in exc.value.allowed and "run.device=cpu" in exc.value.allowed
    # An arm that trains on device=auto counts as well.
    arms = config(tmp_path, CLUSTER, "run.device=cpu", "arms=[{device: auto}]")
    with pytest.raises(ConfigError):
        check_gpu_request(arms, {"GPU": 1.0})


#: The driver of every case: a local Ray with one logical GPU, then `hardmix sweep` (the CLI's
#: own entry) joining it by address, once per case; stdout, stderr and the exit code of each.
DRIVER = r"""
import contextlib, io, json, sys
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
         log_to_driver=False, configure_logging=False)
address = ray.get_runtime_context().gcs_address
from hardmix.cli import main
out = []
for case in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(["sweep", "--set", f"address={address}",
                   *[a for s in case for a in ("--set", s)]])
    out.append({"rc": rc, "stderr": err.getvalue(), "stdout": std.getvalue()})
ray.shutdown()
print("RESULT:" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def on_a_gpu_cluster(tmp_path_factory):
    """Four sweeps against a cluster that advertises a GPU (a logical one)."""
    root = tmp_path_factory.mktemp("where")
    common = [f"storage={root}", *TINY]
    cases = {
        "no_gpu_asked": ["name=a", "resources.gpus=0", "run.device=auto"],
        "cuda_on_cpu_node": ["name=b", "resources.gpus=1", "run.device=cuda"],
        "data_not_on_node": ["name=c", "resources.gpus=1", "run.device=cpu", *MISSING],
        "fine": ["name=d", "resources.gpus=1", "run.device=cpu"],
    }
    proc = subprocess.run([sys.executable, "-c", DRIVER,
                           json.dumps([common + c for c in cases.values()])],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1",
                                   TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT:")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, dict(zip(cases, json.loads(lines[-1][len("RESULT:"):])))


def _one_line(result: dict) -> str:
    assert result["rc"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardmix: error: "), lines
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_cluster_refuses_trials_that_ask_for_no_gpu(on_a_gpu_cluster):
    root, res = on_a_gpu_cluster
    line = _one_line(res["no_gpu_asked"])
    assert line.startswith("hardmix: error: resources.gpus = 0.0: the cluster has 1 GPU but")
    assert not (root / "a" / "sweep.yaml").exists() and not (root / "a" / "trials").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_device_and_data_fail_where_the_trials_run_naming_the_node(on_a_gpu_cluster):
    """Accepted by the driver (a CPU head), refused by the check on the node Ray picked for a
    trial's request (one logical GPU, no CUDA there): one line naming that node, exit 2,
    nothing started, and no sweep.yaml, so the same name can run once it is fixed."""
    import socket

    root, res = on_a_gpu_cluster
    for case, start in (("cuda_on_cpu_node", "run.device = 'cuda': no CUDA device"),
                        ("data_not_on_node", "run.data.path = '/nonexistent/")):
        line = _one_line(res[case])
        assert line.startswith(f"hardmix: error: {start}"), line
        assert f"checked on node {socket.gethostname()} (" in line and "Ray node " in line
        assert "where this sweep's trials run" in line
        assert "checking the data and the device on a node" in res[case]["stdout"]
    for name in ("b", "c"):
        assert not (root / name / "sweep.yaml").exists() and not (root / name / "trials").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_node_check_passes_and_the_sweep_runs(on_a_gpu_cluster):
    from ablations.store import read_results

    root, res = on_a_gpu_cluster
    assert res["fine"]["rc"] == 0, res["fine"]
    assert "data and device are fine on node" in res["fine"]["stdout"]
    trials = read_results(str(root / "d")).trials.to_pylist()
    assert [t["status"] for t in trials] == ["completed"]
