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
           "check_model_name", "check_model_kwargs", "model_reads"]

TIMM_PREFIX = "timm:"
#: The model fields a ``timm:<name>`` model reads (``dropout`` is timm's ``drop_rate``;
#: ``kwargs`` go to ``timm.create_model``; ``pretrained`` loads timm's weights). Only timm models
#: read ``kwargs`` and ``pretrained``: for the others they are inert.
TIMM_READS = ("dropout", "kwargs", "pretrained")
#: ``timm.create_model`` arguments hardmix sets from other fields (not ``model.kwargs``).
TIMM_OWN_KWARGS = {"num_classes": "the data set's classes", "in_chans": "the data's channels",
                   "drop_rate": "model.dropout", "pretrained": "model.pretrained",
                   "model_name": "model.name"}


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


def check_model_kwargs(value: object, field: str = "model.kwargs") -> None:
    """``model.kwargs``: a mapping of argument names to plain values (numbers, strings,
    booleans, null, lists of them), none of which hardmix sets itself. Whether timm's model
    takes them is checked where timm is at hand (:func:`hardmix.models.check_timm_options`)."""
    if not isinstance(value, dict):
        raise ConfigError(field, value, "must be a mapping of timm.create_model arguments, e.g. "
                                        "{drop_path_rate: 0.1}")
    plain = (int, float, str, bool, type(None))
    for key, v in value.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(field, key, "must name keyword arguments (identifiers)")
        if key in TIMM_OWN_KWARGS:
            raise ConfigError(f"{field}.{key}", v, f"is set by hardmix from "
                                                   f"{TIMM_OWN_KWARGS[key]}; drop it here")
        if not (isinstance(v, plain) or isinstance(v, list) and all(isinstance(x, plain)
                                                                    for x in v)):
            raise ConfigError(f"{field}.{key}", v, "must be a number, string, boolean, null or "
                                                   "a list of them")


def model_reads(name: object) -> tuple[str, ...] | None:
    """The ``model.*`` fields (without the prefix) that model ``name`` reads besides ``name``;
    None for a name that is not a model."""
    if isinstance(name, str) and name in ARCHITECTURES:
        return ARCHITECTURES[name].reads
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return TIMM_READS
    return None
