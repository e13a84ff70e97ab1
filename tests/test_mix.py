"""Mixing primitives: λ from the exact pasted area, λ statistics, boxes, Mixup, Cutout, saliency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hardmix import HardMix
from hardmix.mix import (
    Draws, MixerOptions, beta_device, beta_host, box_lam, box_masks, boxes_at, mix_cutmix,
    mix_saliencymix, paste_box, paste_masks, rand_box, rand_boxes, salient_points, sample_box_rows,
    spectral_residual_saliency,
)


def coded_batch(b: int, size: int = 16) -> torch.Tensor:
    """Sample i is the constant image i + 1 (3 channels), so every pixel tells where it came from."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, size, size).clone()


def pasted_fraction(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Per sample: share of pixels that hold the source's code."""
    code = (src.float() + 1).view(-1, 1, 1, 1)
    return (out == code).float().mean((1, 2, 3))


def clipped_lam_expectation(alpha: float, size: int, n: int = 20000) -> float:
    """E[λ] after CutMix's clipping, computed independently of the library.

    λ runs over Beta(α, α) quantiles; for each, the side is ⌊S·√(1-λ)⌋ and the expected clipped
    length averages the exact overlap over every integer centre.
    """
    lam = stats.beta.ppf((np.arange(n) + 0.5) / n, alpha, alpha)
    centres = np.arange(size)
    out = []
    for s in np.floor(size * np.sqrt(1 - lam)).astype(int):
        lo = centres - s // 2
        length = (np.minimum(lo + s, size) - np.maximum(lo, 0)).mean()
        out.append(length)
    length = np.array(out)
    return float(np.mean(1 - length * length / (size * size)))


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_lam_is_one_minus_pasted_area_for_every_sample(box):
    b = 24
    for seed in range(12):
        mix = HardMix(method="cutmix", box=box, seed=seed)
        x = coded_batch(b)
        out = mix(x, torch.zeros(b, dtype=torch.long))
        src = out.source_index
        frac = pasted_fraction(out.x, src)
        other = src != torch.arange(b)
        assert other.any()
        torch.testing.assert_close(out.lam[other], 1 - frac[other], rtol=0, atol=1e-6)
        # the pasted region is one rectangle
        for i in torch.arange(b)[other].tolist():
            where = (out.x[i, 0] == src[i] + 1)
            if where.any():
                rows, cols = where.any(1).nonzero(), where.any(0).nonzero()
                h = int(rows.max() - rows.min() + 1)
                w = int(cols.max() - cols.min() + 1)
                assert h * w == int(where.sum())
        if box == "batch":
            assert torch.all(out.lam == out.lam[0])


def test_batch_and_sample_primitives_agree_with_slicing():
    b, s = 6, 12
    x = torch.randn(b, 3, s, s)
    src = torch.tensor([3, 0, 5, 1, 2, 4])
    box = rand_box(0.4, s, s, 0.2, 0.7)
    y0, y1, x0, x1 = box
    ref = x.clone()
    ref[:, :, y0:y1, x0:x1] = x[src][:, :, y0:y1, x0:x1]
    assert torch.equal(paste_box(x, src, box), ref)
    lo = torch.tensor([[y0], [x0]]).expand(2, b)
    hi = torch.tensor([[y1], [x1]]).expand(2, b)
    masks = box_masks((lo, hi), s, s)
    assert masks.shape == (b, 1, s, s)
    assert torch.equal(paste_masks(x, src, masks), ref)
    lam = box_lam((lo, hi), s, s)
    assert torch.allclose(lam, torch.full((b,), 1 - (y1 - y0) * (x1 - x0) / (s * s)))


def test_inplace_paste_matches_copy_and_writes_into_input():
    b, s = 8, 10
    src = torch.randperm(b, generator=torch.Generator().manual_seed(1))
    base = torch.randn(b, 3, s, s)
    box = (2, 9, 1, 6)
    expected = paste_box(base, src, box)
    assert not torch.equal(expected, base)
    work = base.clone()
    out = paste_box(work, src, box, inplace=True)
    assert out.data_ptr() == work.data_ptr() and torch.equal(out, expected)
    lo, hi = torch.tensor([[2], [1]]).expand(2, b), torch.tensor([[9], [6]]).expand(2, b)
    work = base.clone()
    out = paste_masks(work, src, box_masks((lo, hi), s, s), inplace=True)
    assert out.data_ptr() == work.data_ptr() and torch.equal(out, expected)
    # HardMix(inplace=True) mixes into the given tensor, the default leaves it alone
    x = base.clone()
    HardMix(method="cutmix", seed=3)(x, torch.zeros(b, dtype=torch.long))
    assert torch.equal(x, base)
    got = HardMix(method="cutmix", seed=3, inplace=True)(x, torch.zeros(b, dtype=torch.long))
    assert got.x.data_ptr() == x.data_ptr()


def test_box_rule_sides_centre_and_clipping():
    # centred box: exact sides ⌊S·√(1-λ)⌋
    assert rand_box(0.75, 32, 32, 0.5, 0.5) == (8, 24, 8, 24)
    # clipped at the top-left corner
    y0, y1, x0, x1 = rand_box(0.0, 32, 32, 0.0, 0.0)
    assert (y0, x0) == (0, 0) and (y1, x1) == (16, 16)
    assert rand_box(1.0, 32, 32, 0.3, 0.3)[1] - rand_box(1.0, 32, 32, 0.3, 0.3)[0] == 0
    # device boxes follow the same rule
    lo, hi = boxes_at(torch.tensor([[16], [16]]), torch.tensor([[0, 16], [0, 16]]), 32, 32)
    assert lo.tolist() == [[0, 8], [0, 8]] and hi.tolist() == [[8, 24], [8, 24]]


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_mean_lam_matches_beta_expectation_adjusted_for_clipping(alpha):
    size = 32
    expected = clipped_lam_expectation(alpha, size)
    assert expected - 0.5 > 0.03  # clipping matters: the test can tell it apart from E[Beta] = 0.5
    # per-sample boxes: one big batch, both the reference path and the table-driven fast path
    lam = box_lam(rand_boxes(beta_device(alpha, 40000, torch.Generator().manual_seed(0),
                                         torch.device("cpu")), size, size,
                             torch.Generator().manual_seed(1)), size, size)
    assert abs(lam.mean().item() - expected) < 0.006
    rows, cols, fast = sample_box_rows(40000, alpha, size, size, torch.Generator().manual_seed(2),
                                       torch.device("cpu"))
    assert abs(fast.mean().item() - expected) < 0.006
    assert abs(fast.std().item() - lam.std().item()) < 0.006
    torch.testing.assert_close(fast, 1 - rows.sum(1) * cols.sum(1) / size**2)
    # batch boxes through HardMix: many calls, one λ each
    mix = HardMix(method="cutmix", alpha=alpha, seed=7)
    x, y = torch.zeros(2, 1, size, size), torch.zeros(2, dtype=torch.long)
    lams = torch.stack([mix(x, y).lam[0] for _ in range(4000)])
    assert abs(lams.mean().item() - expected) < 0.015


@pytest.mark.parametrize("alpha", [1.0, 0.3, 2.0])
def test_beta_draws_have_the_beta_moments(alpha):
    host = torch.Generator().manual_seed(0)
    h = np.array([beta_host(alpha, host) for _ in range(4000)])
    d = beta_device(alpha, 40000, torch.Generator().manual_seed(0), torch.device("cpu")).numpy()
    var = 1 / (4 * (2 * alpha + 1))
    for sample, tol in ((h, 0.02), (d, 0.006)):
        assert abs(sample.mean() - 0.5) < tol
        assert abs(sample.var() - var) < 4 * tol * math.sqrt(var)
        assert sample.min() >= 0 and sample.max() <= 1


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_mixup_blend_is_convex_combination(box):
    b = 10
    x = torch.randn(b, 3, 8, 8)
    out = HardMix(method="mixup", box=box, seed=2)(x, torch.arange(b))
    lam = out.lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.x, lam * x + (1 - lam) * x[out.source_index])
    assert torch.all((out.lam >= 0) & (out.lam <= 1))
    assert (out.lam.unique().numel() == 1) == (box == "batch")
    assert torch.equal(out.y_b, out.y_a[out.source_index])


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_cutout_zeroes_a_clipped_square_and_keeps_labels(box):
    b, s = 16, 20
    y = torch.arange(b)
    seen_sizes = set()
    for seed in range(6):
        out = HardMix(method="cutout", box=box, cutout_size=0.5, seed=seed)(torch.ones(b, 3, s, s), y)
        assert out.mixed and torch.equal(out.y_b, y) and torch.all(out.lam == 1)
        zero = out.x[:, 0] == 0
        for i in range(b):
            rows, cols = zero[i].any(1).nonzero(), zero[i].any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert h * w == int(zero[i].sum()) and h <= 10 and w <= 10
            seen_sizes.add((h, w))
        assert torch.all(out.x[:, 1:] == out.x[:, :1])  # same box on every channel
        if box == "batch":
            assert torch.all(zero == zero[0])
    assert (10, 10) in seen_sizes and len(seen_sizes) > 1  # full squares and clipped ones


