"""Nothing lost, nothing executed: a generated battery of bad inputs, and tampered storage.

Every config field gets values its type or constraints cannot take (non-finite numbers,
numbers too large to store, wrong types, out-of-range values, unknown choices), and every file
input gets malformed files (YAML of any shape or encoding, .npz archives, checkpoints, Parquet,
a sweep folder's own files on --resume). Each must end in exactly one line on stderr, exit code
2, no traceback, and nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hardmix.cli import main
from hardmix.config import RunConfig, SweepConfig
from hardmix.config.schema import strip_optional

#: A valid base for the run fields (digits are offline; the output goes to the test's folder).
RUN_BASE = ["data.name=digits", "optim.epochs=1", "output.progress=false"]


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _bad_values(f: dataclasses.Field, tp) -> list[str]:
    """Values a field must refuse, from its type and declared constraints."""
    m = f.metadata
    out = []
    if tp is float:
        out += [".nan", ".inf", "-.inf", "1e400", "abc", "[1, 2]", "{a: 1}", "true"]
    elif tp is int:
        out += ["1.5", "abc", "99999999999999999999999", "-99999999999999999999999", ".nan",
                "true", "[1]"]
    elif tp is bool:
        out += ["maybe", "2", "[true]"]
    elif typing.get_origin(tp) is list:
        out += ["{a: 1}", "[{a: 1}]"]
        if typing.get_args(tp) and typing.get_args(tp)[0] is int:
            out += ["[1.5]", "[.nan]", "[99999999999999999999999]"]
    elif typing.get_origin(tp) is dict:
        out += ["3", "[1, 2]"]
    elif tp is str:
        out += ["{a: 1}", "[a, b]"]
    if m.get("choices") or m.get("check"):
        out.append("definitely-not-a-choice")
    for key, delta in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
        if m.get(key) is not None and tp in (int, float):
            out.append(repr(m[key] + delta if key in ("ge", "le") else m[key]))
    return out


RUN_BATTERY = [(n, v) for n, f, tp in _leaves(RunConfig) for v in _bad_values(f, tp)
               if n not in ("description",)]
SWEEP_BATTERY = [(n, v) for n, f, tp in _leaves(SweepConfig) if not n.startswith("run.")
                 for v in _bad_values(f, tp) if n not in ("description",)]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


def one_line_exit_2(argv: list[str], capsys, root: Path) -> str:
    before = _files(root)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("hardmix: error:"), (argv, err)
    assert "Traceback" not in err
    assert _files(root) == before, ("something was written", argv)
    return lines[0]


@pytest.mark.parametrize("name,bad", RUN_BATTERY, ids=[f"{n}={v}" for n, v in RUN_BATTERY])
def test_every_run_field_refuses_bad_values(name, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_exit_2(["train", *[a for s in RUN_BASE + [f"output.dir={tmp_path}/runs",
                                                              f"{name}={bad}"]
                                       for a in ("--set", s)]], capsys, tmp_path)
    assert name.split(".")[0] in line or "--set" in line


@pytest.mark.parametrize("name,bad", SWEEP_BATTERY, ids=[f"{n}={v}" for n, v in SWEEP_BATTERY])
def test_every_sweep_field_refuses_bad_values(name, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(["sweep", "--preset", "quickstart", "--set", f"storage={tmp_path}/s",
                     "--set", f"{name}={bad}"], capsys, tmp_path)


@pytest.mark.parametrize("argv", [
    ["nope"], ["train", "--nope"], ["sweep", "--resume"], ["report"], ["eval"],
    ["train", "--set", "noequals"], ["train", "--set", "=1"], ["train", "--set", "a..b=1"],
    ["train", "--preset", "no-such-preset"], ["presets", "no-such-preset"],
    ["report", "/no/such/sweep"], ["sweep", "--resume", "/no/such/sweep"],
])
def test_usage_mistakes_are_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "nope" or argv[-1] == "--nope" or argv in (["report"], ["eval"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("hardmix: error:")
    else:
        one_line_exit_2(argv, capsys, tmp_path)


# ---- file inputs -------------------------------------------------------------------------------


def _yaml_cases(d: Path) -> list[Path]:
    cases = {
        "binary.yaml": b"\x00\xff\xfe\x89PNG\r\n",
        "latin1.yaml": "description: caf\xe9\n".encode("latin-1"),
        "list.yaml": b"- a\n- b\n",
        "scalar.yaml": b"42\n",
        "invalid.yaml": b"a: [1, 2\nb: }\n",
        "tabs.yaml": b"augment:\n\talpha: 1\n",
        "python.yaml": b"!!python/object/apply:os.system ['touch pwned']\n",
        "nested-wrong.yaml": b"augment: [1, 2]\n",
        "int-key.yaml": b"1: 2\n",
        "bomb.yaml": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c]\n"
                     b"optim: {milestones: *d}\n",
        "huge.yaml": b"description: " + b"x" * (2 << 20) + b"\n",
        "unknown.yaml": b"augment: {alphaa: 1}\n",
        "bad-value.yaml": b"augment: {alpha: .nan}\n",
        "base-cycle.yaml": b"base: no-such-preset\n",
        "duplicate-key.yaml": b"augment: {alpha: 1}\nseed: 1\naugment: {alpha: 2}\n",
    }
    out = []
    for name, data in cases.items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out


def test_malformed_yaml_configs(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    monkeypatch.chdir(inputs)
    for path in _yaml_cases(inputs) + [inputs / "missing.yaml", inputs]:
        for cmd in ("train", "sweep"):
            one_line_exit_2([cmd, "--config", str(path), "--set", f"output.dir={tmp_path}/o"]
                            if cmd == "train" else [cmd, "--config", str(path), "--set",
                                                    f"storage={tmp_path}/o"], capsys, tmp_path)
    assert not (inputs / "pwned").exists()  # nothing from a file is executed


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_malformed_npz_files_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    monkeypatch.chdir(d)
    x = np.zeros((20, 8, 8, 3), np.uint8)
    y = np.arange(20) % 4
    good = dict(x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    cases = [
        d / "missing.npz",
        _npz(d / "no-test.npz", x_train=x, y_train=y),
        _npz(d / "strings.npz", **{**good, "x_train": np.array(["a"] * 20)}),
        _npz(d / "vector.npz", **{**good, "x_train": np.zeros(20, np.uint8)}),
        _npz(d / "two-channels.npz", **{**good, "x_train": np.zeros((20, 2, 8, 8), np.uint8),
                                        "x_test": np.zeros((5, 2, 8, 8), np.uint8)}),
        _npz(d / "lengths.npz", **{**good, "y_train": y[:19]}),
        _npz(d / "negative.npz", **{**good, "y_train": y - 1}),
        _npz(d / "float-labels.npz", **{**good, "y_train": y.astype(float) + 0.5}),
        _npz(d / "names.npz", **{**good, "label_names": np.array(["a", "b"])}),
        _npz(d / "shapes.npz", **{**good, "x_test": np.zeros((5, 9, 9, 3), np.uint8)}),
        _npz(d / "one-class.npz", **{**good, "y_train": y * 0, "y_test": y[:5] * 0}),
        _npz(d / "matrix-labels.npz", **{**good, "y_train": np.zeros((20, 3), int)}),
        # a 900,001-way head for 20 images; ids far beyond the 4 labels used; 2x2 images
        _npz(d / "huge-class-id.npz", **{**good, "y_train": np.r_[y[:19], 900_000]}),
        _npz(d / "sparse-ids.npz", **{**good, "y_train": y * 5, "y_test": y[:5] * 5}),
        _npz(d / "two-pixels.npz", **{**good, "x_train": np.zeros((20, 2, 2, 3), np.uint8),
                                      "x_test": np.zeros((5, 2, 2, 3), np.uint8)}),
    ]
    (d / "not-zip.npz").write_bytes(b"not a zip at all")
    cases.append(d / "not-zip.npz")
    with zipfile.ZipFile(d / "torn.npz", "w") as z:
        z.writestr("x_train.npy", b"\x93NUMPY garbage")
    cases.append(d / "torn.npz")
    np.savez(d / "objects.npz", **{**good, "x_train": np.array([object()] * 20, dtype=object)})
    cases.append(d / "objects.npz")
    for path in cases:
        line = one_line_exit_2(["train", "--set", "data.name=npz", "--set", f"data.path={path}",
                                "--set", f"output.dir={tmp_path}/o"], capsys, tmp_path)
        assert "data.path" in line, line
        one_line_exit_2(["sweep", "--preset", "quickstart", "--set", "run.data.name=npz",
                         "--set", f"run.data.path={path}", "--set", f"storage={tmp_path}/o"],
                        capsys, tmp_path)


LONG = "n" * 300


@pytest.mark.parametrize("argv,field", [
    (["sweep", "--preset", "quickstart", "--set", "seeds=5"], "seeds"),        # seed 5 or 5 seeds?
    (["sweep", "--preset", "quickstart", "--set", "seeds=[-7]"], "seeds = [-7]"),  # as given
    (["sweep", "--preset", "quickstart", "--set", f"name={LONG}"], "name"),
    (["sweep", "--preset", "quickstart", "--set", f"run.output.name={LONG}"], "run.output.name"),
    (["train", "--set", "data.name=digits", "--set", f"output.name={LONG}"], "output.name"),
    (["train", "--set", "data.name=digits", "--set", "data.batch_size=5000"], "data.batch_size"),
    (["sweep", "--preset", "quickstart", "--set", "run.data.batch_size=5000"],
     "run.data.batch_size"),
    (["train", "--set", "data.name=digits", "--set", "model.name=timm:not_a_model"], "model.name"),
    (["sweep", "--preset", "quickstart", "--dry-run", "--set", "run.model.name=timm:not_a_model"],
     "run.model.name"),
    # a field set by hand that nothing reads would be NULL in the row, the user none the wiser
    (["train", "--set", "data.name=digits", "--set", "model.pretrained=true"], "model.pretrained"),
    (["train", "--set", "data.name=digits", "--set", "optim.betas=[0.9, 0.99]"], "optim.betas"),
    (["train", "--set", "data.name=digits", "--set", "augment.method=cutmix", "--set",
      "augment.min_hard=8"], "augment.min_hard"),
    (["sweep", "--preset", "quickstart", "--set", "run.model.kwargs={drop_path_rate: 0.1}"],
     "run.model.kwargs"),
])
def test_late_or_silent_bad_inputs_are_refused_up_front(argv, field, tmp_path, capsys,
                                                        monkeypatch):
    """Inputs that used to train silently (a batch larger than the data), fail every trial
    (an unknown timm model), raise deep inside (a 300-character folder name) or quote a value
    the user never gave."""
    if "timm" in " ".join(argv):
        pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    out = ["--set", f"output.dir={tmp_path}/o"] if argv[0] == "train" else \
        ["--set", f"storage={tmp_path}/o"]
    line = one_line_exit_2(argv + out, capsys, tmp_path)
    assert f"error: {field}" in line, line


def test_an_arm_field_that_does_not_act_in_its_arm_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arms = ("mode: grid\nspace: {}\narms:\n  - {augment.method: hardmix, augment.min_hard: 8}\n"
            "  - {augment.method: cutmix, augment.min_hard: 8}\n")
    (tmp_path / "arms.yaml").write_text(arms)
    line = one_line_exit_2(["sweep", "--preset", "quickstart", "--config", "arms.yaml",
                            "--set", f"storage={tmp_path}/o"], capsys, tmp_path)
    assert "error: arms[1].augment.min_hard" in line and "augment.method=cutmix" in line, line
    # where it acts in some run of the sweep, a field set by hand is taken
    (tmp_path / "arms.yaml").write_text(arms.replace(", augment.min_hard: 8}\n", "}\n"))
    ok = ["sweep", "--preset", "quickstart", "--config", "arms.yaml", "--dry-run",
          "--set", "run.augment.min_hard=8", "--set", f"storage={tmp_path}/o"]
    assert main(ok) == 0, capsys.readouterr()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_output_folder_behind_a_broken_symlink_is_refused(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "out"
    if kind == "dangling":
        link.symlink_to(tmp_path / "gone" / "deeper")
    else:
        (tmp_path / "other").symlink_to(link)
        link.symlink_to(tmp_path / "other")
    for argv in (["train", "--set", "data.name=digits", "--set", f"output.dir={link}"],
                 ["sweep", "--preset", "quickstart", "--set", f"storage={link}"]):
        line = one_line_exit_2(argv, capsys, tmp_path)
        assert "symbolic link" in line, line


def test_bad_checkpoints_are_refused_and_never_executed(tmp_path, capsys, monkeypatch):
    import torch

    d = tmp_path / "in"
    d.mkdir()
    monkeypatch.chdir(d)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'pwned'}",))

    (d / "random.pt").write_bytes(os.urandom(256))
    with open(d / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    torch.save({"something": 1}, d / "not-hardmix.pt")
    torch.save({"model": {}, "config": {"augment": {"alpha": "x"}}}, d / "bad-config.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"data": {"name": "digits"}},
                "data": {}}, d / "no-data.pt")
    for path in ("random.pt", "evil.pt", "not-hardmix.pt", "bad-config.pt", "no-data.pt",
                 "missing.pt", "."):
        one_line_exit_2(["eval", str(d / path)], capsys, tmp_path)
    assert not (d / "pwned").exists()


def test_corrupt_and_unknown_version_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ablations.store import ResultStore
    from results_fixtures import config, write_run

    st = ResultStore(str(tmp_path / "sw"))
    write_run(st, "a", config(seed=0, optim__epochs=2), top1=10.0)
    folder = Path(st.folder("trials"))
    pq.write_table(pa.table({"trial_id": ["z"], "schema_version": [99],
                             "written_at": pa.array([0], pa.timestamp("us", tz="UTC"))}),
                   folder / "future.parquet")
    line = one_line_exit_2(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "r")],
                           capsys, tmp_path)
    assert "schema_version 99" in line
    (folder / "future.parquet").unlink()
    (folder / "torn.parquet").write_bytes(b"PAR1 torn")
    assert main(["report", str(tmp_path / "sw"), "--out", str(tmp_path / "r")]) == 0
    assert "1 corrupt file(s) skipped" in (tmp_path / "r" / "report.md").read_text()


def test_tampered_sweep_folder_on_resume(tmp_path, capsys, monkeypatch):
    """--resume reads sweep.yaml, sweep_state.json and followup.json as data; a replaced
    tuner.pkl is never unpickled."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sw"
    sweep.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for name in ("tune", "tune-followup"):
        (sweep / name).mkdir()
        with open(sweep / name / "tuner.pkl", "wb") as f:
            pickle.dump(Evil(), f)
    cases = {"sweep.yaml": [b"\x00\xff", b"- a\n", b"mode: nonsense\n", b"a: [1\n",
                            b"!!python/object/apply:os.system ['touch pwned']\n"]}
    for data in cases["sweep.yaml"]:
        (sweep / "sweep.yaml").write_bytes(data)
        one_line_exit_2(["sweep", "--resume", str(sweep)], capsys, tmp_path)
    from hardmix.config import load_config, to_yaml

    good = load_config(SweepConfig, "quickstart", None, [f"storage={tmp_path}", "name=sw"])
    (sweep / "sweep.yaml").write_text(to_yaml(good))
    (sweep / "sweep_state.json").write_text("{not json")
    one_line_exit_2(["sweep", "--resume", str(sweep)], capsys, tmp_path)
    (sweep / "sweep_state.json").write_text(json.dumps({"runs": -3}))
    one_line_exit_2(["sweep", "--resume", str(sweep)], capsys, tmp_path)
    (sweep / "sweep_state.json").unlink()
    # a resume that would change the plan is refused, before Ray starts
    line = one_line_exit_2(["sweep", "--resume", str(sweep), "--set", "run.augment.alpha=0.5"],
                           capsys, tmp_path)
    assert "cannot change on --resume" in line
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_paths_from_storage_are_checked(tmp_path):
    from ablations.storage import safe_relpath
    from tune.checkpoints import CKPT_META, restore_checkpoint

    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../b", "", "c:\\x", "a\x00b", 3):
        with pytest.raises(ValueError):
            safe_relpath(bad)
    assert safe_relpath("checkpoints/last.pt") == "checkpoints/last.pt"
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"x")
    (ckpt / CKPT_META).write_text(json.dumps({"file": "last.pt", "relpath": "../../escaped.pt"}))
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    with pytest.raises(ValueError, match="leaves"):
        restore_checkpoint(str(ckpt), run)
    assert not (tmp_path / "escaped.pt").exists()
    (ckpt / CKPT_META).write_text(json.dumps({"file": "../last.pt", "relpath": "c/last.pt"}))
    with pytest.raises(ValueError):
        restore_checkpoint(str(ckpt), run)


