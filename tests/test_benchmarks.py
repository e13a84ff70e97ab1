"""Every benchmark script runs: a smoke run of each at a tiny size, its last line as documented.

Nothing else runs the benchmarks between measurements, so a script that the code has moved away
from (a config it builds that the rules now refuse, a ratio that comes out NaN) would rot
unnoticed and the figures quoted in docs/benchmarks.md would no longer be produced by the code.
Each script states its last line in its docstring (``Last line: ``key=<x> ...````); the smoke
run (``--smoke``: tiny sizes, not a measurement) must exit 0 and end in a line with exactly
those keys, each with a finite number or a boolean.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
#: Scripts whose CPU smoke run has its own test (they take other flags).
OWN_TEST = {"gpu_check.py": "tests/test_gpu_check.py runs `gpu_check.py --cpu`"}
_LAST_LINE = re.compile(r"[Ll]ast line:\s*``([^`]+)``")


def documented_keys(script: Path) -> list[str]:
    """The keys of the last line a script's docstring promises, in order."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    m = _LAST_LINE.search(doc)
    assert m, f"{script.name}: the docstring does not state its last line (Last line: ``k=<x>``)"
    return [tok.split("=", 1)[0] for tok in m.group(1).split() if "=" in tok]


def parse_last_line(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def value_ok(value: str) -> bool:
    if value in ("True", "False"):
        return True
    number = value.split("±")[0]
    try:
        return math.isfinite(float(number))
    except ValueError:
        return False


def test_every_benchmark_states_its_last_line():
    for script in SCRIPTS:
        if script.name not in OWN_TEST:
            assert documented_keys(script), script.name


def test_the_line_check_refuses_nan_and_missing_keys():
    got = parse_last_line("cached_over_cutmix=nan forward_over_cutmix=1.2")
    assert not value_ok(got["cached_over_cutmix"]) and value_ok(got["forward_over_cutmix"])
    assert value_ok("27.42±0.31") and value_ok("True") and not value_ok("OK")
    assert set(documented_keys(REPO / "benchmarks" / "bench_loader.py")) == {"device_loader_speedup"}


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in OWN_TEST],
                         ids=lambda s: s.name)
def test_benchmark_smoke_run_ends_in_its_documented_line(script):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{script.name} exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"{script.name} printed nothing"
    got = parse_last_line(lines[-1])
    keys = documented_keys(script)
    assert list(got) == keys, f"{script.name}: last line {lines[-1]!r}, documented keys {keys}"
    bad = {k: v for k, v in got.items() if not value_ok(v)}
    assert not bad, f"{script.name}: not a finite number or a boolean: {bad}"
