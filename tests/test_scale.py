"""A small scale simulation (benchmarks/bench_scale.py runs the big one): a grid sweep through
the real Tune + store path on the session's local Ray, a trial process killed mid-run, the
driver interrupted, then resumed; every trial's rows must arrive exactly once."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from hardmix.config import SweepConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks/bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_rows_arrive_exactly_once_despite_a_crash_and_an_interruption(ray_local, tmp_path):
    from tune.plan import sweep_dir_of
    from tune.sweep import run_sweep

    bench = _bench()
    config = tmp_path / "scale.yaml"
    config.write_text(bench.sweep_yaml("scale-test", str(tmp_path / "sweeps"), trials=6, seeds=2,
                                       epochs=2, cpus=4, max_failures=2))
    cfg = load_config(SweepConfig, file=str(config))
    total = len(bench.expected_trials(cfg))
    sweep_dir = Path(sweep_dir_of(cfg))
    events: dict[str, object] = {"killed": None, "interrupted": False}

    def chaos() -> None:
        """Kill one running trial process, then interrupt the driver (this process) the way
        Ctrl+C does: Tune's SIGUSR1 handler stops the run and saves its state."""
        deadline = time.time() + 120
        while time.time() < deadline and events["killed"] is None:
            pids = bench.trial_processes(os.getpid())
            if pids and bench.started_trials(sweep_dir) >= 1:
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    events["killed"] = pids[0]
                except OSError:
                    pass
            time.sleep(0.2)
        while time.time() < deadline and bench.started_trials(sweep_dir) < total // 2:
            time.sleep(0.2)
        events["interrupted"] = True
        os.kill(os.getpid(), signal.SIGUSR1)

    # Outside Tune's run a stray SIGUSR1 must not end pytest.
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    thread = threading.Thread(target=chaos, daemon=True)
    try:
        thread.start()
        first = run_sweep(cfg)
        thread.join(timeout=130)
        assert events["killed"], "no trial process was running to be killed"
        assert events["interrupted"] and first.interrupted, first.counts
        second = run_sweep(cfg, resume=True)
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert not second.interrupted
    counts = bench.check_exactly_once(sweep_dir, cfg, faults=[])
    assert counts["trials"] == total and counts["completed"] == total
    assert counts["retried"] >= 1  # the killed trial ran again
