"""Mutation testing of the core: does the test suite notice a plausible bug?

    python benchmarks/mutation.py [--modules hardmix/mix.py ...] [--max-per-module 40] [--jobs 2]

Each module of :data:`MODULES` is mutated one plausible bug at a time by a small AST mutator
(comparison flips ``<``/``<=``/``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``in``/``not in``;
arithmetic ``+``/``-``, ``*``/``/``, ``//``, ``%``, shifts and bitwise operators; integer and float
constants off by one, ``True``/``False`` flipped; ``and``/``or`` swapped; a ``not`` removed or an
``if``/``while``/conditional-expression test negated; a call statement, an attribute or item
assignment or a ``raise`` removed; a returned value replaced by ``None``). Docstrings, strings,
f-strings and annotations are left alone, and a mutant that does not compile is not generated.
Every mutant runs against the module's own test files only (:data:`MODULES`:
``tests/test_<name>.py`` by naming convention plus an explicit table), so that the whole run
fits a small machine:

* the module's test files first run once unmutated (the *baseline*), with a line tracer that
  records which test executes which line of the module; tests that fail there are left out;
* a mutant inside a function body runs the tests that executed its lines, fastest first, then
  the other tests of their files (a module-scoped fixture runs the code in the first test that
  asks for it, the tests after it only check the result), stopping at the first failure
  (``-x``); a mutant at module or class level (run at import:
  constants, tables, default arguments) or on a line no test executed in-process (a test may
  reach it in a subprocess) runs all of the module's test files;
* a mutant is *killed* when a test fails (or the module no longer imports), or when it runs
  past its timeout (``--timeout-factor`` × the baseline time of its tests + 30 s); it *survives*
  when every test passes.

Mutants never touch the checkout: the tree (tracked and untracked, not ignored, files of the
working tree; ``--from-head``: the last commit) is copied to a scratch folder, one copy per
parallel job, and the mutated file is written there. A forked child per mutant (the parent
imports the heavy third-party packages once, never the project) puts the copy first on
``sys.path`` and in ``PYTHONPATH`` (ahead of the editable install of the checkout), with byte
code writing off so that a mutant of the same size is never served from a stale ``.pyc``. At
the start, a sentinel mutant that makes the project's packages fail at import must fail the
first module's tests at collection, which shows that the tests really import the scratch copy;
otherwise the run stops.

Mutants are ordered by a hash of their module, operator, line text and snippet (not of their
line number, so the order survives edits elsewhere), and ``--max-per-module N`` keeps the
first ``N`` of each module: a deterministic sample. Equivalent mutants (no test can tell
them from the original) are excused by :data:`EQUIVALENTS_FILE`, a reviewed list keyed by
module, line, operator and snippet with a one-line reason each; the run prints each excused
mutant with its reason, and any entry that matches no generated mutant as stale.
Score = killed / (killed + survived), equivalents left out.

``--smoke`` (CI, not a measurement): one small module, a handful of mutants.

Last line: ``mutation_score=<x> killed=<k> survived=<s> equivalent=<e>``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
EQUIVALENTS_FILE = REPO / "benchmarks" / "mutation_equivalents.json"
PROJECT_PACKAGES = ("hardmix", "tune", "ablations")

#: Module -> its own test files besides ``tests/test_<name>.py`` (or ``test_<package>.py`` for a
#: module of a sub-package), which is added when it exists.
EXTRA_TESTS: dict[str, list[str]] = {
    "hardmix/mix.py": ["tests/test_box_edges.py"],
    "hardmix/sources.py": ["tests/test_memory_order.py", "tests/test_topup.py"],
    "hardmix/hardness.py": ["tests/test_hardmix.py", "tests/test_memory_order.py"],
    "hardmix/augment.py": ["tests/test_hardmix.py", "tests/test_memory_order.py"],
    "hardmix/loss.py": ["tests/test_hardmix.py", "tests/test_mixed_loss.py"],
    "hardmix/metrics.py": ["tests/test_metric_applies.py", "tests/test_stats.py"],
    "hardmix/checkpoint.py": ["tests/test_device_path.py", "tests/test_atomic_writes.py",
                              "tests/test_resume_picks.py"],
    "hardmix/config/rules.py": ["tests/test_rule_boundaries.py", "tests/test_space.py"],
    "ablations/stats.py": ["tests/test_difference_references.py"],
    "ablations/report.py": ["tests/test_report_sections.py", "tests/test_rule_boundaries.py"],
    "ablations/store.py": ["tests/test_atomic_writes.py"],
    # the store's writer and the atomic writes it uses (split out of ablations/store.py)
    "ablations/writer.py": ["tests/test_store.py", "tests/test_atomic_writes.py",
                            "tests/test_store_callback.py"],
    "ablations/storage.py": ["tests/test_atomic_writes.py"],
    "tune/resume.py": ["tests/test_space.py", "tests/test_resume_picks.py"],
}
#: The modules, in the order they run.
MODULES = list(EXTRA_TESTS)
#: At most this many mutants of a module whose tests are slow (each test of the report builds
#: whole reports, 5-10 s), whatever --max-per-module says.
CAPS = {"ablations/report.py": 15}
#: Tests never run here: they need a GPU or a simulated multi-node cluster.
MARKERS = "not cuda and not multinode"
SMOKE_MODULE, SMOKE_MUTANTS = "hardmix/loss.py", 4
#: Broken at import in the scratch copy at the start: every test file must then fail to collect.
SENTINELS = tuple(f"{p}/__init__.py" for p in PROJECT_PACKAGES)


def test_files(module: str, root: Path = REPO) -> list[str]:
    """The module's own test files: ``tests/test_<stem>.py`` (``tests/test_<package>.py`` for a
    sub-package's module) where it exists, then the explicit table."""
    path = Path(module)
    names = [f"tests/test_{path.stem}.py"]
    if len(path.parts) > 2:
        names.append(f"tests/test_{path.parts[-2]}.py")
    out = [n for n in names if (root / n).is_file()]
    out += [n for n in EXTRA_TESTS.get(module, []) if n not in out and (root / n).is_file()]
    return out


