"""One training run (hardmix.train): metrics, Parquet + TensorBoard, resume, failures, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from hardmix.cli import main
from hardmix.config import RunConfig, load_config, with_overrides
from hardmix.metrics import EPOCH_METRICS, SUMMARY_FIELDS, applicable, timings
from hardmix.train import Callback, StopRun, lr_factor, train

METRIC_KEYS = ["epoch", *EPOCH_METRICS]
SUMMARY_KEYS = list(SUMMARY_FIELDS)

TINY = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
        "optim.epochs=1", "output.progress=false", "optim.lr=0.05"]
NOT_EXACT = set(timings())  # wall-clock figures


def tiny(tmp_path: Path, *more: str) -> RunConfig:
    return load_config(RunConfig, None, None, TINY + [f"output.dir={tmp_path}", *more])


class Recorder(Callback):
    """Keeps everything a run hands to its callbacks."""

    def __init__(self, stop_at: int | None = None, crash_at: int | None = None):
        self.stop_at, self.crash_at = stop_at, crash_at
        self.info, self.metrics, self.checkpoints, self.summary = None, [], [], None

    def on_run_start(self, cfg, info):
        self.info = info

    def on_epoch_end(self, metrics, checkpoint):
        self.metrics.append(metrics)
        self.checkpoints.append(checkpoint)
        if metrics["epoch"] == self.stop_at:
            raise StopRun()
        if metrics["epoch"] == self.crash_at:
            raise RuntimeError("node lost")

    def on_run_end(self, summary):
        self.summary = summary


# ---- the CLI path: Parquet, TensorBoard, metadata, eval -------------------------------------


def test_one_epoch_cli_run_writes_parquet_tensorboard_and_checkpoint(tmp_path, capsys):
    from ablations.store import read_results
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train"] + [a for s in TINY + [f"output.dir={tmp_path}", "output.name=r1"]
                        for a in ("--set", s)]
    assert main(args) == 0
    run_dir = tmp_path / "r1"
    res = read_results(str(run_dir))
    trials, epochs = res.to_pandas()
    assert list(trials["status"]) == ["completed"] and list(trials["trial_id"]) == ["r1"]
    assert len(epochs) == 1
    row = epochs.iloc[0]
    aug = {k[len("augment."):]: v for k, v in trials.iloc[0].items() if k.startswith("augment.")}
    for key, metric in EPOCH_METRICS.items():
        if metric.kind != "float":
            continue
        if key == "mfu":  # no peak for a CPU: NULL here (tests/test_throughput.py)
            assert pd.isna(row[key])
        elif applicable(metric, aug):  # the defaults: HardMix with the forward signal
            assert math.isfinite(float(row[key])), key
        else:  # e.g. the memory share: no memory without cached/history
            assert pd.isna(row[key]), key
    assert 0 <= row["test_top1_err"] <= 100 and row["mixed_rate"] == 1.0
    assert sum(row["source_class_counts"]) > 0

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"error/test_top1_err", "loss/train_loss", "hardmix/hard_share",
            "hparam/final_top1_err"} <= scalars
    assert acc.Scalars("error/test_top1_err")[0].value == pytest.approx(row["test_top1_err"])
    assert "mixed_batch" in acc.Tags()["images"]
    plugins = acc.PluginTagToContent("hparams")       # HParams in the same run, not a sub-run
    assert "_hparams_/session_start_info" in plugins
    assert not [p for p in run_dir.iterdir() if p.is_dir() and any(p.glob("events.*"))]

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["git_commit"] and set(meta["versions"]) >= {"torch", "torchvision", "hardmix",
                                                             "python", "numpy"}
    assert "augment:" in (run_dir / "config.yaml").read_text()
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"test_top1_err={row['test_top1_err']:.2f}" in out  # eval reproduces the run's figure


def test_cli_never_reuses_a_run_folder(tmp_path, capsys):
    args = ["train"] + [a for s in TINY + [f"output.dir={tmp_path}"] for a in ("--set", s)]
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardmix-smallnet-s0",
                                                          "hardmix-smallnet-s0-2"]
    named = args + ["--set", "output.name=hardmix-smallnet-s0"]
    assert main(named) == 2
    assert "output.name" in capsys.readouterr().err


# ---- real data ------------------------------------------------------------------------------


def test_real_cifar10_subset_beats_chance(cifar10_npz, tmp_path):
    cfg = load_config(RunConfig, None, None, [
        "data.name=npz", f"data.path={cifar10_npz}", "data.subset=5000", "data.val_size=500",
        "model.name=smallnet", "model.width=16", "optim.epochs=3", "optim.lr=0.2",
        "optim.schedule=cosine", "optim.label_smoothing=0.1", "data.batch_size=128",
        "augment.method=hardmix", "augment.signal=cached", "augment.prob=0.5",
        "output.progress=false", "output.checkpoint_every=0", f"output.dir={tmp_path}"])
    rec = Recorder()
    summary = train(cfg, [rec], tmp_path / "real")
    assert summary["status"] == "completed"
    # Chance is 90 %; 10,000 test images make a 15-point margin many standard errors wide.
    assert summary["final_top1_err"] < 75.0
    assert summary["final_val_top1_err"] < 78.0
    assert rec.metrics[-1]["test_top1_err"] < rec.metrics[0]["test_top1_err"]
    assert rec.info["sizes"] == {"train": 4500, "val": 500, "test": 10000}


# ---- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [
    ["augment.signal=cached", "augment.prob=0.5", "model.dropout=0.2"],
    ["augment.signal=forward", "augment.bn_mode=train", "augment.box=sample"],
])
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, augment):
    more = ["optim.epochs=3", "output.checkpoint_every=1", "optim.schedule=cosine",
            "optim.warmup_epochs=1", *augment]
    full = Recorder()
    s_full = train(tiny(tmp_path, *more), [full], tmp_path / "full")

    first = Recorder(stop_at=1)
    s_first = train(tiny(tmp_path, *more), [first], tmp_path / "cut")
    assert s_first["status"] == "pruned" and s_first["epochs_run"] == 1
    second = Recorder()
    s_second = train(tiny(tmp_path, *more), [second], tmp_path / "cut", resume=True)
    assert second.info["start_epoch"] == 1
    assert [m["epoch"] for m in second.metrics] == [2, 3]

    for a, b in zip(full.metrics, first.metrics + second.metrics):
        for key in METRIC_KEYS:
            if key not in NOT_EXACT:
                assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key
    assert full.metrics[-1]["memory_seen"] is not None or "cached" not in augment[0]
    for key in SUMMARY_KEYS:
        if key != "wall_seconds":
            assert s_full[key] == s_second[key], key


def test_crash_is_recorded_then_reraised_and_resumable(tmp_path):
    cfg = tiny(tmp_path, "optim.epochs=3", "output.checkpoint_every=1")
    rec = Recorder(crash_at=2)
    with pytest.raises(RuntimeError, match="node lost"):
        train(cfg, [rec], tmp_path / "crash")
    assert rec.summary["status"] == "failed" and "node lost" in rec.summary["error"]
    assert rec.summary["epochs_run"] == 2 and rec.checkpoints[-1].endswith("last.pt")
    again = Recorder()
    s = train(cfg, [again], tmp_path / "crash", resume=True)
    assert s["status"] == "completed" and [m["epoch"] for m in again.metrics] == [3]


def test_stoprun_prunes_without_raising(tmp_path):
    rec = Recorder(stop_at=1)
    s = train(tiny(tmp_path, "optim.epochs=4", "output.checkpoint_every=0"), [rec],
              tmp_path / "p")
    assert s["status"] == "pruned" and s["epochs_run"] == 1 and rec.summary == s
    assert set(s) == set(SUMMARY_KEYS) and rec.checkpoints == [None]


def test_nan_loss_fails_with_a_clear_error(tmp_path):
    rec = Recorder()
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        train(tiny(tmp_path, "optim.lr=1e30", "optim.epochs=2"), [rec], tmp_path / "nan")
    assert rec.summary["status"] == "failed" and "loss is nan" in rec.summary["error"]
    assert rec.metrics == []


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        rec = Recorder()
        train(tiny(tmp_path, f"seed={seed}"), [rec], tmp_path / name)
        runs[name] = rec.metrics[0]
    assert runs["a"]["train_loss"] == runs["b"]["train_loss"]
    assert runs["a"]["source_class_counts"] == runs["b"]["source_class_counts"]
    assert runs["a"]["train_loss"] != runs["c"]["train_loss"]


# ---- schedule ---------------------------------------------------------------------------------


def test_lr_factor_schedules():
    o = RunConfig().optim
    multi = with_overrides(RunConfig(), {"optim.milestones": [2, 4], "optim.gamma": 0.1}).optim
    assert lr_factor(0, 10, multi) == 1.0 and lr_factor(19, 10, multi) == 1.0
    assert lr_factor(20, 10, multi) == pytest.approx(0.1)
    assert lr_factor(40, 10, multi) == pytest.approx(0.01)
    cos = with_overrides(RunConfig(), {"optim.schedule": "cosine", "optim.epochs": 10,
                                       "optim.warmup_epochs": 2}).optim
    assert lr_factor(0, 10, cos) == pytest.approx(1 / 20)      # warm-up starts small
    assert lr_factor(19, 10, cos) == pytest.approx(1.0)        # and ends at the peak
    assert lr_factor(20, 10, cos) == pytest.approx(1.0)
    assert lr_factor(60, 10, cos) == pytest.approx(0.5)
    assert lr_factor(99, 10, cos) < 0.01
    assert lr_factor(5, 10, o) == 1.0


# ---- every invalid value fails before training, one line, exit 2 ----------------------------


def _invalid_cases(tmp: str) -> list[tuple[list[str], str]]:
    cases = [
        (["data.name=imagenet"], "data.name"),
        (["data.name=npz"], "data.path"),
        (["data.name=npz", f"data.path={tmp}/missing.npz"], "data.path"),
        (["data.name=cifar10", f"data.path={tmp}"], "data.path"),
        (["data.name=folder", f"data.path={tmp}"], "data.path"),
        (["data.subset=0"], "data.subset"),
        (["data.subset=100000"], "data.subset"),
        (["data.val_size=-0.1"], "data.val_size"),
        (["data.val_size=1.5"], "data.val_size"),
        (["data.val_size=600"], "data.val_size"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.eval_batch_size=0"], "data.eval_batch_size"),
        (["data.pad=-1"], "data.pad"),
        (["data.image_size=0"], "data.image_size"),
        (["data.workers=-1"], "data.workers"),
        (["data.crop_flip=maybe"], "data.crop_flip"),
        (["model.name=vgg16"], "model.name"),
        (["model.stem=huge"], "model.stem"),
        (["model.dropout=1"], "model.dropout"),
        (["model.width=0"], "model.width"),
        (["optim.epochs=0"], "optim.epochs"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.momentum=1"], "optim.momentum"),
        (["optim.momentum=0"], "optim.nesterov"),
        (["optim.weight_decay=-1"], "optim.weight_decay"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["optim.milestones=[5, 2]"], "optim.milestones"),
        (["optim.gamma=0"], "optim.gamma"),
        (["optim.warmup_epochs=1"], "optim.warmup_epochs"),
        (["optim.label_smoothing=1"], "optim.label_smoothing"),
        (["optim.grad_clip=0"], "optim.grad_clip"),
        (["output.checkpoint_every=-1"], "output.checkpoint_every"),
        (["output.name=a/b"], "output.name"),
        (["output.dir=/proc/hardmix-cannot-write"], "output.dir"),
        (["device=tpu"], "device"),
        (["seed=-1"], "seed"),
    ]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "device"))
    return cases


def test_every_invalid_value_fails_before_training(tmp_path, capsys):
    out_dir = tmp_path / "out"
    for overrides, field in _invalid_cases(str(tmp_path)):
        sets = TINY + [f"output.dir={out_dir}"] + overrides
        code = main(["train"] + [a for s in sets for a in ("--set", s)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, overrides
        assert len(err) == 1 and err[0].startswith(f"hardmix: error: {field} "), (overrides, err)
        assert not out_dir.exists() or not any(out_dir.iterdir()), overrides  # nothing ran


def test_resume_without_checkpoint_and_bad_checkpoint(tmp_path, capsys):
    sets = TINY + [f"output.dir={tmp_path}", "output.name=none"]
    assert main(["train", "--resume"] + [a for s in sets for a in ("--set", s)]) == 2
    assert capsys.readouterr().err.startswith("hardmix: error: --resume")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad)]) == 2
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.count("hardmix: error: checkpoint") == 2


# ---- data-parallel (gloo, 2 processes on the CPU) ---------------------------------------------


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # eval batch 25: the val shards (26 and 25 images) take 2 and 1 batches on the two ranks.
        cfg = load_config(RunConfig, None, None, TINY + ["optim.epochs=2", f"output.dir={out_dir}",
                                                         "output.checkpoint_every=1",
                                                         "data.eval_batch_size=25"])
        rec = Recorder(stop_at=2 if rank == 1 else None)  # only rank 1 asks to stop
        summary = train(cfg, [rec], Path(out_dir) / "ddp")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"info": {k: rec.info[k] for k in ("rank", "world_size", "steps_per_epoch")},
             "metrics": rec.metrics, "checkpoints": rec.checkpoints, "summary": summary},
            default=str))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["info"]["world_size"] == 2 and r1["info"]["rank"] == 1
    assert r0["info"]["steps_per_epoch"] == r1["info"]["steps_per_epoch"] == 3  # 461 // 2 // 64
    assert r0["metrics"] == r1["metrics"]              # all-reduced before the callbacks
    assert r0["summary"]["status"] == r1["summary"]["status"] == "pruned"  # stop agreed
    assert r0["checkpoints"][0].endswith("last.pt") and r1["checkpoints"] == [None, None]


class _Killed(BaseException):
    """What a kill -9 looks like from inside: nothing after it runs."""


class _KillBeforeWriters(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, metrics, checkpoint):
        if metrics["epoch"] == self.epoch:
            assert checkpoint  # the epoch's checkpoint is on disk, its rows are not
            raise _Killed()


def test_a_kill_between_checkpoint_and_writers_loses_no_epoch_row_or_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ablations.store import ResultStore, StoreCallback, read_results
    from hardmix.tensorboard import TensorBoardCallback

    more = ["optim.epochs=3", "output.checkpoint_every=1"]
    store = ResultStore(str(tmp_path / "sweep"))
    run_dir = tmp_path / "sweep" / "runs" / "t"
    writers = lambda: [StoreCallback(store, "t"), TensorBoardCallback()]  # noqa: E731
    with pytest.raises(_Killed):
        train(tiny(tmp_path, *more), [_KillBeforeWriters(2), *writers()], run_dir)
    epochs = read_results(str(tmp_path / "sweep")).epochs.to_pandas()
    assert sorted(epochs.epoch) == [1]  # epoch 2's checkpoint got ahead of its row

    second = Recorder()
    train(tiny(tmp_path, *more), [*writers(), second], run_dir, resume=True)
    assert second.info["start_epoch"] == 2 and second.info["resumed_metrics"]["epoch"] == 2
    assert [m["epoch"] for m in second.metrics] == [3]  # nothing trained twice
    epochs = read_results(str(tmp_path / "sweep")).epochs.to_pandas()
    assert sorted(epochs.epoch) == [1, 2, 3]
    row = epochs[epochs.epoch == 2].iloc[0]
    assert row.train_loss == second.info["resumed_metrics"]["train_loss"]
    acc = EventAccumulator(str(run_dir)).Reload()
    steps = [e.step for e in acc.Scalars("loss/train_loss")]
    assert sorted(steps) == [1, 2, 3]
