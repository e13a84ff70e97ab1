"""docs/claims.md stays true: every documented command, option and preset names a test that
executes it, and every test the page names exists.

What must be covered is derived, never listed here: the command line's subcommands and options
from ``hardmix.cli.build_parser()`` (docs/cli.md documents each), the presets from the preset
registry, and the other commands the README and docs/*.md show (``ray job submit``, ``python
benchmarks/...``, ``kubectl ...``), extracted with tests/test_docs.py's parser. A row covers a
key when a code span of its first cell is the key; its tests are the ``tests/...py::name`` code
spans of the row.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from pathlib import Path

import pytest

from test_docs import DOCS, REPO, commands_of, hardmix_argv, simple_commands, tokens

CLAIMS = REPO / "docs" / "claims.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")
#: Programs whose documented commands are the project's promises (shell utilities, cloud and
#: container tools are the user's, not ours).
PROJECT_PROGRAMS = ("hardmix", "ray", "kubectl", "tensorboard")


# --------------------------------------------------------------------------------------------
# What must be covered
# --------------------------------------------------------------------------------------------


def cli_keys() -> set[str]:
    """``hardmix SUB`` and ``hardmix SUB --option`` for every subcommand and option."""
    from hardmix.cli import build_parser

    parser = build_parser()
    keys = {f"hardmix {o}" for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        keys.add(f"hardmix {name}")
        keys |= {f"hardmix {name} {o}" for a in p._actions for o in a.option_strings
                 if o.startswith("--") and o != "--help"}
    return keys


def preset_keys() -> set[str]:
    from hardmix.config import preset_names
    return {f"preset {name}" for name in preset_names()}


def _command_key(cmd: list[str]) -> str | None:
    """The key of one documented simple command, or None when it is not a project command."""
    argv = hardmix_argv(cmd)
    if argv is not None:
        return None  # the parser's keys cover hardmix; test_docs checks these parse
    prog = cmd[0]
    words = [w for w in cmd[1:] if not w.startswith("-")]
    if prog == "ray" and words:
        return "ray " + " ".join(words[:2] if words[0] == "job" else words[:1])
    if prog == "kubectl" and words:
        return f"kubectl {words[0]}"
    if prog == "tensorboard":
        return "tensorboard"
    if re.fullmatch(r"python3?", prog) and len(cmd) > 1:
        # (``python -m pytest`` is the runner of every test named here, not a promise of its own)
        if cmd[1] == "-m" and len(cmd) > 2 and \
                cmd[2].split(".")[0] in ("hardmix", "tune", "ablations", "benchmarks"):
            return f"python -m {cmd[2]}"
        if cmd[1].endswith(".py") and (REPO / cmd[1]).is_file():
            return f"python {cmd[1]}"
        return None
    if "/" in prog and (REPO / prog).is_file():  # a script of the repository
        return prog
    return None


def documented_keys() -> dict[str, str]:
    """Every project command the README and docs show, with where it is shown first."""
    found: dict[str, str] = {}
    subcommands = {k.split()[1] for k in cli_keys() if not k.split()[1].startswith("-")}
    for doc in DOCS:
        for c in commands_of(doc.read_text(), str(doc.relative_to(REPO))):
            try:
                words = tokens(c.text)
            except ValueError:
                continue
            pending = [words]
            while pending:
                for cmd in simple_commands(pending.pop()):
                    argv = hardmix_argv(cmd)
                    if argv and argv[0] in subcommands:
                        sub = argv[0]
                        found.setdefault(f"hardmix {sub}", str(c))
                        for w in argv[1:]:
                            if w.startswith("--"):
                                found.setdefault(f"hardmix {sub} {w.split('=')[0]}", str(c))
                    key = _command_key(cmd)
                    if key:
                        found.setdefault(key, str(c))
                    for word in cmd[1:]:  # a command line handed to another program
                        if " " in word and re.search(r"(^|\s)hardmix\s", word):
                            try:
                                pending.append(tokens(word))
                            except ValueError:
                                pass
    return found


# --------------------------------------------------------------------------------------------
# What the page says
# --------------------------------------------------------------------------------------------


def rows(text: str) -> list[tuple[list[str], list[tuple[str, str, str | None]], int]]:
    """``(code spans of the first cell, named tests, line)`` of every table row."""
    out = []
    lines = text.splitlines()
    for no, line in enumerate(lines, 1):
        if not line.startswith("|") or re.match(r"^\|\s*-", line):
            continue
        if no < len(lines) and re.match(r"^\|\s*-", lines[no]):
            continue  # a header row
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        out.append((keys, NODE.findall(line), no))
    return out


def _param_ids(func) -> set[str] | None:
    """The ids ``func``'s parametrization gives, where they can be read (None: unknown)."""
    marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
    if len(marks) != 1:
        return None
    mark = marks[0]
    if mark.kwargs.get("ids") is not None and not callable(mark.kwargs["ids"]):
        return {str(i) for i in mark.kwargs["ids"]}
    values = mark.args[1]
    if all(isinstance(v, (str, int, float, bool)) for v in values):
        return {str(v) for v in values}
    return None


