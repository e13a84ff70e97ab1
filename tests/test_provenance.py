"""Reproducible nodes and runs that say which code ran (#29 item 2).

* requirements-lock.txt pins every distribution a node needs (walked from installed package
  metadata, not from a list), and requirements-cluster.txt agrees with it;
* docker/Dockerfile installs exactly that lock on the lock's Python, with torch's CUDA checked,
  and the project with its commit (Docker does not run here: what can be checked without it is);
* ``python -m hardmix.gpucheck`` (cluster.yaml's first worker setup command) fails fast, with
  one line, where torch does not see the node's GPUs;
* every run row records the commit (``<sha>+modified`` for a dirty tree, the image's recorded
  commit in an installed copy) and the lock's hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from hardmix import provenance

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _header(key: str) -> str:
    match = re.search(rf"^# {key}: (.+)$", LOCK.read_text(), re.M)
    assert match, f"requirements-lock.txt names no {key}"
    return match.group(1)


def _lock_python() -> str:
    return re.match(r"(\d+\.\d+\.\d+)", _header("python")).group(1)


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------


def test_lock_pins_every_distribution_a_node_needs():
    """From the lock's roots (hardmix as pyproject.toml declares it, ray[default], boto3), every
    requirement reachable through installed metadata is pinned, at a version its specifier allows; markers are evaluated for
    the lock's Python. A distribution installed here at another version than the lock's (or
    not at all) is checked by name and version but not walked further: its metadata here would
    be another version's."""
    pins = _pins(LOCK)
    assert pins and all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values())
    python = _lock_python()
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = _header("roots").split(";")[0].split()
    assert {"hardmix", "ray[default]"} <= set(roots)
    todo = [(Requirement(r), "roots") for r in roots]
    walked, unpinned, bad = {}, [], []
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if name == "hardmix":  # the source's own declaration, not an older install's
            version, requires = "source", project["dependencies"]
        else:
            if name not in pins:
                unpinned.append(f"{req} (needed by {parent})")
                continue
            if not req.specifier.contains(pins[name], prereleases=True):
                bad.append(f"{name}=={pins[name]} but {parent} needs {req}")
            version = pins[name]
            if _installed(name) is None or Version(_installed(name)) != Version(version):
                continue  # not walkable here: another version's metadata (or none)
            requires = md.distribution(name).requires
        if name in walked and set(req.extras) <= walked[name]:
            continue
        extras = walked.setdefault(name, set())
        extras |= set(req.extras)
        for text in requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e})
                                         for e in ("", *sorted(extras))):
                todo.append((dep, f"{name}=={version}"))
    assert not unpinned, f"not in requirements-lock.txt: {sorted(set(unpinned))[:5]}"
    assert not bad, bad[:5]
    # The walk covered the heavy part of the tree, not a few leaves.
    assert {"torch", "torchvision", "ray", "numpy", "pyarrow", "optuna"} <= set(walked)
    assert len(walked) >= len(pins) // 2, (len(walked), len(pins))


def test_lock_is_closed_and_has_the_test_suites_versions():
    """Every pinned distribution installed here at the pinned version has all its requirements
    pinned (what `pip check` in the image build verifies for all of them), and the libraries
    this suite tests are the ones the nodes get."""
    pins = _pins(LOCK)
    python = _lock_python()
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python,
           "extra": ""}
    checked = 0
    for name, version in pins.items():
        if _installed(name) is None or Version(_installed(name)) != Version(version):
            continue
        checked += 1
        for text in md.distribution(name).requires or []:
            dep = Requirement(text)
            if dep.marker is not None and not dep.marker.evaluate(env):
                continue
            dep_name = canonicalize_name(dep.name)
            assert dep_name in pins, f"{name}=={version} needs {dep}, not in the lock"
            assert dep.specifier.contains(pins[dep_name], prereleases=True), (name, str(dep))
    assert checked >= len(pins) // 2
    import ray
    import torch
    import torchvision
    for module in (torch, torchvision, ray):
        assert pins[module.__name__] == module.__version__.split("+")[0], module.__name__


