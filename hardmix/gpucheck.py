"""Does torch see this node's GPUs? A cluster node's setup runs this before Ray starts on it.

    python -m hardmix.gpucheck

Prints one line and exits 0 when torch was built with CUDA, CUDA initialises, torch sees every
GPU device the node exposes (``/dev/nvidia<N>``; fewer means a driver/runtime mismatch or a
container started without them) and a tiny computation runs on each. Otherwise prints one line
that says what failed and exits 1, so that ``ray up`` stops at this node (cluster.yaml,
``worker_setup_commands``) instead of a trial failing later on a node without a working GPU.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_DEVICE_FILE = re.compile(r"nvidia\d+")


class GpuCheckError(RuntimeError):
    """The node's GPU is not usable from torch (the message is one line)."""


def devices_present(dev: str = "/dev") -> int:
    """How many NVIDIA GPU device files (``/dev/nvidia0``, ...) this node exposes."""
    try:
        return sum(1 for p in Path(dev).iterdir() if _DEVICE_FILE.fullmatch(p.name))
    except OSError:
        return 0


def check_gpus(expected: int | None = None) -> str:
    """One line describing the GPUs torch uses; raises :class:`GpuCheckError` when torch has no
    CUDA, CUDA fails to initialise, torch sees fewer than ``expected`` GPUs (default: the
    device files of :func:`devices_present`, at least one) or a GPU fails a computation."""
    import torch

    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        raise GpuCheckError(f"{build} is built without CUDA: install the CUDA build "
                            "(requirements-lock.txt, docker/Dockerfile)")
    build += f" (CUDA {torch.version.cuda})"
    if not torch.cuda.is_available():
        try:
            torch.cuda.init()  # the driver's own reason, e.g. a driver older than the runtime
            reason = "torch.cuda.is_available() is False"
        except Exception as exc:  # noqa: BLE001 - any failure here is the answer
            reason = " ".join(str(exc).split()) or type(exc).__name__
        raise GpuCheckError(f"{build} sees no GPU: {reason}")
    want = max(1, devices_present() if expected is None else expected)
    count = torch.cuda.device_count()
    if count < want:
        raise GpuCheckError(f"{build} sees {count} GPU(s) but this node has {want}")
    names = []
    for index in range(count):
        try:
            value = (torch.ones(1, device=f"cuda:{index}") * 2).sum().item()
        except Exception as exc:  # noqa: BLE001
            raise GpuCheckError(f"{build}: cuda:{index} fails a computation: "
                                f"{' '.join(str(exc).split())}") from None
        if value != 2.0:
            raise GpuCheckError(f"{build}: cuda:{index} computed 2 as {value}")
        names.append(torch.cuda.get_device_name(index))
    return f"{build} sees {count} GPU(s): {', '.join(names)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    expected = None
    if args[:1] == ["--expect"] and len(args) == 2 and args[1].isdigit():
        expected = int(args[1])
    elif args:
        print("usage: python -m hardmix.gpucheck [--expect N]", file=sys.stderr)
        return 2
    try:
        print(f"gpucheck: ok: {check_gpus(expected)}")
    except GpuCheckError as exc:
        print(f"gpucheck: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
