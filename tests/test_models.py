"""The model registry (hardmix.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hardmix.architectures import ARCHITECTURES
from hardmix.config import ConfigError, ModelConfig
from hardmix.models import SmallNet, build_model, resolve_stem

MODEL_NAMES = list(ARCHITECTURES)


def test_every_registered_architecture_has_its_builder():
    import importlib

    for arch in ARCHITECTURES.values():
        module, _, fn = arch.builder.partition(":")
        assert callable(getattr(importlib.import_module(module), fn)), arch


@pytest.mark.parametrize("name", sorted(MODEL_NAMES))
def test_every_model_classifies_small_images(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), num_classes=7, in_channels=3,
                        image_size=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_resnet_stems():
    cifar = build_model(ModelConfig(name="resnet18", stem="auto"), 10, 3, 32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    imagenet = build_model(ModelConfig(name="resnet18", stem="auto"), 10, 3, 224)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    forced = build_model(ModelConfig(name="resnet50", stem="imagenet"), 10, 1, 32)
    assert forced.conv1.kernel_size == (7, 7) and forced.conv1.in_channels == 1
    assert resolve_stem("auto", 63) == "cifar" and resolve_stem("auto", 64) == "imagenet"


def test_grey_images_and_dropout_head():
    model = build_model(ModelConfig(name="resnet18", dropout=0.5), 10, 1, 16)
    assert isinstance(model.fc[0], nn.Dropout)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_wrn_dropout_acts_inside_blocks_in_training_only():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="wrn28_10", dropout=0.3), 10, 3, 8)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 12
    x = torch.randn(2, 3, 8, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_smallnet_width_and_learning():
    small = sum(p.numel() for p in SmallNet(8).parameters())
    big = sum(p.numel() for p in SmallNet(16).parameters())
    assert 3 < big / small < 4.5                  # parameters grow ~ width^2
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallnet", width=8), 4, 3, 16)
    x, y = torch.randn(32, 3, 16, 16), torch.arange(32) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]          # it fits a small batch


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="vgg"), 10)


#: A value other than the default of each model field a builder may read.
_OTHER_MODEL_VALUE = {"stem": "imagenet", "width": 16, "dropout": 0.3,
                      "kwargs": {"drop_path_rate": 0.2}, "pretrained": True}


@pytest.mark.parametrize("name", sorted(MODEL_NAMES))
def test_a_model_field_changes_the_model_exactly_where_the_registry_says_it_is_read(name):
    """Build with one model field changed at a time: the parameter shapes or the training-mode
    output change if and only if ``Architecture.reads`` lists the field (what the sweep space
    and the report trust: ``model.width`` of a ResNet is never searched or counted)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    assert fields == set(_OTHER_MODEL_VALUE)  # a new field needs a value here

    def signature(cfg: ModelConfig):
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=5, in_channels=3, image_size=32).train()
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        return [tuple(v.shape) for v in model.state_dict().values()], out

    base = ModelConfig(name=name, width=8)
    shapes, out = signature(base)
    for field, other in _OTHER_MODEL_VALUE.items():
        shapes2, out2 = signature(dataclasses.replace(base, **{field: other}))
        changed = shapes2 != shapes or not torch.equal(out2, out)
        assert changed == (field in ARCHITECTURES[name].reads), (name, field)
