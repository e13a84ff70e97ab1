"""The per-sample hardness memory against a plain-Python model of it, and which rows are clean.

* Never-seen samples count as hard (:mod:`hardmix.hardness`): misclassified, loss +inf, margin
  -inf, no history. So under the ``cached`` signal they rank first for ``topk_loss`` and
  ``low_margin`` and are hard for ``misclassified`` and ``history``; once observed they take
  their place by what was observed.
* ``SampleMemory.observe`` with a ``mask`` updates exactly the masked rows -- latest loss,
  margin, flag, seen, the last flags and their count -- and leaves every other row as it was.
  A random sequence of observations is replayed here on a dictionary model and compared field
  by field, and the ``history`` criterion at every window against its definition.
* ``MixOutput.unmixed`` is True exactly for the rows whose image the call left bit-identical
  (λ = 1 or the sample is its own source), for every method and box mode, and ``observe``
  feeds the memory those rows only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hardmix import HardMix
from hardmix.config import AugmentConfig, ConfigError
from hardmix.config.schema import MAX_HISTORY
from hardmix.hardness import MemoryScores, SampleMemory, Scores, clean_logits, history_hard
from hardmix.methods import METHODS
from hardmix.sources import HardSource

C = 4  # classes


def logits_for(y: torch.Tensor, wrong: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is ``y`` unless ``wrong`` (then ``(y + 1) % C``), margins ``scale``."""
    out = torch.zeros(y.shape[0], C)
    target = torch.where(wrong, (y + 1) % C, y)
    out[torch.arange(y.shape[0]), target] = scale
    return out


class Model:
    """The memory as the docstring says it: per sample the latest observation and all flags."""

    def __init__(self, n: int):
        self.latest: dict[int, tuple[float, float, bool]] = {}
        self.flags: dict[int, list[bool]] = {i: [] for i in range(n)}

    def observe(self, logits, y, index, mask):
        loss = F.cross_entropy(logits, y, reduction="none")
        true = logits[torch.arange(len(y)), y]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        for r, i in enumerate(index.tolist()):
            if mask is None or mask[r]:
                wrong = bool(logits[r].argmax() != y[r])
                self.latest[i] = (float(loss[r]), float(true[r] - other[r]), wrong)
                self.flags[i].append(wrong)

    def hard(self, i: int, window: int, min_wrong: int) -> bool:
        last = self.flags[i][-window:]
        if not last:
            return True
        return sum(last) / len(last) >= min_wrong / window


def test_observe_with_masks_matches_the_model_and_history_its_definition():
    n, b = 30, 10
    g = torch.Generator().manual_seed(0)
    mem, model = SampleMemory(n, MAX_HISTORY), Model(n)
    for step in range(60):
        index = torch.randperm(n - 4, generator=g)[:b]  # the last four are never observed
        y = torch.randint(0, C, (b,), generator=g)
        wrong = torch.rand(b, generator=g) < 0.4
        logits = logits_for(y, wrong, torch.rand(b, generator=g) * 5 + 0.1)
        mask = None if step % 3 == 0 else torch.rand(b, generator=g) < 0.5
        mem.observe(logits, y, index, mask)
        model.observe(logits, y, index, mask)
    every = torch.arange(n)
    scores = MemoryScores(mem, every)
    loss, margin, wrong = scores.loss(), scores.margin(), scores.wrong()
    for i in range(n):
        if i in model.latest:
            want_loss, want_margin, want_wrong = model.latest[i]
            assert loss[i].item() == pytest.approx(want_loss, rel=1e-5)
            assert margin[i].item() == pytest.approx(want_margin, rel=1e-5)
            assert bool(wrong[i]) == want_wrong
        else:  # never observed: as hard as a sample can be
            assert loss[i] == float("inf") and margin[i] == float("-inf") and wrong[i]
    seen = torch.tensor([i in model.latest for i in range(n)])
    assert mem.seen_fraction().item() == pytest.approx(seen.float().mean().item())
    assert seen.any() and not seen.all()  # both kinds are there
    for window in range(1, MAX_HISTORY + 1):
        for min_wrong in range(1, window + 1):
            got = mem.history(every, window, min_wrong).tolist()
            assert got == [model.hard(i, window, min_wrong) for i in range(n)], (window, min_wrong)


