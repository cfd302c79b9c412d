"""The method interface and the context a method distils in.

A method turns the real training split into a PairSet of `pairs` pairs. It gets its own
settings (`cfg.method`) when it is built, and everything else it may use from a
`DistillContext`; it checkpoints through `ctx.run` so a killed run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig
from rich.progress import Progress

from mmdistill.data.noise import NoiseMask
from mmdistill.models.encoders import Encoder
from mmdistill.runs import Run
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet


@dataclass
class DistillContext:
    encoder: Encoder
    train: RealSplit
    val: RealSplit
    pairs: int  # how many pairs to produce
    device: str
    seed: int
    run: Run
    progress: Progress | None = None
    dataset: str = ""  # the dataset's name (expert-buffer keys, metadata)
    noise: DictConfig | None = None  # the noise settings (part of expert-buffer keys)
    noise_mask: NoiseMask | None = None  # the true clean pairs, when noise was injected
    eval: DictConfig | None = None  # the evaluation recipe (val students, online students)
    expert: DictConfig | None = None  # expert settings (trajectory methods)
    cache_dir: Path = Path("~/.cache/mmdistill").expanduser()  # feature and buffer cache


class Method(Protocol):
    def __init__(self, cfg: DictConfig) -> None: ...

    def distill(self, ctx: DistillContext) -> PairSet: ...
