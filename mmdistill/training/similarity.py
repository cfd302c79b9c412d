"""Learnable target similarity over distilled pairs (LoRS's S, MDW's soft correspondence).

A module maps a batch of pair indices to its `[B, B]` target sub-matrix; memory stays linear in
the number of pairs for the low-rank form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LowRankSimilarity(nn.Module):
    """S = diag(a) + (alpha / r) L R^T; init a = 1, L ~ N(0, 1), R = 0, so S = I at start."""

    kind = "lowrank"

    def __init__(self, n: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.diag = nn.Parameter(torch.ones(n))
        self.left = nn.Parameter(torch.randn(n, rank))
        self.right = nn.Parameter(torch.zeros(n, rank))
        self.scale = alpha / rank

    def forward(self, idx: Tensor) -> Tensor:
        low = self.scale * self.left[idx] @ self.right[idx].T
        return torch.diag(self.diag[idx]) + low


class FullSimilarity(nn.Module):
    """A full learnable N x N matrix, initialised to the identity."""

    kind = "full"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(n))

    def forward(self, idx: Tensor) -> Tensor:
        return self.matrix[idx][:, idx]


def build_similarity(kind: str, n: int, rank: int = 10, alpha: float = 1.0) -> nn.Module:
    if kind == "lowrank":
        return LowRankSimilarity(n, rank, alpha)
    if kind == "full":
        return FullSimilarity(n)
    raise ValueError(f"unknown similarity {kind!r}; choose lowrank or full")