def test_unwritable_outputs_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_exit_2(["train", "--set", "data.name=digits", "--set",
                     f"output.dir={blocker}/runs"], capsys, tmp_path)
    one_line_exit_2(["sweep", "--preset", "quickstart", "--set", f"storage={blocker}/s"], capsys,
                    tmp_path)
    from ablations.store import ResultStore
    from results_fixtures import config, write_run

    write_run(ResultStore(str(tmp_path / "sw")), "a", config(seed=0, optim__epochs=2), top1=1.0)
    one_line_exit_2(["report", str(tmp_path / "sw"), "--out", str(blocker / "r")], capsys,
                    tmp_path)


# ---- data loss -------------------------------------------------------------------------------


def test_report_replaces_only_its_own_files(tmp_path):
    from ablations.report import build_report
    from ablations.store import ResultStore
    from results_fixtures import config, write_run

    st = ResultStore(str(tmp_path / "sw"))
    for seed in (0, 1):
        write_run(st, f"a{seed}", config(seed=seed, optim__epochs=2), top1=10.0 + seed)
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "report.md").write_text("my notes")  # the user's, before any report ran here
    (paper / "figure1.png").write_bytes(b"mine")
    (paper / "table.csv").write_text("mine")
    build_report(str(tmp_path / "sw"), out=str(paper))
    build_report(str(tmp_path / "sw"), out=str(paper))  # a re-run replaces its own files
    assert (paper / "figure1.png").read_bytes() == b"mine"
    assert (paper / "table.csv").read_text() == "mine"
    assert (paper / "main_table.csv").exists()


