"""The public HardMix API: reproducibility, signals, BatchNorm safety, loss, stats, no host sync."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hardmix import HardMix, mixed_cross_entropy
from hardmix.config import AugmentConfig, ConfigError
from hardmix.methods import METHODS
from hardmix.hardness import clean_logits, frozen_norm


class TinyNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(self.drop(h))


def batch(b: int = 12, classes: int = 5, seed: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    logits = torch.randn(b, classes, generator=g)
    return x, y, logits


def outputs_equal(a, b) -> bool:
    return (torch.equal(a.x, b.x) and torch.equal(a.lam, b.lam) and a.mixed == b.mixed
            and torch.equal(a.source_index, b.source_index) and torch.equal(a.y_b, b.y_b))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("box", ["batch", "sample"])
def test_same_seed_same_output(method, box):
    x, y, logits = batch()
    runs = []
    for _ in range(2):
        mix = HardMix(method=method, box=box, prob=0.7, seed=11, num_classes=5)
        runs.append([mix(x.clone(), y, logits=logits) for _ in range(6)])
    for a, b in zip(*runs):
        assert outputs_equal(a, b)
    other = HardMix(method=method, box=box, prob=0.7, seed=12)
    outs = [other(x.clone(), y, logits=logits) for _ in range(6)]
    if method != "none":
        assert not all(outputs_equal(a, b) for a, b in zip(runs[0], outs))


def test_prob_coin_is_host_side_and_rank_independent():
    x, y, logits = batch()
    a = HardMix(method="hardmix", prob=0.5, seed=5, rank=0)
    b = HardMix(method="hardmix", prob=0.5, seed=5, rank=1)
    same_box = 0
    flags = []
    for _ in range(200):
        oa, ob = a(x, y, logits=logits), b(x, y, logits=logits)
        assert isinstance(oa.mixed, bool) and oa.mixed == ob.mixed
        flags.append(oa.mixed)
        if oa.mixed:  # one batch λ/box on every rank, per-rank sources
            assert torch.equal(oa.lam, ob.lam)
            same_box += torch.equal(oa.source_index, ob.source_index)
    assert 70 < sum(flags) < 130
    assert same_box < sum(flags) // 2
    never = HardMix(method="hardmix", prob=0.0, seed=1)
    assert not any(never(x, y, logits=logits).mixed for _ in range(20))


def test_label_weights_and_loss():
    x, y, logits = batch(b=16)
    for method in METHODS:
        for box in ("batch", "sample"):
            out = HardMix(method=method, box=box, seed=3, num_classes=5)(x.clone(), y, logits=logits)
            assert out.lam.shape == (16,) and out.lam.dtype == torch.float32
            assert torch.all((out.lam >= 0) & (out.lam <= 1))
            target = out.target()
            torch.testing.assert_close(target.sum(1), torch.ones(16))  # weights sum to 1
            for ls in (0.0, 0.1):
                soft = out.target(label_smoothing=ls)
                expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
                torch.testing.assert_close(out.loss(logits, label_smoothing=ls), expected)


def test_label_smoothing_is_applied_once():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    y_a, y_b = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 3, 0, 2, 2])
    lam = torch.tensor([0.2, 0.5, 0.9, 1.0, 0.0, 0.3])
    eps = 0.2
    onehot = torch.nn.functional.one_hot
    mixed = lam[:, None] * onehot(y_a, 4) + (1 - lam[:, None]) * onehot(y_b, 4)
    once = (1 - eps) * mixed + eps / 4
    twice = (1 - eps) * once + eps / 4
    logp = torch.log_softmax(logits, 1)
    got = mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing=eps)
    torch.testing.assert_close(got, -(once * logp).sum(1).mean())
    assert not torch.allclose(got, -(twice * logp).sum(1).mean())
    # equals the two-term definition with a smoothed CE per term
    two_terms = (lam * nn.functional.cross_entropy(logits, y_a, reduction="none", label_smoothing=eps)
                 + (1 - lam) * nn.functional.cross_entropy(logits, y_b, reduction="none",
                                                           label_smoothing=eps)).mean()
    torch.testing.assert_close(got, two_terms)


def test_hard_sources_and_stats():
    b = 16
    x, y, _ = batch(b=b)
    wrong = torch.zeros(b, dtype=torch.bool)
    wrong[[1, 4, 7, 8, 13]] = True
    logits = torch.full((b, 5), -5.0)
    logits[torch.arange(b), y] = torch.where(wrong, -10.0, 10.0)
    mix = HardMix(method="hardmix", seed=0, num_classes=5)
    for _ in range(10):
        out = mix(x, y, logits=logits)
        assert wrong[out.source_index].all()
        assert set(out.source_index.tolist()) == {1, 4, 7, 8, 13}
        st = out.stats
        assert set(st) == {"n_hard", "hard_share", "fallback", "distinct_sources"}
        assert all(v.dim() == 0 for v in st.values())
        assert st["n_hard"] == 5 and st["hard_share"] == 5 / b and st["fallback"] == 0
        assert st["distinct_sources"] == 5
        counts = out.source_counts_by_class()
        assert counts.sum() == b and torch.equal(counts, torch.bincount(out.y_b, minlength=5))


def test_skip_fallback_leaves_the_batch_untouched():
    x, y, _ = batch()
    logits = torch.nn.functional.one_hot(y, 5).float() * 10  # nothing misclassified
    for method in ("hardmix", "hard_mixup", "hard_saliencymix"):
        for box in ("batch", "sample"):
            out = HardMix(method=method, fallback="skip", box=box, seed=1, num_classes=5)(
                x.clone(), y, logits=logits)
            assert out.mixed and out.stats["fallback"] == 1
            assert torch.equal(out.x, x) and torch.all(out.lam == 1)
            assert out.stats["distinct_sources"] == 0 and out.source_counts_by_class().sum() == 0
            assert out.unmixed.all()
            torch.testing.assert_close(out.loss(logits), nn.functional.cross_entropy(logits, y))


def test_random_fallback_is_plain_cutmix():
    x, y, _ = batch()
    logits = torch.nn.functional.one_hot(y, 5).float() * 10
    out = HardMix(method="hardmix", seed=1)(x, y, logits=logits)
    assert out.stats["fallback"] == 1 and out.stats["n_hard"] == 0
    assert sorted(out.source_index.tolist()) == list(range(12))


def test_unmixed_steps_return_the_batch():
    x, y, logits = batch()
    out = HardMix(method="hardmix", prob=0.0, seed=0, num_classes=5)(x, y, logits=logits)
    assert out.mixed is False and out.x is x and torch.all(out.lam == 1)
    assert all(float(v) == 0 for v in out.stats.values())
    assert out.source_counts_by_class().sum() == 0 and out.unmixed.all()
    out = HardMix(method="none", seed=0)(x, y)
    assert out.mixed is False and out.x is x


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("was_training", [True, False])
def test_forward_signal_leaves_batchnorm_and_modes_untouched(bn_mode, was_training):
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    for _ in range(3):  # non-trivial running stats
        model(torch.randn(8, 3, 8, 8) * 3 + 1)
    model.train(was_training)
    model.drop.train(not was_training)  # a mixed mode must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    before = copy.deepcopy(model.bn.state_dict())
    x, y, _ = batch()
    mix = HardMix(method="hardmix", bn_mode=bn_mode, seed=0)
    for _ in range(3):
        mix(x, y, model=model)
    after = model.bn.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.bn.running_mean is not None and "running_mean" in dict(model.bn.named_buffers())
    # train mode really normalises with the batch statistics, eval with the running ones
    with torch.no_grad(), frozen_norm(model, "eval"):
        ref_eval = model(x)
    got = clean_logits(model, x, bn_mode)
    assert torch.allclose(got, ref_eval) == (bn_mode == "eval")


def test_forward_signal_runs_once_per_mixed_step_only():
    model = TinyNet()
    calls = count_forwards(model)
    x, y, _ = batch()
    mix = HardMix(method="hardmix", prob=0.5, seed=3)
    mixed = sum(mix(x, y, model=model).mixed for _ in range(40))
    assert calls[0] == mixed and 0 < mixed < 40
    calls[0] = 0
    HardMix(method="cutmix", seed=0)(x, y, model=model)  # random sources need no hardness
    assert calls[0] == 0


def test_cached_signal_makes_no_forward_and_learns_from_observe():
    b, n = 8, 40
    model = TinyNet()
    calls = count_forwards(model)
    x, y, _ = batch(b=b)
    index = torch.arange(10, 10 + b)
    with pytest.raises(ConfigError, match="prob < 1"):  # nothing would ever be clean
        HardMix(method="hardmix", signal="cached", dataset_size=n, seed=0, num_classes=5)
    mix = HardMix(method="hardmix", signal="cached", dataset_size=n, seed=0, num_classes=5,
                  prob=0.5)

    def mixed_call():
        while True:
            out = mix(x, y, model=model, index=index)
            if out.mixed:
                return out

    # never-seen samples count as hard
    out = mixed_call()
    assert calls[0] == 0 and out.stats["n_hard"] == b and out.stats["fallback"] == 0
    # observe: samples 0..2 misclassified, the rest correct
    wrong = torch.zeros(b, dtype=torch.bool)
    wrong[:3] = True
    logits = torch.full((b, 5), -5.0)
    logits[torch.arange(b), y] = torch.where(wrong, -10.0, 10.0)
    mix.observe(logits, y, index)
    for _ in range(5):
        out = mixed_call()
        assert set(out.source_index.tolist()) == {0, 1, 2} and out.stats["n_hard"] == 3
    assert calls[0] == 0
    # a masked observe only updates the selected rows
    fixed = torch.nn.functional.one_hot(y, 5).float() * 10
    mix.observe(fixed, y, index, mask=torch.arange(b) == 0)
    assert set(mixed_call().source_index.tolist()) == {1, 2}
    # the memory survives a state_dict round trip
    fresh = HardMix(method="hardmix", signal="cached", dataset_size=n, seed=0, prob=0.5)
    fresh.load_state_dict(mix.state_dict())
    outs = [fresh(x, y, index=index) for _ in range(10)]
    assert any(o.mixed for o in outs)
    assert all(set(o.source_index.tolist()) == {1, 2} for o in outs if o.mixed)
    with pytest.raises(ConfigError, match="dataset_size"):
        HardMix(method="hardmix", signal="cached", prob=0.5)
    with pytest.raises(ValueError, match="index"):
        HardMix(method="hardmix", signal="cached", dataset_size=n, prob=0.5)(x, y)


def test_state_dict_resumes_the_random_stream():
    x, y, logits = batch()
    mix = HardMix(method="hardmix", box="sample", prob=0.6, seed=9)
    for _ in range(3):
        mix(x, y, logits=logits)
    state = mix.state_dict()
    expected = [mix(x, y, logits=logits) for _ in range(5)]
    resumed = HardMix(method="hardmix", box="sample", prob=0.6, seed=123)
    resumed.load_state_dict(state)
    for a in expected:
        assert outputs_equal(a, resumed(x, y, logits=logits))


def test_from_config_and_validation():
    cfg = AugmentConfig(method="hard_mixup", alpha=0.5, prob=0.5, box="sample")
    mix = HardMix.from_config(cfg, num_classes=5, seed=0)
    assert mix.method == "hard_mixup" and mix.cfg == cfg and mix.uses_hardness
    for kwargs, field in (({"alpha": 0.0}, "augment.alpha"), ({"method": "mixcut"}, "augment.method"),
                          ({"prob": 1.5}, "augment.prob"), ({"criterion": "x"}, "augment.criterion"),
                          ({"min_hard": 0}, "augment.min_hard"), ({"box": "tile"}, "augment.box")):
        with pytest.raises(ConfigError) as err:
            HardMix(**kwargs)
        assert err.value.field == field
    x, y, logits = batch(b=6)
    with pytest.raises(ConfigError, match="augment.k"):
        HardMix(method="hardmix", criterion="topk_loss", k=7, seed=0)(x, y, logits=logits)
    with pytest.raises(ValueError, match="model= or logits="):
        HardMix(method="hardmix", seed=0)(x, y)


class NoHostSync(TorchDispatchMode):
    """Fails on every op that makes the host wait for a device value."""

    BANNED = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "item", "equal", "is_nonzero"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.BANNED:
            raise AssertionError(f"host sync in the per-step path: aten.{name}")
        if name in ("index", "index_put", "index_put_"):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"boolean-mask indexing in the per-step path: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
def test_per_step_path_never_syncs(method):
    x, y, logits = batch()
    model = TinyNet()
    index = torch.arange(12)
    configs = [dict(box=b, fallback=f) for b in ("batch", "sample") for f in ("random", "skip", "topk_loss")]
    configs += [dict(criterion="topk_loss", k=3), dict(criterion="low_margin", k=0.25),
                dict(signal="cached", dataset_size=20, prob=0.5), dict(bn_mode="train"),
                dict(criterion="history", dataset_size=20),
                dict(criterion="history", signal="cached", dataset_size=20, prob=0.5)]
    for kw in configs:
        mix = HardMix(method=method, seed=0, num_classes=5, **kw)
        with NoHostSync():
            for _ in range(3):
                out = mix(x.clone(), y, model=model, index=index)
                out.loss(logits, label_smoothing=0.1)
                dict(out.stats), out.source_counts_by_class(), out.unmixed, out.target()
                mix.observe(logits, y, index, out)


def test_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="boolean-mask"), NoHostSync():
        torch.ones(3)[torch.tensor([True, False, True])]


def test_plain_training_loop_learns():
    """The README's loop shape: a few steps of a tiny model with HardMix; the model learns."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 3, 1, 1, generator=g) * 2
    y_all = torch.randint(0, 5, (256,), generator=g)
    x_all = centres[y_all] + 0.5 * torch.randn(256, 3, 8, 8, generator=g)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mix = HardMix(method="hardmix", alpha=1.0, prob=0.5, seed=0, num_classes=5)

    def accuracy() -> float:
        with torch.no_grad(), frozen_norm(model):
            return (model(x_all).argmax(1) == y_all).float().mean().item()

    before, mixed = accuracy(), 0
    for step in range(120):
        idx = torch.randint(0, 256, (32,), generator=g)
        out = mix(x_all[idx], y_all[idx], model=model)
        loss = out.loss(model(out.x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mixed += out.mixed
    assert 30 < mixed < 90
    assert before < 0.5 and accuracy() > 0.9
