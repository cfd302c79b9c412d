"""Student losses over a logits matrix `[B_img, B_txt]`, registered by name.

`targets` is None for the identity correspondence, or a soft `[B, B]` matrix (LoRS's learned
similarity, MDW's correspondence) for the losses that use one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.registry import Registry

LOSSES: Registry = Registry("student loss")


def _eye(logits: Tensor) -> Tensor:
    return torch.eye(logits.shape[0], logits.shape[1], device=logits.device, dtype=logits.dtype)


@LOSSES.register("infonce")
def infonce(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE; with soft targets, cross-entropy against row-normalised targets."""
    if targets is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return soft_infonce(logits, targets)


@LOSSES.register("soft_infonce")
def soft_infonce(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Cross-entropy in both directions against the target rows/columns, each normalised."""
    t = _eye(logits) if targets is None else targets.clamp(min=0)
    row = t / t.sum(dim=1, keepdim=True).clamp(min=1e-8)
    col = t.T / t.T.sum(dim=1, keepdim=True).clamp(min=1e-8)
    i2t = -(row * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(col * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


@LOSSES.register("wbce")
def wbce(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """LoRS's weighted multi-label BCE: mean over positives (target > 0.5) and over negatives.

    Targets are used unclamped, as LoRS does: a learned similarity starts at exactly 0 and 1,
    where a clamp would pass no gradient to it.
    """
    t = _eye(logits) if targets is None else targets
    loss = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pos = t > 0.5
    neg = ~pos
    pos_term = loss[pos].mean() if pos.any() else loss.new_zeros(())
    neg_term = loss[neg].mean() if neg.any() else loss.new_zeros(())
    return 0.5 * (pos_term + neg_term)
