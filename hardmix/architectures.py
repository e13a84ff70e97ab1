"""The model registry: every ``model.name`` and the function that builds it. Torch-free.

An entry names its builder as ``module:function`` (imported only when a model is built), so
config checks and ``--help`` never load torch. ``timm:<name>`` builds any timm model
(``pip install "hardmix[timm]"``) with the data set's classes and input channels. Adding an
architecture is one :func:`register_architecture` entry plus its builder function
``(model_cfg, num_classes, in_channels, image_size) -> nn.Module``, and ``reads``: the
``model.*`` fields that builder reads (the others are inert for it: a sweep cannot search them
and the report never counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

from hardmix.errors import ConfigError

__all__ = ["Architecture", "ARCHITECTURES", "TIMM_PREFIX", "TIMM_READS", "register_architecture",
           "check_model_name", "model_reads"]

TIMM_PREFIX = "timm:"
#: The model fields a ``timm:<name>`` model reads (``dropout`` is timm's ``drop_rate``).
TIMM_READS = ("dropout",)


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    builder: str  # "module:function"
    reads: tuple[str, ...] = ("dropout",)  # model fields the builder reads besides the name


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


_RESNET = ("stem", "dropout")
for _arch in (
    Architecture("resnet18", "torchvision ResNet-18, CIFAR or ImageNet stem",
                 "hardmix.models:resnet18", _RESNET),
    Architecture("resnet34", "torchvision ResNet-34", "hardmix.models:resnet34", _RESNET),
    Architecture("resnet50", "torchvision ResNet-50", "hardmix.models:resnet50", _RESNET),
    Architecture("resnet101", "torchvision ResNet-101", "hardmix.models:resnet101", _RESNET),
    # Its own 3x3 stem for small images: model.stem does not apply.
    Architecture("wrn28_10", "WideResNet-28-10 (dropout inside the blocks)", "hardmix.models:wrn28_10"),
    Architecture("smallnet", "airbench-style BatchNorm CNN of width model.width (CPU runs)",
                 "hardmix.models:smallnet", ("width", "dropout")),
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


def model_reads(name: object) -> tuple[str, ...] | None:
    """The ``model.*`` fields (without the prefix) that model ``name`` reads besides ``name``;
    None for a name that is not a model."""
    if isinstance(name, str) and name in ARCHITECTURES:
        return ARCHITECTURES[name].reads
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return TIMM_READS
    return None
