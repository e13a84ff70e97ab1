"""Trial names people can read: every sweep trial gets a short name from what varies within the
sweep and acts for it (``hardmix-topk_loss-s3``), shown beside its stable id (``c003-s3``) in
the progress lines (and, tested on Ray in test_toolbox, in the trial rows, TensorBoard's run
folders and the W&B / MLflow run names). Also: trackers stay quiet unless ``--verbose``."""

from __future__ import annotations

import io
import logging
import os
import re
from types import SimpleNamespace

import pytest

from hardmix.config import RunConfig, SweepConfig, flatten, load_config
from hardmix.config.acts import MAX_NAME, field_acts, readable_name
from tune.space import grid_trials, trial_config

SPACE = ("space={augment.method: {values: [cutmix, hardmix]}, augment.criterion: {values: "
         "[misclassified, topk_loss]}, augment.k: {values: [0.25, 8]}, augment.alpha: {values: "
         "[0.5, 1.0]}, data.crop_flip: {values: [true, false]}}")


def _grid() -> tuple[SweepConfig, list[tuple[RunConfig, dict]]]:
    cfg = load_config(SweepConfig, None, None, ["mode=grid", "seeds=[0, 3]", SPACE])
    return cfg, [(trial_config(cfg.run, p, s), p) for p, s in grid_trials(cfg)]


def test_a_name_is_the_method_then_what_varies_and_acts_then_the_seed():
    cfg, trials = _grid()
    names = []
    for run, point in trials:
        row = flatten(run)
        name = readable_name(row, list(cfg.space))
        names.append(name)
        parts = name.split("-")
        assert parts[0] == run.augment.method and parts[-1] == f"s{run.seed}"
        assert re.fullmatch(r"[A-Za-z0-9_.+-]+", name) and len(name) <= MAX_NAME
        # Exactly the acting searched values appear, each once, in the space's order.
        want = []
        for col in cfg.space:
            if col == "augment.method" or not field_acts(col, row):
                continue
            value, short = row[col], col.rsplit(".", 1)[1]
            want.append(value if isinstance(value, str) else
                        (short if value else f"no_{short}") if isinstance(value, bool) else
                        f"{short}{value:g}")
        assert parts[1:-1] == want, (name, point)
    assert "cutmix-alpha0.5-crop_flip-s0" in names and "hardmix-topk_loss-k8-alpha1-no_crop_flip-s3" \
        in names
    assert len(set(names)) == len(names)  # distinct trials, distinct names (here)


def test_a_name_stays_short_and_keeps_its_seed():
    row = {**flatten(RunConfig(seed=12)), "description": "x" * 300}
    row["data.path"] = "/very/long/" + "folder/" * 30 + "data set.npz"
    name = readable_name(row, ["data.path", "description"])
    assert len(name) == MAX_NAME and name.endswith("-s12") and " " not in name


class _Trial(SimpleNamespace):
    def __str__(self) -> str:
        return self.id


def test_progress_lines_show_each_trial_by_id_and_name():
    pytest.importorskip("ray")
    from tune.progress import SweepProgress
    from tune.trainable import SweepContext

    cfg, _ = _grid()
    ctx = SweepContext(sweep_dir="/tmp/x", run=cfg.run, seeds=[3], metric="val_top1_err",
                       resources=cfg.resources, hparams=tuple(cfg.space))
    point = {"augment.method": "hardmix", "augment.criterion": "topk_loss", "augment.k": 0.25,
             "augment.alpha": 0.5, "data.crop_flip": True}
    trial = _Trial(id="c003-s3", trial_id="t1", status="TERMINATED",
                   config={"cell": {"point": point, "seed": 3, "index": 3}},
                   last_result={"epoch": cfg.run.optim.epochs, "val_top1_err": 12.5})
    assert ctx.trial_label(trial) == "c003-s3 hardmix-topk_loss-k0.25-alpha0.5-crop_flip-s3"
    out = io.StringIO()
    progress = SweepProgress("val_top1_err", cfg.run.optim.epochs, 1, out=out, live=False,
                             names=ctx.trial_label)
    progress._last_time = 1.0  # past the first report (which lists nothing already ended)
    progress.report([trial], done=True)
    assert "  done    c003-s3 hardmix-topk_loss-k0.25-alpha0.5-crop_flip-s3  val_top1_err 12.50" \
        in out.getvalue().splitlines()


def test_trackers_are_quiet_unless_verbose(monkeypatch):
    from hardmix.cli import main
    from hardmix.trackers import VERBOSE_ENV, quiet_tracker_logs, wandb_settings

    monkeypatch.setenv(VERBOSE_ENV, "0")  # recorded: restored after the test
    monkeypatch.setattr(logging.getLogger("alembic"), "level", logging.INFO)
    assert wandb_settings() == {"silent": True}
    quiet_tracker_logs()
    assert logging.getLogger("alembic").level == logging.WARNING  # MLflow's store set-up lines

    monkeypatch.setattr(logging.getLogger("alembic"), "level", logging.INFO)
    assert main(["sweep", "--verbose", "--set", "no.such=1"]) == 2
    assert os.environ[VERBOSE_ENV] == "1" and wandb_settings() == {}
    quiet_tracker_logs()
    assert logging.getLogger("alembic").level == logging.INFO
