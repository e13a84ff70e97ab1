"""hardmix: HardMix and its baselines as a drop-in PyTorch augmentation, plus one training run.

Nothing here imports Ray; the ``tune`` package (sweeps) is loaded lazily by the CLI. The public
names below load torch on first use (PEP 562), so ``hardmix --help`` and config checks stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HardMix": "hardmix.augment",
    "MixOutput": "hardmix.augment",
    "METHODS": "hardmix.augment",
    "mixed_cross_entropy": "hardmix.loss",
    "mixed_target": "hardmix.loss",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hardmix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
