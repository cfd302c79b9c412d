"""The method interface and the context a method distils in.

A method turns the real training split into a PairSet of `pairs` pairs. It gets its own
settings (`cfg.method`) when it is built, and everything else it may use from a
`DistillContext`; it checkpoints through `ctx.run` so a killed run resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from mmdistill.data.noise import NoiseMask
from mmdistill.models.encoders import Encoder
from mmdistill.runs import Run
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import run_protocol
from mmdistill.training.retrieval import NonFiniteEmbeddings

log = logging.getLogger(__name__)
VAL_SEED = 10_000  # val students draw seeds 10,000,000 + k: never an evaluation student's


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
    monitor: DictConfig | None = None  # val checks for curves (monitor.val_every, val_students)


def val_r_mean(ctx: DistillContext, pairs: PairSet, students: int, what: str) -> float | None:
    """Mean val r_mean of `students` students trained on `pairs`: the protocol's own students
    (parallel on CPU), final step, fixed seeds; None when they diverge (`what` names the
    method in the warning)."""
    assert ctx.eval is not None, "val checks need the evaluation recipe (ctx.eval)"
    cfg = OmegaConf.merge(ctx.eval, {"selection": "final", "students": students})
    try:
        res = run_protocol(
            ctx.encoder, pairs, cfg, ctx.val, None, ctx.device, VAL_SEED, log_level=logging.DEBUG
        )
    except NonFiniteEmbeddings:
        log.warning("%s: val students diverged on the current set; not selectable", what)
        return None
    return res.summary["r_mean"]["mean"]


def monitored_val(ctx: DistillContext, pairs: PairSet, what: str) -> float | None:
    """A val check that only watches: `val_r_mean` with the global random state put back
    afterwards, so a method's own draws (and its distilled set) are the same with or without
    checks."""
    assert ctx.monitor is not None
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        return val_r_mean(ctx, pairs, int(ctx.monitor.val_students), what)
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Method(Protocol):
    def __init__(self, cfg: DictConfig) -> None: ...

    def distill(self, ctx: DistillContext) -> PairSet: ...
