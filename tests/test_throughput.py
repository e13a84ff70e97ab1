"""Achieved throughput in the run rows (``flops_per_s``, ``mfu``) and the table they are
measured against (hardmix.throughput): device names to peaks, MFU, the CPU's measured rate,
the calibration of training steps, and that counting FLOPs leaves a run unchanged."""

from __future__ import annotations

import pytest
import torch

import hardmix.train
from hardmix.config import RunConfig, load_config
from hardmix.metrics import EPOCH_METRICS, timings
from hardmix.models import forward_flops
from hardmix.throughput import (ACCELERATORS, DEFAULT_UTILISATION, TRAIN_PASSES, accelerator,
                                cpu_matmul_flops, device_peak, mfu, named_accelerator, peak_of)
from tune.estimate import calibration_batch, measure_training_rate
from hardmix.train import Callback, train

TINY = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
        "optim.epochs=2", "output.progress=false", "device=cpu", "output.image_grid=false"]


class Rows(Callback):
    def __init__(self):
        self.rows = []

    def on_epoch_end(self, metrics, checkpoint=None):
        self.rows.append(dict(metrics))


def run_rows(tmp_path, *more) -> list[dict]:
    cfg = load_config(RunConfig, None, None, TINY + [f"output.dir={tmp_path}", *more])
    rows = Rows()
    assert train(cfg, [rows], tmp_path / "run")["status"] == "completed"
    return rows.rows


# ---- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 80GB HBM2e", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"),
    ("Tesla V100-SXM2-16GB", "v100-sxm2"), ("Tesla V100-PCIE-32GB", "v100-pcie"),
    ("Tesla T4", "t4"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("h100-sxm", "h100-sxm"), ("A10G", "a10g")])
def test_device_names_as_torch_reports_them_find_their_row(name, key):
    assert accelerator(name).key == key


def test_unknown_devices_have_no_peak_and_a_named_one_is_refused_with_the_keys():
    for name in ("NVIDIA GeForce RTX 3090 Ti", "NVIDIA L40", "AMD Instinct MI300X", ""):
        assert accelerator(name) is None and peak_of(name, "bf16") is None
    from hardmix.errors import ConfigError

    with pytest.raises(ConfigError, match="h100-sxm, a100") as err:
        named_accelerator("b200")
    assert err.value.field == "--device-type"


def test_peaks_are_dense_datasheet_figures_and_fp32_counts_tf32_where_cudnn_uses_it():
    h100 = ACCELERATORS["h100-sxm"]
    assert h100.peak("bf16") == pytest.approx(989.4e12)  # 1,979 with sparsity, halved
    assert h100.peak("fp32") == pytest.approx(494.7e12)  # TF32 tensor cores
    assert h100.peak("fp32", tf32=False) == pytest.approx(66.9e12)
    assert ACCELERATORS["a100"].peak("fp16") == pytest.approx(312e12)
    assert ACCELERATORS["v100-sxm2"].peak("bf16") is None  # no bf16 arithmetic
    assert ACCELERATORS["t4"].peak("fp32") == pytest.approx(8.1e12)  # no TF32: CUDA cores
    for acc in ACCELERATORS.values():  # tensor cores beat CUDA cores, sparsity never counted
        assert acc.fp16 > acc.fp32 and (acc.bf16 is None or acc.bf16 <= acc.fp16)
        assert acc.capability >= (7, 0) and acc.source
    assert 0 < DEFAULT_UTILISATION < 1


def test_mfu_is_the_achieved_rate_over_the_faked_devices_peak(monkeypatch):
    assert mfu(78e12, 312e12) == pytest.approx(0.25)
    assert mfu(78e12, 312e12, devices=2) == pytest.approx(0.125)  # data-parallel ranks
    assert mfu(78e12, None) is None and mfu(None, 312e12) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda", 0)
    assert device_peak(cuda, "bf16") == pytest.approx(312e12)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert device_peak(cuda, "fp32") == pytest.approx(156e12)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert device_peak(cuda, "fp32") == pytest.approx(19.5e12)
    assert device_peak(torch.device("cpu"), "fp32") is None  # never a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert device_peak(cuda, "bf16") is None


