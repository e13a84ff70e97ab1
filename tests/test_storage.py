"""ablations.storage, the one way sweep files are read and written: local paths, ``file://`` URIs
and an S3-compatible server (moto's server mode, started here; skipped when moto is absent).

On each: text and Parquet files round-trip and are published whole; a writer process killed in
the middle of writing a file leaves nothing a reader sees; a writer killed in the middle of a
sweep, then resumed the way ``hardmix sweep --resume`` decides what is left (the finished
trials in the store, :mod:`tune.resume`), ends with every trial and every epoch row there
exactly once, before and after a compaction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ablations import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server on a free local port, and the environment that points pyarrow
    (here and in child processes) at it."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.stop()


@pytest.fixture(params=["path", "file", "s3"])
def location(request, tmp_path, monkeypatch):
    """A folder where sweeps go: a local path, a ``file://`` URI, or ``s3://`` on the server."""
    if request.param == "path":
        return str(tmp_path / "sweeps")
    if request.param == "file":
        return f"file://{tmp_path}/sweeps"
    env = request.getfixturevalue("s3_server")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"].split("://")[1], scheme="http",
                      region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}/sweeps"


def listing(location: str) -> list[str]:
    """Every file under ``location``, relative to it (hidden ones too)."""
    fs, root = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def test_text_and_parquet_round_trip_and_are_published_whole(location, tmp_path):
    target = storage.join(location, "sw", "sweep.yaml")
    assert not storage.exists(target)
    storage.write_text(target, "name: sw\n")
    storage.write_text(target, "name: sw\nseeds: [0]\n")  # replaced whole
    assert storage.exists(target) and storage.read_text(target) == "name: sw\nseeds: [0]\n"
    assert storage.is_dir(storage.join(location, "sw"))
    fs, root = storage.resolve(storage.join(location, "sw"))
    table = pa.table({"trial_id": ["a", "b"], "epoch": [1, 2]})
    path = storage.write_parquet(fs, f"{root}/trials", "part-1.parquet", table)
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        assert pq.ParquetFile(f).read().equals(table)
    # nothing hidden stays behind: every temporary file was renamed or never existed
    assert listing(location) == ["sw/sweep.yaml", "sw/trials/part-1.parquet"]
    # a checkpoint-sized local file copied in, then a folder cleared
    src = tmp_path / "last.pt"
    src.write_bytes(os.urandom(3 << 20))
    copy = storage.join(location, "sw", "runs", "c000-s0", "last.pt")
    storage.copy_file(src, copy)
    assert storage.read_bytes(copy) == src.read_bytes()
    storage.clear_folder(storage.join(location, "sw", "runs"))
    assert not storage.exists(copy) and "sw/sweep.yaml" in listing(location)


@pytest.mark.parametrize("value", ["../x", "/etc/passwd", "a/../../x", "c:x", "", "a\\b", None])
def test_paths_read_from_storage_never_leave_their_folder(value):
    with pytest.raises(ValueError):
        storage.safe_relpath(value)
    assert storage.safe_relpath("checkpoints/./last.pt") == "checkpoints/last.pt"


# A sweep's writer as one process: the trials it still lacks (read back from the store, as a
# resumed sweep decides), each written as a real trial is (a ``running`` row, one row per
# epoch as it ends, the final row), and the sweep's state file. ``kill_at``: die (SIGKILL) in
# the middle of that Parquet write, after half of the file's bytes went out.
WRITER = r"""
import io, json, os, signal, sys
import pyarrow.parquet as pq
from ablations.store import ResultStore, StoreCallback
from tune.resume import SweepState, finished, trial_rows

sweep_dir, trials, epochs, kill_at = json.loads(sys.argv[1])
state = SweepState.load(sweep_dir)
state.runs += 1
state.save(sweep_dir)
real, count = pq.write_table, [0]

def write_table(table, where, **kw):
    count[0] += 1
    if count[0] != kill_at:
        return real(table, where, **kw)
    buf = io.BytesIO()
    real(table, buf, **kw)
    where.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    where.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = write_table
done = finished(trial_rows(sweep_dir))
store = ResultStore(sweep_dir)
for t in range(trials):
    trial = f"c{t:03d}-s0"
    if trial in done:
        continue
    cb = StoreCallback(store, trial)
    cb.on_run_start(None, {"rank": 0})
    for e in range(1, epochs + 1):
        cb.on_epoch_end({"epoch": e, "train_loss": 1.0 / e})
    cb.on_run_end({"status": "completed", "epochs_run": epochs})
print(json.dumps({"runs": state.runs, "skipped": sorted(done)}))
"""


def run_writer(sweep_dir: str, trials: int, epochs: int, kill_at: int = 0
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER,
                           json.dumps([sweep_dir, trials, epochs, kill_at])],
                          capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_a_writer_killed_mid_sweep_and_mid_write_resumes_with_every_row_once(location):
    from ablations.store import ResultStore, read_results

    sweep_dir = storage.join(location, "killed")
    trials, epochs = 4, 3  # 5 writes per trial: running, 3 epochs, final
    kill_at = 8  # the 2nd trial's third epoch row, half written
    first = run_writer(sweep_dir, trials, epochs, kill_at)
    assert first.returncode == -signal.SIGKILL, first.stderr
    # what the killed writer left: its finished trial and epochs, never part of a file
    res = read_results(sweep_dir)  # on_corrupt="raise": a torn file would stop it
    assert res.trials.column("trial_id").to_pylist() == ["c000-s0", "c001-s0"]
    status = dict(zip(res.trials.column("trial_id").to_pylist(),
                      res.trials.column("status").to_pylist()))
    assert status == {"c000-s0": "completed", "c001-s0": "running"}
    assert res.epochs.num_rows == epochs + 1  # c000's three and c001's first; the 2nd was cut
    visible = [f for f in listing(sweep_dir) if not f.rsplit("/", 1)[-1].startswith(".")]
    assert len([f for f in visible if f.endswith(".parquet")]) == res.files == 7

    second = run_writer(sweep_dir, trials, epochs)  # the resume
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report == {"runs": 2, "skipped": ["c000-s0"]}  # a finished trial never runs again

    def check_every_row_once() -> None:
        res = read_results(sweep_dir)
        ids = res.trials.column("trial_id").to_pylist()
        assert ids == [f"c{t:03d}-s0" for t in range(trials)]
        assert set(res.trials.column("status").to_pylist()) == {"completed"}
        keys = list(zip(res.epochs.column("trial_id").to_pylist(),
                        res.epochs.column("epoch").to_pylist()))
        assert sorted(keys) == [(i, e) for i in ids for e in range(1, epochs + 1)]
        # the finished trial's rows were written once; only the interrupted trial twice
        assert res.rows_read["trials"] == 2 * trials + 1
        assert res.rows_read["epochs"] == trials * epochs + 1

    check_every_row_once()
    done = ResultStore(sweep_dir).compact()
    assert done.tables["trials"].files_after == 1 and done.tables["epochs"].files_after == 1
    check_every_row_once()
    assert json.loads(storage.read_text(storage.join(sweep_dir, "sweep_state.json")))["runs"] == 2
