"""The mixed loss: λ·CE(logits, y_a) + (1-λ)·CE(logits, y_b) with per-sample λ.

Label smoothing is applied once. Cross entropy is linear in the target, so the two-term loss with
smoothing ε equals cross entropy against the single soft target
``(1-ε)·(λ·onehot(y_a) + (1-λ)·onehot(y_b)) + ε/C`` -- the uniform part is added once, not once
per term. It is computed from one ``log_softmax``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["mixed_cross_entropy", "mixed_target"]


def mixed_cross_entropy(logits: Tensor, y_a: Tensor, y_b: Optional[Tensor] = None,
                        lam: Optional[Tensor | float] = None, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> Tensor:
    """Two-term cross entropy of mixed samples.

    Args:
        logits: ``(B, C)`` model outputs.
        y_a: ``(B,)`` target labels (the image the patch was pasted into), weight ``lam``.
        y_b: ``(B,)`` source labels, weight ``1 - lam``; None = plain cross entropy.
        lam: ``(B,)`` tensor or a float, the weight of ``y_a``; None = 1.
        label_smoothing: ε of label smoothing, applied once to the mixed target.
        reduction: ``mean`` (default), ``sum`` or ``none`` (per-sample ``(B,)``).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing = {label_smoothing!r}: must be in [0, 1)")
    logp = torch.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, y_a[:, None]).squeeze(1)
    if y_b is not None and lam is not None:
        nll_b = -logp.gather(1, y_b[:, None]).squeeze(1)
        lam_t = lam.to(nll.dtype) if isinstance(lam, Tensor) else float(lam)
        nll = nll_b + lam_t * (nll - nll_b)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    raise ValueError(f"reduction = {reduction!r}: must be mean, sum or none")


def mixed_target(y_a: Tensor, y_b: Tensor, lam: Tensor | float, num_classes: int,
                 label_smoothing: float = 0.0) -> Tensor:
    """The soft target ``(B, C)`` equivalent to :func:`mixed_cross_entropy` (rows sum to 1)."""
    b = y_a.shape[0]
    lam_t = lam.float() if isinstance(lam, Tensor) else torch.full((b,), float(lam), device=y_a.device)
    target = torch.zeros(b, num_classes, device=y_a.device)
    target.scatter_add_(1, y_b[:, None], (1.0 - lam_t)[:, None])
    target.scatter_add_(1, y_a[:, None], lam_t[:, None])
    if label_smoothing > 0:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return target
