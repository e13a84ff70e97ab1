"""The mixed loss and its soft target (:mod:`hardmix.loss`) as one definition.

Cross entropy is linear in the target, so ``mixed_cross_entropy`` must equal cross entropy
against ``mixed_target`` -- the same λ-weighted two-hot target with label smoothing applied once
-- for every reduction, λ given as a tensor or a float, and any smoothing in [0, 1); the
defaults are no smoothing and the mean; λ = 1 or no source labels is plain cross entropy;
smoothing outside [0, 1) and unknown reductions are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hardmix.loss import mixed_cross_entropy, mixed_target

B, C = 7, 5


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g) * 3
    y_a = torch.randint(0, C, (B,), generator=g)
    y_b = torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g)
    return logits, y_a, y_b, lam


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.999])
@pytest.mark.parametrize("lam_kind", ["tensor", "float"])
def test_loss_is_cross_entropy_against_the_soft_target(eps, lam_kind):
    logits, y_a, y_b, lam = data()
    if lam_kind == "float":
        lam = 0.3
    target = mixed_target(y_a, y_b, lam, C, label_smoothing=eps)
    torch.testing.assert_close(target.sum(1), torch.ones(B))
    assert (target >= 0).all()
    per_row = -(target * torch.log_softmax(logits, 1)).sum(1)
    got = mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing=eps, reduction="none")
    torch.testing.assert_close(got, per_row)
    torch.testing.assert_close(
        mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing=eps, reduction="sum"),
        per_row.sum())
    torch.testing.assert_close(
        mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing=eps), per_row.mean())


def test_the_soft_target_puts_lam_on_the_target_label_and_the_rest_on_the_source():
    y_a, y_b = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 4])
    lam = torch.tensor([0.75, 0.4, 1.0])
    t = mixed_target(y_a, y_b, lam, C)
    want = torch.zeros(3, C)
    want[0, 0], want[0, 3] = 0.75, 0.25
    want[1, 1] = 1.0  # both labels the same class
    want[2, 2] = 1.0
    torch.testing.assert_close(t, want)
    smooth = mixed_target(y_a, y_b, lam, C, label_smoothing=0.5)
    torch.testing.assert_close(smooth, want * 0.5 + 0.5 / C)


def test_defaults_are_plain_cross_entropy_without_smoothing():
    logits, y_a, y_b, lam = data(1)
    ce = F.cross_entropy(logits, y_a)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a), ce)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, None), ce)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, None, lam), ce)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, torch.ones(B)), ce)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, 1.0), ce)
    torch.testing.assert_close(mixed_target(y_a, y_b, 1.0, C), F.one_hot(y_a, C).float())
    torch.testing.assert_close(
        mixed_cross_entropy(logits, y_a, label_smoothing=0.2),
        F.cross_entropy(logits, y_a, label_smoothing=0.2))


def test_out_of_range_smoothing_and_unknown_reductions_are_refused():
    logits, y_a, y_b, lam = data()
    for eps in (1.0, -0.01, 1.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing=eps)
    with pytest.raises(ValueError, match="reduction"):
        mixed_cross_entropy(logits, y_a, y_b, lam, reduction="max")
