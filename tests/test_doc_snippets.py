"""Every Python example of the README and docs/ runs as written, offline.

``tests/test_docs.py`` checks that the examples compile and that what they import exists; this
file runs them. Each document's ``python`` blocks run in order in one fresh interpreter, in an
empty working folder, sharing one namespace (a reader runs a page top to bottom), so a block
may use what an earlier block of the same page defined and nothing else. A traceback names the
document and line of the failing block.

Examples that read ``sweeps/quickstart`` get the folder that ``docs/sweeps.md``'s own example
writes (``run_sweep`` of the quickstart preset, one seed, on a local Ray instance): that example
runs first, and what it leaves behind is what the other pages read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import DOCS, REPO, blocks

#: The page whose example writes the sweep folder the other pages read.
PRODUCER = REPO / "docs" / "sweeps.md"
SWEEP = "sweeps/quickstart"

RUNNER = r"""
import json, sys
ns = {"__name__": "__main__"}
for doc, line, body in json.loads(sys.stdin.read()):
    print(f"--- {doc}:{line}", flush=True)
    exec(compile(body, f"{doc}:{line}", "exec"), ns)
print("--- all blocks ran", flush=True)
"""


def python_blocks(doc: Path) -> list[tuple[str, int, str]]:
    return [(str(doc.relative_to(REPO)), line, body)
            for _, line, body in blocks(doc.read_text(), ("python", "py"))]


def run_blocks(doc: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a page's examples in ``cwd`` (the repository importable as an installed user has it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(python_blocks(doc)),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _failure(doc: Path, proc: subprocess.CompletedProcess) -> str:
    ran = [ln for ln in proc.stdout.splitlines() if ln.startswith("--- ")]
    return (f"{doc.relative_to(REPO)}: exit {proc.returncode}; last block started: "
            f"{ran[-1] if ran else 'none'}\n{proc.stderr[-4000:]}")


PAGES = [d for d in DOCS if python_blocks(d) and d != PRODUCER]


@pytest.fixture(scope="module")
def quickstart_sweep(tmp_path_factory) -> Path:
    """The folder ``docs/sweeps.md``'s example writes, after checking that it ran."""
    cwd = tmp_path_factory.mktemp("sweeps-md")
    proc = run_blocks(PRODUCER, cwd)
    assert proc.returncode == 0 and "--- all blocks ran" in proc.stdout, _failure(PRODUCER, proc)
    folder = cwd / SWEEP
    assert (folder / "trials").is_dir() and (folder / "epochs").is_dir(), proc.stdout[-2000:]
    return folder


@pytest.mark.ray
@pytest.mark.slow
def test_the_sweep_example_runs_and_leaves_results_and_a_report(quickstart_sweep):
    from ablations.store import read_results

    trials, epochs = read_results(str(quickstart_sweep)).to_pandas()
    assert len(trials) >= 2 and set(trials["status"]) == {"completed"}, trials[["trial_id", "status"]]
    assert set(epochs["epoch"]) == {1, 2, 3}                 # run.optim.epochs=3, as printed
    assert (quickstart_sweep / "report" / "report.md").is_file()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("doc", PAGES, ids=[str(d.relative_to(REPO)) for d in PAGES])
def test_python_examples_run_as_written(doc, tmp_path, request):
    if any(SWEEP in body for _, _, body in python_blocks(doc)):
        shutil.copytree(request.getfixturevalue("quickstart_sweep"), tmp_path / SWEEP)
    proc = run_blocks(doc, tmp_path)
    assert proc.returncode == 0 and "--- all blocks ran" in proc.stdout, _failure(doc, proc)


def test_the_runner_reports_the_failing_block(tmp_path):
    """The check can fail: a page whose second block uses a name nobody defined."""
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\ntext\n\n```python\nprint(x + train_set)\n```\n")
    items = [(page.name, line, b) for _, line, b in blocks(page.read_text(), ("python",))]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(items), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "NameError" in proc.stderr and "train_set" in proc.stderr
    assert f"page.md:{items[1][1]}" in proc.stderr            # the traceback names doc:line
