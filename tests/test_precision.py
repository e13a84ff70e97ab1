"""Numeric precision: gradients under autocast as fp32 would give them, the precision policy
(``optim.amp``) from the device's hardware facts, and the fp16 + GradScaler step."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hardmix import HardMix
from hardmix.cli import main
from hardmix.config import ConfigError, ModelConfig, OptimConfig, RunConfig, load_config
from hardmix.config.environment import check_run_environment
from hardmix.hardness import clean_logits
from hardmix.models import build_model
from hardmix.device import cpu_bf16_native
from hardmix.train import Precision, check_resumable, precision_policy, train, training_step

BF16 = Precision("cpu", torch.bfloat16, False, "bf16 autocast")
FP32 = Precision("cpu", None, False, "fp32")

# ---- gradients under autocast ------------------------------------------------------------------
#
# Tolerance against the fp32 step, from measurement (smallnet width 8, batch 32 of 16x16, seeds
# 0-19, this CPU): the fc weight's gradient is within 0.4% of fp32, the conv weights' within
# 15-35% (relative L2 error; cosine similarity >= 0.937). A single bf16 conv layer is within
# 0.3%: the spread comes from depth (bf16 rounding flips ReLU and max-pool decisions, and
# BatchNorm networks at initialisation amplify perturbations layer by layer), the same with a
# plain cross entropy and no mixing. The bound below, cosine >= 0.85 and relative error <= 0.6,
# sits outside that spread and far from the failure it looks for: a weight with no gradient
# (or a zero one) has relative error 1 and cosine 0. The sharp check is the other one: the
# step's bf16 gradient equals, bit for bit, a bf16 forward and backward of the same mixed batch
# in a region of its own, so the hardness forward left no trace in it.
MIN_COSINE, MAX_REL_ERR = 0.85, 0.6


def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="smallnet", width=8), 10, 3, 16)
    x = torch.randn(32, 3, 16, 16)
    # Labels far from a precision tie: the half with the widest top-2 margins (fp32, the
    # hardness forward's eval mode) are right, the rest take their least likely class, so the
    # hard set -- and with it every source -- is the same in bf16 and fp32.
    with torch.no_grad():
        logits = clean_logits(model, x, "eval").float()
    top2 = logits.topk(2, dim=1)
    easy = (top2.values[:, 0] - top2.values[:, 1]).argsort(descending=True)[:len(x) // 2]
    y = logits.argmin(1)
    y[easy] = top2.indices[easy, 0]
    return model, x, y


def _step(model, x, y, precision: Precision, step=training_step):
    model = copy.deepcopy(model)
    mix = HardMix(method="hardmix", signal="forward", prob=1.0, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, out = step(model, model, mix, opt, x.clone(), y, torch.arange(len(y)),
                  autocast=precision.autocast)
    return model, out


def _weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def assert_fp32_like_gradients(model_lp, model_fp32) -> None:
    w_lp, w_32 = _weights(model_lp), _weights(model_fp32)
    assert len(w_lp) == 8  # 7 convs and the classifier
    for name, w in w_lp.items():
        assert w.grad is not None, f"{name}.weight received no gradient"
        ref = w_32[name].grad
        rel = ((w.grad - ref).norm() / ref.norm()).item()
        cos = F.cosine_similarity(w.grad.flatten(), ref.flatten(), dim=0).item()
        assert rel <= MAX_REL_ERR and cos >= MIN_COSINE, (name, rel, cos)


def _isolated_gradients(model, out, precision: Precision) -> dict:
    """The bf16 gradients of the step's mixed batch, from a forward in a region of its own."""
    model = copy.deepcopy(model)
    with precision.autocast():
        loss = out.loss(model(out.x).float())
    loss.backward()
    return {n: w.grad for n, w in _weights(model).items()}


def _check_step(model, x, y, step=training_step) -> None:
    m16, out16 = _step(model, x, y, BF16, step)
    m32, out32 = _step(model, x, y, FP32, step)
    assert 0 < int(out16.stats["n_hard"]) < len(y)  # a real hard set, not the whole batch
    assert torch.equal(out16.source_index, out32.source_index)
    assert torch.equal(out16.lam, out32.lam)
    assert_fp32_like_gradients(m16, m32)
    isolated = _isolated_gradients(model, out16, BF16)
    for name, w in _weights(m16).items():
        assert torch.equal(w.grad, isolated[name]), name


def test_weights_get_fp32_like_gradients_on_a_bf16_hardmix_step():
    """A mixed HardMix step with the forward signal under bf16 autocast: every conv and linear
    weight gets the gradient of the fp32 step, within the measured tolerance above."""
    _check_step(*_model_and_batch())


