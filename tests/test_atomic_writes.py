"""Writes that must stay atomic when the write itself fails, and durable before they appear.

A checkpoint (:func:`hardmix.checkpoint.atomic_write_bytes`) and a results file
(:meth:`ablations.store.ResultStore.write_trial`) are written to a hidden temporary file, flushed
and fsynced, and only then renamed into place (the store also fsyncs the folder after the
rename). Here the disk fails in the middle of the write (ENOSPC after half the bytes) or at the
fsync (EIO): the error reaches the caller, the file that was there before is intact, no
temporary file is left, and no reader sees a partial file. The order is checked on the real
calls: at the fsync, the descriptor is the temporary file with every byte written and nothing
is published yet; the rename comes after it.
"""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import hardmix.checkpoint as ckpt
from ablations.store import ResultStore, read_results
from hardmix.config import ConfigError


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class HalfWrite(io.RawIOBase):
    """A file whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(bytes(b)[: max(1, len(b) // 2)])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_checkpoint_write_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "run" / "checkpoints" / "last.pt"  # folders made on the way
    data = os.urandom(1000)  # under the file buffer: only a flush puts it on the disk
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", fd_path(fd), os.fstat(fd).st_size, target.exists()))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.atomic_write_bytes(target, data)
    assert target.read_bytes() == data
    (sync, tmp, size, published), (rename, src, dst) = events
    assert sync == "fsync" and rename == "replace"
    assert Path(tmp).parent == target.parent and Path(tmp).name.startswith(".last.pt.")
    assert size == len(data) and not published  # every byte on disk, nothing published yet
    assert src == tmp and dst == str(target)
    assert visible(target.parent) == ["last.pt"]


@pytest.mark.parametrize("failure", ["write", "fsync", "replace"])
def test_a_failed_checkpoint_write_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path, monkeypatch, failure):
    target = tmp_path / "last.pt"
    ckpt.save_checkpoint(target, {"model": {"w": torch.ones(2)}, "config": {}, "epoch": 1})
    old = target.read_bytes()
    if failure == "write":
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWrite(real(fd, mode)))
    elif failure == "fsync":
        def eio(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", eio)
    else:
        def refuse(src, dst):
            raise OSError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(target, {"model": {"w": torch.zeros(2)}, "config": {}, "epoch": 2})
    monkeypatch.undo()
    assert target.read_bytes() == old and visible(tmp_path) == ["last.pt"]
    assert ckpt.load_checkpoint(target)["epoch"] == 1
    # an interrupt is not swallowed either, and cleans up the same way
    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == old and visible(tmp_path) == ["last.pt"]


def test_a_partial_or_foreign_checkpoint_is_refused_with_one_line(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.save_checkpoint(good, {"model": {}, "config": {"seed": 3}, "epoch": 4})
    assert ckpt.load_checkpoint(good)["config"] == {"seed": 3}
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    for path in (cut, foreign, listed, tmp_path / "missing.pt", tmp_path):
        with pytest.raises(ConfigError) as err:
            ckpt.load_checkpoint(path)
        assert err.value.field == "checkpoint" and "\n" not in str(err.value)
        # a path that is no file is told what is expected; a file, why it cannot be used
        assert ("last.pt" in err.value.allowed) == (not path.is_file()), path
        assert "()" not in err.value.allowed, err.value  # the reason is never left empty


class RunsCode:
    """Unpickling calls ``fn(*args)``: either would leave ``marker`` behind."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    for payload in (RunsCode(Path.touch, marker), RunsCode(os.system, f"touch {marker}")):
        evil = tmp_path / "evil.pt"
        torch.save({"model": {}, "config": {}, "payload": payload}, evil)
        with pytest.raises(ConfigError) as err:
            ckpt.load_checkpoint(evil)
        assert not marker.exists()
        # the one line names the global it refused, not torch's advice to load unsafely
        assert "GLOBAL" in err.value.allowed and "False" not in err.value.allowed, err.value


