"""The method interface and the context a method distils in.

A method turns the real training split into a PairSet of `pairs` pairs. It gets its own
settings (`cfg.method`) when it is built, and everything else it may use from a
`DistillContext`; it checkpoints through `ctx.run` so a killed run resumes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from torch import Tensor

from mmdistill.data.noise import NoiseMask
from mmdistill.models.encoders import Encoder
from mmdistill.runs import Run
from mmdistill.training.experts import ExpertSource
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
    max_steps: int | None = None  # a cap on the method's outer-loop steps (debug=tiny)

    def steps(self, wanted: int) -> int:
        """The outer-loop steps a method runs: its own count, capped by `max_steps`."""
        return wanted if self.max_steps is None else min(wanted, self.max_steps)


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


def expert_source(ctx: DistillContext) -> ExpertSource:
    """The run's experts: its data, encoder, expert settings and cache, reporting to its log,
    progress bars and curves."""
    assert ctx.expert is not None and ctx.noise is not None, "experts need ctx.expert, ctx.noise"
    return ExpertSource(
        ctx.expert,
        ctx.encoder,
        ctx.train,
        ctx.val,
        ctx.dataset,
        ctx.noise,
        ctx.cache_dir,
        ctx.device,
        say=log.info,
        progress=ctx.progress,
        metrics=ctx.run.metrics,
    )


class Method(Protocol):
    def __init__(self, cfg: DictConfig) -> None: ...

    def distill(self, ctx: DistillContext) -> PairSet: ...


# Synthetic data this many times further from zero than the real data they started from have
# diverged even while finite (TESLA at lr_img 1e12 reaches pixels near 1e10 before any NaN).
SANE_FACTOR = 100.0


def sane_bounds(**start: Tensor) -> dict[str, float]:
    """Per synthetic tensor, the largest |value| it may reach: SANE_FACTOR x that of the set
    it started as (random real pairs, or noise at their scale)."""
    return {k: SANE_FACTOR * max(float(v.detach().abs().max()), 1e-6) for k, v in start.items()}


def out_of_range(bounds: dict[str, float], **syn: Tensor) -> str | None:
    """What left the sane range ("synthetic images reach |x| = 3e+10 ..."), or None."""
    for name, x in syn.items():
        top = float(x.detach().abs().max())  # NaN as soon as one value is NaN
        if not math.isfinite(top):
            return f"synthetic {name} are no longer finite"
        if top > bounds[name]:
            return (
                f"synthetic {name} reach |x| = {top:.3g}, beyond {bounds[name]:.3g} "
                f"({SANE_FACTOR:g}x the real data's scale)"
            )
    return None


def keep_partial(run: Run, pairs: PairSet, reason: str, stopped_at: int, checkpoint: int) -> Path:
    """Save the last good set (a checkpoint) as the run's distilled set, flagged partial, so
    `evaluate` and `export` can read it and a resumed run distils on from the checkpoint."""
    pairs.meta["partial"] = {"reason": reason, "stopped_at": stopped_at, "checkpoint": checkpoint}
    path = run.path / "distilled"
    pairs.save(path)
    return path.with_suffix(".safetensors")