# --------------------------------------------------------------------------------------------
# Mutants
# --------------------------------------------------------------------------------------------

COMPARE = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
           ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"),
           ast.IsNot: ("is not", "is"), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
         ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "//"), ast.LShift: ("<<", ">>"),
         ast.RShift: (">>", "<<"), ast.BitAnd: ("&", "|"), ast.BitOr: ("|", "&"),
         ast.BitXor: ("^", "|"), ast.Pow: ("**", "*")}


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    op: str
    before: str
    after: str
    edits: tuple[tuple[int, int, str], ...]  # (start, end, text) character offsets, sorted
    anchors: tuple[int, ...]  # lines whose execution means the mutant ran
    at_import: bool  # module or class level, or a default argument: runs on import
    function: str
    order: str  # sampling key: a hash that does not depend on the line number
    nth: int = 1  # the same operator and snippet more than once on a line: which one
    code: str = ""  # the line's source text, stripped (finds an excused mutant that moved)

    @property
    def key(self) -> tuple[str, int, str, str, str, int]:
        return (self.module, self.line, self.op, self.before, self.after, self.nth)

    def label(self) -> str:
        nth = f" #{self.nth}" if self.nth > 1 else ""
        return (f"{self.module}:{self.line} {self.op}{nth} `{self.before}` -> `{self.after}` "
                f"({self.function})")

    def apply(self, source: str) -> str:
        out, last = [], 0
        for start, end, text in self.edits:
            out += [source[last:start], text]
            last = end
        return "".join(out) + source[last:]


