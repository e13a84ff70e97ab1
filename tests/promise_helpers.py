"""Small real inputs for the promise tests (tests/test_promises*.py): torchvision's CIFAR batch
files, a PNG class tree, a CIFAR-shaped ``.npz``, the ``hardmix`` command in a subprocess, a
probe that records what a process inherited, and two gloo ranks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: torchvision's folder layout: sub-folder, training files, test file, meta file and its key.
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "label_names", "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names",
                 "fine_labels", 100),
}


def write_cifar(root: Path, name: str, per_file: int = 8, n_test: int = 10,
                seed: int = 0) -> dict:
    """Tiny files in torchvision's CIFAR batch format (pickled dicts, ``data`` rows of 3,072
    bytes: the red plane, then green, then blue, each row-major). Returns what was written:
    ``x_train``/``x_test`` as (N, 3, 32, 32) uint8, labels, class names."""
    sub, train_files, test_file, meta_file, meta_key, label_key, classes = CIFAR_LAYOUT[name]
    rng = np.random.RandomState(seed)
    folder = root / sub
    folder.mkdir(parents=True)
    names = [f"{name}-class-{i}" for i in range(classes)]

    def batch(path: Path, n: int, first: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.randint(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = (first + rng.permutation(n)) % classes  # every batch holds other classes
        entry = {"batch_label": path.name, label_key: [int(v) for v in y],
                 "data": x.reshape(n, 3072), "filenames": [f"{path.name}-{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [int(v) // 5 for v in y]
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        return x, y.astype(np.int64)

    parts = [batch(folder / f, per_file, i * per_file) for i, f in enumerate(train_files)]
    x_test, y_test = batch(folder / test_file, n_test, 3)
    meta = {meta_key: names}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"coarse-{i}" for i in range(20)]
    with open(folder / meta_file, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {"x_train": np.concatenate([p[0] for p in parts]),
            "y_train": np.concatenate([p[1] for p in parts]),
            "x_test": x_test, "y_test": y_test, "classes": names}


def patch_cifar_integrity(monkeypatch) -> None:
    """The tiny files cannot match the real files' MD5 sums: accept them."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


def write_png_tree(root: Path, classes=("ant", "bee", "cat"), n_train: int = 8, n_val: int = 2,
                   side: int = 20, seed: int = 0) -> Path:
    """An ImageNet-style folder: ``train/<class>/*.png`` and ``val/<class>/*.png``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(
                    root / split / c / f"{c}{i}.png")
    return root


def write_npz(path: Path, n_per_class: int = 6, n_test: int = 20, classes: int = 10,
              seed: int = 0) -> Path:
    """A CIFAR-shaped ``.npz`` (HWC uint8), as the CPU presets read."""
    rng = np.random.RandomState(seed)
    n = n_per_class * classes
    np.savez(path, x_train=rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(n) % classes, x_test=rng.randint(0, 256, (n_test, 32, 32, 3),
                                                                dtype=np.uint8),
             y_test=np.arange(n_test) % classes)
    return path


def env(**extra: str) -> dict:
    """The environment of a ``hardmix`` subprocess of these tests."""
    e = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", CI="1",
             PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    e.update(extra)
    return e


def hardmix(*args: str, timeout: float = 300, cwd: Path = REPO, env_: dict | None = None,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``hardmix ARGS`` as a user runs it (the installed console script), optionally behind
    ``prefix`` (e.g. ``unshare -n``)."""
    exe = str(Path(sys.executable).with_name("hardmix"))
    return subprocess.run([*prefix, exe, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env_ or env())


# --------------------------------------------------------------------------------------------
# What a process inherited: a sitecustomize that records, when a process imports
# hardmix.train (every trial does), the environment the process was started with.
# --------------------------------------------------------------------------------------------

_PROBE = r'''
import json, os, sys


class _Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "hardmix.train":
            sys.meta_path.remove(self)
            with open("/proc/self/environ", "rb") as f:  # the environment at exec time
                start = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            record = {"pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else "",
                      "OMP_WAIT_POLICY": (start.get(b"OMP_WAIT_POLICY") or b"").decode() or None}
            with open(os.path.join(os.environ["HM_PROBE_DIR"], f"{os.getpid()}.json"), "w") as f:
                json.dump(record, f)
        return None


if os.environ.get("HM_PROBE_DIR"):
    sys.meta_path.insert(0, _Probe())
'''


def probe_env(tmp: Path) -> dict:
    """Environment additions that make every Python process started from it (Ray workers
    included) record its start environment into ``tmp/records`` on importing hardmix.train."""
    site = tmp / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_PROBE)
    records = tmp / "records"
    records.mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HM_PROBE_DIR": str(records)}


def probe_records(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "records").glob("*.json"))]


# --------------------------------------------------------------------------------------------
# Two gloo ranks
# --------------------------------------------------------------------------------------------


def _rank_entry(rank: int, world: int, init_file: str, fn, args) -> None:
    import multiprocessing

    import torch
    import torch.distributed as dist

    # A rank is a fresh process as under torchrun or Ray Train, whose DataLoader workers fork
    # (a spawned child would otherwise spawn them too, re-importing everything per epoch).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp: Path, *args, world: int = 2) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group
    (``fn`` must be a module-level function; it writes what it found into files)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(world, str(tmp / "gloo-init"), fn, args), nprocs=world,
             join=True)


#: Runs ``hardmix`` for each argv in one fresh interpreter (imports cost seconds here): each
#: exit code, stdout and stderr, and whether Ray was ever imported.
_CLI_RUNS = """
import contextlib, io, json, sys
from hardmix.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    out.append({"rc": rc, "out": o.getvalue(), "err": e.getvalue()})
print(json.dumps({"runs": out, "ray_imported": "ray" in sys.modules}))
"""


def cli_runs(runs: list[list[str]], timeout: float = 600) -> dict:
    """``{"runs": [{"rc", "out", "err"}, ...], "ray_imported": bool}`` for ``runs``, run by
    :data:`_CLI_RUNS` in one subprocess (OMP_NUM_THREADS=1, Ray auth off)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", _CLI_RUNS, json.dumps(runs)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
