"""CUDA paths (run by benchmarks/gpu_check.py on a GPU machine; skipped here without one):
no host sync in the augmentation step, bf16 + channels_last training, the device loader."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


@pytest.mark.parametrize("method", ["cutmix", "hardmix", "mixup", "cutout", "saliencymix",
                                    "hard_mixup", "hard_saliencymix"])
@pytest.mark.parametrize("extra", [{}, {"box": "sample"}, {"signal": "cached", "prob": 0.5},
                                   {"criterion": "history"}, {"fallback": "skip", "min_hard": 4}])
def test_augmentation_step_never_syncs_the_host(method, extra):
    from hardmix import HardMix
    from hardmix.models import SmallNet

    dev = torch.device("cuda")
    model = SmallNet(16, 10).to(dev)
    x = torch.randn(64, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    idx = torch.randperm(1000, device=dev)[:64]
    mix = HardMix(method=method, seed=0, num_classes=10, dataset_size=1000, inplace=True,
                  **extra)
    mix(x.clone(), y, model=model, index=idx)  # first call: generators and memory created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = mix(x.clone(), y, model=model, index=idx)
            logits = model(out.x)
            loss = out.loss(logits)
            mix.observe(logits.detach(), y, idx, out)
            dict(out.stats), out.source_counts_by_class()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_bf16_channels_last_training_step_on_cuda():
    from hardmix import HardMix
    from hardmix.config import ModelConfig, OptimConfig
    from hardmix.models import build_model
    from hardmix.train import precision_policy, training_step

    dev = torch.device("cuda")
    p = precision_policy(OptimConfig(), dev)
    assert p.dtype == torch.bfloat16 and p.channels_last
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
