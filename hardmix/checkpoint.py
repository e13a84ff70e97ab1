"""Checkpoints of a run: atomic writes, ``weights_only=True`` loads, every random generator.

A checkpoint is one ``torch.save``d mapping of tensors and plain Python values (no pickled
classes), so :func:`load_checkpoint` can use ``torch.load(weights_only=True)``:

``model``, ``optimizer``, ``scheduler``, ``mix`` (HardMix's ``state_dict``: its generators and the
``cached`` hardness memory), ``rng`` (torch CPU and CUDA, NumPy, Python ``random``), ``epoch``
(last finished, 1-based), ``history`` (per-epoch metrics so far), ``wall_seconds``, ``config``
(the run config as a mapping), ``data`` (per-channel mean/std, classes, image shape) and
``versions``. The data order and crops need no saved state: they are a function of (seed, epoch)
(:func:`hardmix.data.epoch_seed`).

A checkpoint is device-independent: :func:`load_checkpoint` always loads to the CPU, so random
generator states stay the host ByteTensors that ``Generator.set_state`` requires, and the
restoring side moves each tensor to where it lives (``load_state_dict`` copies model and
optimizer tensors to their parameters' device; HardMix's memory goes where its model is). A run
written on a GPU resumes on a CPU and the other way round.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hardmix.config import ConfigError

LAST = "last.pt"
FOLDER = "checkpoints"


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run keeps its latest checkpoint: ``<run_dir>/checkpoints/last.pt``."""
    return Path(run_dir) / FOLDER / LAST


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save ``state`` atomically (serialised in memory, then temporary file + rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint to the CPU with ``weights_only=True`` (no arbitrary code runs on
    load). There is no ``map_location``: mapping everything to a GPU would also move the
    generator states there, which no generator accepts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("checkpoint", str(path), "must be a checkpoint file written by "
                                                   "`hardmix train` (<run>/checkpoints/last.pt)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # the line naming what was refused (torch < 2.6: "Unpickler error: Unsupported global";
        # later: "Trying to load unsupported GLOBAL ..."), not the advice to load unsafely
        why = next((ln for ln in lines if "Unpickler error" in ln or "unsupported GLOBAL" in ln),
                   lines[0] if lines else "")
        raise ConfigError("checkpoint", str(path), f"is not a readable hardmix checkpoint "
                                                   f"({why[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError("checkpoint", str(path), "is not a hardmix checkpoint (no model/config)")
    return state


def rng_state() -> dict[str, Any]:
    """Every global random generator's state, as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def host_bytes(state: torch.Tensor) -> torch.Tensor:
    """A generator state as the CPU ByteTensor ``Generator.set_state`` requires, wherever a
    caller's own ``torch.load(map_location=...)`` put it."""
    return state.detach().to("cpu", torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (states are read on the host wherever they are).
    The CUDA states restore on as many GPUs as both runs see; a CPU-only resume has none."""
    torch.set_rng_state(host_bytes(state["torch"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].detach().cpu().numpy().astype(np.uint32),
                         int(n["pos"]), int(n["has_gauss"]), float(n["gauss"])))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [host_bytes(s) for s in state["cuda"]][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
