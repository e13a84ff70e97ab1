"""What a device can compute and what a run got out of it.

* :data:`ACCELERATORS`: the one table of accelerator peaks (dense FLOP/s per precision, from
  the vendors' datasheets; sparsity figures halved), keyed by ``--device-type`` names and
  matched against ``torch.cuda.get_device_name()``.
* :func:`cpu_matmul_flops`: this CPU's rate, measured (a short matrix product at the run's
  precision): CPU peaks vary too much with cores, clocks and vector units for a table.
* :func:`device_peak`, :func:`mfu`: a run's model-FLOP utilisation, its achieved FLOP/s over
  its device's peak (the ``mfu`` epoch metric: CUDA only, NULL elsewhere).

FLOPs are counted the way :func:`hardmix.models.forward_flops` counts them (2 per multiply-add
of the matrix products and convolutions), a training image as :data:`TRAIN_PASSES` forwards.
Nothing here imports torch at import time.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from hardmix.errors import ConfigError

__all__ = ["Accelerator", "ACCELERATORS", "DEFAULT_UTILISATION", "TRAIN_PASSES",
           "accelerator", "named_accelerator", "peak_of", "device_peak", "mfu",
           "training_flops", "cpu_matmul_flops"]

#: A training step costs about three forwards: the forward, and a backward of two (the
#: gradients of the activations and of the weights).
TRAIN_PASSES = 3

#: The share of a GPU's peak the dry run assumes a trial reaches when it cannot measure one.
#: Convolutional networks at CIFAR and ImageNet sizes use a GPU far less than large matrix
#: products do: ResNet-50 training at the mixed-precision throughput NVIDIA publishes for an
#: A100 (about 2,500-3,000 images/s, 24.6 GFLOP an image by this count) is 20-25% of its bf16
#: peak, and CIFAR-size convolutions at batch 128 are smaller still, more so against the
#: higher peaks of newer GPUs. An estimate, good to a factor of about two; a run's own ``mfu``
#: column is the measured figure.
DEFAULT_UTILISATION = 0.2

T = 1e12


@dataclass(frozen=True)
class Accelerator:
    """One accelerator: dense peak FLOP/s of its CUDA cores (``fp32``) and tensor cores
    (``tf32``, ``fp16`` and ``bf16`` with FP32 accumulation, as autocast runs them; None where
    it has none), its CUDA compute capability (which precision ``optim.amp=auto`` picks on it,
    :func:`hardmix.device.choose_precision`) and the datasheet the figures come from."""

    key: str
    title: str
    pattern: str  # regular expression over the normalised device name (:func:`normalise`)
    capability: tuple[int, int]
    fp32: float
    fp16: float
    bf16: Optional[float]
    tf32: Optional[float]
    source: str

    def peak(self, precision: str, tf32: bool = True) -> Optional[float]:
        """Peak FLOP/s at ``precision`` (``bf16``, ``fp16``, ``fp32``). fp32 counts against
        the TF32 tensor cores where there are some and ``tf32`` (cuDNN's default,
        ``torch.backends.cudnn.allow_tf32``: the convolutions run in TF32)."""
        if precision == "fp32":
            return self.tf32 if tf32 and self.tf32 else self.fp32
        return {"bf16": self.bf16, "fp16": self.fp16}[precision]


_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
_ADA = "NVIDIA Ada GPU architecture whitepaper v2.1 (appendix tables)"
#: Most specific pattern first: the first match wins.
ACCELERATORS: dict[str, Accelerator] = {a.key: a for a in (
    Accelerator("h200-nvl", "H200 NVL", r"\bh200 nvl\b", (9, 0), 60 * T, 835 * T, 835 * T,
                417.5 * T, _H200),
    Accelerator("h200", "H200 SXM", r"\bh200\b", (9, 0), 67 * T, 989.4 * T, 989.4 * T,
                494.7 * T, _H200),
    Accelerator("h100-nvl", "H100 NVL", r"\bh100 nvl\b", (9, 0), 60 * T, 835 * T, 835 * T,
                417.5 * T, _H100),
    Accelerator("h100-pcie", "H100 PCIe", r"\bh100\b.*\b(pcie|hbm2e)\b", (9, 0), 51.2 * T,
                756 * T, 756 * T, 378 * T, _H100),
    Accelerator("h100-sxm", "H100 SXM", r"\bh100\b", (9, 0), 66.9 * T, 989.4 * T, 989.4 * T,
                494.7 * T, _H100),
    Accelerator("a100", "A100 (SXM4 or PCIe, 40 or 80 GB: the same peaks)", r"\ba100\b",
                (8, 0), 19.5 * T, 312 * T, 312 * T, 156 * T, "NVIDIA A100 datasheet"),
    # NVIDIA publishes no datasheet for AWS's A10G: the A10's figures, which it is a variant of.
    Accelerator("a10g", "A10G (AWS g5; the A10's datasheet figures)", r"\ba10g\b", (8, 6),
                31.2 * T, 125 * T, 125 * T, 62.5 * T, "NVIDIA A10 datasheet"),
    Accelerator("a10", "A10", r"\ba10\b", (8, 6), 31.2 * T, 125 * T, 125 * T, 62.5 * T,
                "NVIDIA A10 datasheet"),
    Accelerator("l40s", "L40S", r"\bl40s\b", (8, 9), 91.6 * T, 362.05 * T, 362.05 * T,
                183 * T, "NVIDIA L40S datasheet"),
    Accelerator("l4", "L4", r"\bl4\b", (8, 9), 30.3 * T, 121 * T, 121 * T, 60 * T,
                "NVIDIA L4 datasheet"),
    Accelerator("v100-sxm2", "V100 SXM2", r"\bv100 sxm", (7, 0), 15.7 * T, 125 * T, None,
                None, "NVIDIA V100 datasheet"),
    Accelerator("v100-pcie", "V100 PCIe", r"\bv100 pcie", (7, 0), 14 * T, 112 * T, None,
                None, "NVIDIA V100 datasheet"),
    Accelerator("t4", "T4", r"\bt4\b", (7, 5), 8.1 * T, 65 * T, None, None,
                "NVIDIA T4 datasheet"),
    Accelerator("rtx-4090", "GeForce RTX 4090", r"\brtx 4090\b", (8, 9), 82.6 * T, 165.2 * T,
                165.2 * T, 82.6 * T, _ADA),
    Accelerator("rtx-3090", "GeForce RTX 3090", r"\brtx 3090\b(?! ti)", (8, 6), 35.6 * T,
                71 * T, 71 * T, 35.6 * T, "NVIDIA Ampere GA102 GPU architecture whitepaper"),
)}


def normalise(name: str) -> str:
    """``NVIDIA A100-SXM4-80GB`` -> ``nvidia a100 sxm4 80gb``: lower case, ``-``/``_`` as
    spaces, single spaces."""
    return " ".join(re.sub(r"[-_]", " ", name.lower()).split())


def accelerator(name: str) -> Optional[Accelerator]:
    """The table's entry for a key (``h100-sxm``) or a device name as torch reports it
    (``NVIDIA H100 80GB HBM3``); None when the table has none."""
    text = normalise(name)
    for acc in ACCELERATORS.values():
        if text == normalise(acc.key):
            return acc
    return next((acc for acc in ACCELERATORS.values() if re.search(acc.pattern, text)), None)


def named_accelerator(name: str, field: str = "--device-type") -> Accelerator:
    """:func:`accelerator`, or one ConfigError line listing the table's keys."""
    acc = accelerator(name) if name else None
    if acc is None:
        raise ConfigError(field, name, f"must be one of {', '.join(ACCELERATORS)} (or a device "
                                       "name as torch.cuda.get_device_name() gives it)")
    return acc


