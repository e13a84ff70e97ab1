"""Where sweep files live, and how they are written so that no reader ever sees half of one.

A location is a local path (``~`` expanded, made absolute) or a pyarrow filesystem URI
(``s3://bucket/sweeps/name``, ``gs://...``, ``file:///...``, ``hdfs://...``);
:func:`resolve` turns either into ``(filesystem, path inside it)``. Everything that reads or
writes a sweep folder goes through this module: the results store (:mod:`ablations.store`),
the sweep's own files (``sweep.yaml``, ``sweep_state.json``, ``followup.json``), resume, the
copies of a trial's run folder and checkpoints, export and compaction.

Atomic writes, and what each kind of storage guarantees:

* **local and network disks** (a path, or ``file://``): the bytes go to a hidden temporary
  file in the target's folder (``.<name>.<random>.tmp``: every Parquet dataset reader and
  :func:`ablations.store.read_results` skip names that start with ``.``), are fsynced, and the
  file is renamed into place (``rename`` is atomic on POSIX), then the folder is fsynced so
  the new name survives a crash. A writer killed at any point leaves at most a hidden
  temporary file, which later writers remove once it is old (:data:`STALE_TMP_SECONDS`).
* **object stores** (S3, GCS, and S3-compatible servers such as MinIO): there is no rename
  (pyarrow implements ``move`` as copy + delete, which a kill can cut in half), so the bytes
  are serialised in memory first and sent as **one put**; a put is atomic per object: readers
  see the whole object or none, and a writer killed before the put completes leaves nothing.
  There are no folders either (a "folder" is a key prefix; pyarrow may add empty marker
  objects), listing is consistent on S3 since 2020 and on GCS, and nothing is ever appended or
  rewritten in place, so two writers never need to coordinate: the store gives every file a
  unique name, and the sweep's own small files have one writer (the driver).

fsync has no meaning on an object store; a completed put is durable.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from hardmix.errors import ConfigError

#: A writer's temporary file older than this belongs to a killed writer.
STALE_TMP_SECONDS = 600.0


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    """A filesystem URI (``scheme://...``), not a local path."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI as it is."""
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path (the OS's separator) or a URI (``/``)."""
    if is_uri(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return os.path.join(root, *parts)


def split(location: str) -> tuple[str, str]:
    """``(parent, last name)`` of a local path or a URI."""
    location = str(location)
    if is_uri(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        return parent, name
    return os.path.split(location.rstrip(os.sep))


def resolve(path: str, filesystem: Optional[pafs.FileSystem] = None
            ) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` of a local path or a URI; ``filesystem`` overrides the
    one the URI would pick (tests, custom credentials). A URI pyarrow cannot open raises
    ConfigError (one line)."""
    path = str(path)
    if filesystem is not None:
        return filesystem, path.rstrip("/")
    if is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ConfigError("path", path, f"is not a usable filesystem URI ({exc})") from None
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), absolute(path)


def renames_atomically(fs: pafs.FileSystem) -> bool:
    """Rename is an atomic metadata operation (local and network disks); object stores
    rename by copy + delete, so they get one put instead."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        return renames_atomically(fs.base_fs)
    return isinstance(fs, pafs.LocalFileSystem)


def local_path(fs: pafs.FileSystem, path: str) -> Optional[str]:
    """The OS path of ``path`` when ``fs`` is a local filesystem (None elsewhere)."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        return local_path(fs.base_fs, fs.base_path.rstrip("/") + "/" + path.lstrip("/"))
    return path if isinstance(fs, pafs.LocalFileSystem) else None


def safe_relpath(relpath: Any, what: str = "checkpoint relpath") -> str:
    """A path read from storage, checked before it is joined: relative, normalised, inside
    its folder (no ``..``, no absolute path, no drive, no NUL). ValueError otherwise."""
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath or "\\" in relpath:
        raise ValueError(f"{what} {relpath!r} is not a plain relative path")
    norm = posixpath.normpath(relpath)
    if norm.startswith(("/", "..")) or posixpath.isabs(relpath) or ":" in norm.split("/")[0] \
            or any(part == ".." for part in norm.split("/")):
        raise ValueError(f"{what} {relpath!r} leaves its folder")
    return norm


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def fsync_file(f: Any) -> None:
    """Flush a local file object to the disk."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(folder: str) -> None:
    """Make a rename inside a local folder durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(name: str) -> str:
    """A hidden, unique sibling name for a file being written (readers skip it)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def publish(fs: pafs.FileSystem, folder: str, name: str, write: Any) -> str:
    """Write ``folder/name`` atomically; ``write(sink)`` writes the bytes into a file object.
    Locally: a hidden temporary file, fsynced, renamed into place, the folder fsynced. On an
    object store: serialised in memory, then one put. Returns the file's path in ``fs``."""
    final = f"{folder}/{name}"
    if not renames_atomically(fs):
        # Serialise fully first: closing a half-written stream would upload a partial object.
        sink = pa.BufferOutputStream()
        write(sink)
        data = sink.getvalue()
        with fs.open_output_stream(final) as out:
            out.write(data)
        return final
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/{temporary_name(name)}"
    local = local_path(fs, tmp)
    try:
        if local is not None:  # durable before it is published: fsync, then rename
            with open(local, "wb") as f:
                write(f)
                fsync_file(f)
        else:
            with fs.open_output_stream(tmp) as f:
                write(f)
        fs.move(tmp, final)
        if local is not None:
            fsync_dir(os.path.dirname(local))
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    return final


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file at a local path or URI atomically (see the module docstring)."""
    fs, inner = resolve(path)
    folder, _, name = inner.rpartition("/")
    publish(fs, folder, name, lambda sink: sink.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_parquet(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> str:
    """Publish ``table`` as the Parquet file ``folder/name`` atomically; its path."""
    import pyarrow.parquet as pq

    return publish(fs, folder, name, lambda sink: pq.write_table(table, sink))


def copy_file(source: str | Path, path: str) -> None:
    """Copy a local file to a local path or URI, atomically."""
    fs, inner = resolve(path)
    folder, _, name = inner.rpartition("/")
    with open(source, "rb") as src:
        publish(fs, folder, name, lambda sink: shutil.copyfileobj(src, sink, 1 << 20))


def clear_folder(path: str) -> None:
    """Delete what a folder holds (nothing when it does not exist)."""
    fs, inner = resolve(path)
    fs.delete_dir_contents(inner, missing_dir_ok=True)


def remove_stale_temporaries(fs: pafs.FileSystem, folder: str,
                             older_than: float = STALE_TMP_SECONDS) -> int:
    """Delete the temporary files killed writers left in ``folder`` (older than
    ``older_than`` seconds: a live writer's file is seconds old); how many went."""
    now = time.time()
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder))
    except (OSError, FileNotFoundError):
        return 0
    n = 0
    for info in infos:
        name = info.base_name
        if info.type != pafs.FileType.File or not (name.startswith(".") and
                                                   name.endswith(".tmp")):
            continue
        mtime = info.mtime.timestamp() if info.mtime is not None else now
        if now - mtime > older_than:
            try:
                fs.delete_file(info.path)
                n += 1
            except (OSError, FileNotFoundError):
                pass
    return n
