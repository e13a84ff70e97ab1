"""Exact box edges at the image border, pixel for pixel.

Every primitive of :mod:`hardmix.mix` that builds a box -- the host box of the batch mode, the
device boxes and masks, the table of the per-sample mode, Cutout, the salient point of
SaliencyMix -- must follow the one rule of the module docstring for every centre, the first and
last row and column included, and every side: top-left corner ``centre - side // 2``, the box
half-open and clipped to the image, and λ the exact share of pixels left. The reference below is
that rule written out in plain Python; the tests sweep all centres and sides of small images
(odd, even and non-square), where off-by-one errors at the border are not diluted.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from hardmix.mix import (
    MixerOptions, Draws, beta_device, beta_host, box_lam, box_masks, box_sides, boxes_at,
    cutout_box, cutout_masks, fine_grained_points, mix_cutout, mixup_blend, paste_box,
    paste_masks, place_box, rand_box, salient_points, sample_box_rows,
    spectral_residual_saliency, Workspace,
)

SIZES = [(5, 5), (6, 6), (4, 7)]


def interval(centre: int, side: int, size: int) -> tuple[int, int]:
    """The clipped half-open interval of ``side`` pixels centred at ``centre``."""
    lo = centre - side // 2
    return max(lo, 0), min(lo + side, size)


def ref_mask(box: tuple[int, int, int, int], h: int, w: int) -> torch.Tensor:
    y0, y1, x0, x1 = box
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1  # an empty or inverted box is empty
    return m


def every_box(h: int, w: int):
    """(cy, cx, side_h, side_w) for every centre pixel and every side 0..size."""
    return itertools.product(range(h), range(w), range(h + 1), range(w + 1))


@pytest.mark.parametrize("h,w", SIZES)
def test_host_box_follows_the_rule_at_every_centre_and_side(h, w):
    for cy, cx, sh, sw in every_box(h, w):
        # the uniform in the middle of pixel c maps to centre c, the first and last included
        uy, ux = (cy + 0.5) / h, (cx + 0.5) / w
        want = (*interval(cy, sh, h), *interval(cx, sw, w))
        assert place_box(sh, sw, uy, ux, h, w) == want, (cy, cx, sh, sw)
    # the far edge of the unit interval still names the last pixel, never one past it
    assert place_box(1, 1, 1.0, 1.0, h, w) == (h - 1, h, w - 1, w)
    assert place_box(3, 3, 1.0 - 1e-12, 0.0, h, w) == (*interval(h - 1, 3, h), *interval(0, 3, w))


@pytest.mark.parametrize("h,w", SIZES)
def test_box_sides_are_the_floor_of_the_side_times_root_of_the_area(h, w):
    for lam in [0.0, 1e-9, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0]:
        r = math.sqrt(1 - lam)
        assert box_sides(lam, h, w) == (math.floor(h * r), math.floor(w * r)), lam
    # λ a hair outside [0, 1] (float error of a caller) is clipped, never a negative or NaN side
    assert box_sides(-1e-12, h, w) == (h, w) and box_sides(1 + 1e-12, h, w) == (0, 0)
    # rand_box is place_box of those sides, and its λ is the exact area left
    for lam, uy, ux in [(0.0, 0.0, 0.0), (0.3, 0.999, 0.999), (0.6, 0.0, 0.999)]:
        y0, y1, x0, x1 = rand_box(lam, h, w, uy, ux)
        assert (y0, y1, x0, x1) == place_box(*box_sides(lam, h, w), uy, ux, h, w)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w


@pytest.mark.parametrize("h,w", SIZES)
def test_device_boxes_masks_and_lam_match_the_rule_everywhere(h, w):
    combos = list(every_box(h, w))
    t = torch.tensor(combos).T  # (4, n): cy, cx, sh, sw
    lo, hi = boxes_at(t[2:], t[:2], h, w)
    masks = box_masks((lo, hi), h, w)[:, 0]
    lam = box_lam((lo, hi), h, w)
    for i, (cy, cx, sh, sw) in enumerate(combos):
        box = (*interval(cy, sh, h), *interval(cx, sw, w))
        assert (lo[0, i].item(), hi[0, i].item(), lo[1, i].item(), hi[1, i].item()) == box
        assert torch.equal(masks[i], ref_mask(box, h, w)), (cy, cx, sh, sw)
    area = masks.sum((1, 2))
    torch.testing.assert_close(lam, 1 - area / (h * w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w", SIZES)
def test_per_sample_boxes_are_exactly_the_clipped_intervals_of_the_rule(h, w):
    # enough draws that every (side, centre) pair of these tiny images occurs: the drawn row
    # masks are exactly the rule's intervals, border ones included, and λ is their exact area
    # (sides ⌊S·√(1-λ)⌋ < S: 1 - λ ~ Beta(α, α) is below 1)
    n = 40000
    rows, cols, lam = sample_box_rows(n, 1.0, h, w, torch.Generator().manual_seed(3),
                                      torch.device("cpu"))
    for masks, size in ((rows, h), (cols, w)):
        want = {tuple(ref_mask((0, 1, *interval(c, s, size)), 1, size)[0].tolist())
                for c in range(size) for s in range(size)}
        got = {tuple(r) for r in masks.unique(dim=0).tolist()}
        assert got == want
    torch.testing.assert_close(lam, 1 - rows.sum(1) * cols.sum(1) / (h * w), rtol=0, atol=1e-6)
    assert lam.min() >= 0 and lam.max() <= 1


@pytest.mark.parametrize("h,w", SIZES)
def test_paste_at_the_border_moves_exactly_the_box(h, w):
    b = 4
    x = torch.randn(b, 3, h, w)
    src = torch.tensor([1, 2, 3, 0])
    for cy, cx, sh, sw in [(0, 0, h, w), (h - 1, w - 1, h, w), (h - 1, 0, 2, 3), (0, w - 1, 1, 1),
                           (h // 2, w // 2, 0, w)]:
        box = (*interval(cy, sh, h), *interval(cx, sw, w))
        want = x.clone()
        m = ref_mask(box, h, w).bool()
        want[:, :, m] = x[src][:, :, m]
        assert torch.equal(paste_box(x, src, box), want), box
        lo = torch.tensor([[box[0]], [box[2]]]).expand(2, b)
        hi = torch.tensor([[box[1]], [box[3]]]).expand(2, b)
        assert torch.equal(paste_masks(x, src, box_masks((lo, hi), h, w)), want), box


def test_an_empty_box_pastes_nothing_and_never_aliases_the_input():
    x = torch.randn(3, 2, 5, 5)
    src = torch.tensor([2, 0, 1])
    for box in [(2, 2, 0, 5), (0, 5, 3, 3), (4, 1, 0, 5)]:
        out = paste_box(x, src, box)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        work = x.clone()
        assert paste_box(work, src, box, inplace=True) is work and torch.equal(work, x)


def test_cutout_zeroes_the_clipped_box_and_only_writes_the_input_in_place():
    h, w = 6, 5
    x = torch.rand(2, 3, h, w) + 1
    for cy, cx, sh, sw in [(0, 0, 3, 3), (h - 1, w - 1, 3, 3), (h - 1, 0, h, 1)]:
        box = (*interval(cy, sh, h), *interval(cx, sw, w))
        keep = 1 - ref_mask(box, h, w)
        before = x.clone()
        out = cutout_box(x, box)
        assert torch.equal(out, before * keep) and torch.equal(x, before)
        lo = torch.tensor([[box[0]], [box[2]]]).expand(2, 2)
        hi = torch.tensor([[box[1]], [box[3]]]).expand(2, 2)
        out = cutout_masks(x, box_masks((lo, hi), h, w))
        assert torch.equal(out, before * keep) and torch.equal(x, before)
        work = x.clone()
        assert cutout_box(work, box, inplace=True).data_ptr() == work.data_ptr()
        assert torch.equal(work, before * keep)
    # the Cutout mixer: a square of round(cutout_size * side) pixels, clipped at the border
    from hardmix.config.schema import AugmentConfig
    opt = MixerOptions(aug=AugmentConfig(method="cutout", cutout_size=0.5), box="batch")
    out, lam = mix_cutout(x, None, Draws(1.0, 0.999, 0.999, torch.Generator()), opt)
    zero = (out == 0).all(1)[0]
    corner = (*interval(h - 1, 3, h), *interval(w - 1, 2, w))
    assert torch.equal(zero, ref_mask(corner, h, w).bool())
    assert torch.all(lam == 1)


def test_a_mix_of_a_tensor_that_requires_grad_routes_the_gradient_to_its_sources():
    # autograd cannot go through out= kernels or scratch buffers: the gradient of every pixel
    # goes to the image it came from, with or without a workspace
    b, h, w = 4, 6, 6
    src = torch.tensor([1, 2, 3, 1])
    box = (3, 6, 0, 4)  # at the bottom border
    m = ref_mask(box, h, w)
    lo = torch.tensor([[box[0]], [box[2]]]).expand(2, b)
    hi = torch.tensor([[box[1]], [box[3]]]).expand(2, b)
    for fn in (lambda x, ws: paste_box(x, src, box, ws=ws),
               lambda x, ws: paste_masks(x, src, box_masks((lo, hi), h, w), ws=ws)):
        for ws in (None, Workspace()):
            x = torch.randn(b, 3, h, w, requires_grad=True)
            out = fn(x, ws)
            weight = torch.randn_like(out)
            (out * weight).sum().backward()
            want = weight * (1 - m)
            want = want.index_add(0, src, weight * m)
            torch.testing.assert_close(x.grad, want)
    for ws in (None, Workspace()):
        x = torch.randn(b, 3, h, w, requires_grad=True)
        out = mixup_blend(x, src, 0.25, ws=ws)
        out.sum().backward()
        want = torch.full_like(x, 0.25).index_add(0, src, torch.full_like(x, 0.75))
        torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_host_lam_draws_have_the_beta_law(alpha):
    # the batch λ (which sizes the batch box): Beta(α, α) by a Kolmogorov-Smirnov test
    from scipy import stats

    g = torch.Generator().manual_seed(11)
    lams = [beta_host(alpha, g) for _ in range(3000)]
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_lam_draws_stay_in_the_unit_interval_for_the_smallest_alpha():
    g = torch.Generator().manual_seed(0)
    assert all(0.0 <= beta_host(1e-5, g) <= 1.0 for _ in range(200))
    lam = beta_device(1e-5, 2000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1


def _reference_saliency(img: np.ndarray, max_side: int = 64) -> np.ndarray:
    """The spectral residual of the module docstring in NumPy/SciPy, for one (C, H, W) image."""
    grey = img.astype(np.float64).mean(0)
    factor = max(1, math.ceil(max(grey.shape) / max_side))
    if factor > 1:  # average over factor x factor cells, the last ones partial (ceil_mode)
        hh, ww = (math.ceil(s / factor) for s in grey.shape)
        pooled = np.zeros((hh, ww))
        for i in range(hh):
            for j in range(ww):
                pooled[i, j] = grey[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].mean()
        grey = pooled
    spec = np.fft.fft2(grey)
    amp = np.maximum(np.abs(spec), 1e-8)
    log_amp = np.log(amp)
    residual = log_amp - ndimage.uniform_filter(log_amp, 3, mode="wrap")
    sal = np.abs(np.fft.ifft2(spec / amp * np.exp(residual))) ** 2
    sigma = max(grey.shape[1] / 32.0, 0.5)
    radius = max(1, int(round(2 * sigma)))
    for axis in (1, 0):
        sal = ndimage.gaussian_filter1d(sal, sigma, axis=axis, mode="nearest",
                                        truncate=radius / sigma)
    return sal


@pytest.mark.parametrize("size", [16, 24, 70, 130])
def test_spectral_residual_saliency_matches_a_reference_of_its_docstring(size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    x[0, :, 3:7, size - 6:size - 2] += 3.0
    sal, factor = spectral_residual_saliency(x)
    assert factor == max(1, math.ceil(size / 64))
    for i in range(2):
        ref = _reference_saliency(x[i].numpy())
        got = sal[i].double().numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got / ref.max(), ref / ref.max(), atol=2e-4)


@pytest.mark.parametrize("size", [32, 130])
def test_salient_point_of_an_object_at_the_far_corner_is_inside_it_and_the_image(size):
    # 130 pixels pool by 3 into 44 cells, the last one partial: the centre of that cell would
    # be pixel 130, one past the image, and must be clipped to the last pixel
    x = torch.zeros(1, 3, size, size)
    x[0, :, size - 3:, size - 3:] = 1.0
    cy, cx = salient_points(x, size, size)[:, 0].tolist()
    assert size - 4 <= cy <= size - 1 and size - 4 <= cx <= size - 1


def test_fine_grained_point_is_the_saliencymix_authors_point():
    # the SaliencyMix reference code (saliency_bbox): the image as an HWC array, OpenCV's
    # fine-grained map scaled to uint8, its first argmax as (row, column); a non-square image
    # catches a transposed layout
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(3, 3, 20, 28, generator=torch.Generator().manual_seed(5)) * 0.3
    x[0, :, 2:7, 18:24] = 1.0
    x[1, :, 15:, 22:] = 1.0  # at the bottom-right border
    got = fine_grained_points(x, 20, 28)
    assert got.shape == (2, 3) and got.dtype == torch.long
    for i in range(3):
        img = x[i].numpy().transpose(1, 2, 0)
        ok, sal = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(img)
        assert ok
        want = np.unravel_index(np.argmax((sal * 255).astype("uint8"), axis=None), sal.shape)
        assert got[:, i].tolist() == [int(want[0]), int(want[1])]