def test_spectral_residual_saliency_finds_a_small_object():
    b, s = 4, 32
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(b, 3, s, s, generator=g)
    spots = [(5, 7), (20, 25), (27, 3), (14, 16)]
    for i, (cy, cx) in enumerate(spots):
        x[i, :, cy - 1:cy + 2, cx - 1:cx + 2] += 2.0
    sal, factor = spectral_residual_saliency(x)
    assert factor == 1 and sal.shape == (b, s, s)
    points = salient_points(x, s, s)
    for i, (cy, cx) in enumerate(spots):
        assert abs(int(points[0, i]) - cy) <= 2 and abs(int(points[1, i]) - cx) <= 2
    # a large image is analysed at reduced resolution and mapped back to full-size pixels
    big = 0.05 * torch.randn(b, 3, 4 * s, 4 * s, generator=g)
    for i, (cy, cx) in enumerate(spots):
        big[i, :, 4 * cy - 4:4 * cy + 4, 4 * cx - 4:4 * cx + 4] += 2.0
    assert spectral_residual_saliency(big)[1] == 2
    pts = salient_points(big, 4 * s, 4 * s)
    for i, (cy, cx) in enumerate(spots):
        assert abs(int(pts[0, i]) - 4 * cy) <= 6 and abs(int(pts[1, i]) - 4 * cx) <= 6


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_saliencymix_box_is_centred_on_the_source_salient_point(box):
    b, s = 6, 32
    x = torch.zeros(b, 3, s, s)
    spots = [(6, 6), (25, 25), (6, 25), (25, 6), (16, 16), (10, 20)]
    for i, (cy, cx) in enumerate(spots):
        x[i] = (i + 1) * 0.01
        x[i, :, cy - 1:cy + 2, cx - 1:cx + 2] = 5.0 + i
    src = torch.tensor([1, 2, 3, 4, 5, 0])
    draws = Draws(0.75, 0.0, 0.0, torch.Generator().manual_seed(0))
    opt = MixerOptions(box=box)
    out, lam = mix_saliencymix(x.clone(), src, draws, opt)
    assert lam.shape == (b,)
    for i in range(b):
        j = int(src[i]) if box == "sample" else int(src[0])
        cy, cx = spots[j]
        changed = out[i, 0] != x[i, 0]
        if changed.any():
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            mid_y = (rows.min() + rows.max()).item() / 2
            mid_x = (cols.min() + cols.max()).item() / 2
            assert abs(mid_y - cy) <= 1.5 + 3 and abs(mid_x - cx) <= 1.5 + 3
        # λ from the exact area (the pasted region differs from the target everywhere here)
        assert abs(lam[i].item() - (1 - changed.float().mean().item())) < 1e-6


