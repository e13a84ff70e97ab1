"""The README's and docs' promises, executed without Ray (issue 31): the real loaders on tiny
files in their real formats, every shipped preset trained for one epoch, two gloo ranks on an
image folder, and the small promises of the command line (exit codes, missing optional
packages, TensorBoard after a resume, presets fed back as configs, the dry-run estimate).

The Ray half is tests/test_promises_ray.py; docs/claims.md maps every promise to its test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hardmix.config import RunConfig, SweepConfig, flatten, load_config, preset_kind, \
    preset_names, read_preset
from promise_helpers import (REPO, env, hardmix, patch_cifar_integrity, run_ranks, write_cifar,
                             write_npz, write_png_tree)


def _results(path):
    from ablations.store import read_results
    return read_results(str(path)).to_pandas()


# --------------------------------------------------------------------------------------------
# The CIFAR loader of every paper, cluster and GPU preset: torchvision's batch files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,preset", [("cifar10", "cifar10-paper"),
                                         ("cifar100", "cifar100-paper")])
def test_cifar_folder_in_torchvisions_format_loads_exactly_and_trains(tmp_path, monkeypatch,
                                                                     name, preset):
    from hardmix.data import build_data
    from hardmix.datasets import dataset
    from hardmix.train import train

    written = write_cifar(tmp_path / "data", name, per_file=8 if name == "cifar10" else 40)
    patch_cifar_integrity(monkeypatch)
    cfg = load_config(RunConfig, preset, None, [f"data.path={tmp_path / 'data'}",
                                                 "optim.epochs=1", "device=cpu",
                                                 "data.batch_size=8",
                                                 f"output.dir={tmp_path / 'runs'}"])
    assert cfg.data.name == name

    # What the loader reads: the images in (N, C, H, W), channels R, G, B, labels and names.
    raw = dataset(name).load(cfg.data)
    np.testing.assert_array_equal(raw.x_train, written["x_train"])
    np.testing.assert_array_equal(raw.x_test, written["x_test"])
    np.testing.assert_array_equal(raw.y_train, written["y_train"])
    np.testing.assert_array_equal(raw.y_test, written["y_test"])
    assert list(raw.classes) == written["classes"]

    # What the model sees: the test loader's batches, un-normalised, are the written images.
    data = build_data(cfg.data, cfg.seed, "cpu")
    assert data.num_classes == len(written["classes"]) and data.in_channels == 3
    assert data.sizes == {"train": len(written["y_train"]), "val": 0,
                          "test": len(written["y_test"])}
    xs, ys = zip(*[(x, y) for x, y, *_ in data.test])
    pixels = (data.denormalize(torch.cat(xs)) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(pixels, written["x_test"])
    np.testing.assert_array_equal(torch.cat(ys).numpy(), written["y_test"])

    # ... and one epoch on them (the preset's ResNet-18 runs in test_every_preset_...).
    small = load_config(RunConfig, preset, None, [f"data.path={tmp_path / 'data'}",
                                                   "optim.epochs=1", "device=cpu",
                                                   "model.name=smallnet", "model.width=8",
                                                   "data.batch_size=8",
                                                   f"output.dir={tmp_path / 'runs'}"])
    summary = train(small, run_dir=tmp_path / "runs" / "r")
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    assert summary["classes"] == written["classes"]
    assert 0 <= summary["final_top1_err"] <= 100


# --------------------------------------------------------------------------------------------
# Every shipped preset runs: one epoch of its run config on tiny data of its kind
# --------------------------------------------------------------------------------------------


def _preset_data(tmp: Path, monkeypatch, name: str) -> list[str]:
    """Overrides pointing a run at tiny data of ``name``'s kind."""
    if name in ("cifar10", "cifar100"):
        if not (tmp / name).exists():
            write_cifar(tmp / name, name, per_file=4 if name == "cifar10" else 20, n_test=8)
        patch_cifar_integrity(monkeypatch)
        return [f"data.path={tmp / name}"]
    if name == "npz":
        path = tmp / "c10.npz"
        if not path.exists():
            write_npz(path)
        return [f"data.path={path}", "data.subset=null", "data.val_size=10"]
    if name == "folder":
        if not (tmp / "tree").exists():
            write_png_tree(tmp / "tree", n_train=4, n_val=2)
        return [f"data.path={tmp / 'tree'}", "data.image_size=16", "data.workers=0",
                "data.val_size=3"]
    if name == "digits":
        return ["data.subset=300"]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_one_epoch_and_plans(preset, tmp_path_factory, monkeypatch):
    """Each preset's run (a sweep preset's base ``run:``, as ``hardmix train --preset`` trains
    it) with its own model, method and data loader, shortened to one epoch on tiny data of its
    kind; a sweep preset also plans (every trial a valid run, on that data)."""
    from hardmix.config import flatten
    from hardmix.config.acts import field_acts
    from hardmix.train import train

    tmp = tmp_path_factory.getbasetemp() / "preset-data"
    tmp.mkdir(exist_ok=True)
    raw = read_preset(preset)
    kind = preset_kind(raw)
    base = load_config(RunConfig, preset, None, ["data.path=x"])  # only its data set's name
    data = _preset_data(tmp, monkeypatch, base.data.name)
    out = tmp_path_factory.mktemp(preset)
    if base.data.name != "digits":  # a batch the few images can fill, and what must fit it
        batch = min(base.data.batch_size, 8)
        fit = [f"data.batch_size={batch}"]
        if field_acts("augment.min_hard", flatten(base)):  # set by hand only where it acts
            fit.append(f"augment.min_hard={min(base.augment.min_hard, batch)}")
    else:
        fit = []
    cfg = load_config(RunConfig, preset, None, [*data, *fit, "optim.epochs=1", "device=cpu",
                                                 f"output.dir={out}"])
    summary = train(cfg, run_dir=out / "run")
    assert summary["status"] == "completed" and summary["epochs_run"] == 1, summary
    if kind == "sweep":  # every planned trial (grid cell, arm) is a valid run
        from tune.outcome import planned_trials

        sweep = load_config(SweepConfig, preset, None, [f"run.{o}" for o in data])
        assert planned_trials(sweep)