def node_problem(path: str, name: str, param: str | None) -> str | None:
    """Why ``path::name[param]`` is not a test of this repository (None when it is)."""
    file = REPO / path
    if not file.is_file():
        return f"{path}: no such file"
    tree = ast.parse(file.read_text())
    defs = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if not name.startswith("test") or name not in defs:
        return f"{path}::{name}: no such test function"
    if param is None:
        return None
    module = importlib.import_module(Path(path).stem)
    ids = _param_ids(getattr(module, name))
    if ids is not None and param not in ids:
        return f"{path}::{name}[{param}]: no such parameter ({', '.join(sorted(ids))})"
    return None


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def uncovered(text: str, required: set[str]) -> list[str]:
    covered = {k for keys, tests, _ in rows(text) if tests for k in keys}
    return sorted(required - covered)


def test_every_command_option_and_preset_names_an_executing_test():
    text = CLAIMS.read_text()
    documented = documented_keys()
    required = cli_keys() | preset_keys() | set(documented)
    missing = uncovered(text, required)
    assert not missing, ("docs/claims.md names no test for:\n" + "\n".join(
        f"  {k}" + (f"   (shown at {documented[k]})" if k in documented else "")
        for k in missing))


def test_every_named_test_exists():
    problems = []
    for keys, tests, no in rows(CLAIMS.read_text()):
        for path, name, param in tests:
            why = node_problem(path, name, param or None)
            if why:
                problems.append(f"docs/claims.md:{no}: {why}")
    assert not problems, "\n".join(problems)


def test_every_promise_row_names_a_test():
    text = CLAIMS.read_text()
    body = text[text.index("<!-- claims -->"):text.index("<!-- /claims -->")]
    empty = [no for keys, tests, no in rows(body) if not tests]
    assert not empty, f"rows without a test (line numbers within the claims section): {empty}"


def test_the_checker_notices_what_is_missing_or_wrong():
    page = "\n".join([
        "| what | test |", "|---|---|",
        "| `hardmix sweep --dry-run` | `tests/test_sweep.py::test_bad_configs_fail_before_ray_and_dry_run_plans_without_it` |",
        "| `preset quickstart` | no test named |",
        "| `hardmix train` | `tests/test_sweep.py::test_no_such_test` |",
        "| `hardmix report` | `tests/test_promises.py::test_every_preset_trains_one_epoch_and_plans[no-such]` |",
    ])
    assert uncovered(page, {"hardmix sweep --dry-run", "preset quickstart"}) == ["preset quickstart"]
    found = [node_problem(p, n, a or None) for _, tests, _ in rows(page) for p, n, a in tests]
    assert found[0] is None
    assert "no such test function" in found[1] and "no such parameter" in found[2]
    assert node_problem("tests/no_such_file.py", "test_x", None).endswith("no such file")
    assert "ray job submit" in documented_keys() and "hardmix sweep --resume" in cli_keys()
