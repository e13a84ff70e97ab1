"""CUDA paths (run by benchmarks/gpu_check.py on a GPU machine; skipped here without one).

The same checks as tests/test_device_path.py, with the GPU itself as the judge:
``torch.cuda.set_sync_debug_mode`` instead of the CPU stand-in. No host sync in any training
step of every method and switch (the same settings and the same step); a whole epoch and its
evaluation that sync a fixed number of times whatever their length; a resume on the GPU that
restores every generator; a device generator's state that restores on another GPU index; bf16 +
channels_last training; the device loader.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from test_device_path import (EPOCH_AUGMENT, RESUME_AUGMENT, SETTINGS, check_generators_restored,
                              device_generator_round_trip, epoch_traffic, evaluation_traffic,
                              per_step_run, per_step_sites, resume_round_trip, setting_id)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


class SyncWarnings:
    """Counts CUDA's synchronising calls by call site (``set_sync_debug_mode("warn")``);
    ``events`` as :class:`test_device_path.HostTraffic`'s."""

    def __enter__(self):
        torch.cuda.synchronize()
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(*exc)

    @property
    def events(self) -> list[tuple[str, str]]:
        return [("sync", f"{r.filename}:{r.lineno}") for r in self.records
                if "synchroniz" in str(r.message)]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_training_step_never_syncs_the_host(setting):
    """Every setting of the method table (tests/test_device_path.py's list), CUDA batch sizes,
    the run's autocast: three training steps after a warm-up step (cuDNN and cuBLAS set up
    there) raise on any synchronising call."""
    from hardmix.config import OptimConfig
    from hardmix.train import precision_policy

    dev = _device()
    policy = precision_policy(OptimConfig(), dev)
    step, _ = per_step_run(setting, dev, batch=64, size=32, width=16, classes=10, dataset=1000,
                           autocast=policy.autocast)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(o.lam).all() for o in outs)


def test_evaluation_syncs_once_whatever_the_batch_count():
    one, three = evaluation_traffic(_device(), SyncWarnings)
    assert not per_step_sites(one, three), "\n".join(per_step_sites(one, three))


def test_a_whole_epoch_syncs_a_fixed_number_of_times(tmp_path):
    """The trainer's loop on the GPU: twice the training images, no more synchronising calls."""
    small = epoch_traffic(tmp_path, 64, EPOCH_AUGMENT, "cuda", SyncWarnings())
    large = epoch_traffic(tmp_path, 160, EPOCH_AUGMENT, "cuda", SyncWarnings())
    assert not per_step_sites(small, large), "\n".join(per_step_sites(small, large))


@pytest.mark.parametrize("signal", RESUME_AUGMENT)
def test_resume_on_the_gpu_restores_every_generator(tmp_path, monkeypatch, signal):
    """train -> stop -> resume on CUDA (no stand-in: the real device); every generator, CUDA's
    included, holds exactly the checkpoint's state after the restore (rows are not compared:
    cuDNN's autotuned kernels are not bitwise repeatable)."""
    trip = resume_round_trip(tmp_path, monkeypatch, RESUME_AUGMENT[signal], "cuda", None)
    check_generators_restored(trip)
    assert [r["epoch"] for r in trip["resumed"]] == [1, 2]


def test_a_cuda_generator_state_round_trips_onto_another_index(tmp_path):
    device_generator_round_trip(tmp_path, _device())


def test_bf16_channels_last_training_step_on_cuda():
    from hardmix import HardMix
    from hardmix.config import ModelConfig, OptimConfig
    from hardmix.models import build_model
    from hardmix.train import precision_policy, training_step

    dev = _device()
    p = precision_policy(OptimConfig(), dev)
    if torch.cuda.get_device_capability(dev) >= (8, 0):
        assert p.dtype == torch.bfloat16
    assert p.channels_last
    model = build_model(ModelConfig(name="resnet18"), 10, 3, 32).to(dev,
                                                                    memory_format=p.memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(128, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device=dev)
    losses = [training_step(model, model, HardMix(seed=0, inplace=True), opt, x.clone(), y,
                            torch.arange(128, device=dev), autocast=p.autocast)[0]
              for _ in range(3)]
    assert all(torch.isfinite(v) for v in losses)


def test_device_loader_keeps_cifar_on_the_gpu():
    from hardmix.config import DataConfig
    from hardmix.data import build_data

    data = build_data(DataConfig(name="synthetic", batch_size=32), device="cuda",
                      memory_format=torch.channels_last)
    data.train.set_epoch(1)
    x, y, idx = next(iter(data.train))
    assert x.is_cuda and y.is_cuda and idx.is_cuda
    assert x.is_contiguous(memory_format=torch.channels_last)