# --------------------------------------------------------------------------------------------
# Image folders, as the ImageNet presets read them; and two gloo ranks on them
# --------------------------------------------------------------------------------------------


def test_image_folder_trains_with_loader_workers_and_hardmix_eval_reads_the_checkpoint(tmp_path):
    from hardmix.commands import train_from_cli

    tree = write_png_tree(tmp_path / "tree", n_train=6, n_val=3)
    cfg = load_config(RunConfig, "imagenet-paper", None, [
        f"data.path={tree}", "data.workers=2", "data.image_size=16", "data.batch_size=6",
        "optim.epochs=1", "model.name=smallnet", "model.width=8", "device=cpu",
        f"output.dir={tmp_path / 'runs'}", "output.name=folder"])
    assert cfg.data.name == "folder" and cfg.data.workers == 2
    assert train_from_cli(cfg) == 0
    trials, epochs = _results(tmp_path / "runs" / "folder")
    row = trials.iloc[0]
    assert row.status == "completed" and row.epochs_run == 1
    assert list(row.classes) == ["ant", "bee", "cat"]

    ckpt = tmp_path / "runs" / "folder" / "checkpoints" / "last.pt"
    res = hardmix("eval", str(ckpt), "--set", "data.workers=2", timeout=120)
    assert res.returncode == 0, res.stderr
    values = dict(kv.split("=", 1) for kv in res.stdout.split())
    assert values["images"] == "9" and values["epoch"] == "1"
    # the checkpoint's model on the val/ folder: the run's own last test error
    assert float(values["test_top1_err"]) == pytest.approx(row.final_top1_err, abs=0.01)