class _Source:
    """Offsets of a source text: AST positions (UTF-8 byte columns) and tokens (characters)."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))
        self.tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                       if t.type in (tokenize.OP, tokenize.NAME)]

    def char(self, line: int, byte_col: int) -> int:
        ln = self.lines[line - 1]
        return self.starts[line - 1] + len(ln.encode()[:byte_col].decode(errors="replace"))

    def start(self, node: ast.AST) -> int:
        return self.char(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.char(node.end_lineno, node.end_col_offset)

    def pos(self, rc: tuple[int, int]) -> int:
        return self.starts[rc[0] - 1] + rc[1]

    def op_tokens(self, lo: int, hi: int, words: tuple[str, ...]) -> Optional[tuple[int, int, int]]:
        """The operator ``words`` (one or two tokens) between offsets lo and hi:
        ``(start, end, line)``."""
        toks = [t for t in self.tokens if self.pos(t.start) >= lo and self.pos(t.end) <= hi]
        for i in range(len(toks) - len(words) + 1):
            if tuple(t.string for t in toks[i:i + len(words)]) == words:
                last = toks[i + len(words) - 1]
                return self.pos(toks[i].start), self.pos(last.end), toks[i].start[0]
        return None


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.add(id(body[0]))
    return out


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                                and isinstance(node.value, (str, bytes)))


def generate(module: str, root: Path = REPO) -> list[Mutant]:
    """Every mutant of ``module`` (a path relative to ``root``) that compiles."""
    text = (root / module).read_text()
    src = _Source(text)
    tree = ast.parse(text)
    docstrings = _docstring_nodes(tree)
    found: list[Mutant] = []
    seen_order: dict[str, int] = defaultdict(int)
    seen_key: dict[tuple, int] = defaultdict(int)

    def add(op: str, line: int, edits: list[tuple[int, int, str]], before: str, after: str,
            stmt: ast.stmt, node: ast.AST, at_import: bool, function: str) -> None:
        m_lines = set(range(getattr(node, "lineno", line), getattr(node, "end_lineno", line) + 1))
        anchors = tuple(sorted(m_lines | {stmt.lineno, line}))
        line_text = src.lines[line - 1].strip()
        base = f"{module}|{op}|{line_text}|{before}|{after}"
        seen_order[base] += 1
        order = hashlib.sha1(f"{base}|{seen_order[base]}".encode()).hexdigest()
        seen_key[(line, op, before, after)] += 1
        found.append(Mutant(module, line, op, before, after, tuple(sorted(edits)), anchors,
                            at_import, function, order, seen_key[(line, op, before, after)],
                            line_text))

    def visit(node: ast.AST, stmt: Optional[ast.stmt], in_body: bool, function: str) -> None:
        if isinstance(node, ast.stmt):
            if id(node) in docstrings:
                return
            stmt = node
            _statement_mutants(node, in_body, function)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                visit(dec, stmt, in_body, function)
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                visit(default, stmt, in_body, function)  # evaluated where the def runs
            name = node.name if function == "<module>" else f"{function}.{node.name}"
            for child in node.body:
                visit(child, child, True, name)
            return
        if isinstance(node, ast.ClassDef):
            for child in node.bases + node.keywords + node.decorator_list:
                visit(child, stmt, in_body, function)
            for child in node.body:
                visit(child, child, in_body, f"{node.name}" if function == "<module>"
                      else f"{function}.{node.name}")
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                visit(node.value, stmt, in_body, function)
            return
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_text(node):
            return
        if isinstance(node, ast.expr):
            _expression_mutants(node, stmt, in_body, function)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.arguments, ast.arg)):
                continue
            visit(child, stmt, in_body, function)

    def _expression_mutants(node: ast.expr, stmt: ast.stmt, in_body: bool, function: str) -> None:
        at_import = not in_body
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                pair = COMPARE.get(type(op))
                if pair:
                    loc = src.op_tokens(src.end(left), src.start(right), tuple(pair[0].split()))
                    if loc:
                        add("compare", loc[2], [(loc[0], loc[1], pair[1])], pair[0], pair[1],
                            stmt, node, at_import, function)
                left = right
        elif isinstance(node, ast.BinOp):
            pair = BINOP.get(type(node.op))
            if pair and not (_is_text(node.left) or _is_text(node.right)):
                loc = src.op_tokens(src.end(node.left), src.start(node.right), (pair[0],))
                if loc:
                    add("arith", loc[2], [(loc[0], loc[1], pair[1])], pair[0], pair[1],
                        stmt, node, at_import, function)
        elif isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            other = "or" if word == "and" else "and"
            edits, line = [], None
            for a, b in zip(node.values, node.values[1:]):
                loc = src.op_tokens(src.end(a), src.start(b), (word,))
                if loc:
                    edits.append((loc[0], loc[1], other))
                    line = line or loc[2]
            if edits:
                add("boolop", line, edits, word, other, stmt, node, at_import, function)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            word = {ast.Not: "not", ast.USub: "-", ast.Invert: "~"}[type(node.op)]
            if not (isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)):
                s = src.start(node)
                add("unary", node.lineno, [(s, s + len(word), "")],
                    f"{word} {ast.unparse(node.operand)}"[:60], ast.unparse(node.operand)[:60],
                    stmt, node, at_import, function)
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) \
                and node.value is not None and node.value is not Ellipsis:
            v = node.value
            if isinstance(v, bool):
                new = repr(not v)
            elif isinstance(v, int):
                new = repr(v + 1)
            elif isinstance(v, float):
                new = repr(v + 1.0)
            else:
                return
            add("constant", node.lineno, [(src.start(node), src.end(node), new)], repr(v), new,
                stmt, node, at_import, function)
        elif isinstance(node, ast.IfExp):
            _negate(node.test, stmt, node.test, at_import, function)
        elif isinstance(node, ast.comprehension):
            pass

    def _negate(test: ast.expr, stmt: ast.stmt, node: ast.AST, at_import: bool,
                function: str) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # removing the `not` is the same mutant
        s, e = src.start(test), src.end(test)
        add("negate", test.lineno, [(s, s, "not ("), (e, e, ")")], ast.unparse(test)[:60],
            f"not ({ast.unparse(test)})"[:60], stmt, node, at_import, function)

    def _statement_mutants(node: ast.stmt, in_body: bool, function: str) -> None:
        at_import = not in_body
        if isinstance(node, (ast.If, ast.While)):
            _negate(node.test, node, node.test, at_import, function)
        removable = (
            (isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)))
            or isinstance(node, (ast.Raise, ast.AugAssign))
            or (isinstance(node, ast.Assign)
                and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)))
        if removable:
            first = ast.unparse(node).splitlines()[0]
            add("remove", node.lineno, [(src.start(node), src.end(node), "pass")], first[:60],
                "pass", node, node, at_import, function)
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add("return", node.lineno, [(src.start(node.value), src.end(node.value), "None")],
                ast.unparse(node.value)[:60], "None", node, node, at_import, function)

    for child in tree.body:
        visit(child, child, False, "<module>")
    out = []
    for m in found:
        try:
            compile(m.apply(text), module, "exec")
        except SyntaxError:
            continue
        out.append(m)
    return out


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> list[dict]:
    """The reviewed list of equivalent mutants: one entry per mutant (module, line, operator,
    snippet before and after, ``nth`` where the line has the same one twice, the line's code)
    with its ``reason``."""
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())
    for e in entries:
        missing = [k for k in ("module", "line", "op", "before", "after", "code", "reason")
                   if not str(e.get(k, "")).strip()]
        if missing:
            raise SystemExit(f"{path.name}: entry {e} lacks {', '.join(missing)}")
    return entries


def match_equivalents(entries: list[dict], mutants: list[Mutant]
                      ) -> tuple[dict[tuple, str], list[str], list[dict]]:
    """Excused mutants: ``{key: reason}``, notes on entries whose line moved, and stale entries
    (no such mutant). An entry matches its module, line, operator and snippet; when others
    edited the file and the line moved, the one mutant with the same line of code, operator
    and snippet matches instead (and the move is reported, so that the list is updated)."""
    by_key = {m.key: m for m in mutants}
    by_code: dict[tuple, list[Mutant]] = defaultdict(list)
    for m in mutants:
        by_code[(m.module, m.code, m.op, m.before, m.after, m.nth)].append(m)
    excused, moved, stale = {}, [], []
    for e in entries:
        nth = int(e.get("nth", 1))
        key = (e["module"], int(e["line"]), e["op"], e["before"], e["after"], nth)
        m = by_key.get(key)
        if m is None or m.code != e["code"]:
            same = by_code.get((e["module"], e["code"], e["op"], e["before"], e["after"], nth), [])
            m = same[0] if len(same) == 1 else None
            if m is not None:
                moved.append(f"{e['module']}:{e['line']} is now line {m.line}: {e['code']}")
        if m is None:
            stale.append(e)
        else:
            excused[m.key] = e["reason"]
    return excused, moved, stale


# --------------------------------------------------------------------------------------------
# Running tests in a forked child of a parent that holds the heavy imports
# --------------------------------------------------------------------------------------------

HEAVY = ("torch", "numpy", "pandas", "pyarrow", "pyarrow.parquet", "pyarrow.dataset",
         "pyarrow.fs", "pyarrow.compute", "scipy.stats", "yaml", "pytest", "optuna")


def preimport() -> None:
    import importlib

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    for name in HEAVY:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    leaked = [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]
    if leaked:
        raise SystemExit(f"the parent imported project modules {leaked[:3]}: children would "
                         "not see mutants")


def line_tracer(target: str) -> Any:
    """A pytest plugin: which lines of the file ``target`` each test executes (setup, call and
    teardown), each test's duration and whether it failed. Lines run outside a test
    (collection, imports) are not attributed."""
    import threading

    import pytest

    class LineTracer:
        def __init__(self) -> None:
            self.current: Optional[str] = None
            self.lines: dict[str, set[int]] = defaultdict(set)
            self.durations: dict[str, float] = defaultdict(float)
            self.failed: set[str] = set()
            self.order: list[str] = []

        def _global(self, frame, event, arg):
            return self._local if frame.f_code.co_filename == target else None

        def _local(self, frame, event, arg):
            if event == "line" and self.current is not None:
                self.lines[self.current].add(frame.f_lineno)
            return self._local

        def pytest_sessionstart(self, session):
            sys.settrace(self._global)
            threading.settrace(self._global)

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_protocol(self, item, nextitem):
            self.current = item.nodeid
            self.order.append(item.nodeid)

        def pytest_runtest_logreport(self, report):
            self.durations[report.nodeid] += report.duration
            if report.failed:
                self.failed.add(report.nodeid)
            if report.when == "teardown":
                self.current = None

        def dump(self, path: str) -> None:
            sys.settrace(None)
            threading.settrace(None)
            Path(path).write_text(json.dumps({
                "tests": self.order, "failed": sorted(self.failed),
                "durations": dict(self.durations),
                "lines": {k: sorted(v) for k, v in self.lines.items()}}))

    return LineTracer()


def _child(root: Path, args: list[str], log: Path, tracer_target: Optional[str],
           tracer_out: Optional[str]) -> None:
    """In the forked child: run pytest in the scratch copy; never returns."""
    rc = 3
    try:
        os.setsid()
        fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(root)
        sys.path.insert(0, str(root))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        import pytest

        plugins = []
        tracer = None
        if tracer_target:
            tracer = line_tracer(tracer_target)
            plugins.append(tracer)
        rc = int(pytest.main(args, plugins=plugins))
        if tracer is not None:
            tracer.dump(tracer_out)
    except BaseException as exc:  # noqa: BLE001 - the child must exit, never unwind
        try:
            print(f"mutation child: {exc!r}", file=sys.stderr)
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


@dataclass
class Job:
    kind: str  # "baseline", "sentinel" or "mutant"
    module: str
    mutant: Optional[Mutant] = None
    args: list[str] = field(default_factory=list)
    timeout: float = 600.0
    selected: str = ""  # "covering" or "all"
    # filled when running
    slot: int = -1
    pid: int = 0
    started: float = 0.0
    log: Optional[Path] = None
    trace: Optional[str] = None


class Runner:
    """Up to ``jobs`` forked pytest children at a time, each in its own scratch copy."""

    def __init__(self, copies: list[Path], tmp: Path):
        self.copies, self.tmp = copies, tmp
        self.free = list(range(len(copies)))
        self.running: dict[int, Job] = {}
        self.originals: dict[str, str] = {}
        self.counter = 0

    def original(self, module: str) -> str:
        if module not in self.originals:
            self.originals[module] = (self.copies[0] / module).read_text()
        return self.originals[module]

    def start(self, job: Job) -> None:
        slot = self.free.pop(0)
        root = self.copies[slot]
        self.counter += 1
        job.slot, job.log = slot, self.tmp / f"job-{self.counter}.log"
        target = root / job.module
        if job.kind == "mutant":
            target.write_text(job.mutant.apply(self.original(job.module)))
        elif job.kind == "sentinel":
            for name in SENTINELS:
                (root / name).write_text("raise ImportError('mutation sentinel: the scratch "
                                         "copy is imported')\n" + self.original(name))
        tracer_target = str(target) if job.kind == "baseline" else None
        job.trace = str(self.tmp / f"trace-{self.counter}.json") if tracer_target else None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(root, job.args, job.log, tracer_target, job.trace)
        job.pid, job.started = pid, time.monotonic()
        self.running[pid] = job

    def _finish(self, job: Job) -> None:
        for name in SENTINELS if job.kind == "sentinel" else (job.module,):
            (self.copies[job.slot] / name).write_text(self.original(name))
        self.free.append(job.slot)
        self.free.sort()

    def wait(self) -> Iterator[tuple[Job, Optional[int]]]:
        """Yield (job, pytest exit code or None on timeout) for every job that ended."""
        while True:
            ended = []
            for pid, job in list(self.running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    ended.append((job, os.waitstatus_to_exitcode(status)))
                elif time.monotonic() - job.started > job.timeout:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(pid, 0)
                    ended.append((job, None))
            if ended:
                for job, rc in ended:
                    del self.running[job.pid]
                    self._finish(job)
                    yield job, rc
                return
            time.sleep(0.05)

    def kill_all(self) -> None:
        for pid in list(self.running):
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

PYTEST_BASE = ["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "-m", MARKERS]


def scratch_tree(dest: Path, from_head: bool) -> None:
    """Copy the checkout's files (no .git, no ignored files such as .venv) to ``dest``."""
    dest.mkdir(parents=True)
    if from_head:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                               check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the sources only
        names = [str(p.relative_to(REPO)) for top in (*PROJECT_PACKAGES, "tests")
                 for p in (REPO / top).rglob("*") if p.is_file()]
        names += ["pyproject.toml"]
    for name in filter(None, names):
        src = REPO / name
        if src.is_file() and "__pycache__" not in src.parts:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def first_failure(log: Path) -> str:
    try:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line.split(" - ")[0].split(" ", 1)[1]
    except OSError:
        pass
    return ""


def uncollectable(log: Path) -> bool:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return "found no collectors" in text or "ERROR collecting" in text


@dataclass
class Baseline:
    tests: list[str]
    failed: set[str]
    durations: dict[str, float]
    lines: dict[int, set[str]]  # line -> tests that executed it
    wall: float


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", default=None, help=f"subset of {', '.join(MODULES)}")
    ap.add_argument("--max-per-module", type=int, default=None,
                    help="deterministic sample: the first N mutants of each module by hash order")
    ap.add_argument("--jobs", type=int, default=2, help="parallel test processes (default 2)")
    ap.add_argument("--timeout-factor", type=float, default=5.0,
                    help="a mutant's timeout: this × the baseline time of its tests + 30 s")
    ap.add_argument("--from-head", action="store_true",
                    help="mutate the last commit instead of the working tree's files")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--grep", default=None,
                    help="only the mutants whose label contains this text (e.g. 'mix.py:108 ')")
    ap.add_argument("--json", type=Path, default=None, help="write every mutant's outcome here")
    ap.add_argument("--check-equivalents", action="store_true",
                    help="run the excused mutants too (an excused mutant that is killed is "
                         "reported: its entry is wrong)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI: {SMOKE_MODULE} only, {SMOKE_MUTANTS} mutants (not a measurement)")
    args = ap.parse_args(argv)
    modules = args.modules or MODULES
    limit = args.max_per_module
    if args.smoke:
        modules, limit = [SMOKE_MODULE], SMOKE_MUTANTS
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"--modules: {unknown[0]} is not one of {', '.join(MODULES)}", file=sys.stderr)
        return 2

    entries = [e for e in load_equivalents() if e["module"] in modules]

    def make_plan(root: Path) -> tuple[dict, dict, list, tuple]:
        """The mutants of the files under ``root`` (the scratch copy: what the tests run)."""
        plan: dict[str, list[Mutant]] = {}
        total: dict[str, int] = {}
        generated: list[Mutant] = []
        for module in modules:
            every = generate(module, root)
            generated += every
            total[module] = len(every)
            every.sort(key=lambda m: m.order)
            if args.grep:
                every = [m for m in every if args.grep in m.label()]
            cap = min(limit, CAPS.get(module, limit)) if limit else None
            chosen = every[:cap] if cap else every
            plan[module] = sorted(chosen, key=lambda m: (m.line, m.op, m.before))
        return plan, total, generated, match_equivalents(entries, generated)

    if args.list:
        plan, _, _, (equivalents, _, _) = make_plan(REPO)
        for module, mutants in plan.items():
            for m in mutants:
                tag = "  [equivalent]" if m.key in equivalents else ""
                print(m.label() + tag)
        n = sum(map(len, plan.values()))
        print(f"mutation_score=0 killed=0 survived={n} equivalent=0")
        return 0

    t0 = time.monotonic()
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C: children killed, scratch copy removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="hardmix-mutation-"))
    copies = []
    try:
        base = tmp / "w0"
        scratch_tree(base, args.from_head)
        # the mutants of the copy, never of the checkout, which others may be editing
        plan, total, generated, (equivalents, moved, stale) = make_plan(base)
        copies.append(base)
        for i in range(1, max(1, args.jobs)):
            shutil.copytree(base, tmp / f"w{i}")
            copies.append(tmp / f"w{i}")
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("MPLBACKEND", "Agg")
        preimport()
        runner = Runner(copies, tmp)
        files = {m: test_files(m, base) for m in modules}
        for m in modules:
            if not files[m]:
                print(f"{m}: no test files", file=sys.stderr)
                return 2
        print(f"mutation run: {sum(map(len, plan.values()))} mutants "
              f"({'sample of ' + str(limit) + ' per module, ' if limit else ''}"
              f"{sum(total.values())} generated) over {len(modules)} module(s), "
              f"{len(copies)} parallel job(s), scratch copy {tmp} of "
              f"{'HEAD' if args.from_head else 'the working tree'}", flush=True)
        results = run_all(runner, plan, files, equivalents, args)
    finally:
        try:
            runner.kill_all()  # noqa: F821 - only when it exists
        except NameError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return report(results, plan, total, equivalents, limit, args, time.monotonic() - t0,
                  moved, stale)