def test_history_rule_on_hand_made_flags():
    # bits hold the flags newest first; fewer observations than the window: the same rate
    bits = torch.tensor([0b0000, 0b0001, 0b0011, 0b0110, 0b1111, 0b0101, 0b0000], dtype=torch.uint8)
    count = torch.tensor([0, 1, 2, 4, 4, 3, 2], dtype=torch.uint8)
    got = history_hard(bits, count, window=4, min_wrong=2).tolist()
    # never seen; 1/1 >= 2/4; 2/2; 2/4; 4/4; 2/3 (bits 0,2 of 3); 0/2
    assert got == [True, True, True, True, True, True, False]
    assert history_hard(bits, count, window=4, min_wrong=3).tolist() == [
        True, True, True, False, True, False, False]


def test_a_masked_update_leaves_the_other_rows_and_their_history_alone():
    mem = SampleMemory(6, MAX_HISTORY)
    y = torch.tensor([0, 1, 2, 3])
    index = torch.tensor([5, 0, 2, 3])
    first = logits_for(y, torch.tensor([True, True, False, False]), torch.full((4,), 2.0))
    mem.observe(first, y, index)
    before = {k: v.clone() for k, v in mem.state_dict().items() if k != "dataset_size"}
    second = logits_for(y, torch.tensor([False, False, True, True]), torch.full((4,), 3.0))
    mem.observe(second, y, index, mask=torch.tensor([False, True, False, True]))
    after = mem.state_dict()
    for name, old in before.items():
        untouched = [1, 4, 5, 2]  # never observed, and rows 0 and 2 that the mask left out
        assert torch.equal(after[name][untouched], old[untouched]), name
    assert after["count"][[0, 3]].tolist() == [2, 2] and after["count"][[5, 2]].tolist() == [1, 1]
    assert after["bits"][[0, 3]].tolist() == [0b10, 0b01]
    assert after["seen"].tolist() == [True, False, True, True, False, True]


def test_a_checkpoint_from_before_the_history_memory_counts_one_observation():
    mem = SampleMemory(4, MAX_HISTORY)
    y = torch.tensor([0, 1])
    mem.observe(logits_for(y, torch.tensor([True, False]), torch.ones(2)), y, torch.tensor([1, 2]))
    old = {k: v for k, v in mem.state_dict().items() if k not in ("bits", "count")}
    fresh = SampleMemory(4, MAX_HISTORY)
    fresh.load_state_dict(old)
    # one observation each where seen; the latest flag is the only one (never seen: flag 1)
    assert fresh.count_mem.tolist() == [0, 1, 1, 0] and fresh.bits_mem.tolist() == [1, 1, 0, 1]
    assert fresh.history(torch.arange(4), 4, 1).tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="dataset_size"):
        SampleMemory(5, MAX_HISTORY).load_state_dict(mem.state_dict())
    assert SampleMemory(4).seen_fraction().item() == 0.0
    assert SampleMemory(4).state_dict() == {"dataset_size": 4}


@pytest.mark.parametrize("criterion", ["topk_loss", "low_margin", "misclassified", "history"])
def test_never_seen_samples_come_first_under_the_cached_signal(criterion):
    n, b, k = 20, 8, 4
    mix = HardMix(method="hardmix", signal="cached", criterion=criterion, k=k, min_hard=1,
                  dataset_size=n, prob=0.5, seed=0, num_classes=C)
    index = torch.arange(b)
    y = torch.arange(b) % C
    # samples 0..5 observed: 0..2 misclassified with growing loss, 3..5 correct; 6, 7 never
    obs = torch.arange(6)
    wrong = torch.tensor([True, True, True, False, False, False])
    scale = torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 1.0])
    for _ in range(4):  # history: four observations of each
        mix.observe(logits_for(y[obs], wrong, scale), y[obs], obs)
    if criterion in ("topk_loss", "low_margin"):
        hard = {6, 7, 2, 1}  # the two never-seen first, then the two highest losses (margins)
    else:
        hard = {6, 7, 0, 1, 2}
    x = torch.randn(b, 3, 8, 8)
    outs = [mix(x, y, index=index) for _ in range(12)]
    assert any(o.mixed for o in outs)
    for out in outs:
        if out.mixed:
            # every hard sample is a source, and only hard samples are
            assert set(out.source_index.tolist()) == hard
            assert out.stats["n_hard"] == len(hard)


