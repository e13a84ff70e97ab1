"""How a report names places: never by a machine's absolute path.

A report is committed, shared and read elsewhere, so the folders of the machine that wrote it
mean nothing there and should not leak. :func:`shown_path` names a sweep relative to the working
folder, or to the report's own folder, or by its folder name; :func:`shown_text` does the same
for every absolute path inside free text (a failed trial's error); :func:`data_labels` names a
trial's ``data.path`` by its file (or folder) name and the content hash the run recorded
(``data_sha256``), which identifies the data wherever the file lay.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from typing import Optional

import pandas as pd

from ablations.storage import is_uri

#: Hex digits of the data file's SHA-256 a report shows (the store keeps all 64).
SHORT_HASH = 12


def _is_uri(path: str) -> bool:
    """A URI of a remote store; ``file://`` names a local path like any other."""
    return is_uri(path) and not path.startswith("file://")


def shown_path(path: str, out: Optional[str] = None, cwd: Optional[str] = None) -> str:
    """``path`` as a report prints it. A URI (``s3://bucket/x``) names no machine and stays as
    given. A local path is shown relative to the working folder ``cwd`` (default: the current
    one) when it lies under it; else relative to the report's folder ``out`` when one of the two
    holds the other (``..`` for the default ``<sweep>/report``); else by its own folder name."""
    path = str(path)
    if _is_uri(path):
        return path
    path = path.removeprefix("file://")
    here = os.path.abspath(cwd or os.getcwd())
    target = os.path.abspath(os.path.join(here, os.path.expanduser(path)))
    if _under(target, here) and here != os.path.dirname(here):  # not relative to "/"
        return os.path.relpath(target, here)
    if out is not None and not _is_uri(str(out)):
        folder = os.path.abspath(os.path.join(here, str(out).removeprefix("file://")))
        if _under(target, folder) or _under(folder, target):
            return os.path.relpath(target, folder)
    return os.path.basename(target.rstrip(os.sep)) or target


def _under(path: str, folder: str) -> bool:
    """Is ``path`` ``folder`` or inside it (both absolute)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


#: An absolute POSIX path inside text: a ``/`` that starts a word (not ``a/b``, not the
#: ``//`` of a URI), up to a space, quote or bracket.
_ABSOLUTE = re.compile(r"(?<![\w.~:/\\-])/[^\s'\"`,;:()\[\]{}<>|*]+")


def shown_text(text: str, out: Optional[str] = None, cwd: Optional[str] = None) -> str:
    """``text`` with every absolute path in it shown as :func:`shown_path` shows a path."""
    if not isinstance(text, str) or "/" not in text:
        return text
    return _ABSOLUTE.sub(lambda m: shown_path(m.group(0), out, cwd), text)


def data_label(path: Optional[str], sha256: Optional[str]) -> Optional[str]:
    """``cifar10.npz (sha256 0123456789ab)``: the data file's name and the first
    :data:`SHORT_HASH` hex digits of its content hash; a folder (or a file whose hash was not
    recorded) by its name alone; None where no path was set."""
    if path is None or (isinstance(path, float) and path != path) or not str(path).strip():
        return None
    name = PurePosixPath(str(path).replace("\\", "/").rstrip("/")).name or str(path)
    return f"{name} (sha256 {sha256[:SHORT_HASH]})" if sha256 else name


def data_labels(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with ``data.path`` replaced by :func:`data_label` of each row.

    A row written before runs recorded the hash (NULL ``data_sha256``) takes the one hash the
    other rows of the same path recorded, when they all agree: a sweep whose later trials ran
    newer code must not split its variants on a bookkeeping column. Paths whose rows recorded
    different hashes (the file changed during the sweep) keep each row's own, and rows without
    one show the name alone."""
    if "data.path" not in trials.columns:
        return trials
    out = trials.copy()
    hashes = (out["data_sha256"] if "data_sha256" in out.columns
              else pd.Series(None, index=out.index, dtype=object))
    known = pd.DataFrame({"path": out["data.path"], "sha": hashes}).dropna()
    only = {p: s.iloc[0] for p, s in known.groupby("path")["sha"] if s.nunique() == 1}
    out["data.path"] = [
        data_label(p, h if isinstance(h, str) and h else only.get(p))
        for p, h in zip(out["data.path"], hashes)]
    return out
