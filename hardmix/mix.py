"""Mixing primitives: small pure functions over a batch, and the registry of mixers built from them.

Every function here takes the source of each target sample as an index tensor (``source_index``,
shape ``(B,)``): which sample pastes into which is the job of :mod:`hardmix.sources`, so CutMix and
HardMix share all of this code and differ only in that index.

Two box modes:

* **batch** -- one λ ~ Beta(α, α) and one box for the whole batch (CutMix, the paper). λ and the box
  corners are drawn on the host from a seeded generator, so the box is a pair of Python slices: the
  paste is one ``index_select`` of the patch, written straight into the output.
* **sample** -- every sample draws its own λ and box on the device. The box becomes a 0/1 mask:
  row and column masks (from broadcast comparisons of ``arange`` as airbench does, or looked up
  in a small precomputed table of clipped intervals) joined by one outer product, and the paste
  is one ``lerp``; no Python loop over samples.

Either way λ is recomputed from the exact pasted area: ``λ = 1 - box_area / (H*W)`` (CutMix's
``correct_lam``), per sample in sample mode.

Box rule (CutMix's, which the paper follows): centre uniform over the pixels, sides
``⌊H·√(1-λ)⌋`` and ``⌊W·√(1-λ)⌋``, top-left corner at ``centre - side // 2``, clipped to the image.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hardmix.config.schema import AugmentConfig

__all__ = [
    "Draws", "MIXERS", "beta_host", "beta_device", "column", "box_sides", "place_box", "rand_box",
    "boxes_at", "lam_sides", "rand_centres", "rand_boxes", "sample_box_rows", "outer_masks",
    "box_lam",
    "box_masks", "Workspace", "gather", "paste_box", "paste_masks", "mixup_blend", "cutout_box",
    "cutout_masks",
    "spectral_residual_saliency", "salient_points", "fine_grained_points", "SALIENCY_DETECTORS",
    "MixerOptions",
]

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, already clipped


# --------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------


def beta_host(alpha: float, generator: torch.Generator) -> float:
    """One λ ~ Beta(α, α) drawn on the host (CPU generator), as a Python float.

    Beta(1, 1) is the uniform distribution; other α use the ratio of two Gamma(α) draws.
    ``.numpy()`` reads the CPU tensor without a dispatcher call (no device involved).
    """
    if alpha == 1.0:
        return float(torch.rand(1, generator=generator, dtype=torch.float64).numpy()[0])
    g = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64),
                              generator=generator).numpy()
    total = g[0] + g[1]
    return float(g[0] / total) if total > 0 else 0.5


def beta_device(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` independent λ ~ Beta(α, α) on ``device`` from a device generator, float32 ``(n,)``."""
    if alpha == 1.0:
        return torch.rand(n, generator=generator, device=device)
    conc = torch.full((2, n), float(alpha), device=device)
    g = torch._standard_gamma(conc, generator=generator)
    total = g.sum(0)
    # Tiny α can underflow both gammas to 0; the limit of Beta(α, α) as α -> 0 is a fair coin on {0, 1}.
    return torch.where(total > 0, g[0] / total.clamp_min(torch.finfo(g.dtype).tiny),
                       (g[0] >= g[1]).float())


class Draws(NamedTuple):
    """The random inputs of one mixing call.

    ``lam``, ``uy`` and ``ux`` are host floats in [0, 1) from the seeded host generator (batch λ,
    batch box centre), identical on every data-parallel rank; ``generator`` is the device generator
    for per-sample draws.
    """

    lam: float
    uy: float
    ux: float
    generator: torch.Generator


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def box_sides(lam: float, height: int, width: int) -> tuple[int, int]:
    """The CutMix box sides ``(⌊H·√(1-λ)⌋, ⌊W·√(1-λ)⌋)`` as host ints."""
    ratio = math.sqrt(min(max(1.0 - lam, 0.0), 1.0))
    return int(height * ratio), int(width * ratio)


def place_box(ch: int, cw: int, uy: float, ux: float, height: int, width: int) -> Box:
    """A ``ch × cw`` box centred at pixel ``(⌊uy·H⌋, ⌊ux·W⌋)``, clipped to the image (host ints)."""
    cy, cx = min(int(uy * height), height - 1), min(int(ux * width), width - 1)
    y0, x0 = cy - ch // 2, cx - cw // 2
    return (max(y0, 0), min(y0 + ch, height), max(x0, 0), min(x0 + cw, width))