def test_requirements_cluster_is_the_locks_top_level():
    text = (REPO / "requirements-cluster.txt").read_text()
    assert re.search(r"^-c requirements-lock\.txt$", text, re.M), "the AMI path uses the lock too"
    lock, top = _pins(LOCK), _pins(REPO / "requirements-cluster.txt")
    assert top and {k: lock.get(k) for k in top} == top


def test_lock_generator_reproduces_the_lock_from_an_environment_like_this_one():
    """docker/lock.py walks what is installed; here (no ray[default] extras, maybe no boto3)
    it cannot rebuild the whole file, but every pin it derives from what is installed at the
    lock's versions must be the lock's."""
    spec = importlib.util.spec_from_file_location("docker_lock", REPO / "docker" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    assert tuple(_header("roots").split(";")[0].split()) == lock.ROOTS
    pins = _pins(LOCK)
    assert lock.project_requires() and all(Requirement(r) for r in lock.project_requires())
    derived = lock.closure(("hardmix",))
    same = {k: v for k, v in derived.items() if pins.get(k) == v}
    assert len(same) >= len(derived) * 0.9, sorted(set(derived.items()) - set(same.items()))
    assert "hardmix" not in derived


# ------------------------------------------------------------------------------------------------
# The image
# ------------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_uses_the_locks_python_and_installs_exactly_the_lock():
    steps = _instructions()
    base = [args for word, args in steps if word == "FROM"]
    assert len(base) == 1 and re.fullmatch(rf"python:{re.escape(_lock_python())}-slim-\w+",
                                           base[0]), base
    runs = [args for word, args in steps if word == "RUN"]
    installs = [part for r in runs for part in r.split("&&") if "pip install" in part]
    assert installs, "no pip install"
    for part in installs:  # nothing resolved: the lock, then the project without dependencies
        assert "--no-deps" in part, part
        assert "==" not in part and ">=" not in part, f"a pin outside the lock: {part}"
    assert any(re.search(r"-r /tmp/requirements-lock\.txt\b", p) for p in installs)
    copies = [args.split() for word, args in steps if word == "COPY"]
    assert ["requirements-lock.txt", "/tmp/requirements-lock.txt"] in copies
    after = " ".join(runs[[i for i, r in enumerate(runs) if "/src/hardmix" in r][0]:])
    assert "pip check" in after  # the lock plus the project is a consistent set


def test_image_copies_every_package_the_project_installs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns)}
    assert {"hardmix", "tune", "ablations"} <= packages
    copied = [args.split() for word, args in _instructions() if word == "COPY"]
    sources = {src for c in copied for src in c[:-1]}
    assert packages <= sources, packages - sources
    assert {"pyproject.toml", project["project"]["readme"]} <= sources


def test_image_checks_torchs_cuda_against_the_lock_and_records_commit_and_lock():
    text = DOCKERFILE.read_text()
    cuda = re.search(r"^ARG TORCH_CUDA=(\S+)$", text, re.M).group(1)
    pins = _pins(LOCK)
    runtime = pins["nvidia-cuda-runtime"] if "nvidia-cuda-runtime" in pins else None
    assert runtime and ".".join(runtime.split(".")[:2]) == cuda  # the locked CUDA runtime
    import torch
    if torch.__version__.split("+")[0] == pins["torch"] and torch.version.cuda:
        assert torch.version.cuda == cuda  # the same wheel as here
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA}"' in text
    assert "torch.version.cuda" in text and "${TORCH_CUDA}" in text  # checked at build time
    assert f'"$pkg/{provenance.BUILD_COMMIT_FILE}"' in text and "HARDMIX_COMMIT" in text
    assert f'"$pkg/{provenance.LOCK_FILE}"' in text


