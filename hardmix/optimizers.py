"""The optimiser registry: every ``optim.name``, the ``optim.*`` fields only it reads, and how it
is built. Torch-free at import (torch is imported when an optimiser is built), so config checks
and ``--help`` never load it.

``sgd`` is the paper's: SGD with Nesterov momentum 0.9 and weight decay 5e-4 (L2, added to the
gradient), the default. ``adamw`` is AdamW (Loshchilov & Hutter): decoupled weight decay, its
own ``betas`` and ``eps``. ``lr``, ``weight_decay``, the schedule, warm-up, label smoothing and
clipping apply to every optimiser; the fields an entry ``reads`` act only for it (elsewhere they
are inert: NULL in the Parquet rows, never searched, never a factor of the report;
:mod:`hardmix.config.acts`). Adding an optimiser is one :func:`register_optimizer` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from hardmix.errors import ConfigError

__all__ = ["Optimizer", "OPTIMIZERS", "register_optimizer", "optimizer_reads", "check_optim",
           "check_betas", "build_optimizer"]


@dataclass(frozen=True)
class Optimizer:
    name: str
    description: str
    #: ``(parameters, optim config) -> torch.optim.Optimizer``
    build: Callable[[Iterable[Any], Any], Any]
    #: ``optim.*`` fields (without the prefix) only this optimiser reads.
    reads: tuple[str, ...] = ()
    #: Rules between its fields: ``check(optim config, prefix)`` raises ConfigError.
    check: Optional[Callable[[Any, str], None]] = None


OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(entry: Optimizer) -> Optimizer:
    OPTIMIZERS[entry.name] = entry
    return entry


def _sgd(params: Iterable[Any], o: Any) -> Any:
    import torch

    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)


def _check_sgd(o: Any, prefix: str) -> None:
    if o.nesterov and o.momentum == 0:
        raise ConfigError(f"{prefix}nesterov", o.nesterov,
                          f"needs {prefix}momentum > 0 (or set {prefix}nesterov=false)")


def _adamw(params: Iterable[Any], o: Any) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=o.lr, betas=(float(o.betas[0]), float(o.betas[1])),
                             eps=o.eps, weight_decay=o.weight_decay)


register_optimizer(Optimizer("sgd", "SGD with (Nesterov) momentum, L2 weight decay (the paper)",
                             _sgd, ("momentum", "nesterov"), _check_sgd))
register_optimizer(Optimizer("adamw", "AdamW: Adam with decoupled weight decay", _adamw,
                             ("betas", "eps")))


def optimizer_reads(name: object) -> tuple[str, ...] | None:
    """The ``optim.*`` fields only optimiser ``name`` reads; None for a name not registered."""
    entry = OPTIMIZERS.get(name) if isinstance(name, str) else None
    return entry.reads if entry is not None else None


def check_betas(value: Any, path: str) -> None:
    """``optim.betas``: two numbers in [0, 1)."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                       for b in value)):
        raise ConfigError(path, value, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")


def check_optim(o: Any, prefix: str = "optim.") -> None:
    """The rules between the fields of the chosen optimiser (only its own fields: the others
    are inert)."""
    entry = OPTIMIZERS.get(o.name)
    if entry is None:
        raise ConfigError(f"{prefix}name", o.name, f"must be one of {', '.join(OPTIMIZERS)}")
    if entry.check is not None:
        entry.check(o, prefix)


def build_optimizer(params: Iterable[Any], o: Any) -> Any:
    """The torch optimiser ``o.name`` over ``params``, configured from ``o`` (an OptimConfig)."""
    check_optim(o)
    return OPTIMIZERS[o.name].build(params, o)