# ---- the run rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("method, extra", [("none", 0), ("hardmix", 1)])
def test_a_cpu_run_records_its_flops_per_second_and_no_mfu(tmp_path, method, extra):
    """flops_per_s is the counted FLOPs of the epoch's training over its training seconds:
    against images_per_s (same seconds) it is exactly the FLOPs of a training image, 3
    forwards plus HardMix's hardness forward on its mixed steps."""
    mixing = ["augment.prob=1.0"] if method != "none" else []  # `none` reads no prob
    rows = run_rows(tmp_path, f"augment.method={method}", *mixing)
    cfg = load_config(RunConfig, None, None, TINY)
    per_image = forward_flops(cfg.model, 10, 3, 16)  # synthetic: 10 classes of 3x16x16
    assert per_image > 0
    for row in rows:
        assert row["flops_per_s"] > 0 and row["mfu"] is None
        assert row["flops_per_s"] / row["images_per_s"] == pytest.approx(
            per_image * (TRAIN_PASSES + extra * (row["mixed_rate"] or 0)))
    assert {"flops_per_s", "mfu"} <= set(timings())  # timings: never compared across runs
    assert EPOCH_METRICS["mfu"].group == EPOCH_METRICS["flops_per_s"].group == "speed"


def test_mfu_of_a_run_is_its_rate_over_its_devices_peak(tmp_path, monkeypatch):
    """The run asks the table for its device's peak once, at its precision (a faked GPU peak
    on the CPU here), and each epoch's mfu is flops_per_s over it."""
    asked = []

    def fake_peak(device, precision):
        asked.append((device.type, precision))
        return 2e12

    monkeypatch.setattr(hardmix.train, "device_peak", fake_peak)
    rows = run_rows(tmp_path, "optim.amp=fp32")
    assert asked == [("cpu", "fp32")]
    for row in rows:
        assert row["mfu"] == pytest.approx(row["flops_per_s"] / 2e12)


def test_counting_flops_draws_nothing_from_torchs_generator():
    from hardmix.config import ModelConfig

    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    assert forward_flops(ModelConfig(name="resnet18"), 10, 3, 32) == pytest.approx(1.11e9,
                                                                                  rel=0.01)
    assert torch.equal(torch.random.get_rng_state(), before)


# ---- measured rates ---------------------------------------------------------------------------


def test_the_cpu_rate_is_measured_and_the_calibration_times_real_steps(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        torch.set_num_threads(2)
        assert cpu_matmul_flops("fp32", threads=1, seconds=0.05, n=128) > 1e8
        assert torch.get_num_threads() == 2  # put back
        run = load_config(RunConfig, None, None, TINY + ["optim.amp=fp32"])
        torch.manual_seed(5)
        state = torch.random.get_rng_state()
        rate = measure_training_rate(run, 10, 3, 16, threads=1, seconds=0.2)
        assert torch.get_num_threads() == 2 and torch.backends.cudnn.benchmark is True
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rate.steps >= 1 and rate.seconds >= 0.2 and rate.batch == 64
    assert rate.precision == "fp32" and rate.device == "cpu" and rate.flops_per_s > 1e7


def test_a_calibration_batch_shrinks_only_when_a_step_would_not_fit_the_time():
    assert calibration_batch(128, step_flops=1e9, rate=1e10, seconds=2.0) == 128
    assert calibration_batch(128, step_flops=1e11, rate=1e10, seconds=2.0) == 12  # 10 s a step
    assert calibration_batch(128, step_flops=1e14, rate=1e10, seconds=2.0) == 4  # the floor
    assert calibration_batch(2, step_flops=1e14, rate=1e10, seconds=2.0) == 2