class StaleWeightCache(TorchFunctionMode):
    """Autocast's weight cache as torch released it before pytorch#112583 was fixed: the
    low-precision copy of a leaf fp32 weight that requires grad is cached whatever the grad
    mode -- a copy cast under no_grad has no grad_fn -- and reused until the outermost autocast
    region exits (``torch.clear_autocast_cache``, patched to clear this cache too).

    A stand-in, because the installed torch has the fix: it models the conv and linear weight
    casts of the CPU autocast, which is where a weight loses its gradient, not the C++ cache
    itself (other ops, CUDA, a cache bug of another shape are out of its sight)."""

    OPS = {torch.conv2d, F.linear}

    def __init__(self):
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS and torch.is_autocast_enabled("cpu"):
            w = args[1]
            if w.dtype == torch.float32 and w.requires_grad and w.is_leaf:
                if id(w) not in self.cache:
                    self.cache[id(w)] = w.to(torch.get_autocast_dtype("cpu"))
                args = (args[0], self.cache[id(w)], *args[2:])
        return func(*args, **kwargs)


@pytest.fixture
def stale_cache(monkeypatch):
    mode = StaleWeightCache()
    clear = torch.clear_autocast_cache

    def clear_both():
        mode.cache.clear()
        clear()

    monkeypatch.setattr(torch, "clear_autocast_cache", clear_both)  # what autocast's exit calls
    with mode:
        yield mode


def _shared_region_step(model, raw_model, mix, optimizer, x, y, idx, *, autocast):
    """The step as it was: the hardness forward inside the training forward's region."""
    with autocast():
        out = mix(x, y, model=raw_model, index=idx)
        loss = out.loss(model(out.x).float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), out


def test_the_stand_in_reproduces_the_lost_gradient(stale_cache):
    model, x, y = _model_and_batch()
    with BF16.autocast():
        with torch.no_grad():
            model(x)
        model(x).float().sum().backward()
    assert all(w.grad is None for w in _weights(model).values())
    model.zero_grad(set_to_none=True)
    with BF16.autocast():  # no no_grad forward first: the stand-in keeps gradients
        model(x).float().sum().backward()
    assert all(w.grad is not None for w in _weights(model).values())


def test_shared_region_fails_the_check_under_a_stale_cache_and_the_step_passes(stale_cache):
    """The check above catches the defect: with the old cache, the step as it was gives conv
    and linear weights no gradient; the training step (two regions) still gets them right."""
    model, x, y = _model_and_batch()
    with pytest.raises(AssertionError, match="received no gradient"):
        _check_step(model, x, y, step=_shared_region_step)
    _check_step(model, x, y)


# ---- the precision policy --------------------------------------------------------------------


