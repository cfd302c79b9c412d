"""Coreset baselines: select real pairs instead of synthesising them."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mmdistill.methods.base import METHODS, DistillContext
from mmdistill.pairs import PairSet


@METHODS.register("random")
class RandomPairs:
    """Uniformly sampled real pairs: the floor every method must beat."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def distill(self, ctx: DistillContext) -> PairSet:
        gen = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(ctx.train.n_pairs, generator=gen)[: ctx.pairs]
        pairs = ctx.train.pairset(idx)
        pairs.meta.update(method="random")
        return pairs
