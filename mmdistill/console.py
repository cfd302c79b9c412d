"""The one terminal console and progress bar every verb prints through.

On a terminal the progress is rich's live bar. Anywhere else (stderr written to a file by a
cluster job, a pipe) rich draws nothing, so the same bar logs plain lines instead: a stage's
first step, its last, and one line every `MMDISTILL_PROGRESS_EVERY` seconds (default 30; 0:
every step) in between, e.g. `covmatch: step 1200/10000, 0.012 s/it, ETA 1m46s`. They are log
records (logger `mmdistill.progress`), so they land timestamped in the job's stdout and its
run folder's `cli.log`, and stderr keeps to errors (one line each).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mmdistill.errors import UserError

# soft_wrap: paths and one-line errors stay one line, whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)

EVERY = "MMDISTILL_PROGRESS_EVERY"  # seconds between plain progress lines outside a terminal
DEFAULT_EVERY = 30.0
progress_log = logging.getLogger("mmdistill.progress")


class RateColumn(ProgressColumn):
    """Seconds per item for slow stages (`2.31 s/it`), items per second for fast ones."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        shown = f"{1 / speed:.2f} s/it" if speed < 1 else f"{speed:.1f} it/s"
        return Text(shown, style="progress.data.speed")


class InfoColumn(ProgressColumn):
    """What a stage last measured (`info=` of the task), e.g. the current val r_mean."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_every() -> float:
    """The seconds between plain progress lines, from `MMDISTILL_PROGRESS_EVERY`."""
    raw = os.environ.get(EVERY, "").strip()
    if not raw:
        return DEFAULT_EVERY
    try:
        every = float(raw)
    except ValueError:
        every = -1.0
    if not math.isfinite(every) or every < 0:
        raise UserError(
            f"{EVERY}={raw!r}: give the seconds between progress lines "
            f"(a number >= 0; 0 prints every step; default {DEFAULT_EVERY:g})"
        )
    return every


def duration(seconds: float) -> str:
    """`12s`, `1m46s`, `2h03m`: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(value: float) -> str:
    """A step count as a whole number (`10000`, never `1e+04`), a fraction as it is."""
    return str(int(value)) if float(value).is_integer() else f"{value}"


def plain_line(task: Task, seconds: float, steps: float) -> str:
    """One progress line: `<stage>: step <done>/<total>, <s/it>, ETA <left>[, <info>]`, the
    rate over the `steps` done in `seconds` since this process started the stage."""
    done = int(task.completed)
    of = "" if task.total is None else f"/{_count(task.total)}"
    parts = [f"{task.description}: step {done}{of}"]
    if steps > 0:
        per = seconds / steps
        parts.append(f"{per:.3f} s/it" if per >= 1e-3 or per == 0 else f"{1 / per:,.0f} it/s")
        if task.total is not None and done >= task.total:
            parts.append(f"done in {duration(seconds)}")
        elif task.total is not None:
            parts.append(f"ETA {duration((task.total - done) * per)}")
    info = task.fields.get("info")
    if info:
        parts.append(str(info))
    return ", ".join(parts)


@dataclass
class _Mark:
    """Where a task stood when this process added it, and when it last printed a line."""

    start: float  # clock time at add_task
    completed: float  # steps already done then (a resumed stage)
    said: float | None = None  # clock time of the last line; None before the first
    finished: bool = False  # the last step's line is printed


class StageProgress(Progress):
    """rich's bar on an interactive terminal; anywhere else, where rich would show nothing,
    plain lines to `say` instead (rich's live display is off there), so a job writing to a
    file still says where every stage is."""

    def __init__(
        self,
        *columns: str | ProgressColumn,
        out: Console,
        every: float,
        say: Callable[[str], None],
        **options: Any,
    ) -> None:
        self.plain = not (out.is_interactive or out.is_jupyter)
        super().__init__(*columns, console=out, disable=self.plain, **options)
        self.every, self.say = every, say
        self._marks: dict[TaskID, _Mark] = {}

    def add_task(self, description: str, *args: Any, **options: Any) -> TaskID:
        task_id = super().add_task(description, *args, **options)
        self._marks[task_id] = _Mark(self.get_time(), self._tasks[task_id].completed)
        return task_id

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def remove_task(self, task_id: TaskID) -> None:
        super().remove_task(task_id)
        self._marks.pop(task_id, None)

    def _say(self, task_id: TaskID) -> None:
        """Say the task's line if it is due: first step, last step, or `every` seconds on."""
        mark = self._marks.get(task_id)
        if not self.plain or mark is None:
            return
        with self._lock:
            task = self._tasks[task_id]
            steps = task.completed - mark.completed
            if steps <= 0:
                return  # nothing done by this process yet
            now = self.get_time()
            last = task.total is not None and task.completed >= task.total
            due = mark.said is None or now - mark.said >= self.every
            if (last and mark.finished) or not (last or due):
                return
            mark.said, mark.finished = now, last
            line = plain_line(task, now - mark.start, steps)
        self.say(line)


def progress_bar(
    out: Console | None = None,
    every: float | None = None,
    clock: Callable[[], float] | None = None,
    say: Callable[[str], None] = progress_log.info,
) -> StageProgress:
    """The progress of a job's stages: a bar on `out` (the console) when it is a terminal,
    else lines to `say` (the progress log), `every` seconds apart (default:
    `MMDISTILL_PROGRESS_EVERY`); `clock` and `say` for tests."""
    return StageProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        InfoColumn(),
        out=out or console,
        every=progress_every() if every is None else every,
        say=say,
        transient=True,
        get_time=clock,
    )