def test_rng_state_round_trips_every_generator():
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    state = ckpt.rng_state()
    # CUDA generators are saved only where CUDA runs (a CPU checkpoint carries none)
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    buf = io.BytesIO()
    torch.save(state, buf)  # as a checkpoint holds it
    buf.seek(0)
    ckpt.set_rng_state(torch.load(buf, weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


# --------------------------------------------------------------------------------------------
# The results store
# --------------------------------------------------------------------------------------------

ROW = {"trial_id": "c000-s0", "status": "completed", "seed": 0}


def trial_folder(store: ResultStore) -> Path:
    return Path(store.folder("trials"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_results_file_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path / "sweep"))
    events = []
    real = os.fsync

    def fsync(fd):
        path = fd_path(fd)
        folder = trial_folder(store)
        published = [p for p in folder.iterdir() if not p.name.startswith(".")]
        events.append((path, os.fstat(fd).st_size if os.path.isfile(path) else None,
                       len(published)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = store.write_trial(ROW)
    (file_path, size, before), (dir_path, _, after) = events
    assert Path(file_path).name.startswith(".") and file_path.endswith(".tmp")
    assert size == Path(final).stat().st_size and before == 0  # all bytes, not yet published
    assert dir_path == str(trial_folder(store)) and after == 1  # the rename, then the folder
    assert [p.name for p in trial_folder(store).iterdir()] == [Path(final).name]


@pytest.mark.parametrize("failure", ["write", "fsync"])
def test_a_failed_results_write_publishes_nothing_and_cleans_up(tmp_path, monkeypatch, failure):
    sweep = tmp_path / "sweep"
    store = ResultStore(str(sweep))
    store.write_trial(ROW)
    if failure == "write":
        real = pq.write_table

        def half(table, where, **kw):
            buf = io.BytesIO()
            real(table, buf, **kw)
            where.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(pq, "write_table", half)
    else:
        def eio(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        ResultStore(str(sweep)).write_trial({**ROW, "trial_id": "c001-s0"})
    monkeypatch.undo()
    files = visible(trial_folder(store))
    assert len(files) == 1 and not any(f.startswith(".") for f in files)
    assert read_results(str(sweep)).trials.column("trial_id").to_pylist() == ["c000-s0"]


def test_leftovers_of_killed_writers_are_removed_once_stale_and_only_then(tmp_path):
    store = ResultStore(str(tmp_path / "sweep"))
    store.write_trial(ROW)
    folder = trial_folder(store)
    stale, fresh = folder / ".dead.parquet.tmp", folder / ".live.parquet.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"PAR1 half")
    now = time.time()
    os.utime(stale, (now - 86400,) * 2)  # a writer killed yesterday
    os.utime(fresh, (now - 5,) * 2)  # a live writer's file
    ResultStore(str(tmp_path / "sweep")).write_trial({**ROW, "trial_id": "c001-s0"})
    names = visible(folder)
    assert ".dead.parquet.tmp" not in names and ".live.parquet.tmp" in names
    assert len([n for n in names if not n.startswith(".")]) == 2
    assert sorted(read_results(str(tmp_path / "sweep")).trials.column("trial_id").to_pylist()) \
        == ["c000-s0", "c001-s0"]


# --------------------------------------------------------------------------------------------
# The storage layer under both (ablations.storage)
# --------------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_atomic_writes_leave_no_descriptor_open(tmp_path):
    from ablations import storage

    storage.write_text(str(tmp_path / "warm.txt"), "x")
    before = open_fds()
    for i in range(20):
        storage.write_text(str(tmp_path / f"f{i}.txt"), "hello")
        ResultStore(str(tmp_path / "s")).write_trial({**ROW, "trial_id": f"c{i:03d}-s0"})
    assert open_fds() == before


def test_stale_temporaries_are_counted_and_only_hidden_tmp_files_go(tmp_path):
    import pyarrow.fs as pafs

    from ablations import storage

    old = time.time() - 3600
    names = [".a.parquet.tmp", ".b.tmp", "c.tmp", ".d.parquet", "e.parquet", ".fresh.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
        if n != ".fresh.tmp":
            os.utime(tmp_path / n, (old, old))
    (tmp_path / ".dir.tmp").mkdir()
    os.utime(tmp_path / ".dir.tmp", (old, old))
    fs = pafs.LocalFileSystem()
    assert storage.remove_stale_temporaries(fs, str(tmp_path), older_than=600) == 2
    assert sorted(visible(tmp_path)) == sorted([".dir.tmp", "c.tmp", ".d.parquet", "e.parquet",
                                                ".fresh.tmp"])
    assert storage.remove_stale_temporaries(fs, str(tmp_path), older_than=600) == 0
    assert storage.remove_stale_temporaries(fs, str(tmp_path / "missing")) == 0
    assert storage.remove_stale_temporaries(fs, str(tmp_path), older_than=-1) == 1  # the fresh


def test_a_sub_tree_of_a_local_disk_is_written_through_a_rename(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from ablations import storage

    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert storage.renames_atomically(sub) and storage.renames_atomically(pafs.LocalFileSystem())
    assert storage.local_path(sub, "/a/b.txt") == f"{tmp_path}/a/b.txt"
    moves = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: moves.append(fd_path(fd)) or real(fd))
    path = storage.publish(sub, "out", "f.txt", lambda sink: sink.write(b"data"))
    assert path == "out/f.txt" and (tmp_path / "out" / "f.txt").read_bytes() == b"data"
    assert moves and moves[0].endswith(".tmp")  # fsynced under its temporary name first
    assert storage.split("s3://bucket/a/b") == ("s3://bucket/a", "b")
    assert storage.split(str(tmp_path / "x" / "y")) == (str(tmp_path / "x"), "y")
    fs, inner = storage.resolve(str(tmp_path) + "/")
    assert isinstance(fs, pafs.LocalFileSystem) and inner == str(tmp_path)
    given = pafs.LocalFileSystem()
    assert storage.resolve("/x/y/", given) == (given, "/x/y")