def _folder_and_ddp_rank(rank: int, world: int, tree: str, out: str) -> None:
    """One rank: the folder loader's shards over two epochs, a data-parallel run, and
    ``HardMix(model=DDP(net))`` between training steps."""
    import torch.distributed as dist
    import torch.nn as nn

    from hardmix import HardMix
    from hardmix.data import build_data
    from hardmix.train import train

    cfg = load_config(RunConfig, "imagenet-paper", None, [
        f"data.path={tree}", "data.workers=2", "data.image_size=16", "data.batch_size=3",
        "optim.epochs=1", "model.name=smallnet", "model.width=8", "device=cpu",
        f"output.dir={out}"])
    data = build_data(cfg.data, cfg.seed, "cpu", rank, world)
    seen = {}
    for epoch in (1, 2):
        data.train.set_epoch(epoch)
        seen[epoch] = [int(i) for _, _, idx in data.train for i in idx]
    summary = train(cfg, run_dir=Path(out) / "ddp-run")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    checks = []
    for bn_mode in ("eval", "train"):
        mix = HardMix(method="hardmix", signal="forward", bn_mode=bn_mode, prob=1.0, seed=0,
                      num_classes=3)
        for _ in range(2):
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            buffers = {k: v.clone() for k, v in net.named_buffers()}
            out_ = mix(x, y, model=ddp)
            unchanged = all(torch.equal(buffers[k], v) for k, v in net.named_buffers())
            net.eval()
            with torch.no_grad():
                wrong = (net(x).argmax(1) != y).float().mean().item()
            net.train()
            loss = out_.loss(ddp(out_.x))
            opt.zero_grad()
            loss.backward()  # a reducer left waiting by the hardness forward would raise here
            opt.step()
            checks.append({"bn_mode": bn_mode, "unchanged": unchanged,
                           "hard_share": float(out_.stats["hard_share"]), "wrong": wrong})
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"seen": seen, "status": summary["status"], "world": dist.get_world_size(),
         "checks": checks, "train_size": data.sizes["train"]}))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_on_an_image_folder_and_hardmix_through_ddp(tmp_path):
    """DistributedSampler shards are disjoint and cover the training split once per epoch (in a
    new order each epoch); a data-parallel run on the folder completes; ``HardMix(model=DDP(net))``
    runs its hardness forward through the wrapped module: BatchNorm buffers untouched, no
    reducer error, hard share = the clean model's error on that batch."""
    tree = write_png_tree(tmp_path / "tree", n_train=4, n_val=2)  # 12 training images
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_folder_and_ddp_rank, tmp_path, str(tree), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    n = ranks[0]["train_size"]
    assert n == 12
    for epoch in ("1", "2"):
        a, b = (r["seen"][epoch] for r in ranks)
        assert not set(a) & set(b) and len(a) == len(set(a)) == len(b) == len(set(b))
        assert sorted(a + b) == list(range(n))
    assert ranks[0]["seen"]["1"] != ranks[0]["seen"]["2"]
    assert all(r["status"] == "completed" and r["world"] == 2 for r in ranks)
    run_json = json.loads((out / "ddp-run" / "run.json").read_text())
    assert run_json["world_size"] == 2
    for r in ranks:
        for c in r["checks"]:
            assert c["unchanged"], c
            assert c["hard_share"] == pytest.approx(c["wrong"]) if c["bn_mode"] == "eval" else True


# --------------------------------------------------------------------------------------------
# The command line's small promises
# --------------------------------------------------------------------------------------------

#: Runs ``hardmix`` several times in one interpreter with some top-level packages made
#: unimportable (``sys.modules[name] = None``: ``import`` raises ModuleNotFoundError and
#: ``importlib.util.find_spec`` returns None, as for a package that is not installed).
_BLOCKED_RUNS = """
import contextlib, io, json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from hardmix.cli import main
out = []
for argv in json.loads(sys.argv[2]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    out.append({"rc": rc, "out": o.getvalue(), "err": e.getvalue()})
print(json.dumps(out))
"""


