"""Each fact in one place, and layers that point one way.

A toy method (one method-table entry plus its mixing function) and a toy metric (one metric
entry) registered here reach validation, the sweep space, the store and the report without any
other file knowing them; the library imports neither ``tune`` nor ``ablations`` (but for the
command line's lazy imports); the analysis never imports torch; and the import graph of
``hardmix``, ``ablations`` and ``tune`` (every import, lazy ones too) has no circle and no
import from a lower layer into a higher one (docs/architecture.md).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_method():
    """``toy_mix``: hard sources, its own mixer (the sources' images averaged in whole)."""
    from hardmix import methods
    from hardmix.mix import MIXERS

    def mix_toy(x, source_index, draws, opt):
        lam = torch.full((x.shape[0],), 0.5, device=x.device)
        return 0.5 * x + 0.5 * x.index_select(0, source_index), lam

    methods.register_method(methods.MethodSpec("toy_mix", "toy", "hard", ("alpha", "prob"),
                                               summary="a toy"))
    MIXERS["toy"] = mix_toy
    yield "toy_mix"
    del methods.METHODS["toy_mix"], MIXERS["toy"]


@pytest.fixture
def toy_metric():
    from hardmix.metrics import EPOCH_METRICS, Metric, register_epoch_metric

    register_epoch_metric(Metric("toy_epoch_share", "float", "a toy: the epoch / 10",
                                 group="toy", diagnostic=True,
                                 compute=lambda run: run.epoch / 10.0))
    yield "toy_epoch_share"
    del EPOCH_METRICS["toy_epoch_share"]


def test_a_toy_method_and_metric_reach_validation_space_store_and_report(tmp_path, toy_method,
                                                                         toy_metric):
    from ablations.report import build_report
    from ablations.store import read_results
    from hardmix.commands import run_callbacks
    from hardmix.config import ConfigError, RunConfig, SweepConfig, load_config
    from hardmix.train import train
    from tune.space import grid_points
    from tune.trainable import tune_metrics

    # validation: a valid value, and its fields act as the table says
    base = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
            "optim.epochs=2", "output.progress=false", f"output.dir={tmp_path}"]
    cfg = load_config(RunConfig, overrides=base + ["augment.method=toy_mix"])
    assert cfg.augment.method == "toy_mix"
    with pytest.raises(ConfigError):
        load_config(RunConfig, overrides=base + ["augment.method=toy_mixx"])
    # the sweep space: a hard-source method, so criterion exists for it and not for CutMix
    sweep = load_config(SweepConfig, overrides=[
        "mode=grid", f"storage={tmp_path}",
        "space={augment.method: {values: [cutmix, toy_mix]},"
        " augment.criterion: {values: [misclassified, topk_loss]}}"])
    points = grid_points(sweep)
    assert {"augment.method": "cutmix"} in points and len(points) == 3
    # the store and the report
    store = tmp_path / "study"
    for method in ("cutmix", "toy_mix"):
        for seed in (0, 1):
            run = load_config(RunConfig, overrides=base + [f"augment.method={method}",
                                                           f"seed={seed}"])
            name = f"{method}-s{seed}"
            train(run, run_callbacks(run, str(store), name), tmp_path / name)
    trials, epochs = read_results(str(store)).to_pandas()
    toy = trials[trials["augment.method"] == "toy_mix"]
    assert len(toy) == 2 and toy["augment.criterion"].notna().all()
    assert trials.loc[trials["augment.method"] == "cutmix", "augment.criterion"].isna().all()
    assert sorted(epochs["toy_epoch_share"]) == [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2]
    assert tune_metrics({"epoch": 1, "toy_epoch_share": 0.1}, {}, 1, 2)["toy_epoch_share"] == 0.1
    rep = build_report(str(store))
    assert "toy_epoch_share" in rep.main_table.columns
    assert any(c.factor == "augment.method" and c.value == "toy_mix" for c in rep.contrasts)


def test_the_library_never_imports_tune_or_ablations_but_from_the_command_line():
    allowed = {"cli.py", "commands.py"}
    for path in (REPO / "hardmix").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in ("tune", "ablations"):
                    assert path.name in allowed, f"{path.relative_to(REPO)} imports {name}"
                    # ... and only lazily, inside a function
                    assert node.col_offset > 0, f"{path.name} imports {name} at module level"