def test_failed_resume_changes_nothing(tmp_path, capsys, monkeypatch):
    from ablations.store import read_results

    monkeypatch.chdir(tmp_path)
    args = ["train", "--set", "data.name=synthetic", "--set", "model.name=smallnet", "--set",
            "model.width=8", "--set", "optim.epochs=1", "--set", "output.progress=false",
            "--set", f"output.dir={tmp_path}/runs", "--set", "output.name=r"]
    assert main(args) == 0
    trials = read_results(str(tmp_path / "runs" / "r")).trials.to_pylist()
    assert [t["status"] for t in trials] == ["completed"]
    line = one_line_exit_2(args + ["--resume", "--set", "augment.alpha=0.5"], capsys, tmp_path)
    assert "augment.alpha=1.0, not 0.5" in line
    assert read_results(str(tmp_path / "runs" / "r")).trials.to_pylist() == trials


def test_space_overrides_merge_key_by_key(tmp_path):
    from hardmix.config import load_config

    cfg = load_config(SweepConfig, "search-hardmix", None, ["space.augment.k.high=0.4"])
    assert cfg.space["augment.k"].high == 0.4 and cfg.space["augment.k"].low == 0.05
    assert {"augment.alpha", "augment.criterion", "augment.fallback"} <= set(cfg.space)
    cfg = load_config(SweepConfig, "quickstart", None,
                      ["space.augment.method.values=[cutmix, hardmix]"])
    assert set(cfg.space) >= {"augment.criterion", "augment.fallback"}
    cfg = load_config(SweepConfig, "search-hardmix", None, ["space.augment.k=null"])
    assert "augment.k" not in cfg.space


