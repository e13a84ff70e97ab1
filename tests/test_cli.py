"""The `hardmix` command: help texts, version, exit codes, one-line errors, lazy Ray."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hardmix import __version__
from hardmix.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hardmix")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "hardmix.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_console_script_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    for sub in ("train", "sweep", "report", "eval", "presets"):
        assert sub in res.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_bad_value_is_one_line_and_exit_2():
    res = run_cli("train", "--set", "augment.alpha=-1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["hardmix: error: augment.alpha = -1.0: must be > 0"]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("argv,field", [
    (["train", "--set", "augment.criterion=hardest"], "augment.criterion"),
    (["train", "--preset", "no-such-preset"], "preset"),
    (["train", "--config", "/no/such.yaml"], "--config"),
    (["sweep", "--set", "seeds=[]"], "seeds"),
    (["sweep", "--set", "run.augment.alpha=0"], "run.augment.alpha"),
    (["sweep", "--set", "space.augment.alpha.low=3", "--set", "space.augment.alpha.high=1",
      "--set", "space.augment.alpha.type=float"], "space.augment.alpha"),
])
def test_config_errors_exit_2_naming_the_field(argv, field, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hardmix: error: {field} = ")


def test_sweep_config_error_happens_before_ray_starts():
    code = ("import sys; from hardmix.cli import main; rc = main(['sweep', '--set', "
            "'run.augment.alpha=-1']); print('ray' in sys.modules); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("sub,expected", [
    ("train", ["--preset", "--set", "--resume", "augment.alpha", "augment.criterion",
               "augment.fallback", "augment.min_hard", "augment.signal", "data.path"]),
    ("sweep", ["--dry-run", "--resume", "--address", "space", "seeds", "scheduler.type",
               "resources.gpus", "run.*"]),
    ("report", ["path", "--out", "--baseline"]),
    ("eval", ["checkpoint"]),
])
def test_subcommand_help_describes_options(sub, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out, f"`hardmix {sub} --help` does not mention {word}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_importing_hardmix_does_not_import_ray():
    code = "import sys, hardmix, hardmix.cli, hardmix.config; print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False"


def test_presets_lists_kinds(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), "presets ship with the package"
    assert main(["presets", "no-such-preset"]) == 2