def run_all(runner: Runner, plan: dict[str, list[Mutant]], files: dict[str, list[str]],
            equivalents: dict[tuple, str], args) -> dict[tuple, dict]:
    modules = list(plan)
    baselines: dict[str, Baseline] = {}
    results: dict[tuple, dict] = {}
    queue: list[Job] = []
    first = modules[0]
    queue.append(Job("sentinel", SENTINELS[0], timeout=300,
                     args=files[first] + ["--collect-only"] + PYTEST_BASE))
    for m in modules:
        queue.append(Job("baseline", m, args=files[m] + PYTEST_BASE, timeout=1800))
    for m in modules:
        for mut in plan[m]:
            if mut.key in equivalents and not args.check_equivalents:
                results[mut.key] = {"mutant": mut, "outcome": "equivalent",
                                    "reason": equivalents[mut.key]}
                continue
            queue.append(Job("mutant", m, mutant=mut))
    sentinel_ok = None
    done_count, n_mut = 0, sum(1 for j in queue if j.kind == "mutant")
    while queue or runner.running:
        while runner.free and queue:
            job = next((j for j in queue if j.kind != "mutant" or (
                j.module in baselines and sentinel_ok)), None)
            if job is None:
                break
            queue.remove(job)
            if job.kind == "mutant" and not prepare(job, baselines[job.module], files, args):
                results[job.mutant.key] = {"mutant": job.mutant, "outcome": "survived",
                                           "tests": "none", "why": "no test of its files runs"}
                continue
            runner.start(job)
        if not runner.running:
            if queue and sentinel_ok is False:
                break
            continue
        for job, rc in runner.wait():
            if job.kind == "sentinel":
                sentinel_ok = rc not in (0, None)
                if not sentinel_ok:
                    raise SystemExit("sentinel: the tests did not import the scratch copy (a "
                                     f"module that cannot import collected fine): {job.log}")
                print(f"sentinel: a module broken in the scratch copy fails collection "
                      f"(exit {rc}): tests import the copy", flush=True)
            elif job.kind == "baseline":
                baselines[job.module] = read_baseline(job, rc)
                b = baselines[job.module]
                print(f"baseline {job.module}: {len(b.tests)} tests in {b.wall:.0f} s "
                      f"({len(b.failed)} failing there, left out: "
                      f"{', '.join(sorted(b.failed)) or 'none'})", flush=True)
            else:
                done_count += 1
                mut = job.mutant
                if rc is None:
                    outcome, how = "killed", "timeout"
                elif rc == 0:
                    outcome, how = "survived", ""
                elif rc in (1, 2) or (rc == 4 and uncollectable(job.log)):
                    # 4: a test file the mutant keeps from importing (its nodes are not found)
                    outcome, how = "killed", first_failure(job.log) or f"exit {rc}"
                else:
                    outcome, how = "error", f"pytest exit {rc}: {job.log.read_text()[-300:]}"
                if mut.key in equivalents and outcome == "killed":
                    outcome = "killed"  # reported below as a wrong entry
                results[mut.key] = {"mutant": mut, "outcome": outcome, "by": how,
                                    "tests": job.selected,
                                    "seconds": time.monotonic() - job.started}
                if outcome != "killed" or done_count % 25 == 0:
                    print(f"[{done_count}/{n_mut}] {outcome}: {mut.label()} "
                          f"({job.selected} tests{', ' + how if how else ''})", flush=True)
    return results


