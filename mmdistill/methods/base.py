"""The method interface and its registry.

A method turns the real training split into a PairSet of `budget` pairs. It reads everything
it needs from a `DistillContext`, and checkpoints through `ctx.run` so a killed run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from omegaconf import DictConfig
from rich.progress import Progress

from mmdistill.data.features import RealSplit
from mmdistill.models.encoders import Encoder
from mmdistill.pairs import PairSet
from mmdistill.registry import Registry
from mmdistill.runs import Run


@dataclass
class DistillContext:
    cfg: DictConfig  # the whole job config (method settings are cfg.method)
    encoder: Encoder
    train: RealSplit
    val: RealSplit
    pairs: int  # how many pairs to produce
    device: str
    seed: int
    run: Run
    progress: Progress | None = None


class Method(Protocol):
    def __init__(self, cfg: DictConfig) -> None: ...

    def distill(self, ctx: DistillContext) -> PairSet: ...


METHODS: Registry = Registry("method")
