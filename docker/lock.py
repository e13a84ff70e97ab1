"""Write requirements-lock.txt: every distribution a cluster node needs, pinned to the version
installed in the environment that runs this script.

    python docker/lock.py > requirements-lock.txt

Run it in the environment the test suite passed with, after installing what a node needs on top
of this project (``pip install -e . "ray[default]==<ray>" "boto3==<boto3>"``, the versions of
requirements-cluster.txt). It walks the requirements of :data:`ROOTS` through installed package
metadata (``importlib.metadata``), evaluating environment markers for this interpreter and
platform, which the lock's header names: the image (docker/Dockerfile) uses the same Python.
The project's own requirements come from pyproject.toml (an editable install's metadata may be
older than the file); the project itself is not pinned (the image installs it from source).
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: What a node installs: this project, Ray's cluster extras (dashboard, job API, autoscaler's
#: metrics) and the AWS SDK that the head's autoscaler launches nodes with.
ROOTS = ("hardmix", "ray[default]", "boto3")
PROJECT = "hardmix"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_requires(pyproject: Path = PYPROJECT) -> list[str]:
    """The project's requirements as pyproject.toml declares them (extras as ``extra ==``)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    out = list(project.get("dependencies", []))
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [f"{r}; extra == '{extra}'" if ";" not in r else f"{r} and extra == '{extra}'"
                for r in reqs]
    return out


def closure(roots: tuple[str, ...] = ROOTS) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``roots`` need."""
    extras_seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras_seen and set(req.extras) <= extras_seen[name]:
            continue
        extras = extras_seen.setdefault(name, set())
        extras |= set(req.extras)
        requires = (project_requires() if name == PROJECT
                    else md.distribution(req.name).requires)  # not installed: install it first
        for text in requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                         for e in ("", *sorted(extras))):
                todo.append(dep)
    return {name: md.distribution(name).version for name in sorted(extras_seen)
            if name != PROJECT}


def main() -> None:
    pins = closure()
    print("# Complete lock of a cluster node's Python dependencies (generated; do not edit):")
    print("#   python docker/lock.py > requirements-lock.txt")
    print(f"# roots: {' '.join(ROOTS)}; the project itself is installed from source.")
    print(f"# python: {platform.python_version()} ({sys.implementation.name}); "
          f"platform: {sys.platform} {platform.machine()}")
    print("# docker/Dockerfile installs it with `pip install --no-deps -r` and `pip check`.")
    for name, version in pins.items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