def read_baseline(job: Job, rc: Optional[int]) -> Baseline:
    if rc is None or job.trace is None or not Path(job.trace).is_file():
        raise SystemExit(f"baseline of {job.module} did not finish (exit {rc}): "
                         f"{job.log.read_text()[-2000:] if job.log else ''}")
    data = json.loads(Path(job.trace).read_text())
    lines: dict[int, set[str]] = defaultdict(set)
    for test, hit in data["lines"].items():
        for ln in hit:
            lines[ln].add(test)
    return Baseline(data["tests"], set(data["failed"]), data["durations"], lines,
                    time.monotonic() - job.started)


def prepare(job: Job, base: Baseline, files: dict[str, list[str]], args) -> bool:
    """Choose a mutant's tests and timeout; False when none of them can run."""
    mut = job.mutant
    ok = [t for t in base.tests if t not in base.failed]
    if not ok:
        return False
    covering = set()
    if not mut.at_import:
        for ln in mut.anchors:
            covering |= base.lines.get(ln, set())
    covering -= base.failed
    if covering:
        # the covering tests first, then the rest of their files: a module- or session-scoped
        # fixture runs the code once, in the first test that asks for it, and the tests after
        # it check the result without executing a line of it
        by_time = lambda t: (base.durations.get(t, 0.0), t)
        files_of = {t.split("::")[0] for t in covering}
        rest = [t for t in ok if t not in covering and t.split("::")[0] in files_of]
        tests = sorted(covering, key=by_time) + sorted(rest, key=by_time)
        job.args = tests + ["-x"] + PYTEST_BASE
        job.selected = f"{len(covering)} covering + {len(rest)} of their files"
        seconds = sum(base.durations.get(t, 0.0) for t in tests)
    else:
        deselect = [a for t in sorted(base.failed) for a in ("--deselect", t)]
        job.args = files[job.module] + deselect + ["-x"] + PYTEST_BASE
        job.selected = f"all {len(ok)}"
        seconds = sum(base.durations.get(t, 0.0) for t in ok)
    job.timeout = args.timeout_factor * seconds + 30.0
    return True


