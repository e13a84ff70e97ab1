"""Source selection: hard sources only, every hard sample used, criteria, fallbacks, registries."""

from __future__ import annotations

import pytest
import torch

from hardmix import HardMix, methods
from hardmix.config import AugmentConfig, ConfigError
from hardmix.hardness import SIGNALS, LogitScores, margins
from hardmix.methods import METHODS
from hardmix.mix import MIXERS
from hardmix.sources import CRITERIA, FALLBACKS, SOURCES, HardSource, hard_source_index


def source(**fields) -> HardSource:
    return HardSource(AugmentConfig(**fields))


def logits_with_wrong(wrong: torch.Tensor, classes: int = 5, seed: int = 0):
    """Labels and logits whose argmax is wrong exactly where ``wrong`` is True."""
    g = torch.Generator().manual_seed(seed)
    b = wrong.shape[0]
    y = torch.randint(0, classes, (b,), generator=g)
    logits = torch.randn(b, classes, generator=g)
    boost = torch.where(wrong, -10.0, 10.0)
    logits[torch.arange(b), y] += boost
    return logits, y


def test_registry_names_match_the_method_table():
    assert tuple(CRITERIA) == tuple(methods.CRITERIA)
    assert tuple(FALLBACKS) == tuple(methods.FALLBACKS)
    assert tuple(SIGNALS) == tuple(methods.SIGNALS)
    assert set(SOURCES) == {"random", "hard"}
    for spec in METHODS.values():
        assert spec.mixer in MIXERS and (spec.source is None or spec.source in SOURCES)
    assert (METHODS["hardmix"].mixer, METHODS["hardmix"].source) == ("cutmix", "hard")
    assert (METHODS["cutmix"].mixer, METHODS["cutmix"].source) == ("cutmix", "random")


def test_sources_are_hard_and_cover_every_hard_sample():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        b = int(torch.randint(1, 40, (1,), generator=g))
        hard = torch.rand(b, generator=g) < torch.rand(1, generator=g)
        if not hard.any():
            hard[int(torch.randint(0, b, (1,), generator=g))] = True
        src = hard_source_index(hard, g)
        assert src.shape == (b,) and src.dtype == torch.long
        assert hard[src].all(), "a source that is not hard"
        used = torch.zeros(b, dtype=torch.bool)
        used[src] = True
        assert torch.equal(used, hard), "a hard sample missing from the source batch"


def test_source_batch_is_shuffled_and_repeats_are_random():
    # 3 hard samples in a batch of 12: which target gets which source varies from draw to draw,
    # and the 9 repeats are drawn at random (not a fixed pattern)
    hard = torch.zeros(12, dtype=torch.bool)
    hard[[2, 5, 9]] = True
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([hard_source_index(hard, g) for _ in range(600)])
    for target in range(12):
        values, counts = draws[:, target].unique(return_counts=True)
        assert values.tolist() == [2, 5, 9]
        assert counts.min() > 120  # about 200 each
    per_draw = torch.stack([(draws == v).sum(1) for v in (2, 5, 9)], 1)
    assert per_draw.min() >= 1 and len({tuple(r) for r in per_draw.tolist()}) > 5


def test_all_hard_batch_gives_a_permutation():
    g = torch.Generator().manual_seed(2)
    src = hard_source_index(torch.ones(16, dtype=torch.bool), g)
    assert sorted(src.tolist()) == list(range(16))


def test_criteria():
    g = torch.Generator().manual_seed(3)
    b, c = 20, 6
    logits = torch.randn(b, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    scores = LogitScores(logits, y)
    assert torch.equal(CRITERIA["misclassified"](scores, AugmentConfig(k=0.25)), logits.argmax(1) != y)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    top = CRITERIA["topk_loss"](scores, AugmentConfig(k=4))
    assert top.sum() == 4 and loss[top].min() >= loss[~top].max()
    assert CRITERIA["topk_loss"](scores, AugmentConfig(k=0.25)).sum() == 5  # a fraction of the batch
    margin = margins(logits, y)
    other = logits.clone()
    other[torch.arange(b), y] = -float("inf")
    torch.testing.assert_close(margin, logits[torch.arange(b), y] - other.max(1).values)
    low = CRITERIA["low_margin"](scores, AugmentConfig(k=3))
    assert low.sum() == 3 and margin[low].max() <= margin[~low].min()
    assert torch.equal(margin < 0, logits.argmax(1) != y)


@pytest.mark.parametrize("criterion", ["topk_loss", "low_margin"])
def test_k_larger_than_the_batch_is_rejected(criterion):
    logits, y = logits_with_wrong(torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ConfigError) as err:
        source(criterion=criterion, k=9)(8, logits.device, torch.Generator(),
                                         LogitScores(logits, y))
    assert err.value.field == "augment.k" and "batch size (8)" in str(err.value)
    with pytest.raises(ConfigError):
        HardMix(method="hardmix", criterion=criterion, k=2.5)
    with pytest.raises(ConfigError):  # the topk_loss fallback is checked too
        source(criterion="misclassified", k=9, fallback="topk_loss")(
            8, logits.device, torch.Generator(), LogitScores(logits, y))


@pytest.mark.parametrize("fallback", ["random", "skip", "topk_loss"])
@pytest.mark.parametrize("min_hard", [1, 3])
def test_fallback_fires_exactly_when_too_few_hard(fallback, min_hard):
    b = 10
    g = torch.Generator().manual_seed(4)
    src = source(criterion="misclassified", k=3, fallback=fallback, min_hard=min_hard)
    for n in range(b + 1):
        for rep in range(3):
            wrong = torch.zeros(b, dtype=torch.bool)
            wrong[torch.randperm(b, generator=g)[:n]] = True
            logits, y = logits_with_wrong(wrong, seed=rep)
            scores = LogitScores(logits, y)
            sel = src(b, logits.device, g, scores)
            assert int(sel.n_hard) == n
            assert bool(sel.fired) == (n < min_hard)
            if n >= min_hard:  # never fires: only hard sources, each used
                assert wrong[sel.index].all() and set(sel.index.tolist()) == set(
                    torch.arange(b)[wrong].tolist())
                assert sel.skipped is None or not bool(sel.skipped)
                continue
            if fallback == "random":
                assert sorted(sel.index.tolist()) == list(range(b))
            elif fallback == "skip":
                assert bool(sel.skipped) and torch.equal(sel.index, torch.arange(b))
            else:
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                top = set(loss.topk(3).indices.tolist())
                assert set(sel.index.tolist()) == top


@pytest.mark.parametrize("fallback", ["random", "skip", "topk_loss"])
def test_batch_of_one(fallback):
    for wrong in (True, False):
        logits, y = logits_with_wrong(torch.tensor([wrong]))
        sel = source(criterion="misclassified", k=1, fallback=fallback)(
            1, logits.device, torch.Generator(), LogitScores(logits, y))
        assert sel.index.tolist() == [0]
        assert bool(sel.fired) == (not wrong)


def test_random_source_is_a_permutation():
    sel = SOURCES["random"]()(32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert sorted(sel.index.tolist()) == list(range(32))
    assert sel.n_hard is None and sel.fired is None
