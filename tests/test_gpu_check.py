"""benchmarks/gpu_check.py, the GPU smoke check: its CPU-side halves run here (``--cpu``: resume
round trips, gradients under CPU bf16, gloo for NCCL, an image-folder epoch with loader
workers, bench_step's smoke run, four packed trials on a logical Ray GPU with one retried from
its checkpoint), and the script's own contract: every check listed and selectable, a failure
or a NaN is a non-zero exit, one last line that says how many passed."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1",
           TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_check_and_what_runs_on_the_cpu():
    checks = gpu_check().CHECKS
    names = [c.name for c in checks]
    assert {"cuda_tests", "sync_debug_epoch", "resume", "grad_bf16", "ddp_resume",
            "folder_epoch", "step_ratios", "packed_trials"} <= set(names)
    out = run("--help").stdout
    for c in checks:
        line = next(x for x in out.splitlines() if x.strip().startswith(c.name + " "))
        assert c.doc in line and (("[GPU only]" in line) != c.cpu_half), line


def test_unknown_check_and_missing_cuda_are_refused_with_one_line():
    import torch

    proc = run("--only", "resume,warp_drive")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "warp_drive" in proc.stderr and "resume" in proc.stderr
    if not torch.cuda.is_available():
        proc = run()
        assert proc.returncode == 2 and "--cpu" in proc.stderr


def test_rows_compare_equal_only_when_every_value_matches():
    same_rows = gpu_check().same_rows
    a = [{"epoch": 1, "train_loss": 0.5, "test_top1_err": 40.0, "epoch_seconds": 3.0,
          "source_class_counts": [3, 4]}]
    assert same_rows(a, [dict(a[0], epoch_seconds=9.0)], exact=True) is None  # timings differ
    assert "train_loss" in same_rows(a, [dict(a[0], train_loss=0.5 + 1e-12)], exact=True)
    assert same_rows(a, [dict(a[0], train_loss=0.5 + 1e-9)], exact=False) is None
    assert "train_loss" in same_rows(a, [dict(a[0], train_loss=math.nan)], exact=False)
    nan = [dict(a[0], train_loss=math.nan)]
    assert "train_loss" in same_rows(nan, nan, exact=True)  # a NaN is never a match
    assert "source_class_counts" in same_rows(a, [dict(a[0], source_class_counts=[4, 3])],
                                              exact=False)
    assert "epochs" in same_rows(a, a + a, exact=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_halves_of_the_gpu_check_pass():
    proc = run("--cpu", timeout=840)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert lines, proc.stderr[-3000:]
    cpu_halves = [c.name for c in gpu_check().CHECKS if c.cpu_half]
    last = lines[-1]
    assert re.match(rf"gpu_check: {len(cpu_halves)}/{len(cpu_halves)} passed \(cpu mode, \d+ s; "
                    r"GPU only, not run: cuda_tests, sync_debug_epoch, throughput\)$", last), (
        last, proc.stdout[-4000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert [x.split()[1] for x in lines if x.startswith("PASS ")] == cpu_halves
