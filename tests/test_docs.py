"""Every command the README and docs/*.md show names what exists, checked as written.

This file parses; it does not execute (``tests/test_doc_snippets.py`` runs the Python examples,
and the claims page ``docs/claims.md`` names the test that executes each command).

The shell commands of the fenced ``bash`` / ``console`` (and ``sh`` / ``shell``) blocks are
extracted (continuation lines joined, ``$ `` prompts stripped in console blocks, heredoc bodies
and comments skipped) and split into simple commands (at ``&&``, ``||``, ``;``, ``|``, ``(``,
``)`` and a ``--`` that hands over to another program, as in ``ray job submit ... -- hardmix
sweep ...``). For every ``hardmix`` command (also ``python -m hardmix.cli``):

* it parses with ``hardmix.cli.build_parser()`` (a subcommand or option that does not exist
  fails);
* ``--preset NAME`` and ``hardmix presets NAME`` name a real preset, ``--baseline`` a method;
* every ``--set KEY=VALUE`` key is a config field: of ``RunConfig`` for ``train`` / ``eval``, of
  ``SweepConfig`` for ``sweep`` (``run.*`` included); in ``space.X...`` keys ``X`` must be a run
  field and what follows a ``ParamSpec`` field (``when.Y`` with ``Y`` a run field);
* ``train`` and ``sweep`` commands build a valid config (preset < file < ``--set``, no disk
  access), except in a console block whose output shows the command failing on purpose.

Other commands: ``python FILE.py`` names a file of the repository and only options that file
defines; ``python -m MODULE`` an importable module; ``pip install`` extras exist in
pyproject.toml; files named to ``ray`` and ``pip -c`` exist. No command, and no line of any doc,
uses a workspace-only path (``../shared/``, ``/work/``). Environment variables (``$BUCKET``,
``${AWS_REGION}``) stand for any value: they are replaced by a placeholder before parsing, the
only tolerance. Besides the commands, ``yaml`` blocks that hold config keys must be valid
configs, ``python`` blocks must compile and their ``from hardmix|tune|ablations... import``
names must exist, and docs/cli.md's preset table must list exactly the shipped presets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: The docs the README's long sections moved to (each must exist).
REQUIRED_DOCS = ("api", "cli", "sweeps", "results-schema", "reports", "benchmarks",
                 "reliability", "cluster-setup")
#: Paths that exist only in the workspace this project is developed in, not on a fresh machine.
WORKSPACE_PATHS = ("../shared/", "/work/")
SHELL_LANGS = ("bash", "console", "sh", "shell")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
#: Programs whose bare file arguments (cluster.yaml, requirements-cluster.txt) must exist.
FILE_ARG_PROGRAMS = ("ray", "pip", "pip3")
_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_ENV = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_HEREDOC = re.compile(r"<<-?\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    """One shell command line of a doc: where it is, its text, and whether the doc shows it
    failing on purpose (a console block whose next output line is a hardmix error)."""

    doc: str
    line: int
    text: str
    fails_on_purpose: bool = False

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def blocks(text: str, langs: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """``(language, first line number of the body, body)`` of the fenced blocks in ``langs``."""
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in langs:
            out.append((m.group(1).lower(), text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return out


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, line in lines:
        if pending is not None:
            no, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (no, line.rstrip()[:-1].rstrip())
            continue
        out.append((no, line))
    if pending is not None:
        out.append(pending)
    return out


def commands_of(text: str, doc: str = "doc") -> list[Command]:
    """Every shell command of the fenced shell blocks of a Markdown text."""
    found: list[Command] = []
    for lang, start, body in blocks(text, SHELL_LANGS):
        raw = [(start + i, line) for i, line in enumerate(body.splitlines())]
        if lang == "console":
            lines, i = [], 0
            while i < len(raw):
                no, line = raw[i]
                if line.startswith("$ "):
                    cmd = [(no, line[2:])]
                    while cmd[-1][1].rstrip().endswith("\\") and i + 1 < len(raw):
                        i += 1
                        cmd.append(raw[i])
                    joined = _join_continuations(cmd)[0]
                    nxt = raw[i + 1][1] if i + 1 < len(raw) else ""
                    lines.append((joined, nxt.startswith("hardmix: error:")))
                i += 1
        else:
            lines = [(c, False) for c in _join_continuations(raw)]
        heredoc = None
        for (no, line), failing in lines:
            stripped = line.strip()
            if heredoc is not None:
                if stripped == heredoc:
                    heredoc = None
                continue
            if not stripped or stripped.startswith("#"):
                continue
            m = _HEREDOC.search(stripped)
            if m:
                heredoc = m.group(1)
            found.append(Command(doc, no, stripped, failing))
    return found


def tokens(text: str) -> list[str]:
    """Shell words of a command line, environment variables replaced by a placeholder."""
    lex = shlex.shlex(_ENV.sub(lambda m: m.group(1).lower(), text), posix=True,
                      punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def simple_commands(words: list[str]) -> list[list[str]]:
    """Split at shell operators and at a ``--`` that hands over to another program; leading
    ``VAR=value`` assignments are dropped."""
    out: list[list[str]] = [[]]
    for w in words:
        if w in OPERATORS or (w == "--" and out[-1] and out[-1][0] != "hardmix"):
            out.append([])
        else:
            out[-1].append(w)
    cleaned = []
    for cmd in out:
        while cmd and _ASSIGNMENT.match(cmd[0]):
            cmd = cmd[1:]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def hardmix_argv(cmd: list[str]) -> list[str] | None:
    """The arguments after ``hardmix`` (or ``python -m hardmix.cli``), else None."""
    if cmd[0] == "hardmix":
        return cmd[1:]
    if re.fullmatch(r"python3?", cmd[0]) and cmd[1:3] in (["-m", "hardmix.cli"],
                                                           ["-m", "hardmix"]):
        return cmd[3:]
    return None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _is_field(cls: type, dotted: str) -> bool:
    """A leaf field of ``cls`` (``augment.k``; not a section such as ``augment``)."""
    from hardmix.config import ConfigError, field_type

    if not dotted:
        return False
    try:
        return not dataclasses.is_dataclass(field_type(cls, dotted))
    except ConfigError:
        return False


def key_problem(cls: type, key: str) -> str | None:
    """Why ``key`` of ``--set key=value`` is not a config field of ``cls`` (None if it is)."""
    from hardmix.config import ConfigError, ParamSpec, RunConfig, SweepConfig, field_type

    parts = key.split(".")
    if not key or any(not p for p in parts):
        return f"--set {key!r}: not a dotted field name"
    if cls is SweepConfig and parts[0] == "space" and len(parts) > 1:
        rest = parts[1:]
        spec_fields = {f.name for f in dataclasses.fields(ParamSpec)}
        for i in range(len(rest), 0, -1):
            name = ".".join(rest[:i])
            if not _is_field(RunConfig, name):
                continue
            tail = rest[i:]
            if not tail or (len(tail) == 1 and tail[0] in spec_fields - {"when"}):
                return None
            if tail[0] == "when" and (len(tail) == 1 or _is_field(RunConfig, ".".join(tail[1:]))):
                return None
            return (f"--set {key}: {'.'.join(tail)} is not a field of a search parameter "
                    f"({', '.join(sorted(spec_fields))})")
        return f"--set {key}: {'.'.join(rest)} is not a run config field"
    try:
        field_type(cls, key)
        return None
    except ConfigError:
        pass
    for i in range(len(parts) - 1, 0, -1):  # a key inside a mapping field (resources.custom.x)
        try:
            tp = field_type(cls, ".".join(parts[:i]))
        except ConfigError:
            continue
        if typing.get_origin(tp) is dict:
            return None
        break
    return f"--set {key}: not a config field of {cls.__name__}"


def hardmix_problems(argv: list[str], fails_on_purpose: bool = False) -> list[str]:
    """What is wrong with one ``hardmix`` command line (empty when nothing is)."""
    from hardmix.cli import build_parser
    from hardmix.config import (ConfigError, RunConfig, SweepConfig, load_config,
                                preset_names)
    from hardmix.methods import METHODS

    helps = {"-h", "--help", "--version"}
    shown_help = any(a in helps for a in argv)
    argv = [a for a in argv if a not in helps]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return [f"does not parse (exit {exc.code}): {err.getvalue().strip()}"]
    if args.command is None:
        return [] if shown_help else ["names no subcommand"]
    problems = []
    presets = preset_names()
    if getattr(args, "preset", None) and args.preset not in presets:
        problems.append(f"--preset {args.preset}: no such preset ({', '.join(presets)})")
    if args.command == "presets" and args.name and args.name not in presets:
        problems.append(f"presets {args.name}: no such preset")
    if args.command == "report" and args.baseline not in METHODS:
        problems.append(f"--baseline {args.baseline}: not a method")
    cls = SweepConfig if args.command == "sweep" else RunConfig
    overrides = list(getattr(args, "overrides", []) or [])
    for pair in overrides:
        key, sep, _ = pair.partition("=")
        if not sep:
            problems.append(f"--set {pair!r}: needs KEY=VALUE")
            continue
        why = key_problem(cls, key.strip())
        if why:
            problems.append(why)
    if problems or fails_on_purpose or args.command not in ("train", "sweep"):
        return problems
    if args.command == "sweep":
        overrides += [f"address={args.address}"] if args.address else []
        overrides += [f"storage={args.storage}"] if args.storage else []
    config = getattr(args, "config", None)
    if config and not (REPO / config).is_file():
        config = None  # a user's own file: only the preset and --set are checked
    try:
        load_config(cls, args.preset, config, overrides)
    except ConfigError as exc:
        problems.append(f"is not a valid config: {exc}")
    return problems


def _script_options(path: Path) -> set[str]:
    return set(re.findall(r"""["'](--?[A-Za-z][\w-]*)["']""", path.read_text()))


def _extras() -> set[str]:
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(meta["project"].get("optional-dependencies", {}))


def other_problems(cmd: list[str]) -> list[str]:
    """Checks of non-hardmix commands: python scripts and modules, pip extras, files."""
    problems = []
    prog = cmd[0]
    if re.fullmatch(r"python3?", prog) and len(cmd) > 1:
        if cmd[1] == "-m" and len(cmd) > 2:
            mod = cmd[2]
            if mod.split(".")[0] in ("hardmix", "tune", "ablations", "benchmarks") and \
                    importlib.util.find_spec(mod) is None:
                problems.append(f"python -m {mod}: no such module")
        elif cmd[1].endswith(".py"):
            script = REPO / cmd[1]
            if not script.is_file():
                problems.append(f"python {cmd[1]}: no such file in the repository")
            else:
                known = _script_options(script)
                for arg in cmd[2:]:
                    opt = arg.split("=", 1)[0]
                    if opt.startswith("--") and opt not in known:
                        problems.append(f"python {cmd[1]}: {opt} is not an option of the script")
    if prog in ("pip", "pip3") or (re.fullmatch(r"python3?", prog) and cmd[1:3] == ["-m", "pip"]):
        extras = _extras()
        for arg in cmd:
            m = re.fullmatch(r"(?:\.|hardmix)\[([\w,-]+)\]", arg)
            if m:
                for extra in m.group(1).split(","):
                    if extra not in extras:
                        problems.append(f"{arg}: pyproject.toml has no extra {extra!r}")
    if prog in FILE_ARG_PROGRAMS:
        for arg in cmd[1:]:
            if re.fullmatch(r"[\w.-]+\.(yaml|yml|txt|toml)", arg) and not (REPO / arg).is_file():
                problems.append(f"{prog}: {arg} is not a file of the repository")
    return problems


def command_problems(command: Command) -> list[str]:
    """Every problem of one command line (with the nested command strings of e.g.
    ``ray exec cluster.yaml "..."``)."""
    problems = [f"uses a workspace-only path ({p})" for p in WORKSPACE_PATHS
                if p in command.text]
    try:
        words = tokens(command.text)
    except ValueError as exc:
        if re.search(r"\bhardmix\s+\w", command.text):
            problems.append(f"cannot be split into shell words ({exc})")
        return problems
    pending = [words]
    while pending:
        for cmd in simple_commands(pending.pop()):
            argv = hardmix_argv(cmd)
            if argv is not None:
                problems += hardmix_problems(argv, command.fails_on_purpose)
            else:
                problems += other_problems(cmd)
            for prev, word in zip(cmd, cmd[1:]):  # a quoted command line handed to a program
                if prev.startswith("--"):  # the value of a long option is text (--description)
                    continue
                if " " in word and re.search(r"(^|[\s;&|(])hardmix\s", word):
                    try:
                        pending.append(tokens(word))
                    except ValueError:
                        problems.append(f"cannot split the nested command {word!r}")
    return problems


def doc_problems(path: Path) -> list[str]:
    text = path.read_text()
    name = str(path.relative_to(REPO))
    return [f"{cmd}\n    -> {p}" for cmd in commands_of(text, name) for p in command_problems(cmd)]


def _params(paths):
    return pytest.mark.parametrize("doc", paths, ids=[str(p.relative_to(REPO)) for p in paths])


# --------------------------------------------------------------------------------------------
# The checker itself: it must refuse what does not exist
# --------------------------------------------------------------------------------------------


def _problems_of(markdown: str) -> list[str]:
    return [p for c in commands_of(markdown) for p in command_problems(c)]


@pytest.mark.parametrize("line,why", [
    ("hardmix trian --preset quickstart", "does not parse"),
    ("hardmix train --no-such-option", "does not parse"),
    ("hardmix sweep --preset no-such-preset", "no such preset"),
    ("hardmix presets no-such-preset", "no such preset"),
    ("hardmix train --set augment.alpah=1", "not a config field"),
    ("hardmix sweep --set run.augment.nope=1", "not a config field"),
    ("hardmix sweep --set space.augment.nope.high=1", "not a run config field"),
    ("hardmix sweep --set space.augment.k.highest=1", "not a field of a search parameter"),
    ("hardmix sweep --set space.augment.k.when.augment.nope=[a]", "not a field of a search"),
    ("hardmix train --set run.augment.alpha=1", "not a config field"),
    ("hardmix train --preset cpu-quick --set data.path=../shared/data/cifar10.npz",
     "workspace-only"),
    ("ray job submit --address http://127.0.0.1:8265 -- hardmix sweep --preset nope",
     "no such preset"),
    ("hardmix train --set augment.alpha=-1", "not a valid config"),
    ("python benchmarks/no_such_bench.py", "no such file"),
    ("python benchmarks/bench_train.py --no-such-flag 3", "not an option"),
    ("python -m tune.no_such_module cluster.yaml", "no such module"),
    ("pip install -e \".[no-such-extra]\"", "no extra"),
    ("ray up no-such-cluster.yaml", "not a file"),
    ("ray exec cluster.yaml 'hardmix sweep --preset nope'", "no such preset"),
    ("hardmix report sweeps/x --baseline nope", "not a method"),
])
def test_the_checker_refuses_what_does_not_exist(line, why):
    problems = _problems_of(f"```bash\n{line}\n```\n")
    assert any(why in p for p in problems), problems


def test_the_checker_accepts_real_commands_and_environment_variables():
    markdown = "\n".join([
        "```bash",
        "export BUCKET=x  # a comment",
        "hardmix sweep --preset quickstart --set name=q --set run.data.subset=5000 \\",
        "    --set space.augment.method.values=[cutmix,hardmix] --dry-run",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . --no-wait -- \\",
        "  hardmix sweep --preset cluster-cifar10-ablation --address auto --storage s3://$BUCKET/h",
        "hardmix sweep --preset search-hardmix --set space.augment.k.high=0.4 "
        "--set 'space.augment.k.when.augment.criterion=[topk_loss]'",
        "hardmix sweep --preset search-hardmix --set space.augment.k=null",
        "hardmix sweep --set resources.custom.ssd=1 --set 'arms=[{augment.method: cutmix}]' "
        "--set mode=grid",
        "cat > /tmp/x.json <<'JSON'",
        "hardmix this line is a heredoc body, not a command",
        "JSON",
        "hardmix train --help",
        "python -m tune.cluster cluster.yaml",
        "python benchmarks/bench_train.py --rounds 3 --compile",
        "pip install -e \".[dev]\" \"hardmix[timm]\"",
        "```",
        "```console",
        "$ hardmix train --set augment.alpha=-1",
        "hardmix: error: augment.alpha = -1.0: must be > 0",
        "$ hardmix presets",
        "quickstart   sweep  ...",
        "```",
    ])
    cmds = commands_of(markdown)
    assert [c.text.split()[0] for c in cmds] == ["export", "hardmix", "ray", "hardmix",
                                                  "hardmix", "hardmix", "cat", "hardmix",
                                                  "python", "python", "pip", "hardmix",
                                                  "hardmix"]
    assert cmds[-2].fails_on_purpose and not cmds[-1].fails_on_purpose
    assert _problems_of(markdown) == []


# --------------------------------------------------------------------------------------------
# The docs
# --------------------------------------------------------------------------------------------


def test_the_long_readme_sections_have_their_docs():
    missing = [d for d in REQUIRED_DOCS if not (REPO / "docs" / f"{d}.md").is_file()]
    assert not missing, missing


@_params(DOCS)
def test_every_shell_command_names_real_subcommands_options_presets_and_fields(doc):
    problems = doc_problems(doc)
    assert not problems, "\n".join(problems)


@_params(DOCS)
def test_no_workspace_only_paths(doc):
    lines = [f"{doc.relative_to(REPO)}:{i}: {line.strip()}"
             for i, line in enumerate(doc.read_text().splitlines(), 1)
             if any(p in line for p in WORKSPACE_PATHS)]
    assert not lines, "\n".join(lines)


@_params(DOCS)
def test_yaml_config_examples_are_valid_configs(doc):
    from hardmix.config import (ConfigError, RunConfig, SweepConfig, from_dict, preset_kind,
                                validate)

    top_keys = ({f.name for f in dataclasses.fields(SweepConfig)}
                | {f.name for f in dataclasses.fields(RunConfig)} | {"base"})
    problems = []
    for _, line, body in blocks(doc.read_text(), ("yaml", "yml")):
        try:
            raw = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            problems.append(f"{doc.name}:{line}: not YAML ({exc})")
            continue
        if not isinstance(raw, dict) or not set(raw) & top_keys:
            continue  # not a config (e.g. a cluster file excerpt)
        raw.pop("base", None)
        cls = SweepConfig if preset_kind(raw) == "sweep" else RunConfig
        try:
            validate(from_dict(cls, raw))
        except ConfigError as exc:
            problems.append(f"{doc.name}:{line}: not a valid {cls.__name__}: {exc}")
    assert not problems, "\n".join(problems)


@_params(DOCS)
def test_python_examples_compile_and_import_what_exists(doc):
    problems = []
    for _, line, body in blocks(doc.read_text(), ("python", "py")):
        try:
            compile(body, f"{doc.name}:{line}", "exec")
        except SyntaxError as exc:
            problems.append(f"{doc.name}:{line}: {exc}")
            continue
        for m in re.finditer(r"^\s*from\s+((?:hardmix|tune|ablations)[\w.]*)\s+import\s+"
                             r"\(?([\w\s,]+)\)?", body, re.M):
            module, names = m.group(1), [n.strip() for n in m.group(2).split(",") if n.strip()]
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                problems.append(f"{doc.name}:{line}: from {module}: {exc}")
                continue
            for n in names:
                n = n.split()[0]
                if not hasattr(mod, n) and importlib.util.find_spec(f"{module}.{n}") is None:
                    problems.append(f"{doc.name}:{line}: {module} has no {n}")
    assert not problems, "\n".join(problems)


def test_cli_doc_lists_every_preset_with_its_kind():
    from hardmix.config import preset_kind, preset_names, read_preset

    text = (REPO / "docs" / "cli.md").read_text()
    start, end = text.index("<!-- presets -->"), text.index("<!-- /presets -->")
    rows = re.findall(r"^\|\s*`([\w.-]+)`\s*\|\s*(\w+)\s*\|", text[start:end], re.M)
    listed = {name: kind for name, kind in rows}
    assert len(listed) == len(rows), "a preset is listed twice"
    shipped = set(preset_names())
    assert set(listed) == shipped, (f"missing: {sorted(shipped - set(listed))}, "
                                    f"not presets: {sorted(set(listed) - shipped)}")
    wrong = {n: k for n, k in listed.items() if k != preset_kind(read_preset(n))}
    assert not wrong, f"kind differs from the preset's: {wrong}"