METHOD_NAMES = [m for m in METHODS if m != "none"]


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("box", ["batch", "sample"])
def test_unmixed_is_exactly_the_rows_left_bit_identical(method, box):
    # 4x4 images: an empty box (λ = 1) is frequent; hard sources repeat, so a sample is often
    # its own source; random images, so any paste or blend changes a row
    b, n = 16, 16
    kw = dict(method=method, box=box, prob=1.0, seed=1, num_classes=C)
    if METHODS[method].hard:
        kw.update(criterion="topk_loss", k=3)
    mix = HardMix(**kw)
    g = torch.Generator().manual_seed(2)
    seen = {"clean": 0, "changed": 0}
    for _ in range(25):
        x = torch.rand(b, 3, 4, 4, generator=g) + 0.1
        y = torch.randint(0, C, (b,), generator=g)
        out = mix(x.clone(), y, logits=torch.randn(b, C, generator=g))
        same = torch.tensor([torch.equal(out.x[i], x[i]) for i in range(b)])
        assert torch.equal(out.unmixed, same), (method, box)
        assert out.unmixed.dtype == torch.bool and out.unmixed.shape == (b,)
        # the loss of a clean row is plain cross entropy of its own label
        logits = torch.randn(b, C, generator=g)
        per_row = out.loss(logits, reduction="none")
        ce = F.cross_entropy(logits, y, reduction="none")
        torch.testing.assert_close(per_row[out.unmixed], ce[out.unmixed])
        seen["clean"] += int(same.sum())
        seen["changed"] += int((~same).sum())
    assert seen["changed"] > 0
    if method != "cutout":
        assert seen["clean"] > 0  # the property was tested on both kinds of rows


def test_unmixed_steps_and_skipped_steps_are_all_clean():
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % C
    out = HardMix(method="hardmix", prob=0.0, seed=0)(x, y, logits=torch.randn(6, C))
    assert not out.mixed and out.unmixed.all()
    correct = F.one_hot(y, C).float() * 10  # nothing misclassified: skip fires
    out = HardMix(method="hardmix", fallback="skip", seed=0)(x, y, logits=correct)
    assert out.mixed and out.unmixed.all() and torch.equal(out.x, x)


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_observe_after_a_mixed_step_remembers_only_its_clean_rows(box):
    n, b = 12, 12
    mix = HardMix(method="hardmix", signal="cached", criterion="topk_loss", k=2, box=box,
                  dataset_size=n, prob=0.5, seed=4, num_classes=C)
    model = Model(n)
    g = torch.Generator().manual_seed(0)
    index = torch.arange(n)
    clean_rows = mixed_rows = 0
    for _ in range(30):
        x = torch.rand(b, 3, 4, 4, generator=g)
        y = torch.randint(0, C, (b,), generator=g)
        out = mix(x, y, index=index)
        logits = torch.randn(b, C, generator=g)
        mix.observe(logits, y, index, out)
        model.observe(logits, y, index, out.unmixed if out.mixed else None)
        if out.mixed:
            clean_rows += int(out.unmixed.sum())
            mixed_rows += int((~out.unmixed).sum())
        # after every step (the counts saturate at MAX_HISTORY, the latest values get
        # overwritten: a difference must be caught where it happens)
        loss = mix.memory.loss_mem
        for i in range(n):
            want = model.latest[i][0] if i in model.latest else float("inf")
            assert loss[i].item() == pytest.approx(want, rel=1e-5)
        counts = mix.memory.count_mem.tolist()
        assert counts == [min(len(model.flags[i]), MAX_HISTORY) for i in range(n)]
    assert clean_rows > 0 and mixed_rows > 0


def test_the_forward_signal_observes_its_clean_forward_and_not_the_mixed_one():
    n, b = 8, 8
    mix = HardMix(method="hardmix", criterion="history", dataset_size=n, prob=1.0, seed=0,
                  num_classes=C)
    index = torch.arange(b)
    y = torch.arange(b) % C
    clean = logits_for(y, torch.zeros(b, dtype=torch.bool), torch.ones(b))
    out = mix(torch.rand(b, 3, 4, 4), y, logits=clean, index=index)
    assert out.mixed and mix.memory.count_mem.tolist() == [1] * n
    mix.observe(torch.randn(b, C), y, index, out)  # the mixed training forward: not an observation
    assert mix.memory.count_mem.tolist() == [1] * n
    assert mix.memory.loss_mem.tolist() == pytest.approx(
        F.cross_entropy(clean, y, reduction="none").tolist())


