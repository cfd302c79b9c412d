"""Exact recall@K for image-text retrieval with several captions per image.

TR (image -> text): an image is a hit at K if any of its captions ranks within the top K.
IR (text -> image): a caption is a hit at K if its image ranks within the top K.

Ties are broken against the query: a ground truth's rank counts every wrong candidate scoring
at least as high as it (the worst rank among ties). Collapsed or constant embeddings therefore
score no better than chance instead of 100, and non-finite embeddings are refused. Ranks are
computed in blocks so COCO-sized test sets fit in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmdistill.errors import UserError

KS = (1, 5, 10)
METRICS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")


class NonFiniteEmbeddings(UserError):
    """A student produced NaN or infinite embeddings: it diverged, its recall means nothing."""


@torch.no_grad()
def recall_at_k(
    image_emb: Tensor, text_emb: Tensor, caption_image: Tensor, block: int = 1024
) -> dict[str, float]:
    """Recalls (percent) and r_mean from L2-normalised embeddings.

    `caption_image[j]` is the index of caption j's image in `image_emb`.
    """
    if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(text_emb).all())):
        raise NonFiniteEmbeddings(
            "the student's embeddings are not finite (it diverged); lower eval.lr or "
            "eval.trunk_lr, or check the pair set for NaN / huge values"
        )
    caption_image = caption_image.to(image_emb.device).long()
    n_img = image_emb.shape[0]
    tr_rank = torch.empty(n_img, dtype=torch.long, device=image_emb.device)
    for s in range(0, n_img, block):
        sim = image_emb[s : s + block] @ text_emb.T  # [b, n_txt]
        own = (
            caption_image.unsqueeze(0)
            == torch.arange(s, s + sim.shape[0], device=sim.device)[:, None]
        )
        best_own = sim.masked_fill(~own, float("-inf")).max(dim=1).values
        # Wrong captions scoring >= the best own caption all rank above it.
        tr_rank[s : s + sim.shape[0]] = ((sim >= best_own[:, None]) & ~own).sum(dim=1)
    n_txt = text_emb.shape[0]
    ir_rank = torch.empty(n_txt, dtype=torch.long, device=image_emb.device)
    for s in range(0, n_txt, block):
        sim = text_emb[s : s + block] @ image_emb.T  # [b, n_img]
        gt_idx = caption_image[s : s + sim.shape[0], None]
        gt = sim.gather(1, gt_idx)
        # Every other image scoring >= the caption's own image ranks above it.
        ir_rank[s : s + sim.shape[0]] = (sim >= gt).sum(dim=1) - 1
    out = {}
    for k in KS:
        out[f"TR@{k}"] = 100.0 * int((tr_rank < k).sum()) / n_img
    for k in KS:
        out[f"IR@{k}"] = 100.0 * int((ir_rank < k).sum()) / n_txt
    out["r_mean"] = sum(out[m] for m in METRICS) / len(METRICS)
    return out