def test_image_and_build_script_shell_commands_parse():
    for word, args in _instructions():
        if word == "RUN":
            out = subprocess.run(["bash", "-n", "-c", args], capture_output=True, text=True)
            assert out.returncode == 0, (args[:80], out.stderr)
    out = subprocess.run(["bash", "-n", str(REPO / "docker" / "build.sh")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_cluster_yaml_runs_ray_in_the_image_and_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    from tune.cluster import validate_cluster_file

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    validate_cluster_file(REPO / "cluster.yaml")
    docker = prepared["docker"]
    assert docker["image"] and docker["container_name"] and docker["pull_before_run"]
    assert not docker.get("disable_automatic_runtime_detection")  # GPUs reach the container
    assert any("nofile=65536" in o for o in docker["run_options"])
    # The image's environment is where the cluster file's commands look for it.
    assert "python -m venv /root/venv" in DOCKERFILE.read_text()
    assert "~/venv/bin/python -m hardmix.gpucheck" in prepared["worker_setup_commands"]


# ------------------------------------------------------------------------------------------------
# The GPU check of every worker node
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def gpucheck():
    from hardmix import gpucheck

    return gpucheck


def _fake_cuda(monkeypatch, *, available=True, count=1, init_error=None, compute_error=None,
               present=None, build="12.8"):
    import torch

    from hardmix import gpucheck

    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")

    def init():
        if init_error:
            raise RuntimeError(init_error)

    monkeypatch.setattr(torch.cuda, "init", init)
    real_ones = torch.ones

    def ones(*shape, device=None, **kwargs):
        if compute_error:
            raise RuntimeError(compute_error)
        return real_ones(*shape, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)
    monkeypatch.setattr(gpucheck, "devices_present", lambda dev="/dev": present or 0)


def test_gpucheck_passes_when_torch_sees_and_uses_every_gpu(gpucheck, monkeypatch):
    _fake_cuda(monkeypatch, count=4, present=4)
    line = gpucheck.check_gpus()
    assert "sees 4 GPU(s)" in line and "Fake GPU 3" in line and "\n" not in line


@pytest.mark.parametrize("facts, words", [
    ({"build": None}, "built without CUDA"),
    ({"available": False, "init_error": "CUDA driver version is insufficient for CUDA\nruntime "
                                        "version"},
     "sees no GPU: CUDA driver version is insufficient for CUDA runtime version"),
    ({"available": False}, "sees no GPU: torch.cuda.is_available() is False"),
    ({"count": 2, "present": 4}, "sees 2 GPU(s) but this node has 4"),
    ({"count": 1, "compute_error": "CUDA error: no kernel image is available"},
     "cuda:0 fails a computation: CUDA error: no kernel image"),
])
def test_gpucheck_fails_with_one_line_saying_why(gpucheck, monkeypatch, capsys, facts, words):
    _fake_cuda(monkeypatch, **facts)
    with pytest.raises(gpucheck.GpuCheckError) as info:
        gpucheck.check_gpus()
    assert words in str(info.value) and "\n" not in str(info.value)
    assert gpucheck.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and words in err


def test_gpucheck_counts_the_nodes_gpu_device_files(gpucheck, tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset", "null"):
        (tmp_path / name).touch()
    assert gpucheck.devices_present(str(tmp_path)) == 2
    assert gpucheck.devices_present(str(tmp_path / "absent")) == 0


def test_gpucheck_command_as_the_cluster_runs_it(tmp_path):
    """The worker setup command's module, run as a process: here (no GPU) it fails in one line;
    on a machine with a working GPU it passes. The command parses as Ray's shell runs it."""
    import torch

    command = "~/venv/bin/python -m hardmix.gpucheck"
    wrapped = f"source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({command})"
    assert subprocess.run(["bash", "-n", "-c", wrapped]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "hardmix.gpucheck"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if torch.cuda.is_available():
        assert out.returncode == 0 and out.stdout.startswith("gpucheck: ok"), out
    else:
        assert out.returncode == 1 and out.stdout == "", out
        assert len(out.stderr.strip().splitlines()) == 1 and "FAILED" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------
# Which code ran: commit, modified working copy, lock hash
# ------------------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("hardmix", "tune", "ablations"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    for name in ("requirements-lock.txt", "pyproject.toml"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "docker", dest / "docker", ignore=ignore)
    return dest


_TWO_RUNS = """
import sys
from pathlib import Path
from hardmix.cli import main
args = lambda name: [a for s in ["data.name=synthetic", "model.name=smallnet", "model.width=8",
    "data.batch_size=64", "optim.epochs=1", "output.progress=false",
    f"output.dir={sys.argv[1]}", f"output.name={name}"]
    for a in ("--set", s)]
assert main(["train", *args("clean")]) == 0
path = Path("hardmix/methods.py")
path.write_text(path.read_text() + "\\n# a local edit\\n")
assert main(["train", *args("modified")]) == 0
"""


@pytest.mark.slow
def test_run_rows_name_the_commit_or_the_modified_working_copy_and_the_lock(tmp_path):
    """Two `hardmix train` runs from a git checkout of the project: clean, then after a local
    edit. The rows' git_commit are the commit and `<commit>+modified`; versions.lock is the
    lock's sha256. docker/build.sh would record the same for an image (a stand-in `docker`)."""
    from ablations.store import read_results

    repo = _copy_project(tmp_path / "repo")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "snapshot")
    sha = _git(repo, "rev-parse", "HEAD")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\necho "$@" >> "$DOCKER_LOG"\n')
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(tmp_path / "docker.log")}
    subprocess.run(["bash", "docker/build.sh", "img:clean"], cwd=repo, env=env, check=True)

    out = subprocess.run([sys.executable, "-c", _TWO_RUNS, str(tmp_path / "runs")], cwd=repo,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    subprocess.run(["bash", "docker/build.sh", "img:modified"], cwd=repo, env=env, check=True)

    lock = hashlib.sha256((REPO / "requirements-lock.txt").read_bytes()).hexdigest()
    for name, want in (("clean", sha), ("modified", f"{sha}+modified")):
        trials, _ = read_results(str(tmp_path / "runs" / name)).to_pandas()
        row = trials.iloc[0]
        assert row["git_commit"] == want, (name, row["git_commit"])
        versions = json.loads(row["versions"])
        assert versions["lock"] == lock and versions["hardmix"] == provenance.hardmix.__version__
    builds = (tmp_path / "docker.log").read_text().splitlines()
    assert f"HARDMIX_COMMIT={sha} " in builds[0] + " " and "-f docker/Dockerfile" in builds[0]
    assert f"HARDMIX_COMMIT={sha}+modified " in builds[1] + " "


def _load_provenance_copy(package_dir: Path):
    """hardmix/provenance.py loaded from a copy, so that its __file__ (what git_commit and
    lock_hash look beside) is the copy's; everything it imports is the real package."""
    shutil.copy(REPO / "hardmix" / "provenance.py", package_dir / "provenance.py")
    spec = importlib.util.spec_from_file_location(f"provenance_copy_{abs(hash(package_dir))}",
                                                  package_dir / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_an_installed_copy_without_git_reports_the_commit_its_build_recorded(tmp_path):
    """The image: site-packages/hardmix has no .git; the build wrote COMMIT and the lock beside
    the package, and those are what a run records."""
    package = tmp_path / "site-packages" / "hardmix"
    package.mkdir(parents=True)
    copy = _load_provenance_copy(package)
    assert copy.git_commit() == "unknown" and copy.lock_hash() == "unknown"
    (package / copy.BUILD_COMMIT_FILE).write_text("0123abcd+modified\n")
    (package / copy.LOCK_FILE).write_text("torch==1.0\n")
    assert copy.git_commit() == "0123abcd+modified"
    assert copy.lock_hash() == hashlib.sha256(b"torch==1.0\n").hexdigest()
    assert copy.versions()["lock"] == copy.lock_hash()


def test_a_package_inside_someone_elses_repository_is_not_credited_with_its_commit(tmp_path):
    """A venv inside another project's checkout (ignored by it): that project's HEAD is not the
    commit of the hardmix code that runs."""
    outer = tmp_path / "their-project"
    package = outer / ".venv" / "site-packages" / "hardmix"
    package.mkdir(parents=True)
    (outer / ".gitignore").write_text(".venv/\n")
    (outer / "main.py").write_text("print(1)\n")
    _git(outer, "init", "-q")
    _git(outer, "add", ".")
    _git(outer, "commit", "-q", "-m", "theirs")
    copy = _load_provenance_copy(package)
    assert _git(outer, "rev-parse", "HEAD") not in copy.git_commit()
    assert copy.git_commit() == "unknown"