def test_the_default_memory_keeps_one_byte_of_flags():
    mem = SampleMemory(3)
    y = torch.tensor([0, 1, 2])
    for step in range(MAX_HISTORY + 4):
        mem.observe(logits_for(y, torch.tensor([step % 2 == 0] * 3), torch.ones(3)), y,
                    torch.arange(3))
    assert mem.count_mem.tolist() == [MAX_HISTORY] * 3
    assert mem.history(torch.arange(3), MAX_HISTORY, MAX_HISTORY // 2).all()
    assert not mem.history(torch.arange(3), MAX_HISTORY, MAX_HISTORY // 2 + 1).any()


def test_hard_sources_refuse_what_they_cannot_use():
    with pytest.raises(ConfigError) as err:
        HardSource(AugmentConfig(criterion="nope"))
    assert err.value.field == "augment.criterion"
    with pytest.raises(ConfigError) as err:
        HardSource(AugmentConfig(fallback="nope"))
    assert err.value.field == "augment.fallback"
    with pytest.raises(ValueError, match="scores"):
        HardSource(AugmentConfig())(4, torch.device("cpu"), torch.Generator())
    # k is checked when HardMix is built, not at the first call
    for k in (1.5, 2.5):
        with pytest.raises(ConfigError) as err:
            HardMix(method="hardmix", criterion="topk_loss", k=k)
        assert err.value.field == "augment.k"
    assert "hardmix" in repr(HardMix(method="hardmix", criterion="topk_loss", k=2))


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, C)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_the_clean_forward_normalises_with_running_or_batch_statistics_as_asked():
    net = BNNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(6, 3, 6, 6)
    with torch.no_grad():
        ref_eval = copy.deepcopy(net).eval()(x)  # running statistics
        ref_train = copy.deepcopy(net).train()(x)  # batch statistics (a copy: it updates buffers)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.testing.assert_close(clean_logits(net, x, "eval"), ref_eval)
    torch.testing.assert_close(clean_logits(net, x, "train"), ref_train)
    assert not torch.allclose(ref_eval, ref_train)
    assert net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("fallback", ["random", "skip", "topk_loss"])
def test_a_single_hard_sample_is_the_source_of_every_target(fallback):
    # one misclassified sample and min_hard = 1: the fallback does not fire, and the hard set
    # of one gives content to the whole batch (no other sample may slip in as a repeat)
    b = 9
    y = torch.arange(b) % C
    wrong = torch.zeros(b, dtype=torch.bool)
    wrong[4] = True
    logits = logits_for(y, wrong, torch.ones(b))
    mix = HardMix(method="hardmix", criterion="misclassified", fallback=fallback, min_hard=1,
                  k=2, seed=0, num_classes=C)
    for _ in range(20):
        out = mix(torch.rand(b, 3, 8, 8), y, logits=logits)
        assert out.source_index.tolist() == [4] * b
        assert out.stats["n_hard"] == 1 and out.stats["fallback"] == 0


def test_the_share_of_the_data_set_the_memory_has_seen():
    n = 10
    mix = HardMix(method="hardmix", signal="cached", dataset_size=n, prob=0.5, seed=0)
    assert mix.memory_seen().item() == 0.0
    y = torch.arange(4) % C
    mix.observe(torch.randn(4, C), y, torch.tensor([0, 3, 5, 9]))
    assert mix.memory_seen().item() == pytest.approx(0.4)
    assert HardMix(method="cutmix", seed=0).memory_seen() is None
    assert HardMix(method="hardmix", seed=0).memory_seen() is None  # forward signal: no memory


def test_a_scores_view_a_subclass_lacks_is_an_error_not_a_none():
    for view in ("wrong", "loss", "margin"):
        with pytest.raises(NotImplementedError):
            getattr(Scores(), view)()
    with pytest.raises(ValueError, match="dataset_size"):
        Scores().history(4, 2)


def test_observe_is_a_no_op_where_there_is_no_memory():
    # call it every step whatever the method: without a memory it reads nothing, not even index
    y = torch.arange(6) % C
    x = torch.rand(6, 3, 8, 8)
    for kw in ({"method": "hardmix"}, {"method": "cutmix"}, {"method": "none"}):
        mix = HardMix(**kw, seed=0, num_classes=C)
        out = mix(x, y, logits=torch.randn(6, C))
        mix.observe(torch.randn(6, C), y, None, out)
        assert mix.memory is None