def test_missing_optional_packages_and_a_failed_run_exit_codes(tmp_path):
    """``timm:``, ``fine_grained`` (OpenCV), ``wandb`` and ``mlflow`` without their package:
    one line naming the field and the extra, exit 2, nothing written, before any work (for
    ``train`` and ``sweep``). A run that diverges (lr 1e30): exit 1, recorded as ``failed``."""
    base = ["--set", "data.name=digits", "--set", "optim.epochs=1", "--set", "device=cpu"]
    cases = [("timm", ["--set", "model.name=timm:resnet18"], "model.name"),
             ("cv2", ["--set", "augment.method=saliencymix", "--set",
                      "augment.saliency=fine_grained"], "augment.saliency"),
             ("wandb", ["--set", "output.loggers=[wandb]"], "output.loggers"),
             ("mlflow", ["--set", "output.loggers=[mlflow]"], "output.loggers")]
    runs = []
    for i, (_, args, _) in enumerate(cases):
        runs.append(["train", *base, *args, "--set", f"output.dir={tmp_path / f'o{i}'}"])
    runs.append(["sweep", "--preset", "quickstart", "--set", f"storage={tmp_path / 'sw'}",
                 "--set", "run.model.name=timm:resnet18"])
    runs.append(["train", "--set", "data.name=synthetic", "--set", "model.name=smallnet",
                 "--set", "model.width=8", "--set",
                 "optim.epochs=1", "--set", "device=cpu", "--set", "output.progress=false",
                 "--set", "optim.lr=1e30", "--set", f"output.dir={tmp_path / 'nan'}", "--set",
                 "output.name=nan"])
    blocked = [pkg for pkg, _, _ in cases]
    proc = __import__("subprocess").run(
        [sys.executable, "-c", _BLOCKED_RUNS, json.dumps(blocked), json.dumps(runs)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    extras = {"timm": "timm", "cv2": "saliency", "wandb": "wandb", "mlflow": "mlflow"}
    for (pkg, _, field), res in zip(cases + [("timm", None, "run.model.name")], results):
        lines = res["err"].strip().splitlines()
        assert res["rc"] == 2 and len(lines) == 1, res
        assert lines[0].startswith(f"hardmix: error: {field}") and \
            f'hardmix[{extras[pkg]}]' in lines[0], lines
    assert not any(p.exists() for p in [tmp_path / f"o{i}" for i in range(4)] + [tmp_path / "sw"])

    failed = results[-1]
    assert failed["rc"] == 1, failed
    assert failed["err"].strip().splitlines()[-1].startswith("hardmix: error: run failed:"), \
        failed["err"]
    trials, _ = _results(tmp_path / "nan" / "nan")
    assert list(trials.status) == ["failed"] and trials.error.iloc[0]


class _CrashAfter:
    """A callback that fails the run after epoch ``n`` (after the other callbacks wrote it)."""

    def __init__(self, n: int):
        self.n = n

    def on_run_start(self, cfg, info):
        pass

    def on_epoch_end(self, metrics, checkpoint):
        if metrics["epoch"] == self.n:
            raise RuntimeError("crash")

    def on_run_end(self, summary):
        pass

    def on_mixed_preview(self, images):
        pass


def test_tensorboard_events_after_a_resume_hold_each_step_once(tmp_path):
    """Checkpoints every 2 epochs; the run dies after epoch 3 was logged; the resume starts
    after epoch 2 and logs 3 and 4 again: TensorBoard (its EventAccumulator) shows each step
    once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hardmix.commands import run_callbacks
    from hardmix.train import train

    cfg = load_config(RunConfig, None, None, [
        "data.name=synthetic", "model.name=smallnet", "model.width=8", "optim.epochs=4",
        "device=cpu", "output.checkpoint_every=2", "output.image_grid=false",
        f"output.dir={tmp_path}"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, run_callbacks(cfg, str(run_dir), "run") + [_CrashAfter(3)], run_dir)
    summary = train(cfg, run_callbacks(cfg, str(run_dir), "run"), run_dir, resume=True)
    assert summary["status"] == "completed"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/train_loss" in tags or any(t.endswith("/train_loss") for t in tags)
    _, epochs = _results(run_dir)
    by_epoch = epochs.set_index("epoch").train_loss
    for tag in tags:
        if tag.startswith("hparam/"):
            continue
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
        if tag.endswith("/train_loss"):
            assert steps == [1, 2, 3, 4]
            values = [e.value for e in acc.Scalars(tag)]
            assert values == pytest.approx([by_epoch[s] for s in steps], rel=1e-6)


def test_presets_printed_and_fed_back_as_config_give_the_same_config(tmp_path, capsys):
    from hardmix.cli import main

    for name in preset_names():
        assert main(["presets", name]) == 0
        text = capsys.readouterr().out
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        cls = SweepConfig if preset_kind(read_preset(name)) == "sweep" else RunConfig
        # presets that say "set data.path" get one on both sides
        extra = [f"{'run.' if cls is SweepConfig else ''}data.path={tmp_path / 'data'}"] \
            if load_config(RunConfig, name, None, ["data.path=x"]).data.name in (
                "npz", "folder") else []
        assert flatten(load_config(cls, None, str(path), extra)) == \
            flatten(load_config(cls, name, None, extra)), name
    # and through the command line: the same plan from --config as from --preset
    plans = []
    for source in (["--preset", "quickstart"], ["--config", str(tmp_path / "quickstart.yaml")]):
        assert main(["sweep", *source, "--dry-run", "--set", f"storage={tmp_path}"]) == 0
        # the time estimate is measured on this machine at each call: all but it must agree
        plans.append([line for line in capsys.readouterr().out.splitlines()
                      if not line.startswith("time")])
    assert plans[0] == plans[1] and any("= 18" in line for line in plans[0])
    tiny = ["--set", "data.name=synthetic", "--set", "data.path=null", "--set", "optim.epochs=1",
            "--set", "model.width=8", "--set", "device=cpu", "--set", f"output.dir={tmp_path}"]
    for source, name in ((["--preset", "cpu-quick"], "p"), (["--config", str(tmp_path / "cpu-quick.yaml")], "c")):
        assert main(["train", *source, *tiny, "--set", f"output.name={name}"]) == 0
    capsys.readouterr()
    stored = [yaml.safe_load((tmp_path / n / "config.yaml").read_text()) for n in ("p", "c")]
    stored[0]["output"].pop("name"), stored[1]["output"].pop("name")
    assert stored[0] == stored[1]


def test_dry_run_flop_estimate_matches_a_counted_epoch(tmp_path, capsys):
    """The dry run's compute estimate of a one-trial, one-epoch sweep is within 10% of
    torch's FlopCounterMode over that epoch really trained (hardness forward, training forward
    and backward, validation and test)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hardmix.cli import main
    from hardmix.train import train

    run = ["data.name=digits", "model.name=smallnet", "model.width=16", "optim.epochs=1",
           "augment.method=hardmix", "augment.signal=forward", "augment.prob=1.0",
           "device=cpu", "optim.amp=false", "output.image_grid=false"]
    args = ["sweep", "--dry-run", "--set", f"storage={tmp_path}", "--set", "mode=grid",
            "--set", "seeds=[0]"] + [a for o in run for a in ("--set", f"run.{o}")]
    assert main(args) == 0
    text = capsys.readouterr().out
    m = re.search(r"about ([\d.]+) (\w+)FLOP", text)
    assert m, text
    scale = {"": 1, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[m.group(2)]
    estimate = float(m.group(1)) * scale

    cfg = load_config(RunConfig, None, None, run + [f"output.dir={tmp_path}"])
    with FlopCounterMode(display=False) as counter:
        summary = train(cfg, run_dir=tmp_path / "counted")
    assert summary["status"] == "completed"
    counted = counter.get_total_flops()
    assert abs(estimate - counted) / counted < 0.10, (estimate, counted)
