"""How CovMatch stores its rows: float32 (the paper), int8 codes (`bits: 8`) or a low-rank
factorisation on the real cross-covariance's top singular directions (`rank`), each one
`training.storage` object, so the budget's bytes decide how many pairs are distilled."""

from __future__ import annotations

import torch
from torch import Tensor

from mmdistill.training.pairs import PairSet
from mmdistill.training.storage import (
    Factor,
    Int8,
    LowRank,
    PairStorage,
    float32_bytes,
    rows_storage,
)


def storage_for(bits: int, rank: int) -> PairStorage:
    """The storage `method.bits` and `method.rank` name, before its offsets and bases."""
    if rank:
        return PairStorage(LowRank(rank, bits), LowRank(rank, bits))
    return rows_storage(bits)


def factored_pairs(budget: int, rank: int, dims: tuple[int, int], bits: int = 32) -> int:
    """How many pairs fit in the bytes of `budget` plain float32 pairs.

    Rank k > 0: rank-k coefficients beside the two bases `[k, D]` and offsets `[D]`, so
    (budget - k - 1) (D_v + D_t) / 2k pairs in float32. Rank 0 stores feature rows. With 8
    bits the rows (or coefficients) are int8 codes plus a float32 scale per row and modality,
    beside float32 offsets.
    """
    return storage_for(bits, rank).pairs_that_fit(float32_bytes(budget, dims), dims)


def fitted(storage: PairStorage, real_cov: Tensor, means: tuple[Tensor, Tensor]) -> PairStorage:
    """The storage with its offsets (the real means) and, for a factorised set, its bases (the
    top-`rank` left / right singular vectors of C_real), on the CPU."""
    offsets = (means[0].cpu().flatten(), means[1].cpu().flatten())
    if isinstance(storage.images, LowRank):
        rank, bits = storage.images.rank, storage.images.bits
        u, _, vh = torch.linalg.svd(real_cov.cpu(), full_matrices=False)
        return PairStorage(
            LowRank(rank, bits, u[:, :rank].T.contiguous(), offsets[0]),
            LowRank(rank, bits, vh[:rank].contiguous(), offsets[1]),
        )
    if isinstance(storage.images, Int8):
        return PairStorage(Int8(offsets[0]), Int8(offsets[1]))
    return storage


def stored_set(storage: PairStorage, images: Tensor, texts: Tensor, **kw: object) -> PairSet:
    """The PairSet of optimised rows as they are stored: decoded rows, with their records
    (`factors`) unless the storage is plain float32."""
    parts: dict[str, Factor] = {}
    if not storage.plain:
        parts = storage.encode(images, texts)
        images, texts = parts["images"].decode(), parts["texts"].decode()
    return PairSet(images=images, texts=texts, factors=parts, **kw)