def report(results: dict[tuple, dict], plan: dict[str, list[Mutant]], total: dict[str, int],
           equivalents: dict[tuple, str], limit: Optional[int], args, wall: float,
           moved: list[str], stale: list[dict]) -> int:
    killed = survived = equivalent = errors = 0
    rows = []
    print()
    for module, mutants in plan.items():
        outs = [results.get(m.key, {"mutant": m, "outcome": "not run"}) for m in mutants]
        k = sum(r["outcome"] == "killed" for r in outs)
        s = sum(r["outcome"] == "survived" for r in outs)
        e = sum(r["outcome"] == "equivalent" for r in outs)
        err = sum(r["outcome"] not in ("killed", "survived", "equivalent") for r in outs)
        killed, survived = killed + k, survived + s
        equivalent, errors = equivalent + e, errors + err
        score = k / (k + s) if k + s else 1.0
        sample = (f" (sample of {len(mutants)} of {total[module]})"
                  if len(mutants) < total[module] else "")
        print(f"{module}: {len(mutants)} mutants{sample}: killed {k}, survived {s}, "
              f"equivalent {e}{f', errors {err}' if err else ''}, score {score:.3f}")
        for r in outs:
            m = r["mutant"]
            if r["outcome"] == "survived":
                print(f"  survived   {m.label()}")
            elif r["outcome"] == "equivalent":
                print(f"  equivalent {m.label()}: {r['reason']}")
            elif r["outcome"] not in ("killed",):
                print(f"  {r['outcome']:<10} {m.label()} {r.get('by', '')}")
            elif m.key in equivalents:
                print(f"  WRONG EQUIVALENT (killed by {r.get('by')}): {m.label()}")
            rows.append({"module": m.module, "line": m.line, "op": m.op, "before": m.before,
                         "after": m.after, "function": m.function, "outcome": r["outcome"],
                         "by": r.get("by", ""), "tests": r.get("tests", "")})
    generated = {m.key for ms in plan.values() for m in ms}
    for note in moved:
        print(f"  equivalent entry moved (update {EQUIVALENTS_FILE.name}): {note}")
    for e in stale:
        print(f"  stale equivalent entry (no such mutant any more): {e['module']}:{e['line']} "
              f"{e['op']} `{e['before']}` -> `{e['after']}`: {e['code']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    score = killed / (killed + survived) if killed + survived else 1.0
    print(f"\n{len(generated)} mutants in {wall / 60:.1f} min"
          f"{f' (at most {limit} per module)' if limit else ''}; errors {errors}; "
          f"stale equivalent entries {len(stale)}")
    print(f"mutation_score={score:.3f} killed={killed} survived={survived} equivalent={equivalent}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
