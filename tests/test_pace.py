"""Training at the hardware's pace: the numeric policy, the evaluation cadence, threads.

Speed itself is measured by benchmarks/bench_train.py (ratios in one run), never here.
"""

from __future__ import annotations

import contextlib

import torch

from hardmix.config import OptimConfig, RunConfig, load_config
from hardmix.metrics import Callback
from hardmix.device import cpu_bf16_native
from hardmix.train import precision_policy, train

TINY = ["data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
        "output.progress=false", "output.checkpoint_every=0"]


class Rec(Callback):
    def __init__(self):
        self.info, self.metrics = None, []

    def on_run_start(self, cfg, info):
        self.info = info

    def on_epoch_end(self, metrics, checkpoint):
        self.metrics.append(metrics)


def test_cpu_policy_is_bf16_where_the_cpu_computes_it_natively_and_says_why():
    native, why = cpu_bf16_native()
    p = precision_policy(OptimConfig(), torch.device("cpu"))
    assert p.channels_last and p.memory_format == torch.channels_last
    if native:
        assert p.dtype == torch.bfloat16 and "bf16 autocast" in p.note and why in p.note
    else:
        assert p.dtype is None and why in p.note
    off = precision_policy(OptimConfig(amp="fp32", channels_last=False), torch.device("cpu"))
    assert off.dtype is None and off.note == "fp32 (optim.amp=fp32), contiguous"
    assert isinstance(off.autocast(), contextlib.nullcontext)


def test_model_batches_and_hardness_forward_follow_the_policy(tmp_path):
    """channels_last model and batches; the hardness forward and the loss under one autocast;
    BatchNorm statistics and parameters stay fp32."""
    from hardmix import HardMix
    from hardmix.data import build_data
    from hardmix.models import build_model
    from hardmix.config import ModelConfig, DataConfig
    from hardmix.train import training_step

    p = precision_policy(OptimConfig(), torch.device("cpu"))
    data = build_data(DataConfig(name="synthetic", batch_size=32), memory_format=p.memory_format)
    data.train.set_epoch(1)
    x, y, idx = next(iter(data.train))
    assert x.is_contiguous(memory_format=torch.channels_last)
    model = build_model(ModelConfig(name="smallnet", width=8), 10, 3, 16).to(
        memory_format=p.memory_format)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, out = training_step(model, model, HardMix(prob=1.0, seed=0, inplace=True), opt, x, y,
                              idx, autocast=p.autocast)
    want = p.dtype or torch.float32
    assert seen == [want, want]  # the hardness forward and the training forward
    assert loss.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in model.state_dict().values()
               if t.is_floating_point())


def test_evaluation_cadence_and_scheduler_epochs(tmp_path):
    cfg = load_config(RunConfig, None, None, TINY + ["optim.epochs=5", "eval.every=3",
                                                     "eval.test_every=2",
                                                     f"output.dir={tmp_path}"])
    rec = Rec()
    s = train(cfg, [rec], tmp_path / "r", eval_epochs=(2,))
    val = [m["epoch"] for m in rec.metrics if m["val_top1_err"] is not None]
    test = [m["epoch"] for m in rec.metrics if m["test_top1_err"] is not None]
    assert val == [2, 3, 5] and test == [2, 4, 5]  # every N, the scheduler's, always the last
    assert s["final_top1_err"] == rec.metrics[-1]["test_top1_err"]
    assert s["best_val_top1_err"] == min(m["val_top1_err"] for m in rec.metrics
                                         if m["val_top1_err"] is not None)
    assert rec.info["threads"] == torch.get_num_threads() and rec.info["precision"]


def test_asha_rungs_are_the_epochs_ray_decides_on():
    from hardmix.config import SweepConfig
    from tune.search import scheduler_epochs

    cfg = load_config(SweepConfig, None, None, ["scheduler.type=asha", "scheduler.grace_period=2",
                                                "scheduler.reduction_factor=3",
                                                "run.optim.epochs=60"])
    assert scheduler_epochs(cfg) == [2, 6, 18, 54]
    assert scheduler_epochs(load_config(SweepConfig, None, None, ["run.optim.epochs=60"])) == []
