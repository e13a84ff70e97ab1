"""The ``topup`` fallback: HardMix's hard sources kept, topped up to ``min_hard`` distinct ones.

The planned test of the "few sources" mechanism (late in training HardMix draws its patches
from a handful of images): the hard set is never dropped, and below ``min_hard`` it is filled
with the next-highest-loss samples, so the batch always has at least ``min_hard`` distinct
sources (or the whole batch, if it is shorter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hardmix.config import RunConfig, validate, with_overrides
from hardmix.config.schema import AugmentConfig
from hardmix.hardness import LogitScores
from hardmix.methods import FALLBACKS, active_fields, effective_augment
from hardmix.sources import HardSource


def _batch(b: int, classes: int, n_wrong: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (b,), generator=g)
    logits = torch.randn(b, classes, generator=g)
    logits[torch.arange(b), y] += 20.0                   # every sample right ...
    wrong = torch.randperm(b, generator=g)[:n_wrong]
    logits[wrong, y[wrong]] -= 40.0                      # ... but these
    return logits, y


@pytest.mark.parametrize("b,min_hard", [(32, 8), (16, 16), (64, 3)])
def test_sources_keep_every_hard_sample_and_reach_the_floor(b, min_hard):
    cfg = AugmentConfig(method="hardmix", criterion="misclassified", fallback="topup",
                        min_hard=min_hard)
    source = HardSource(cfg)
    for seed in range(40):
        n_wrong = seed % (min_hard + 3)                  # below, at and above the floor
        logits, y = _batch(b, 10, n_wrong, seed)
        scores = LogitScores(logits, y)
        hard = scores.wrong()
        sel = source(b, torch.device("cpu"), torch.Generator().manual_seed(seed), scores)
        used = set(sel.index.tolist())
        hard_set = set(hard.nonzero().flatten().tolist())
        assert hard_set <= used, (seed, hard_set - used)                  # sources ⊇ hard set
        assert bool(sel.fired) == (len(hard_set) < min_hard)
        if len(hard_set) >= min_hard:
            assert used == hard_set                                      # HardMix unchanged
        else:
            assert len(used) == min(min_hard, b)                        # the floor, exactly
            loss = F.cross_entropy(logits, y, reduction="none")
            extra = used - hard_set
            left_out = set(range(b)) - used
            if extra and left_out:                                       # next-highest losses
                assert min(loss[i] for i in extra) >= max(loss[i] for i in left_out)
        assert int(sel.n_hard) == len(hard_set)                          # counted before top-up


def test_a_short_batch_tops_up_to_all_of_it():
    cfg = AugmentConfig(method="hardmix", criterion="misclassified", fallback="topup", min_hard=8)
    logits, y = _batch(5, 10, 1, 0)
    sel = HardSource(cfg)(5, torch.device("cpu"), torch.Generator().manual_seed(0),
                          LogitScores(logits, y))
    assert set(sel.index.tolist()) == set(range(5))


def test_unseen_samples_with_infinite_loss_never_push_out_a_hard_sample():
    """Ties at +inf (a cached memory's never-seen samples) cannot displace the hard set."""
    class Inf(LogitScores):
        def loss(self):
            out = super().loss().clone()
            out[:] = float("inf")
            return out

    cfg = AugmentConfig(method="hardmix", criterion="misclassified", fallback="topup", min_hard=6)
    logits, y = _batch(16, 10, 3, 1)
    scores = Inf(logits, y)
    hard = set(scores.wrong().nonzero().flatten().tolist())
    sel = HardSource(cfg)(16, torch.device("cpu"), torch.Generator().manual_seed(1), scores)
    assert hard <= set(sel.index.tolist()) and len(set(sel.index.tolist())) == 6


def test_topup_is_a_switch_of_the_method_table():
    assert "topup" in FALLBACKS
    aug = {"method": "hardmix", "criterion": "misclassified", "fallback": "topup", "min_hard": 4,
           "k": 0.25}
    assert {"fallback", "min_hard"} <= active_fields(aug) and "k" not in active_fields(aug)
    assert effective_augment(aug)["k"] is None                           # NULL where inert
    for criterion in ("topk_loss", "low_margin"):                        # never short: inert
        assert effective_augment({**aug, "criterion": criterion})["fallback"] is None
    cfg = with_overrides(RunConfig(), {"data.name": "digits", "augment.fallback": "topup",
                                       "augment.min_hard": 16})
    validate(cfg)
