"""Shared fixtures: tiny torch threads, the real CIFAR-10 file when present, one Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared by pytest, Ray workers and torch: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")

REPO = Path(__file__).resolve().parents[1]


def cifar10_path() -> Path | None:
    """The real CIFAR-10 arrays: $HARDMIX_CIFAR10, else ../shared/data/cifar10.npz, else None."""
    for candidate in (os.environ.get("HARDMIX_CIFAR10"), REPO.parent / "shared/data/cifar10.npz"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def cifar10_npz() -> Path:
    path = cifar10_path()
    if path is None:
        pytest.skip("real CIFAR-10 not found (set HARDMIX_CIFAR10 or place ../shared/data/cifar10.npz)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting one costs 6-9 s here).

    num_cpus=4 on two cores on purpose: nested Tune -> Train placement groups hang with 2
    logical CPUs (shared/NOTES-ray.md).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
