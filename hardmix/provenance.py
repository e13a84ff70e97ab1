"""What a run records about the code and data that ran it: package versions, the hash of the
dependency lock it shipped with, the git commit (or the commit an image build baked in), and the
content hash of its data file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import hardmix


def versions() -> dict[str, str]:
    """Package versions stored with every run, and ``lock``: the SHA-256 of the dependency lock
    the code shipped with (:func:`lock_hash`)."""
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "hardmix": str(hardmix.__version__), "python": platform.python_version(),
            "numpy": str(np.__version__), "lock": lock_hash()}


#: The complete dependency lock of a cluster node (docker/Dockerfile installs it): in a source
#: tree beside the package, in an image's installed copy inside it (the build puts it there).
LOCK_FILE = "requirements-lock.txt"


#: Where an image build records the commit of the source it installed (docker/Dockerfile): an
#: installed copy has no ``.git`` to ask.
BUILD_COMMIT_FILE = "COMMIT"


def lock_hash() -> str:
    """``sha256sum`` of the dependency lock that ships with this code (:data:`LOCK_FILE`), or
    ``unknown`` where there is none."""
    here = Path(__file__).resolve().parent
    for path in (here / LOCK_FILE, here.parent / LOCK_FILE):
        if path.is_file():
            return file_sha256(path)
    return "unknown"


def _git(cwd: Path, *args: str) -> Optional[str]:
    """Output of ``git args`` in ``cwd``, or None when git fails or is absent."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """The commit of the hardmix code that runs.

    In a git checkout: ``git rev-parse HEAD``, plus ``+modified`` when the working tree differs
    from it (anything ``git status`` lists: changed, staged or new files; also when git cannot
    tell). Only a repository that tracks this package counts, not one the package happens to
    lie in (a venv inside another project). An installed copy without ``.git`` (the container
    image) answers with the commit its build recorded (:data:`BUILD_COMMIT_FILE`); else
    ``unknown``.
    """
    here = Path(__file__).resolve().parent
    if _git(here, "ls-files", "--error-unmatch", "__init__.py") is not None:
        sha = (_git(here, "rev-parse", "HEAD") or "").strip()
        if sha:
            # core.fileMode=false: an unpacked copy (a Ray job's working_dir) loses executable
            # bits, which changes no code.
            status = _git(here, "-c", "core.fileMode=false", "status", "--porcelain")
            return sha if status is not None and not status.strip() else f"{sha}+modified"
    baked = here / BUILD_COMMIT_FILE
    if baked.is_file():
        recorded = baked.read_text(encoding="utf-8", errors="replace").strip()
        if recorded:
            return recorded
    return "unknown"


#: Bytes read at a time when hashing a data file (a CIFAR-10 archive is ~170 MB: never all at once).
HASH_CHUNK = 1 << 20


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of the file at ``path``, read in :data:`HASH_CHUNK` pieces. Cached per (path,
    size, modification time): the trials of a sweep that share a worker process hash their data
    file once, and a file rewritten in place is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256sum`` of a file (hex), cached in this process while its size and modification
    time stay the same."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    st = os.stat(real)
    return _sha256_of(real, st.st_size, st.st_mtime_ns)


def data_sha256(path: Optional[str]) -> Optional[str]:
    """The content identity of a run's ``data.path``: the SHA-256 of the file it names (an
    ``.npz`` archive), so a result says which data it came from wherever the file lay; None for
    a folder (image folders, torchvision's CIFAR folder), no path, or a path that is not there
    (the data set's own check reports that)."""
    if not path or not os.path.isfile(os.path.expanduser(path)):
        return None
    return file_sha256(path)