def _cuda(monkeypatch, cc: tuple[int, int]) -> torch.device:
    """Patch the device facts of a CUDA GPU of compute capability ``cc`` (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    # True by emulation on V100/T4: the policy must not believe it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return torch.device("cuda", 0)


F16, B16, F32, REFUSED = "fp16+scaler", "bf16", "fp32", "refused"
#: optim.amp -> what runs, for each device: (auto, bf16, fp16, fp32).
POLICY = {
    (6, 0): (F32, REFUSED, F16, F32),      # P100: no tensor cores
    (7, 0): (F16, REFUSED, F16, F32),      # V100
    (7, 5): (F16, REFUSED, F16, F32),      # T4
    (8, 0): (B16, B16, F16, F32),          # A100
    (9, 0): (B16, B16, F16, F32),          # H100
    "cpu+bf16": (B16, B16, REFUSED, F32),  # avx512_bf16 / amx_bf16
    "cpu": (F32, REFUSED, REFUSED, F32),
}


def _what_runs(amp: str, device: torch.device) -> str:
    try:
        p = precision_policy(OptimConfig(amp=amp), device)
    except ConfigError as exc:
        assert exc.field == "optim.amp" and "\n" not in str(exc)
        return REFUSED
    assert p.note.startswith({torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast",
                              None: "fp32"}[p.dtype])
    if p.dtype is torch.float16:
        assert p.scaler and "GradScaler" in p.note
        return F16
    assert not p.scaler and p.grad_scaler() is None
    return B16 if p.dtype is torch.bfloat16 else F32


@pytest.mark.parametrize("facts", list(POLICY), ids=str)
def test_policy_follows_the_hardware_not_emulation(facts, monkeypatch):
    if isinstance(facts, tuple):
        device = _cuda(monkeypatch, facts)
    else:
        native = facts == "cpu+bf16"
        monkeypatch.setattr("hardmix.device.cpu_bf16_native",
                            lambda: (native, "CPU flags avx512_bf16" if native else "no flag"))
        device = torch.device("cpu")
    got = tuple(_what_runs(amp, device) for amp in ("auto", "bf16", "fp16", "fp32"))
    assert got == POLICY[facts]


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    with_flag, without = tmp_path / "a", tmp_path / "b"
    with_flag.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert cpu_bf16_native(str(with_flag)) == (True, "CPU flags avx512_bf16")
    assert cpu_bf16_native(str(without))[0] is False
    assert cpu_bf16_native(str(tmp_path / "missing"))[0] is False


def test_forced_precision_the_device_lacks_is_refused_before_work(tmp_path, monkeypatch, capsys):
    args = ["train", "--set", "data.name=synthetic", "--set", "device=cpu",
            "--set", f"output.dir={tmp_path}", "--set", "output.progress=false"]
    monkeypatch.setattr("hardmix.device.cpu_bf16_native", lambda: (False, "no bf16 flag"))
    for amp in ("bf16", "fp16"):
        assert main(args + ["--set", f"optim.amp={amp}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "optim.amp" in err[0] and amp in err[0]
    assert not any(tmp_path.iterdir())  # nothing was written
    _cuda(monkeypatch, (7, 5))  # a T4: bf16 only by emulation
    cfg = load_config(RunConfig, overrides=["data.name=synthetic", "device=cuda",
                                            "optim.amp=bf16"])
    with pytest.raises(ConfigError, match="compute capability 7.5") as info:
        check_run_environment(cfg, outputs=False)
    assert info.value.field == "optim.amp"


def test_run_row_says_which_precision_ran_and_old_switches_still_load(tmp_path):
    fields = ["data.name=synthetic", "model.name=smallnet", "model.width=8",
              "data.batch_size=64", "optim.epochs=1", "output.progress=false",
              f"output.dir={tmp_path}", "output.tensorboard=false"]
    cfg = load_config(RunConfig, overrides=fields + ["optim.amp=false"])  # the old boolean
    assert cfg.optim.amp == "fp32"
    assert load_config(RunConfig, overrides=["optim.amp=true"]).optim.amp == "auto"
    summary = train(cfg, [], tmp_path / "r")
    assert summary["precision"] == "fp32 (optim.amp=fp32), channels_last"
    assert json.loads((tmp_path / "r" / "run.json").read_text())["precision"] == \
        summary["precision"]
    # A checkpoint of an earlier version (optim.amp: false) resumes as fp32, and only as fp32.
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"]["optim"]["amp"] = False
    torch.save(state, ckpt)
    check_resumable(cfg, tmp_path / "r")
    with pytest.raises(ConfigError, match="optim.amp='fp32', not 'auto'"):
        check_resumable(load_config(RunConfig, overrides=fields), tmp_path / "r")


# ---- fp16 + GradScaler -----------------------------------------------------------------------


def _fp16():
    return torch.autocast("cpu", dtype=torch.float16)


def test_fp16_step_unscales_before_clipping_and_skips_a_step_with_inf_gradients():
    model, x, y = _model_and_batch()
    mix = HardMix(method="cutmix", prob=1.0, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    params = lambda: [p.detach().clone() for p in model.parameters()]
    clip = 1e-3
    before = params()
    loss, _ = training_step(model, model, mix, opt, x.clone(), y, torch.arange(32),
                            grad_clip=clip, autocast=_fp16, scheduler=sched, scaler=scaler)
    assert torch.isfinite(loss)
    # The true gradients were clipped (scaled ones would end at clip / 2**16 after the step).
    norm = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
    assert norm == pytest.approx(clip, rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, params()))  # it stepped
    assert scaler.get_scale() == 2.0 ** 16

    before, state = params(), copy.deepcopy(opt.state_dict()["state"])
    hook = model.fc.weight.register_hook(lambda g: g * float("inf"))
    training_step(model, model, mix, opt, x.clone(), y, torch.arange(32), grad_clip=clip,
                  autocast=_fp16, scheduler=sched, scaler=scaler)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, params()))  # skipped: nothing moved
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in state.items())
    assert scaler.get_scale() == 2.0 ** 15  # and the scale backed off
    training_step(model, model, mix, opt, x.clone(), y, torch.arange(32), grad_clip=clip,
                  autocast=_fp16, scheduler=sched, scaler=scaler)
    assert any(not torch.equal(a, b) for a, b in zip(before, params()))  # steps again