def test_fast_per_sample_boxes_follow_the_box_rule():
    # every row/column mask is one interval whose length and position match CutMix's rule for
    # some side in the law's support and some centre; non-square images use two tables
    for h, w in ((16, 16), (12, 20)):
        rows, cols, lam = sample_box_rows(3000, 1.0, h, w, torch.Generator().manual_seed(0),
                                          torch.device("cpu"))
        for masks, size in ((rows, h), (cols, w)):
            assert masks.shape == (3000, size)
            assert set(masks.unique().tolist()) <= {0.0, 1.0}
            steps = (masks[:, 1:] != masks[:, :-1]).sum(1)
            assert steps.max() <= 2  # a single run of ones
            assert masks.sum(1).max() >= size - 1 and masks.sum(1).min() == 0
        torch.testing.assert_close(lam, 1 - rows.sum(1) * cols.sum(1) / (h * w))
        # the height and width of a box come from the same λ: their side ratios agree
        # wherever neither side is clipped
        full = (rows[:, 0] == 0) & (rows[:, -1] == 0) & (cols[:, 0] == 0) & (cols[:, -1] == 0)
        rh, rw = rows.sum(1)[full] / h, cols.sum(1)[full] / w
        assert (rh - rw).abs().max() <= 1.0 / min(h, w) + 1e-6


def test_cutmix_mixer_handles_integer_images():
    b = 5
    x = torch.randint(0, 255, (b, 3, 8, 8), dtype=torch.uint8)
    src = torch.tensor([1, 2, 3, 4, 0])
    for box in ("batch", "sample"):
        out, lam = mix_cutmix(x, src, Draws(0.3, 0.5, 0.5, torch.Generator().manual_seed(0)),
                              MixerOptions(box=box))
        assert out.dtype == torch.uint8 and lam.shape == (b,)
