"""A trial's checkpoints and run folder across attempts and machines: the attempt counter, the
run's checkpoint packed into a Ray checkpoint and put back where the run wrote it, the newest
checkpoint a trial left in the sweep's storage (what a resumed trial continues from), and the
copy of a node-local run folder into the storage (:class:`RunFolderSync`).

Every path read back from storage is checked before it is joined
(:func:`ablations.storage.safe_relpath`); files are written atomically through
:mod:`ablations.storage`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ablations import storage
from ablations.storage import safe_relpath
from hardmix.config import RunConfig
from hardmix.metrics import Callback

#: Files a trial keeps in its run folder across attempts.
ATTEMPT_FILE = "attempt.json"
CKPT_META = "hardmix_checkpoint.json"


def next_attempt(run_dir: Path, checkpoint_dir: str | None) -> int:
    """1 + the attempts recorded so far (in the run folder and in the restored checkpoint)."""
    seen = 0
    for source in (run_dir / ATTEMPT_FILE, Path(checkpoint_dir or "/nonexistent") / CKPT_META):
        try:
            seen = max(seen, int(json.loads(source.read_text()).get("attempt", 0)))
        except (OSError, ValueError, TypeError):
            pass
    attempt = seen + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(str(run_dir / ATTEMPT_FILE), json.dumps({"attempt": attempt}))
    return attempt


def restore_checkpoint(checkpoint_dir: str | None, run_dir: Path) -> bool:
    """Put a Ray checkpoint's run checkpoint back where the run wrote it; True if there was one.

    Without one, the run folder is emptied (but for the attempt counter): a fresh start must not
    mix its logs and checkpoints with those of a killed attempt.
    """
    meta_file = Path(checkpoint_dir) / CKPT_META if checkpoint_dir else None
    if meta_file is not None and meta_file.is_file():
        meta = json.loads(meta_file.read_text())  # from storage: checked before it is used
        name = safe_relpath(meta.get("file"), "checkpoint file")
        if "/" in name:
            raise ValueError(f"checkpoint file {name!r} is not a plain file name")
        rel = safe_relpath(meta.get("relpath"))
        target = (run_dir / rel).resolve()
        if run_dir.resolve() not in target.parents:
            raise ValueError(f"checkpoint relpath {rel!r} leaves the run folder")
        storage.copy_file(Path(checkpoint_dir) / name, str(target))
        return True
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name == ATTEMPT_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return False


def pack_checkpoint(checkpoint: str, run_dir: Path, folder: Path, attempt: int,
                     epoch: int) -> None:
    """Fill ``folder`` (a fresh temporary folder) with the run's checkpoint file and where it
    goes back to. A hard link where possible: Ray copies the folder into storage anyway."""
    src = Path(checkpoint)
    try:
        rel = src.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        rel = src.name
    try:
        os.link(src, folder / src.name)
    except OSError:
        shutil.copyfile(src, folder / src.name)
    (folder / CKPT_META).write_text(json.dumps(
        {"file": src.name, "relpath": rel, "attempt": attempt, "epoch": epoch}))


def stored_checkpoint(sweep_dir: str, trial_id: str) -> Optional[str]:
    """The newest Ray checkpoint of ``trial_id`` anywhere in the sweep's Tune folders
    (``tune*/<trial>/checkpoint_*``), copied into a local temporary folder; None if there is
    none. For sweeps whose run folders live in URI storage (with local run folders the run's
    own ``checkpoints/last.pt`` is newer)."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(sweep_dir)
    best: tuple[int, str] | None = None
    for phase in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if phase.type != pafs.FileType.Directory or not phase.base_name.startswith("tune"):
            continue
        trial_dir = f"{phase.path}/{trial_id}"
        for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                with fs.open_input_stream(f"{info.path}/{CKPT_META}") as f:
                    meta = json.loads(f.read().decode())
                epoch = int(meta.get("epoch", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if best is None or epoch > best[0]:
                best = (epoch, info.path)
    if best is None:
        return None
    local = tempfile.mkdtemp(prefix="hardmix-resume-")
    for info in fs.get_file_info(pafs.FileSelector(best[1])):
        if info.type == pafs.FileType.File and "/" not in info.base_name:
            with fs.open_input_stream(info.path) as src, \
                    open(os.path.join(local, info.base_name), "wb") as dst:
                dst.write(src.read())
    return local


class RunFolderSync(Callback):
    """Copies a run folder written on this node (``local``) into the sweep's storage
    (``remote``, a path or URI: ``<sweep>/runs/<trial>``) through the storage's filesystem:
    the files that changed since the last copy, when the run starts, after every epoch and at
    the end. A data-parallel trial's rank 0 may run on any node, and a node the autoscaler
    removes takes its disk with it."""

    def __init__(self, local: Path, remote: str):
        self.local, self.remote = Path(local), remote
        self.copied: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)

    def clear_remote(self) -> None:
        """A fresh start: drop what a killed attempt left in the storage (as a local run
        folder is emptied)."""
        storage.clear_folder(self.remote)

    def sync(self) -> int:
        """Copy what changed; the number of files copied."""
        if not self.local.is_dir():
            return 0
        n = 0
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if rel.startswith(".") or "/." in rel:  # temporary files of atomic writes
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced while we looked
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self.copied.get(rel) == stamp:
                continue
            try:
                storage.copy_file(path, storage.join(self.remote, *rel.split("/")))
            except FileNotFoundError:  # replaced while we copied: the next sync takes it
                continue
            self.copied[rel] = stamp
            n += 1
        return n

    def on_run_start(self, cfg: RunConfig, info: dict) -> None:
        self.sync()  # config.yaml and run.json

    def on_epoch_end(self, metrics: dict, checkpoint: str | None = None) -> None:
        self.sync()

    def on_run_end(self, summary: dict) -> None:
        self.sync()
