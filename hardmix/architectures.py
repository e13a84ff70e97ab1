"""The model registry: every ``model.name`` and the function that builds it. Torch-free.

An entry names its builder as ``module:function`` (imported only when a model is built), so
config checks and ``--help`` never load torch. ``timm:<name>`` builds any timm model
(``pip install "hardmix[timm]"``) with the data set's classes and input channels. Adding an
architecture is one :func:`register_architecture` entry plus its builder function
``(model_cfg, num_classes, in_channels, image_size) -> nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hardmix.errors import ConfigError

__all__ = ["Architecture", "ARCHITECTURES", "TIMM_PREFIX", "register_architecture",
           "check_model_name"]

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    builder: str  # "module:function"


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


for _arch in (
    Architecture("resnet18", "torchvision ResNet-18, CIFAR or ImageNet stem", "hardmix.models:resnet18"),
    Architecture("resnet34", "torchvision ResNet-34", "hardmix.models:resnet34"),
    Architecture("resnet50", "torchvision ResNet-50", "hardmix.models:resnet50"),
    Architecture("resnet101", "torchvision ResNet-101", "hardmix.models:resnet101"),
    Architecture("wrn28_10", "WideResNet-28-10 (dropout inside the blocks)", "hardmix.models:wrn28_10"),
    Architecture("smallnet", "airbench-style BatchNorm CNN of width model.width (CPU runs)",
                 "hardmix.models:smallnet"),
):
    register_architecture(_arch)


def check_model_name(name: object, field: str = "model.name") -> None:
    """A registered architecture or ``timm:<model>`` (raises ConfigError)."""
    if isinstance(name, str) and name in ARCHITECTURES:
        return
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return
    raise ConfigError(field, name, f"must be one of {', '.join(ARCHITECTURES)} or "
                                   f"{TIMM_PREFIX}<any timm model>")