def test_analysis_and_config_checks_import_no_torch():
    code = ("import sys; import ablations.report, ablations.store, hardmix.config, "
            "hardmix.methods, hardmix.metrics, hardmix.datasets, hardmix.cli; "
            "from hardmix.config import load_config, RunConfig, check_run_environment; "
            "cfg = load_config(RunConfig, overrides=['data.name=digits']); "
            "check_run_environment(cfg, outputs=False); "
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_every_method_field_and_metric_has_one_home():
    """Which fields a method reads is the method table's; the schema's choices are the tables
    themselves (a registry, not a copy)."""
    import dataclasses

    from hardmix.config import AugmentConfig, DataConfig
    from hardmix.datasets import DATASETS
    from hardmix.methods import CRITERIA, FALLBACKS, METHODS, SIGNALS

    meta = {f.name: f.metadata for f in dataclasses.fields(AugmentConfig)}
    assert meta["method"]["choices"] is METHODS and meta["criterion"]["choices"] is CRITERIA
    assert meta["fallback"]["choices"] is FALLBACKS and meta["signal"]["choices"] is SIGNALS
    assert {f.name: f.metadata for f in dataclasses.fields(DataConfig)}["name"]["choices"] \
        is DATASETS
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    from hardmix.methods import SALIENCY, Switch
    read = set()
    for m in METHODS.values():
        read |= set(m.reads)
    for table in (CRITERIA, FALLBACKS, SIGNALS, SALIENCY):
        for sw in table.values():
            assert isinstance(sw, Switch)
            read |= set(sw.reads)
    # every augment field is a switch or read by some entry of the table
    assert fields - read <= {"method", "criterion", "fallback", "min_hard", "signal"}


# ---- the import graph (docs/architecture.md) --------------------------------------------------

#: Packages bottom up: a module imports its own layer or one below it, never one above.
LAYERS = ("hardmix", "ablations", "tune")
#: The command line lives in the library's package but sits above everything: its lazy imports
#: into the layers above the library, by name (each also checked to be inside a function).
COMMAND_LINE = {("hardmix.cli", "tune.sweep"), ("hardmix.cli", "ablations.report"),
                ("hardmix.cli", "ablations.export"), ("hardmix.commands", "ablations.store")}
#: Floors inside a layer that the docs promise: (module or package prefix, what it never imports).
NEVER = [
    # the registries the config takes its choices from never import the config back
    (("hardmix.errors", "hardmix.methods", "hardmix.datasets", "hardmix.architectures",
      "hardmix.optimizers", "hardmix.metrics"), ("hardmix.config",)),
    # the schema is plain data: nothing of the config package above it
    (("hardmix.config.schema",), ("hardmix.config.",)),
    # storage is the floor of the analysis layer
    (("ablations.storage",), ("ablations.",)),
    # the results store's parts never import their public face
    (("ablations.schema", "ablations.writer", "ablations.reader", "ablations.compaction"),
     ("ablations.store",)),
    # only the command line starts a sweep: nothing imports the driver
    (("hardmix", "ablations", "tune"), ("tune.sweep",)),
]


def import_graph(root: Path, packages=LAYERS) -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """``{module: {imported module: [(line, lazy), ...]}}`` over the packages under ``root``:
    every ``import`` and ``from ... import`` anywhere in a file (inside functions and
    ``TYPE_CHECKING`` blocks too), resolved to the module it names (``from a import b`` names
    ``a.b`` where that is a module)."""
    files = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    graph: dict[str, dict[str, list[tuple[int, bool]]]] = {m: {} for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        lazy_lines = {n.lineno for f in ast.walk(tree)
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    pkg = module.split(".")[: len(module.split(".")) - node.level
                                         + (path.name == "__init__.py")]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # import a.b.c where only a.b is ours
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].setdefault(target, []).append(
                        (node.lineno, node.lineno in lazy_lines))
    return graph


def circles(graph) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a loop."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_faults(graph, layers=LAYERS, allowed=COMMAND_LINE) -> list[str]:
    """Imports from a lower layer into a higher one (but the allowed ones, which must be
    lazy), and imports the NEVER list forbids."""
    rank = {name: i for i, name in enumerate(layers)}
    faults = []
    for a, targets in graph.items():
        for b, sites in targets.items():
            if (a, b) in allowed:
                faults += [f"{a}:{line} imports {b} at module level" for line, lazy in sites
                           if not lazy]
            elif rank[b.split(".")[0]] > rank[a.split(".")[0]]:
                faults.append(f"{a}:{sites[0][0]} imports {b}, a higher layer")
            for sources, banned in NEVER:
                if any(a == s or a.startswith(s + ".") for s in sources) and \
                        any(b == x or (x.endswith(".") and b.startswith(x)) for x in banned) \
                        and (a, b) not in allowed:
                    faults.append(f"{a}:{sites[0][0]} imports {b} (never: docs/architecture.md)")
    return faults


def test_no_import_circle_and_no_import_into_a_higher_layer():
    graph = import_graph(REPO)
    assert {"hardmix.config.schema", "ablations.storage", "tune.sweep"} <= set(graph)
    for loop in circles(graph):  # name the imports that close each circle
        ties = [f"{a} -> {b} (line {graph[a][b][0][0]})" for a in loop for b in graph[a]
                if b in loop]
        pytest.fail(f"import circle: {', '.join(loop)}; ties: {'; '.join(ties)}")
    assert layering_faults(graph) == []
    assert all(pair[1] in graph[pair[0]] for pair in COMMAND_LINE)  # the list names real imports


def test_the_graph_check_finds_a_circle_and_an_upward_import(tmp_path):
    """The checker itself, on a small tree: a lazy circle, a TYPE_CHECKING import and an
    import from the library into the analysis are each found."""
    for folder, files in {"hardmix": {"__init__.py": "", "a.py": "from hardmix import b\n",
                                      "b.py": "def f():\n    from hardmix.a import x\n",
                                      "c.py": "from typing import TYPE_CHECKING\n"
                                              "if TYPE_CHECKING:\n    import ablations.d\n"},
                          "ablations": {"__init__.py": "", "d.py": "from hardmix.c import y\n"},
                          "tune": {"__init__.py": ""}}.items():
        (tmp_path / folder).mkdir()
        for name, text in files.items():
            (tmp_path / folder / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["hardmix.a"] == {"hardmix.b": [(1, False)]}
    assert graph["hardmix.b"] == {"hardmix.a": [(2, True)]}
    assert sorted(circles(graph)) == [["ablations.d", "hardmix.c"], ["hardmix.a", "hardmix.b"]]
    assert layering_faults(graph) == ["hardmix.c:3 imports ablations.d, a higher layer"]


def test_the_architecture_page_names_every_module_with_its_job():
    """docs/architecture.md gives every module of the three packages its one job: a module
    added without a line there fails here."""
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = []
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            name = path.relative_to(REPO / pkg).as_posix()
            if f"`{name}`" not in page:
                missing.append(f"{pkg}/{name}")
    assert missing == [], f"docs/architecture.md does not name {missing}"