def rand_box(lam: float, height: int, width: int, uy: float, ux: float) -> Box:
    """The CutMix box for area ratio ``1 - lam`` centred at pixel ``(⌊uy·H⌋, ⌊ux·W⌋)``, clipped.

    Pure: the uniforms ``uy``/``ux`` come from the caller's generator. Returns host ints
    ``(y0, y1, x0, x1)``; the box may be empty (λ close to 1).
    """
    return place_box(*box_sides(lam, height, width), uy, ux, height, width)


# Device boxes are a pair ``(lo, hi)`` of long tensors of shape (2, B): row 0 is y, row 1 is x, and
# the box of sample i covers rows lo[0, i]:hi[0, i] and columns lo[1, i]:hi[1, i]. Handling y and x
# as one tensor halves the number of (tiny) tensor ops, which dominate the cost of the per-sample path.
Boxes = tuple[Tensor, Tensor]


class _Consts(NamedTuple):
    hw: Tensor  # long (2, 1): [[H], [W]]
    hw4: Tensor  # float (4, 1): [[H], [W], [H], [W]]
    rows4: Tensor  # long (4,): [0, 0, 1, 2], picks (r, r, u_y, u_x) out of (r, u_y, u_x)
    arange: Tensor  # long (max(H, W),)


def column(values: tuple[float, ...], device: torch.device,
           dtype: torch.dtype = torch.long) -> Tensor:
    """Host numbers as an ``(n, 1)`` tensor on ``device`` without a host->device copy: each
    entry is a ``fill_``, whose value travels as a kernel argument (``torch.tensor(values,
    device=...)`` would copy from pageable host memory and wait for it on a GPU)."""
    out = torch.empty((len(values), 1), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


@functools.lru_cache(maxsize=64)
def _consts(height: int, width: int, device: torch.device) -> _Consts:
    return _Consts(column((height, width), device),
                   column((height, width, height, width), device, torch.float32),
                   column((0, 0, 1, 2), device).view(-1),
                   torch.arange(max(height, width), device=device))


@functools.lru_cache(maxsize=64)
def _cutout_sides(side_h: int, side_w: int, device: torch.device) -> Tensor:
    return column((side_h, side_w), device)


def boxes_at(sides: Tensor, centres: Tensor, height: int, width: int) -> Boxes:
    """Boxes of ``sides`` (long (2, B) or (2, 1): heights, widths) centred at pixels ``centres``.

    The top-left corner is ``centre - side // 2``; the box is clipped to the image.
    """
    hw = _consts(height, width, centres.device).hw
    lo = centres - (sides >> 1)
    hi = torch.minimum(lo + sides, hw)
    return lo.clamp_min_(0), hi


def lam_sides(lam: Tensor, height: int, width: int) -> Tensor:
    """Per-sample CutMix box sides ``(⌊H·√(1-λ)⌋, ⌊W·√(1-λ)⌋)`` as long (2, B)."""
    return (_consts(height, width, lam.device).hw * (1.0 - lam).sqrt_()).long()


def rand_centres(n: int, height: int, width: int, generator: torch.Generator,
                 device: torch.device) -> Tensor:
    """``n`` box centres uniform over the pixels (device generator): long (2, n) of (cy, cx).

    ``⌊u·S⌋ <= S - 1`` for every float32 ``u < 1`` and side ``S < 2**24``: the product rounds
    down, never up to ``S``, so no clamp is needed.
    """
    u = torch.rand(2, n, generator=generator, device=device)
    return (u * _consts(height, width, device).hw).long()


def rand_boxes(lam: Tensor, height: int, width: int, generator: torch.Generator) -> Boxes:
    """Per-sample CutMix boxes for λ ``(B,)``, centres uniform over the pixels."""
    centres = rand_centres(lam.shape[0], height, width, generator, lam.device)
    return boxes_at(lam_sides(lam, height, width), centres, height, width)


@functools.lru_cache(maxsize=64)
def _interval_table(size: int, device: torch.device) -> Tensor:
    """Row ``s * size + c``: the 0/1 mask over ``size`` pixels of the clipped interval of length
    ``s`` centred at ``c`` (CutMix's rule), followed by its clipped length. Float, ``((size+1)·size,
    size+1)``; 33 KB for CIFAR, 200 KB for 224-pixel images."""
    s = torch.arange(size + 1, device=device).repeat_interleave(size)
    c = torch.arange(size, device=device).repeat(size + 1)
    lo = c - s // 2
    hi = (lo + s).clamp_max(size)
    lo = lo.clamp_min(0)
    ar = torch.arange(size, device=device)
    mask = ((ar >= lo[:, None]) & (ar < hi[:, None])).float()
    return torch.cat((mask, (hi - lo).clamp_min(0).float()[:, None]), 1)


def sample_box_rows(n: int, alpha: float, height: int, width: int, generator: torch.Generator,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` per-sample CutMix boxes as row masks ``(n, H)``, column masks ``(n, W)`` and exact λ.

    Same law as :func:`rand_boxes` + :func:`box_lam` (λ ~ Beta(α, α), sides ``⌊S·√(1-λ)⌋``,
    centres uniform, clipped) in a third of the tensor ops, which dominate at CIFAR sizes: 1 - λ is
    itself Beta(α, α), side ratios and centres come out of one multiply, and the clipped interval
    of every (side, centre) pair -- mask and length -- is one row of a small precomputed table.
    """
    u = torch.cat((beta_device(alpha, n, generator, device)[None],  # 1 - λ ~ Beta(α, α) too
                   torch.rand(2, n, generator=generator, device=device)))  # (1 - λ, u_y, u_x)
    u[0].sqrt_()
    if height == width:
        sc = (u * height).long()  # (side, cy, cx)
        keys = sc[1:].add_(sc[0], alpha=height)  # table row side * S + centre, for y and x
        table = _interval_table(height, device).index_select(0, keys.view(-1))
        rows, cols, lens = table[:n, :height], table[n:, :width], table[:, height]
    else:
        c = _consts(height, width, device)
        sc = (u.index_select(0, c.rows4) * c.hw4).long()  # (⌊H·r⌋, ⌊W·r⌋, cy, cx)
        rt = _interval_table(height, device).index_select(0, sc[0].mul_(height).add_(sc[2]))
        ct = _interval_table(width, device).index_select(0, sc[1].mul_(width).add_(sc[3]))
        rows, cols, lens = rt[:, :height], ct[:, :width], torch.cat((rt[:, height], ct[:, width]))
    lam = torch.rsub(lens.view(2, n).prod(0), 1.0, alpha=1.0 / float(height * width))
    return rows, cols, lam


def outer_masks(rows: Tensor, cols: Tensor, dtype: torch.dtype = torch.float32,
                ws: Optional[Workspace] = None) -> Tensor:
    """Box masks ``(B, 1, H, W)`` as the outer product of row ``(B, H)`` and column ``(B, W)`` masks."""
    shape = (rows.shape[0], rows.shape[1], cols.shape[1])
    out = ws.get("mask", shape, dtype, rows.device) if ws is not None else torch.empty(
        shape, dtype=dtype, device=rows.device)
    return torch.mul(rows[:, :, None], cols[:, None, :], out=out).unsqueeze(1)


def box_lam(boxes: Boxes, height: int, width: int) -> Tensor:
    """Exact λ = 1 - box area / image area: float32 ``(B,)``."""
    lo, hi = boxes
    return torch.rsub((hi - lo).prod(0), 1.0, alpha=1.0 / float(height * width))


def box_masks(boxes: Boxes, height: int, width: int, dtype: torch.dtype = torch.float32,
              ws: Optional[Workspace] = None) -> Tensor:
    """0/1 masks ``(B, 1, H, W)`` of the boxes, from broadcast comparisons of ``arange``.

    Rows and columns are compared separately (``(2, B, max(H, W))``, tiny) and joined by one
    outer product: much cheaper on a CPU than combining two full-size boolean masks with ``&``.
    Inside ``[lo, hi)`` is ``(i >= lo) xor (i >= hi)`` since ``lo <= hi``.
    """
    lo, hi = boxes
    ar = _consts(height, width, lo.device).arange
    # float, not bool: broadcast bool kernels are not vectorised on CPU (10x slower here)
    inside = (torch.ge(ar, lo[:, :, None]) ^ torch.ge(ar, hi[:, :, None])).to(dtype)
    return outer_masks(inside[0, :, :height], inside[1, :, :width], dtype, ws)


# --------------------------------------------------------------------------------------------
# Pasting and blending
# --------------------------------------------------------------------------------------------


class Workspace:
    """Scratch tensors reused from call to call (gathered sources, masks).

    On a CPU, a fresh multi-megabyte temporary per call is returned to the OS by ``malloc`` and
    page-faulted back on the next call, which costs more than the copy itself; reusing one buffer
    per name avoids it (on CUDA the caching allocator does the same). Not shared between threads.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> Tensor:
        key = (name, dtype, device)
        n = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def _scratch(ws: Optional[Workspace], x: Tensor) -> bool:
    # out= kernels do not record autograd: only use scratch buffers for plain data
    return ws is not None and not (x.requires_grad and torch.is_grad_enabled())


def gather(x: Tensor, index: Tensor, ws: Optional[Workspace] = None, name: str = "src") -> Tensor:
    """``x.index_select(0, index)``, into a reused scratch buffer when ``ws`` is given."""
    if not _scratch(ws, x):
        return x.index_select(0, index)
    out = ws.get(name, (index.shape[0], *x.shape[1:]), x.dtype, x.device)
    return torch.index_select(x, 0, index, out=out)


def paste_box(x: Tensor, source_index: Tensor, box: Box, inplace: bool = False,
              ws: Optional[Workspace] = None) -> Tensor:
    """CutMix with one box for the batch: ``out[i, :, box] = x[source_index[i], :, box]``.

    With ``inplace=False`` the output is a fresh tensor: one copy of ``x`` and one ``index_select``
    of the patch written straight into it. ``inplace=True`` writes into ``x`` itself (the patches
    are gathered first, so sources are read before they are overwritten).
    """
    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        return x if inplace else x.clone()
    patch = x[:, :, y0:y1, x0:x1]
    if inplace:
        x[:, :, y0:y1, x0:x1] = gather(patch, source_index, ws, "patch")
        return x
    out = x.clone()
    if x.requires_grad and torch.is_grad_enabled():  # out= kernels do not record autograd
        out[:, :, y0:y1, x0:x1] = patch.index_select(0, source_index)
    else:
        torch.index_select(patch, 0, source_index, out=out[:, :, y0:y1, x0:x1])
    return out


def paste_masks(x: Tensor, source_index: Tensor, masks: Tensor, inplace: bool = False,
                ws: Optional[Workspace] = None) -> Tensor:
    """Paste with per-sample 0/1 masks ``(B or 1, 1, H, W)``: ``out = x + mask·(x[src] - x)``.

    ``lerp`` with weights exactly 0 or 1 returns exactly one of its inputs, so pixels are copied,
    not blended. Integer images fall back to ``torch.where``.
    """
    src = gather(x, source_index, ws)
    if not x.is_floating_point():
        out = torch.where(masks.bool(), src, x)
        return x.copy_(out) if inplace else out
    masks = masks.to(x.dtype)
    return x.lerp_(src, masks) if inplace else torch.lerp(x, src, masks)


def mixup_blend(x: Tensor, source_index: Tensor, lam: Tensor | float, inplace: bool = False,
                ws: Optional[Workspace] = None) -> Tensor:
    """Mixup: ``out = lam·x + (1 - lam)·x[source_index]``; ``lam`` a float or a ``(B,)`` tensor."""
    src = gather(x, source_index, ws)
    if isinstance(lam, Tensor):
        weight = (1.0 - lam).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    else:
        weight = 1.0 - float(lam)
    return x.lerp_(src, weight) if inplace else torch.lerp(x, src, weight)


def cutout_box(x: Tensor, box: Box, inplace: bool = False) -> Tensor:
    """Cutout with one box for the batch: the box is set to zero, labels stay as they are."""
    out = x if inplace else x.clone()
    y0, y1, x0, x1 = box
    out[:, :, y0:y1, x0:x1] = 0
    return out


def cutout_masks(x: Tensor, masks: Tensor, inplace: bool = False) -> Tensor:
    """Cutout with per-sample 0/1 masks ``(B, 1, H, W)``: masked pixels become zero."""
    keep = masks.to(x.dtype).neg_().add_(1)
    return x.mul_(keep) if inplace else x * keep


# --------------------------------------------------------------------------------------------
# Saliency (SaliencyMix)
# --------------------------------------------------------------------------------------------


def spectral_residual_saliency(x: Tensor, max_side: int = 64) -> tuple[Tensor, int]:
    """Spectral-residual saliency maps (Hou & Zhang, 2007) of a batch, computed with torch FFTs.

    The grey image is average-pooled by an integer ``factor`` so that its sides are at most
    ``max_side`` (OpenCV's implementation works on 64×64 too); log amplitude minus its 3×3 local
    mean (circular padding: the spectrum is periodic) is the spectral residual; it is recombined
    with the phase, transformed back, squared and smoothed. Returns ``(maps (B, h, w), factor)``.
    """
    grey = x.float().mean(1, keepdim=True)
    factor = max(1, math.ceil(max(grey.shape[-2:]) / max_side))
    if factor > 1:
        grey = F.avg_pool2d(grey, factor, ceil_mode=True)
    spec = torch.fft.fft2(grey)
    amp = spec.abs().clamp_min(1e-8)
    log_amp = amp.log()
    local = F.avg_pool2d(F.pad(log_amp, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    sal = torch.fft.ifft2(spec / amp * torch.exp(log_amp - local)).abs().square()
    sal = _gaussian_blur(sal, sigma=max(grey.shape[-1] / 32.0, 0.5))
    return sal[:, 0], factor


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def salient_points(x: Tensor, height: int, width: int) -> Tensor:
    """The most salient pixel of every image of ``x`` by spectral residual, on the device:
    long (2, B) of (cy, cx)."""
    sal, factor = spectral_residual_saliency(x)
    w = sal.shape[-1]
    flat = sal.flatten(1).argmax(1)
    cy = ((flat // w) * factor + factor // 2).clamp_max(height - 1)
    cx = ((flat % w) * factor + factor // 2).clamp_max(width - 1)
    return torch.stack((cy, cx))


def fine_grained_points(x: Tensor, height: int, width: int) -> Tensor:
    """The most salient pixel of every image of ``x`` by OpenCV's
    ``StaticSaliencyFineGrained``, exactly as the SaliencyMix authors' ``saliency_bbox``: the
    (normalised) image as an HWC float32 array, the map scaled to uint8, its first argmax.

    Runs on the host, one image at a time (the method table allows it with one box per batch
    only, i.e. one image per step); needs ``opencv-contrib-python`` (extra ``[saliency]``).
    """
    import cv2
    import numpy as np

    detector = cv2.saliency.StaticSaliencyFineGrained_create()
    points = []
    for img in x.detach().float().cpu().numpy():
        ok, sal = detector.computeSaliency(np.ascontiguousarray(img.transpose(1, 2, 0)))
        if not ok:
            raise RuntimeError("OpenCV's StaticSaliencyFineGrained failed on an image")
        sal = (sal * 255).astype("uint8")
        cy, cx = np.unravel_index(int(np.argmax(sal)), sal.shape)
        points.append((min(int(cy), height - 1), min(int(cx), width - 1)))
    return torch.tensor(points, dtype=torch.long, device=x.device).T.contiguous()


#: SaliencyMix detectors by name (``augment.saliency``): images -> most salient pixel (2, B).
SALIENCY_DETECTORS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "spectral_residual": salient_points,
    "fine_grained": fine_grained_points,
}


# --------------------------------------------------------------------------------------------
# Mixers: (x, source_index, draws, options) -> (mixed x, λ per sample)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixerOptions:
    """What a mixer reads besides the batch: the augment config (``alpha``, ``cutout_size``,
    ``saliency``: read from it, never copied), the box mode that runs (``box: auto`` resolved by
    the method table), in-place mixing and scratch buffers."""

    aug: AugmentConfig = field(default_factory=AugmentConfig)
    box: str = "batch"
    inplace: bool = False
    workspace: Optional[Workspace] = field(default=None, compare=False)


Mixer = Callable[[Tensor, Optional[Tensor], Draws, MixerOptions], tuple[Tensor, Tensor]]


def _mask_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _lam_full(value: float, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), value, device=device)


def mix_none(x: Tensor, source_index: Optional[Tensor], draws: Draws,
             opt: MixerOptions) -> tuple[Tensor, Tensor]:
    """No augmentation: the batch as it is, λ = 1."""
    return x, _lam_full(1.0, x.shape[0], x.device)


def mix_cutmix(x: Tensor, source_index: Tensor, draws: Draws,
               opt: MixerOptions) -> tuple[Tensor, Tensor]:
    """CutMix box paste (batch or per-sample box) with λ from the exact pasted area."""
    b, _, h, w = x.shape
    if opt.box == "batch":
        box = rand_box(draws.lam, h, w, draws.uy, draws.ux)
        lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)
        return paste_box(x, source_index, box, opt.inplace, opt.workspace), _lam_full(lam, b, x.device)
    rows, cols, lam = sample_box_rows(b, opt.aug.alpha, h, w, draws.generator, x.device)
    masks = outer_masks(rows, cols, _mask_dtype(x), opt.workspace)
    return paste_masks(x, source_index, masks, opt.inplace, opt.workspace), lam


def mix_saliencymix(x: Tensor, source_index: Tensor, draws: Draws,
                    opt: MixerOptions) -> tuple[Tensor, Tensor]:
    """SaliencyMix: a CutMix box centred on the most salient pixel of the source image.

    ``batch``: one λ and one box for the batch, centred on the salient point of the first target's
    source (as the SaliencyMix reference code does); ``sample``: every target its own λ and a box
    at its own source's salient point. The centre lives on the device, so the paste uses masks.
    """
    b, _, h, w = x.shape
    detect = SALIENCY_DETECTORS[opt.aug.saliency]
    if opt.box == "batch":
        centres = detect(x.index_select(0, source_index[:1]), h, w)
        sides = column(box_sides(draws.lam, h, w), x.device)
    else:
        centres = detect(x, h, w).index_select(1, source_index)
        sides = lam_sides(beta_device(opt.aug.alpha, b, draws.generator, x.device), h, w)
    boxes = boxes_at(sides, centres, h, w)
    masks = box_masks(boxes, h, w, _mask_dtype(x), opt.workspace)
    mixed = paste_masks(x, source_index, masks, opt.inplace, opt.workspace)
    return mixed, box_lam(boxes, h, w).expand(b).contiguous()


def mix_mixup(x: Tensor, source_index: Tensor, draws: Draws,
              opt: MixerOptions) -> tuple[Tensor, Tensor]:
    """Mixup: one λ for the batch (``batch``) or one per sample (``sample``)."""
    b = x.shape[0]
    if opt.box == "batch":
        mixed = mixup_blend(x, source_index, draws.lam, opt.inplace, opt.workspace)
        return mixed, _lam_full(draws.lam, b, x.device)
    lam = beta_device(opt.aug.alpha, b, draws.generator, x.device)
    return mixup_blend(x, source_index, lam, opt.inplace, opt.workspace), lam


def mix_cutout(x: Tensor, source_index: Optional[Tensor], draws: Draws,
               opt: MixerOptions) -> tuple[Tensor, Tensor]:
    """Cutout: a square of side ``cutout_size``·side, centre uniform, clipped, set to zero; λ = 1."""
    b, _, h, w = x.shape
    side_h, side_w = max(1, round(opt.aug.cutout_size * h)), max(1, round(opt.aug.cutout_size * w))
    if opt.box == "batch":
        out = cutout_box(x, place_box(side_h, side_w, draws.uy, draws.ux, h, w), opt.inplace)
    else:
        boxes = boxes_at(_cutout_sides(side_h, side_w, x.device),
                         rand_centres(b, h, w, draws.generator, x.device), h, w)
        out = cutout_masks(x, box_masks(boxes, h, w, _mask_dtype(x), opt.workspace), opt.inplace)
    return out, _lam_full(1.0, b, x.device)


#: Mixers by name (``MethodSpec.mixer``). A mixer takes the batch, the source of every target,
#: the step's random draws and the static options, and returns the mixed batch and the weight λ
#: of the target label.
MIXERS: dict[str, Mixer] = {
    "none": mix_none,
    "cutout": mix_cutout,
    "mixup": mix_mixup,
    "cutmix": mix_cutmix,
    "saliencymix": mix_saliencymix,
}
