"""``hardmix sweep --dry-run`` estimates time, not only FLOPs (tune/estimate.py): its basis
(measured here, or the peak table at the stated utilisation for ``--device-type``), per trial,
device-hours and wall-clock; whether this machine or a cluster file holds a trial; and a plan
without the data file where the data set's shape is known (CIFAR-10/100), while the sweep
itself still refuses the missing file before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hardmix.config import SweepConfig, load_config
from hardmix.throughput import ACCELERATORS, DEFAULT_UTILISATION
from tune import estimate
from tune.estimate import Basis, estimate_lines, fmt_duration
from tune.plan import plan_text
from tune.preflight import prepare
from promise_helpers import cli_runs

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()

def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1).replace(",", ""))


FLOP_UNITS = {"TFLOP": 1e12, "PFLOP": 1e15, "EFLOP": 1e18}


def test_gpu_preset_plans_without_its_data_and_the_sweep_still_refuses_it(tmp_path):
    """The GPU study's dry run with its CIFAR-10 .npz absent: the plan, sized as CIFAR-10 (the
    file's name), a note that the file is not here, the GPU-hours of the named GPU's peak at
    the stated utilisation; exit 0 and no Ray. Without --dry-run: one line, exit 2."""
    gpu = ["sweep", "--preset", "cifar10-gpu-study", "--set", f"storage={tmp_path}",
           "--set", f"run.data.path={tmp_path / 'cifar10.npz'}"]
    cifar100 = ["sweep", "--preset", "quickstart", "--dry-run", "--set", f"storage={tmp_path}",
                "--set", "run.data.name=cifar100", "--set", f"run.data.path={tmp_path / 'tv'}",
                "--set", "seeds=[0]"]
    report = cli_runs([gpu + ["--dry-run", "--device-type", "h100-sxm"], gpu,
                       gpu + ["--dry-run", "--device-type", "b200"],
                       gpu + ["--device-type", "a100"], cifar100])
    assert report["ray_imported"] is False
    dry, real, unknown, no_dry, tv = report["runs"]

    assert dry["rc"] == 0, dry["err"]
    out = dry["out"]
    assert "33 trials" in out and "cifar10.npz is not here" in out
    assert "50,000 train / 10,000 test images, 32x32x3, 10 classes" in out
    assert "refuses to start until it is there" in out
    passes = number(r"compute: 33 trials, ([\d,]+) training image passes", out)
    assert passes == 30 * 45_000 * 33  # 30 epochs of CIFAR-10's 50,000 less 10% validation
    m = re.search(r"about ([\d.]+) (\w)FLOP", out)
    total = float(m.group(1)) * FLOP_UNITS[m.group(2) + "FLOP"]
    gpu_hours = number(r"([\d.]+) GPU-hours in all", out)
    rate = ACCELERATORS["h100-sxm"].bf16 * DEFAULT_UTILISATION  # ResNet-18 in bf16 (auto)
    assert gpu_hours == pytest.approx(total / rate / 3600, rel=0.01)
    assert "the peak table: H100 SXM" in out and "bf16 dense peak 989 TFLOP/s" in out
    assert f"the stated utilisation {DEFAULT_UTILISATION:.0%}" in out
    # four trials of 0.25 GPU at once (max_concurrent_trials): one GPU's worth, so the
    # wall-clock is the GPU-hours
    wall = re.search(r"wall-clock ([\d.]+) (min|h) with 4 at once", out)
    assert wall and float(wall.group(1)) * (1 / 60 if wall.group(2) == "min" else 1) == \
        pytest.approx(gpu_hours, rel=0.05)
    if NO_GPU:
        assert "fit: the local Ray instance the sweep starts cannot hold one trial" in out
        assert "resources.gpus = 0.25" in out

    for run, field in ((real, "run.data.path"), (unknown, "--device-type"),
                       (no_dry, "--device-type")):
        lines = run["err"].strip().splitlines()
        assert run["rc"] == 2 and len(lines) == 1, run
        assert lines[0].startswith(f"hardmix: error: {field}"), lines
    assert "must be an existing .npz file" in real["err"] and not real["out"]
    assert "h100-sxm" in unknown["err"] and "--dry-run" in no_dry["err"]

    # torchvision's CIFAR-100 folder absent (no download): planned at its known sizes
    assert tv["rc"] == 0, tv["err"]
    assert "is not here; the plan uses the known sizes of cifar100" in tv["out"]
    assert "100 classes" in tv["out"] and "time basis: measured here" in tv["out"]
    assert not (tmp_path / "tv").exists() and not (tmp_path / "cifar10.npz").exists()


def test_a_file_not_named_after_a_known_data_set_plans_without_sizes(tmp_path):
    cfg = prepare(load_config(SweepConfig, "cifar10-cpu-study", None,
                              [f"run.data.path={tmp_path / 'mine.npz'}",
                               f"storage={tmp_path}"]), plan=True)
    text = plan_text(cfg)
    assert "mine.npz is not here; sizes unknown" in text
    assert "time: unknown" in text and "33 trials x 16 epochs" in text


def gpu_sweep(tmp_path, *more: str) -> SweepConfig:
    return load_config(SweepConfig, None, None, [
        "mode=grid", f"storage={tmp_path}", "seeds=[0, 1]", "resources.gpus=0.25",
        "resources.cpus=2", "max_concurrent_trials=4", "run.data.name=synthetic",
        "run.model.name=smallnet", "run.optim.epochs=1", *more])


def test_table_time_is_flops_over_the_trials_share_of_the_peak(tmp_path):
    """Per trial: its FLOPs over its share (resources.gpus) of the GPU's peak x the stated
    utilisation; GPU-hours: the GPUs it holds x its time; wall-clock: the trials through
    max_concurrent_trials at once."""
    cfg = gpu_sweep(tmp_path)
    flops = [3.6e15, 7.2e15]
    lines = estimate_lines(cfg, [cfg.run, cfg.run], flops, {"classes": 10, "channels": 3,
                                                            "size": 16}, 4, "a100")
    rate = 312e12 * DEFAULT_UTILISATION  # smallnet under amp=auto on an A100: bf16
    seconds = [f / (rate * 0.25) for f in flops]
    assert "time basis: the peak table: A100" in lines[1]
    assert lines[2] == (
        "time (compute only; starting Ray and the trials comes on top): "
        f"{fmt_duration(sum(seconds) / 2)} a trial ({fmt_duration(seconds[0])} to "
        f"{fmt_duration(seconds[1])}), {sum(flops) / rate / 3600:.3g} GPU-hours in all; "
        f"wall-clock {fmt_duration(max(sum(seconds) / 4, seconds[1]))} with 4 at once "
        "(max_concurrent_trials)")
    # fp32 on a V100 (no tensor cores for it), a precision it lacks is refused
    fp32 = gpu_sweep(tmp_path, "run.optim.amp=fp32")
    v100 = estimate_lines(fp32, [fp32.run], [1e15], {}, 4, "v100-sxm2")
    assert "fp32 dense peak 15.7 TFLOP/s" in v100[1]
    from hardmix.errors import ConfigError

    bf16 = gpu_sweep(tmp_path, "run.optim.amp=bf16")
    with pytest.raises(ConfigError, match="native bf16"):
        estimate_lines(bf16, [bf16.run], [1e15], {}, 4, "t4")


def test_cpu_time_uses_the_rate_measured_here_and_shares_the_cores(tmp_path, monkeypatch):
    """CPU trials: the basis is measured here (timed training steps of the run's model); the
    CPU-core-hours are the trial's CPUs x its time; trials beyond this machine's cores share
    them."""
    cfg = load_config(SweepConfig, None, None, [
        "mode=grid", f"storage={tmp_path}", "seeds=[0, 1, 2, 3]", "resources.cpus=1",
        "run.data.name=synthetic", "run.model.name=smallnet", "run.model.width=8",
        "run.optim.epochs=1", "run.data.batch_size=64"])
    text = plan_text(prepare(cfg, plan=True))
    assert "time basis: measured here:" in text and "training step" in text
    assert "with 1 thread (resources.cpus)" in text and "CPU-core-hours in all" in text

    seen = []

    def fake(run, facts, device, threads, seconds=1.5):
        seen.append((device, threads, facts["size"]))
        return Basis("cpu", 1e9, "fake")

    monkeypatch.setattr(estimate, "measured_basis", fake)
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    lines = estimate_lines(cfg, [cfg.run] * 4, [100e9] * 4, {"classes": 10, "channels": 3,
                                                             "size": 16}, 4)
    assert seen == [("cpu", 1, 16)]
    assert lines[0] == (f"fit: 4 trials at once on this machine {{CPU: 4, GPU: "
                        f"{torch.cuda.device_count()}}} x 1 (from the local Ray instance the "
                        "sweep starts)")
    # 4 trials of 100 s at once (4 logical CPUs) on 2 cores: 200 s
    assert lines[2].endswith("100 s a trial, 0.111 CPU-core-hours in all; wall-clock 3 min "
                             "with 4 at once (as many as fit) sharing this machine's 2 cores")


def test_fit_says_when_this_machine_or_a_cluster_files_node_types_cannot_hold_a_trial(
        tmp_path, monkeypatch):
    def fit(cfg, cluster=None):
        return estimate_lines(cfg, [cfg.run], None, None, 4, None, cluster)[0]

    big = load_config(SweepConfig, None, None, [f"storage={tmp_path}", "resources.cpus=8",
                                                "run.data.name=synthetic"])
    assert fit(big).startswith("fit: the local Ray instance the sweep starts cannot hold one "
                               "trial; the sweep would stop with: resources.cpus = 8.0")
    study = load_config(SweepConfig, "cifar10-gpu-study", None, ["run.data.path=x.npz"])
    # cluster.yaml: 2 gpu-4x (16 trials of 3 CPUs + 0.25 GPU each) + 8 gpu-1x (2 each)
    assert fit(study, str(REPO / "cluster.yaml")).startswith("fit: 48 trials at once on head")
    huge = load_config(SweepConfig, "cifar10-gpu-study", None, ["run.data.path=x.npz",
                                                                 "resources.gpus=8"])
    line = fit(huge, str(REPO / "cluster.yaml"))
    assert line.startswith(f"fit: {REPO / 'cluster.yaml'} cannot hold one trial; the sweep "
                           "would stop with: resources.gpus = 8.0: no node type can ever hold")
    joined = load_config(SweepConfig, None, None, [f"storage={tmp_path}", "address=auto",
                                                   "run.data.name=synthetic"])
    monkeypatch.setattr(estimate, "_view_from_bootstrap", lambda: None)  # not on a head
    assert fit(joined).startswith("fit: unknown (a sweep joining a cluster: give its file "
                                  "with --cluster")
    from hardmix.errors import ConfigError

    with pytest.raises(ConfigError, match="cluster file"):
        fit(study, str(tmp_path / "no-such.yaml"))