def test_resume_with_more_seeds_adds_grid_cells_and_refuses_other_changes():
    from hardmix.config import ConfigError, load_config
    from tune.resume import check_resume_changes

    saved = load_config(SweepConfig, "quickstart")
    more = load_config(SweepConfig, "quickstart", None, ["seeds=[0, 1, 2, 3]"])
    check_resume_changes(saved, more)  # a grid takes new seeds as new cells
    check_resume_changes(saved, load_config(SweepConfig, "quickstart", None,
                                            ["max_concurrent_trials=1", "address=auto"]))
    for change in (["seeds=[0, 1]"], ["run.optim.epochs=3"], ["mode=search"]):
        with pytest.raises(ConfigError, match="cannot change on --resume"):
            check_resume_changes(saved, load_config(SweepConfig, "quickstart", None, change))
    search = load_config(SweepConfig, "search-hardmix")
    with pytest.raises(ConfigError, match="seeds"):
        check_resume_changes(search, load_config(SweepConfig, "search-hardmix", None,
                                                 ["seeds=[0, 1, 2]"]))


def test_stale_temporary_files_of_killed_writers_are_cleaned(tmp_path):
    import time as _time

    from ablations import store as store_mod
    from ablations.store import ResultStore

    st = ResultStore(str(tmp_path / "sw"))
    st.write_trial({"trial_id": "a", "status": "running"})
    folder = Path(st.folder("trials"))
    old, fresh = folder / ".dead-1.parquet.tmp", folder / ".live-2.parquet.tmp"
    old.write_bytes(b"PAR1")
    fresh.write_bytes(b"PAR1")
    past = _time.time() - store_mod.STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    ResultStore(str(tmp_path / "sw")).write_trial({"trial_id": "b", "status": "running"})
    assert not old.exists() and fresh.exists()  # a live writer's file stays


