"""THE outer loop of synthetic sets, shared by CovMatch and trajectory matching (MTT, TESLA,
LoRS, RepBlend, MDW).

A method supplies a `Task`: its named parameters (their optimizer's momentum is checkpointed
under `momentum.<name>`, through `optimizer.state_dict()`), one update per step, its val check,
its checkpoint state, and the last good set when it diverges. The loop owns the order of
everything around the updates, which is what makes a killed run resume to the same set:
resume from the checkpoint, the progress bar, val checks, metrics.jsonl records, checkpoints
and divergence (a non-finite loss, or a task raising `Diverged`), where it keeps the last good
set as the run's partial distilled set and stops with the task's fix.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.methods.base import DistillContext, keep_partial
from mmdistill.training.pairs import PairSet
from mmdistill.training.trainer import FiniteCheck, default_check_every

log = logging.getLogger(__name__)
STREAM = "method"  # the metrics.jsonl stream of every method's records


class Diverged(Exception):
    """Raised by a task (or the loss check) when the set stopped being usable at `step`."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(what)
        self.step, self.what = step, what


@dataclass(frozen=True)
class Schedule:
    """When the loop checkpoints and checks val."""

    steps: int
    checkpoint_every: int = 0  # 0: never
    val_every: int = 0  # 0: never
    first_checkpoint: bool = False  # a fresh run saves its starting set as the last good one
    last_checkpoint: bool = False  # also checkpoint after the final step


class Task(ABC):
    """What one method does inside the loop."""

    name: str  # progress label
    checkpoint: str  # checkpoint file name under the run's checkpoints/

    @abstractmethod
    def parameters(self) -> dict[str, Tensor]:
        """The optimised tensors by name (checkpoint keys `momentum.<name>`)."""

    @abstractmethod
    def step(self, at: int, check: FiniteCheck) -> dict[str, Any] | None:
        """Update `at` (0-based); a metrics record (with its `step`) to write, or None."""

    @abstractmethod
    def validate(self, done: int) -> dict[str, Any] | None:
        """A val check after `done` updates: its metrics record, None without a score."""

    @abstractmethod
    def saved_state(self, done: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The checkpoint after `done` updates, momentum left out (the loop adds it)."""

    @abstractmethod
    def load(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> int:
        """Take a checkpoint's state back; the number of updates it had done."""

    @abstractmethod
    def last_good(
        self, saved: tuple[dict[str, Tensor], dict] | None, step: int
    ) -> tuple[PairSet, int]:
        """The set to keep when the run diverged at `step` (from the last checkpoint, None
        before the first), and the step it is from."""

    @abstractmethod
    def stop_message(self, step: int, what: str, good: int, path: Path) -> str:
        """The one-line error after divergence at `step`, the set of step `good` kept."""

    def needs_start_val(self, start: int) -> bool:
        """Whether to check val before the first update of this (resumed) run."""
        return start == 0


class OuterLoop:
    """Runs a task's updates with resume, progress, val checks, metrics and checkpoints."""

    def __init__(
        self, ctx: DistillContext, task: Task, opt: torch.optim.Optimizer, schedule: Schedule
    ) -> None:
        self.ctx, self.task, self.opt, self.schedule = ctx, task, opt, schedule
        self.check = FiniteCheck(default_check_every(ctx.device), self._bad_loss)
        self.start = 0
        self.step_seconds = 0.0  # updates only: val checks and checkpoints left out

    def run(self) -> None:
        try:
            self._run()
        except Diverged as stop:
            self.diverged(stop.step, stop.what)

    def _run(self) -> None:
        ctx, s = self.ctx, self.schedule
        if self.resume() is None and s.first_checkpoint:
            self.save(0)
        progress = ctx.progress
        self._plan()
        bar = None
        if progress is not None:
            bar = progress.add_task(self.task.name, total=s.steps, completed=self.start)
        ctx.run.metrics.start(STREAM)
        if s.val_every > 0 and self.task.needs_start_val(self.start):
            self._validate(self.start, bar)
        for at in range(self.start, s.steps):
            t0 = time.perf_counter()
            row = self.task.step(at, self.check)
            self.step_seconds += time.perf_counter() - t0
            if row is not None:
                ctx.run.metrics.write(STREAM, **row)
            done = at + 1
            if s.val_every > 0 and (done % s.val_every == 0 or done == s.steps):
                self.check.flush()  # never score a diverged set
                self._validate(done, bar)
            if self._checkpoint_due(done):
                self.check.flush()  # a checkpoint is always a finite set
                self.save(done)
            if bar is not None:
                progress.update(bar, completed=done)
        self.check.flush()
        if bar is not None:
            progress.remove_task(bar)

    def _plan(self) -> None:
        """One log line before the longest stage of a run, so a log says what it waits for
        (the bar, or outside a terminal its plain lines, count the steps down)."""
        resuming = f", resuming after step {self.start:,}" if self.start else ""
        log.info("%s: %s steps%s", self.task.name, f"{self.schedule.steps:,}", resuming)

    def _checkpoint_due(self, done: int) -> bool:
        s = self.schedule
        if s.checkpoint_every <= 0:
            return False
        return s.last_checkpoint if done == s.steps else done % s.checkpoint_every == 0

    def _validate(self, done: int, bar: Any) -> None:
        row = self.task.validate(done)
        if row is None:
            return
        self.ctx.run.metrics.write(STREAM, **row)
        if bar is not None:
            self.ctx.progress.update(bar, info=f"val r_mean {row['val_r_mean']:.2f}")

    # ------------------------------------------------------------------ checkpoints

    def _index(self) -> dict[int, int]:
        """Each parameter's index in the optimizer's state_dict."""
        ordered = (p for group in self.opt.param_groups for p in group["params"])
        return {id(p): i for i, p in enumerate(ordered)}

    def save(self, done: int) -> None:
        tensors, state = self.task.saved_state(done)
        index, held = self._index(), self.opt.state_dict()["state"]
        for name, p in self.task.parameters().items():
            buf = held.get(index[id(p)], {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{name}"] = buf
        self.ctx.run.save_checkpoint(self.task.checkpoint, tensors, state)

    def resume(self) -> tuple[dict[str, Tensor], dict] | None:
        """Load the run's checkpoint into the task and the optimizer; None without one."""
        run, name = self.ctx.run, self.task.checkpoint
        saved = run.load_checkpoint(name)
        if saved is None:
            return None
        tensors, state = saved
        with io.reading(run.checkpoint_path(name), run.checkpoint_fix()):
            self.start = self.task.load(tensors, state)
            index = self._index()
            held = {
                index[id(p)]: {"momentum_buffer": tensors[f"momentum.{n}"]}
                for n, p in self.task.parameters().items()
                if f"momentum.{n}" in tensors
            }
            if held:
                groups = self.opt.state_dict()["param_groups"]
                self.opt.load_state_dict({"state": held, "param_groups": groups})
        return saved

    # ------------------------------------------------------------------ divergence

    def _bad_loss(self, value: float, step: int) -> None:
        raise Diverged(step, f"the loss became {value}")

    def diverged(self, step: int, what: str) -> NoReturn:
        """Keep the last good set as the run's partial distilled set and stop with the fix."""
        run, name = self.ctx.run, self.task.checkpoint
        saved = run.load_checkpoint(name)
        with io.reading(run.checkpoint_path(name), run.checkpoint_fix()):
            pairs, good = self.task.last_good(saved, step)
        path = keep_partial(run, pairs, what, step, good)
        raise UserError(self.task.stop_message(step, what, good, path))
