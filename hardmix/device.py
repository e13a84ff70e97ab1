"""Where a run computes: its device (``run.device``, or the one a launcher assigned), its rank
in a data-parallel group, and its numeric precision (``optim.amp``, ``optim.channels_last``)
from the device's hardware facts. Imported by the training loop and, for the environment
check of a forced precision, by :mod:`hardmix.config.environment`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from hardmix.config.schema import PRECISIONS, OptimConfig
from hardmix.errors import ConfigError


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str, assigned: Optional[torch.device] = None) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU.

    ``assigned``: the device the launcher gave this process -- under Ray Train
    ``ray.train.torch.get_device()``, which ``tune`` passes in: the GPU Ray assigned, at
    whatever index of the visible ones it has (a rank's ``LOCAL_RANK`` need not be it). Without
    one (torchrun, a plain process), ``LOCAL_RANK`` picks the GPU where it is visible, else the
    current device."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is available here; use auto or cpu")
    if assigned is not None and assigned.type != "cuda":
        if name == "cuda":
            raise ConfigError("device", name, "this Ray Train worker was given no GPU: set "
                              "resources.gpus >= 1, or device=auto or cpu")
        return torch.device("cpu")
    if assigned is not None:
        index = assigned.index if assigned.index is not None else torch.cuda.current_device()
    else:
        local = int(os.environ.get("LOCAL_RANK", "-1"))
        index = local if 0 <= local < torch.cuda.device_count() else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cpu_bf16_native(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether this CPU computes bf16 in hardware, and what said so.

    x86: the ``avx512_bf16`` or ``amx_bf16`` flags; Arm: ``bf16`` in /proc/cpuinfo's features.
    Elsewhere (no /proc/cpuinfo) the answer is no: emulated bf16 is slower than fp32.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
                    if found:
                        return True, f"CPU flags {', '.join(found)}"
                    return False, "this CPU has no native bf16 (no avx512_bf16/amx_bf16/bf16 flag)"
    except OSError:
        pass
    return False, "cannot read /proc/cpuinfo to detect native bf16"


#: CUDA compute capability from which bf16 runs natively (Ampere); below it
#: ``torch.cuda.is_bf16_supported()`` may still say True, by emulation (V100, T4).
CUDA_BF16_CAPABILITY = (8, 0)


#: CUDA compute capability from which fp16 has tensor cores (Volta): ``auto`` picks fp16 there.
CUDA_FP16_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Precision:
    """The run's numeric policy: autocast dtype (None = fp32), whether a GradScaler guards fp16
    gradients, memory format, and what ran and why (``note``, the run row's ``precision``)."""

    device_type: str
    dtype: Optional[torch.dtype]
    channels_last: bool
    note: str
    scaler: bool = False

    def autocast(self):
        """A fresh autocast context (loss, softmax and BatchNorm statistics stay fp32, as
        autocast arranges; parameters and optimizer state are fp32 throughout)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """A fresh ``torch.amp.GradScaler`` for fp16, else None (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device_type) if self.scaler else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def kind(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``: the arithmetic the autocast regions run in (what a
        device's peak FLOP/s is looked up for, :mod:`hardmix.throughput`)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")


def device_precision(device: torch.device) -> tuple[bool, bool, str]:
    """``(native bf16, fp16 tensor cores, why)`` of a device, from its hardware facts: the
    CUDA compute capability (not ``is_bf16_supported()``, which counts emulation), the CPU's
    flags."""
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        why = f"CUDA compute capability {cc[0]}.{cc[1]}"
        return tuple(cc) >= CUDA_BF16_CAPABILITY, tuple(cc) >= CUDA_FP16_CAPABILITY, why
    if device.type == "cpu":
        native, why = cpu_bf16_native()
        return native, False, why
    return False, False, f"no precision policy for {device.type}"


def precision_policy(o: OptimConfig, device: torch.device) -> Precision:
    """What ``optim.amp`` runs on ``device``, and channels_last where asked
    (``optim.channels_last``).

    ``auto``: bf16 autocast where the device computes bf16 natively (CUDA compute capability
    >= 8.0, CPUs with native bf16), fp16 autocast + GradScaler on CUDA GPUs with fp16 tensor
    cores but no native bf16 (7.x: V100, T4), fp32 elsewhere. ``bf16`` and ``fp16`` force it and
    raise ConfigError where the device lacks it natively (emulated bf16 is slower than fp32 and
    CPUs have no fp16 path worth taking); ``fp32`` never autocasts.
    """
    if o.amp == "fp32":  # no hardware facts needed (nor read: a CUDA query on a CPU host)
        return choose_precision(o, device.type, False, False, "")
    return choose_precision(o, device.type, *device_precision(device))


def choose_precision(o: OptimConfig, device_type: str, bf16: bool, fp16: bool,
                     why: str) -> Precision:
    """:func:`precision_policy` from a device's facts (native bf16, fp16 tensor cores, what
    said so) rather than the device itself: the dry run asks it of a GPU it names but does
    not have (:mod:`hardmix.throughput`)."""
    amp = o.amp
    if amp not in PRECISIONS:
        raise ConfigError("optim.amp", amp, f"must be one of {', '.join(PRECISIONS)}")
    layout = "channels_last" if o.channels_last else "contiguous"
    policy = lambda dtype, note, scaler=False: Precision(device_type, dtype, o.channels_last,
                                                          f"{note}, {layout}", scaler)
    if amp == "fp32":
        return policy(None, "fp32 (optim.amp=fp32)")
    if amp == "bf16" and not bf16:
        raise ConfigError("optim.amp", amp, f"needs native bf16 and this device has none "
                          f"({why}; bf16 needs CUDA compute capability >= 8.0 or a CPU with "
                          "avx512_bf16/amx_bf16): use auto, fp16 (CUDA) or fp32")
    if amp == "fp16" and device_type != "cuda":
        raise ConfigError("optim.amp", amp, f"needs a CUDA device, not {device_type} (a CPU "
                          "computes fp16 by emulation): use auto, bf16 or fp32")
    if amp in ("auto", "bf16") and bf16:
        return policy(torch.bfloat16, f"bf16 autocast ({why})")
    if amp == "fp16" or fp16:
        return policy(torch.float16, f"fp16 autocast + GradScaler ({why}"
                      + ("" if bf16 or amp == "fp16" else ": no native bf16") + ")", True)
    return policy(None, f"fp32 ({why})")