# ---- faults: SIGTERM and kill -9 of the driver ---------------------------------------------------


def _sweep_cmd(tmp_path: Path, address: str, name: str) -> list[str]:
    import sys

    overrides = [f"storage={tmp_path}", f"name={name}", f"address={address}", "mode=grid",
                 "max_concurrent_trials=1", "space={optim.epochs: {values: [2, 40]}}",
                 "seeds=[0]", "run.data.name=synthetic", "run.model.name=smallnet",
                 "run.model.width=8", "run.data.batch_size=64", "run.device=cpu",
                 "run.output.checkpoint_every=1", "run.output.image_grid=false", "report=false",
                 "max_failures=0"]
    return [sys.executable, "-m", "hardmix.cli", "sweep", *[a for o in overrides
                                                             for a in ("--set", o)]]


def _epochs(sweep: Path, trial: str) -> list[int]:
    from ablations.store import read_results

    try:
        e = read_results(str(sweep)).epochs.to_pandas()
    except Exception:  # noqa: BLE001 - nothing written yet
        return []
    return sorted(e[e.trial_id == trial].epoch)


def _start_and_wait(cmd, sweep: Path, env, until_epochs: int = 3):
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if len(_epochs(sweep, "c001-s0")) >= until_epochs:
            return proc
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the sweep ended (or hung) before it could be stopped")


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_sigterm_stops_like_ctrl_c_and_kill_9_resumes_without_rerunning(tmp_path, ray_local):
    import signal
    import subprocess
    import sys

    address = ray_local.get_runtime_context().gcs_address
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    root = Path(__file__).resolve().parents[1]

    # SIGTERM: stops cleanly, says how to resume, counts every planned trial, exit 143
    sweep = tmp_path / "term"
    proc = _start_and_wait(_sweep_cmd(tmp_path, address, "term"), sweep, env)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "hardmix sweep --resume" in out and "2 trials: 1 completed" in out
    assert "1 unfinished" in out and "Traceback" not in out and "*** SIG" not in out

    # kill -9 of the driver: the finished trial is never run again, the other continues from
    # its newest checkpoint, every epoch row is there exactly once
    sweep = tmp_path / "kill"
    proc = _start_and_wait(_sweep_cmd(tmp_path, address, "kill"), sweep, env)
    proc.kill()
    proc.wait(timeout=60)
    done_before = _epochs(sweep, "c001-s0")
    short = sorted(p.name for p in (sweep / "trials").rglob("c000-s0-*.parquet"))
    # Tune's pickled state replaced by pickles that would run a command if a resume loaded them
    planted = _plant_evil_pickles(sweep, tmp_path / "pwned")
    assert planted
    res = subprocess.run([sys.executable, "-m", "hardmix.cli", "sweep", "--resume", str(sweep),
                          "--set", f"address={address}"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    from ablations.store import read_results

    trials, epochs = read_results(str(sweep)).to_pandas()
    assert set(trials.status) == {"completed"} and len(trials) == 2
    assert sorted(p.name for p in (sweep / "trials").rglob("c000-s0-*.parquet")) == short
    assert _epochs(sweep, "c001-s0") == list(range(1, 41))
    run_json = json.loads((sweep / "runs" / "c001-s0" / "run.json").read_text())
    assert 1 <= run_json["resumed_from_epoch"] <= max(done_before)
    assert "2 trials: 2 completed" in res.stdout and "min in all" in res.stdout
    assert not (tmp_path / "pwned").exists()  # the resume that proceeded unpickled nothing
    pickle.loads(next(iter(planted.values())).replace(b"pwned", b"alive"))  # the plant is live
    assert (tmp_path / "alive").exists()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_evil_pickles(sweep: Path, marker: Path) -> dict:
    """Every ``tuner.pkl`` a resume could restore from (Tune's experiment folders) and every
    other pickle Tune left in the sweep folder (searcher state), replaced by one that creates
    ``marker`` when unpickled. Returns what was written, by path."""
    targets = set(sweep.rglob("*.pkl")) | {sweep / "tune" / "tuner.pkl"}
    planted = {}
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(_Evil(marker)))
        planted[path] = path.read_bytes()
    return planted