def peak_of(device_name: str, precision: str, tf32: bool = True) -> Optional[float]:
    """Peak FLOP/s of the named device at ``precision``; None when it is not in the table or
    has no such arithmetic."""
    acc = accelerator(device_name)
    return acc.peak(precision, tf32) if acc is not None else None


def device_peak(device: Any, precision: str) -> Optional[float]:
    """Peak FLOP/s of a run's ``torch.device`` at ``precision`` (``Precision.kind``): a CUDA
    device looked up by its name, None on the CPU and on devices not in the table."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return peak_of(torch.cuda.get_device_name(device), precision,
                   tf32=bool(torch.backends.cudnn.allow_tf32))


def mfu(flops_per_s: Optional[float], peak: Optional[float], devices: int = 1) -> Optional[float]:
    """Model-FLOP utilisation: achieved FLOP/s over the peak of the ``devices`` that achieved
    them (a data-parallel run's ranks); None without a peak."""
    if flops_per_s is None or not peak:
        return None
    return flops_per_s / (peak * max(1, devices))


def training_flops(per_image: float, images: float, extra_forwards: float = 0.0) -> float:
    """FLOPs of training on ``images`` images: :data:`TRAIN_PASSES` forwards each, plus
    ``extra_forwards`` no-grad forwards per image (HardMix's hardness forward on the steps it
    runs on: :func:`hardmix.methods.extra_forwards` x the share of mixed steps)."""
    return per_image * images * (TRAIN_PASSES + extra_forwards)


# --------------------------------------------------------------------------------------------
# Measured rates
# --------------------------------------------------------------------------------------------


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def cpu_matmul_flops(precision: str = "fp32", threads: Optional[int] = None,
                     seconds: float = 0.3, n: int = 512) -> float:
    """This CPU's measured FLOP/s of ``n x n`` matrix products at ``precision`` with
    ``threads`` torch threads (default: as set), the best of the products that fit in about
    ``seconds``: the CPU's row of the peak table, measured because CPU peaks vary."""
    import torch

    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        g = torch.Generator().manual_seed(0)  # its own generator: the global one is the run's
        a = torch.rand(n, n, generator=g).to(_dtype(precision))
        b = torch.rand(n, n, generator=g).to(_dtype(precision))
        a @ b  # warm-up: thread pool, packing buffers
        best, start = float("inf"), time.perf_counter()
        while best == float("inf") or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n ** 3 / max(best, 1e-9)
    finally:
        torch.set_num_threads(before)
