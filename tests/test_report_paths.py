"""A committed report names no machine's folders (#25).

Two real runs train on a tiny ``.npz`` at an absolute path and write through the real store;
a failed trial's error names that path and a corrupt file sits in the store. The report of
that sweep shows the sweep relative to the working folder (or by its name), the data file by its
name and the content hash the runs recorded (also in run.json), and no file it writes holds the
machine path. Rows written before the hash was recorded still read and report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ablations.paths import data_label, data_labels, shown_path, shown_text
from ablations.report import build_report
from ablations.store import ResultStore, StoreCallback, read_results
from hardmix.config import RunConfig, load_config
from hardmix.provenance import data_sha256, file_sha256
from hardmix.train import train
from results_fixtures import config, write_run


def _tiny_npz(path: Path) -> Path:
    rng = np.random.RandomState(0)
    path.parent.mkdir(parents=True)
    np.savez(path, x_train=rng.randint(0, 256, (48, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(48) % 3, x_test=rng.randint(0, 256, (12, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(12) % 3, label_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """``(machine folder, sweep folder, data file)``: two seeds trained on the data file, one
    failed trial whose error names it, one corrupt file."""
    base = tmp_path_factory.mktemp("machine").resolve()
    npz = _tiny_npz(base / "datasets" / "tiny.npz")
    root = base / "sweeps" / "tiny-sweep"
    store = ResultStore(str(root))
    for seed in (0, 1):
        cfg = load_config(RunConfig, None, None, [
            "data.name=npz", f"data.path={npz}", "data.batch_size=16", "data.val_size=0.25",
            "model.name=smallnet", "model.width=4", "optim.epochs=1", "output.progress=false",
            f"output.dir={base / 'runs'}", f"seed={seed}"])
        train(cfg, [StoreCallback(store, f"c000-s{seed}", cfg)], run_dir=base / "runs" / str(seed))
    write_run(store, "c001-s0", config(**{"data__path": str(npz)}), top1=None, status="failed",
              error=f"FileNotFoundError: [Errno 2] No such file or directory: '{npz}'")
    bad = root / "trials" / "sweep=tiny-sweep" / "broken.parquet"
    bad.write_bytes(b"not parquet")
    return base, root, npz


def _written(out: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("utf-8", "replace") for p in out.iterdir()}


def test_runs_record_their_data_files_content_hash(sweep):
    base, root, npz = sweep
    want = hashlib.sha256(npz.read_bytes()).hexdigest()
    trials, _ = read_results(str(root), on_corrupt="skip").to_pandas()
    ran = trials[trials["trial_id"].str.startswith("c000")]
    assert list(ran["data_sha256"]) == [want, want]
    assert json.loads((base / "runs" / "0" / "run.json").read_text())["data_sha256"] == want


def test_the_report_names_no_machine_path(sweep, tmp_path, monkeypatch):
    base, root, npz = sweep
    want = hashlib.sha256(npz.read_bytes()).hexdigest()[:12]
    out = tmp_path / "committed"
    monkeypatch.chdir(tmp_path)  # the sweep lies outside the working folder
    rep = build_report(str(root), out=str(out))
    files = _written(out)
    assert {"report.md", "settings.csv", "trials.csv", "left_out.csv",
            "skipped_files.csv", "main_table.csv"} <= set(files)
    for name, text in files.items():
        assert str(base) not in text and str(tmp_path) not in text, name
    assert "Source: `tiny-sweep`" in files["report.md"]
    assert f"data.path=tiny.npz (sha256 {want})" in files["report.md"]
    assert f"tiny.npz (sha256 {want})" in files["settings.csv"]
    assert "'tiny.npz'" in files["left_out.csv"]  # the error keeps the file's name
    assert "tiny-sweep/trials/sweep=tiny-sweep/broken.parquet" in files["skipped_files.csv"]
    assert rep.n_used == 2


def test_the_source_is_relative_to_the_working_folder_or_the_report(sweep, monkeypatch):
    base, root, _ = sweep
    monkeypatch.chdir(base)
    assert shown_path(str(root)) == "sweeps/tiny-sweep"
    assert shown_path(str(root), cwd="/") == "tiny-sweep"  # under "/" is no relative path
    assert shown_path(str(root), out=str(root / "report"), cwd=str(base / "runs")) == ".."
    assert shown_path(str(root), out="/elsewhere/out", cwd=str(base / "runs")) == "tiny-sweep"
    assert shown_path("s3://bucket/sweeps/x", out="/o") == "s3://bucket/sweeps/x"
    assert shown_path(f"file://{root}", cwd=str(base / "runs")) == "tiny-sweep"


def test_absolute_paths_in_text_are_shown_like_paths():
    text = "OSError: '/data/x/cifar.npz' missing; see s3://b/k and 3/4 (a/b)"
    assert shown_text(text, cwd="/work") == \
        "OSError: 'cifar.npz' missing; see s3://b/k and 3/4 (a/b)"
    assert shown_text("/work/sweeps/s failed", cwd="/work") == "sweeps/s failed"


def test_a_data_path_shows_as_its_name_and_hash():
    assert data_label("/m/d/cifar10.npz", "0123456789abcdef" * 4) == \
        "cifar10.npz (sha256 0123456789ab)"
    assert data_label("/m/imagenet/", None) == "imagenet"  # a folder: its name
    assert data_label(None, None) is None
    import pandas as pd

    # Rows without a hash (written before it was recorded) take the one the path's other rows
    # agree on, so a sweep upgraded mid-way does not split its variants; disagreeing hashes stay.
    rows = pd.DataFrame({"data.path": ["/a/d.npz", "/a/d.npz", "/b/e.npz", "/b/e.npz", "/b/e.npz"],
                         "data_sha256": ["1" * 64, None, "2" * 64, "3" * 64, None]})
    assert list(data_labels(rows)["data.path"]) == [
        "d.npz (sha256 111111111111)", "d.npz (sha256 111111111111)",
        "e.npz (sha256 222222222222)", "e.npz (sha256 333333333333)", "e.npz"]


def test_the_hash_is_streamed_and_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    from hardmix import provenance

    f = tmp_path / "d.npz"
    f.write_bytes(b"x" * (3 * provenance.HASH_CHUNK + 5))
    assert data_sha256(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert data_sha256(str(tmp_path)) is None and data_sha256(None) is None
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a) or real_open(*a, **k))
    file_sha256(f)
    assert reads == []  # cached: the same file is not read again
    f.write_bytes(b"y" * 10)
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) == hashlib.sha256(b"y" * 10).hexdigest() and reads


def test_rows_written_before_the_hash_column_still_read_and_report(tmp_path, monkeypatch):
    root = tmp_path / "old"
    store = ResultStore(str(root))
    for seed, err in enumerate([4.0, 4.2]):
        write_run(store, f"c000-s{seed}", config(seed=seed, data__path="/m/old.npz"), top1=err)
    for f in (root / "trials").rglob("*.parquet"):  # as an older hardmix wrote them
        table = pq.read_table(f)
        pq.write_table(table.drop_columns(["data_sha256"]), f)
    trials, _ = read_results(str(root)).to_pandas()
    assert trials["data_sha256"].isna().all()
    monkeypatch.chdir(tmp_path)
    rep = build_report(str(root), out=str(tmp_path / "out"))
    assert "data.path=old.npz," in rep.text and "Source: `old`" in rep.text
