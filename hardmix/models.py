"""Models by name: ResNet-18/34/50/101 (CIFAR or ImageNet stem), WideResNet-28-10, smallnet.

``build_model(cfg.model, num_classes, in_channels, image_size)`` looks the name up in the
torch-free registry :data:`hardmix.architectures.ARCHITECTURES` (which names each builder below),
or builds ``timm:<name>`` with timm.

The ResNets are torchvision's, with the stem swapped for small images: the CIFAR stem is a 3x3
stride-1 convolution without max-pool (He et al.'s CIFAR variant, used by CutMix, SaliencyMix and
HardMix), the ImageNet stem is torchvision's 7x7 stride-2 convolution + max-pool. ``stem: auto``
picks the CIFAR stem for images smaller than 64 pixels.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch
import torch.nn as nn
import torchvision.models.resnet as tv_resnet

from hardmix.architectures import ARCHITECTURES, TIMM_PREFIX, check_model_name
from hardmix.config.schema import ModelConfig
from hardmix.errors import ConfigError

Builder = Callable[[ModelConfig, int, int, int], nn.Module]


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3,
                image_size: int = 32) -> nn.Module:
    """The model ``cfg.name`` for ``num_classes`` classes and images of ``in_channels`` x
    ``image_size`` x ``image_size``."""
    check_model_name(cfg.name)
    if cfg.name.startswith(TIMM_PREFIX):
        return timm_model(cfg, num_classes, in_channels, image_size)
    module, _, fn = ARCHITECTURES[cfg.name].builder.partition(":")
    return getattr(importlib.import_module(module), fn)(cfg, num_classes, in_channels, image_size)


def forward_flops(cfg: ModelConfig, num_classes: int, in_channels: int = 3,
                  image_size: int = 32) -> float | None:
    """FLOPs of one forward pass of one image through the model ``cfg`` (torch's
    ``FlopCounterMode``: matrix products and convolutions, 2 per multiply-add), or None where it
    cannot be counted. The sweep's compute estimate and the run's ``flops_per_s`` both use it.

    The model is built on the meta device (shapes only: no memory, no weights fetched, and no
    draw from torch's generator, so a run that counts is the run it would have been), else on
    the CPU with the generator's state put back."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    cfg = dataclasses.replace(cfg, pretrained=False)  # the count needs no weights
    for device in ("meta", "cpu"):
        try:
            with torch.random.fork_rng(devices=[]), torch.device(device):
                model = build_model(cfg, num_classes, in_channels, image_size).eval()
                x = torch.zeros(1, in_channels, image_size, image_size)
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    model(x)
            return float(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - an op without a meta kernel: try the CPU; else unknown
            continue
    return None


def timm_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Any timm model by name, with the data set's classes and input channels, ``model.dropout``
    as timm's ``drop_rate``, ``model.kwargs`` as further ``timm.create_model`` arguments and
    ``model.pretrained`` (timm's weights; the classifier of ``num_classes`` is new)."""
    try:
        import timm
    except ImportError:
        raise ConfigError("model.name", cfg.name, "needs timm: pip install \"hardmix[timm]\"") \
            from None
    name = cfg.name[len(TIMM_PREFIX):]
    try:
        return timm.create_model(name, pretrained=cfg.pretrained, num_classes=num_classes,
                                 in_chans=in_channels, drop_rate=cfg.dropout, **cfg.kwargs)
    except TypeError as exc:  # an argument the model does not take
        raise ConfigError("model.kwargs", cfg.kwargs, f"are not arguments timm's {name} takes "
                                                      f"({exc})") from None
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ConfigError("model.name", cfg.name, f"is not a timm model ({exc})") from None
    except OSError as exc:  # the weights could not be fetched (checked up front as well)
        raise ConfigError("model.pretrained", True, f"timm's weights for {name} could not be "
                                                    f"loaded ({exc})") from None


def check_timm_options(cfg: ModelConfig, prefix: str = "") -> None:
    """Before any work: timm's model takes ``model.kwargs`` (checked by building it on the meta
    device, which allocates nothing) and, with ``model.pretrained``, timm has weights for it and
    they are in the local cache or can be fetched now (fetched here, once, so the runs find
    them in the cache). Raises ConfigError (one line)."""
    import timm

    name = cfg.name[len(TIMM_PREFIX):]
    if cfg.kwargs:
        try:
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, **cfg.kwargs)
        except TypeError as exc:
            raise ConfigError(f"{prefix}model.kwargs", cfg.kwargs,
                              f"are not arguments timm's {name} takes ({exc})") from None
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta: built later
            pass
    if cfg.pretrained:
        check_timm_weights(name, f"{prefix}model.pretrained")


def check_timm_weights(name: str, field: str) -> None:
    """timm has pretrained weights for model ``name`` and they are at hand: in the local cache
    (the Hugging Face Hub's, ``HF_HOME``, or torch.hub's), or fetched now. Offline
    (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, one line says so at once."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model_pretrained(name):
        raise ConfigError(field, True, f"timm has no pretrained weights for {name} "
                                       "(timm.list_pretrained() lists the models that have)")
    pc = get_pretrained_cfg(name)
    if _weights_cached(pc):
        return
    import huggingface_hub.constants as hub

    where = pc.hf_hub_id and f"{hub.ENDPOINT}/{pc.hf_hub_id}" or pc.url or pc.file
    if hub.is_offline_mode():
        raise ConfigError(field, True, f"timm's weights for {name} ({where}) are not in the "
                                       f"local cache ({hub.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                                       "set: fetch them once where the Hub is reachable, or set "
                                       "model.pretrained=false")
    import socket
    from urllib.parse import urlparse

    host = urlparse(where if "://" in str(where) else hub.ENDPOINT).hostname
    try:  # fail in seconds, not after the Hub client's minute of retries
        socket.create_connection((host, 443), timeout=10).close()
    except OSError as exc:
        raise ConfigError(field, True, f"timm's weights for {name} cannot be fetched: {host} is "
                                       f"unreachable ({exc}); put them in the cache "
                                       f"({hub.HF_HUB_CACHE}) or set model.pretrained=false") \
            from None
    try:
        timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is the same answer
        raise ConfigError(field, True, f"timm's weights for {name} could not be fetched "
                                       f"({type(exc).__name__}: {exc})") from None


def _weights_cached(pc) -> bool:
    """Whether the weights a timm pretrained config names are on this machine already."""
    if pc.file:
        return os.path.isfile(pc.file)
    if pc.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = pc.hf_hub_id.partition("@")
        names = [pc.hf_hub_filename] if pc.hf_hub_filename else ["model.safetensors",
                                                                 "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str)
               for n in names):
            return True
    if pc.url:
        from timm.models._hub import check_cached_file

        return bool(check_cached_file(pc.url))
    return False


def resolve_stem(stem: str, image_size: int) -> str:
    """``auto`` -> ``cifar`` below 64 pixels, else ``imagenet``."""
    if stem != "auto":
        return stem
    return "cifar" if image_size < 64 else "imagenet"


# --------------------------------------------------------------------------------------------
# ResNet (torchvision) with a swappable stem
# --------------------------------------------------------------------------------------------

_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}


def _resnet(name: str) -> Builder:
    block, layers = _RESNETS[name]

    def build(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        model = tv_resnet.ResNet(block, layers, num_classes=num_classes)
        if resolve_stem(cfg.stem, image_size) == "cifar":
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        if cfg.dropout > 0:
            model.fc = nn.Sequential(nn.Dropout(cfg.dropout), model.fc)
        return model

    build.__doc__ = f"{name} from torchvision with the CIFAR or ImageNet stem."
    return build


resnet18, resnet34, resnet50, resnet101 = (_resnet(n) for n in _RESNETS)


# --------------------------------------------------------------------------------------------
# WideResNet-28-10 (Zagoruyko & Komodakis), dropout inside the blocks
# --------------------------------------------------------------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv-(dropout)-BN-ReLU-conv + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (nn.Identity() if c_in == c_out and stride == 1
                         else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        # The projection shortcut reads the activated input, as in the reference implementation.
        short = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(torch.relu(self.bn2(self.dropout(o))))
        return o + short


class WideResNet(nn.Module):
    """WideResNet-depth-widen for small images (3 groups, strides 1/2/2)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        c_in = widths[0]
        for g, (c_out, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                blocks.append(_WideBlock(c_in, c_out, stride if i == 0 else 1, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(o, 1), 1))


def wrn28_10(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """WideResNet-28-10; ``model.dropout`` is the dropout inside every block (0.3 in the paper)."""
    return WideResNet(28, 10, num_classes, in_channels, cfg.dropout)


# --------------------------------------------------------------------------------------------
# smallnet: a small, fast BatchNorm CNN for CPU runs
# --------------------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


LOGIT_SCALE = 0.125


class SmallNet(nn.Module):
    """An airbench-style CNN: a stem, then three stages of conv-pool-conv at widths w, 2w, 4w,
    global max-pool and a linear head. Max-pools come early so most convolutions run at 16x16 and
    below, which keeps a 2-core CPU at a few thousand images a second with ``width`` 32."""

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, image_size: int = 32):
        super().__init__()
        w = width
        layers: list[nn.Module] = _conv_bn(in_channels, w)
        c = w
        # Images of 16 px and below (digits) keep their resolution for one more stage.
        pools = 3 if image_size >= 32 else max(1, image_size.bit_length() - 3)
        for i, c_out in enumerate((w, 2 * w, 4 * w)):
            layers += _conv_bn(c, c_out)
            if i < pools:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn(c_out, c_out)
            c = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.amax(self.features(x), dim=(2, 3))
        # Small initial logits (Myrtle's ResNet-9 scales by 1/8): stable at high learning rates.
        return self.fc(self.dropout(o)) * LOGIT_SCALE


def smallnet(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """smallnet of base width ``model.width``."""
    return SmallNet(cfg.width, num_classes, in_channels, cfg.dropout, image_size)

