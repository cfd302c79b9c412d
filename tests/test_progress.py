"""Progress outside a terminal: plain lines at a stage's first step, every few seconds and at
its last (a console on a stream that is no TTY, a clock the test moves), the outer loop's plan
line, and a whole distill run whose output is a pipe, as a cluster job's file would be."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from mmdistill.console import EVERY, duration, progress_bar, progress_every
from mmdistill.errors import UserError
from mmdistill.methods.loop import OuterLoop, Schedule, Task
from mmdistill.runs import Run

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """A clock the test sets by hand (rich reads it too, as often as it likes)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain() -> tuple[Console, list[str]]:
    """A console on a stream that is not a terminal, and the list the progress says into."""
    return Console(file=io.StringIO(), width=200), []


def test_outside_a_terminal_a_stage_says_its_first_step_every_interval_and_its_last() -> None:
    out, lines = plain()
    clock = Clock()
    with progress_bar(out, every=30, clock=clock, say=lines.append) as progress:
        task = progress.add_task("distill covmatch", total=10000)
        clock.now = 12.0
        progress.update(task, completed=1)  # the first step: always
        clock.now = 20.0
        progress.update(task, completed=2)  # 8 s after the last line: quiet
        clock.now = 44.0
        progress.update(task, completed=1200, info="val r_mean 31.25")
        clock.now = 50.0
        progress.advance(task, 100)  # quiet again
        clock.now = 120.0
        progress.advance(task, 8700)  # the last step: always
        progress.update(task, completed=10000)  # said once
        progress.remove_task(task)
    assert lines == [
        "distill covmatch: step 1/10000, 12.000 s/it, ETA 33h19m",
        "distill covmatch: step 1200/10000, 0.037 s/it, ETA 5m23s, val r_mean 31.25",
        "distill covmatch: step 10000/10000, 0.012 s/it, done in 2m00s, val r_mean 31.25",
    ]
    assert out.file.getvalue() == ""  # rich draws nothing there


def test_a_large_stage_counts_in_whole_steps() -> None:
    out, lines = plain()
    clock = Clock()
    with progress_bar(out, every=0, clock=clock, say=lines.append) as progress:
        task = progress.add_task("encode train images", total=1_000_000)
        clock.now = 2.0
        progress.advance(task, 500_000)
    assert lines == ["encode train images: step 500000/1000000, 250,000 it/s, ETA 2s"]


def test_a_resumed_stage_rates_only_the_steps_this_process_did() -> None:
    out, lines = plain()
    clock = Clock()
    with progress_bar(out, every=0, clock=clock, say=lines.append) as progress:
        task = progress.add_task("students", total=5, completed=3)
        progress.update(task, info="nothing done yet")  # no step of its own: quiet
        clock.now = 4.0
        progress.update(task, completed=4)
    assert lines == ["students: step 4/5, 4.000 s/it, ETA 4s, nothing done yet"]


def test_on_a_terminal_the_bar_is_rich_s_and_no_plain_line_is_said() -> None:
    stream, lines = io.StringIO(), []
    out = Console(file=stream, force_terminal=True, width=200)
    with progress_bar(out, every=0, say=lines.append) as progress:
        task = progress.add_task("covmatch", total=3)
        progress.update(task, completed=3)
    assert lines == [] and "covmatch" in stream.getvalue()  # the bar


def test_the_plain_lines_are_records_of_the_progress_log(caplog: pytest.LogCaptureFixture) -> None:
    out = Console(file=io.StringIO(), width=200)
    with caplog.at_level(logging.INFO, "mmdistill.progress"), progress_bar(out, every=0) as bar:
        bar.update(bar.add_task("students", total=1), completed=1)
    said = [(r.name, r.getMessage()) for r in caplog.records]
    assert len(said) == 1 and said[0][0] == "mmdistill.progress"
    assert said[0][1].startswith("students: step 1/1, ")


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVERY, raising=False)
    assert progress_every() == 30.0
    monkeypatch.setenv(EVERY, "0")
    assert progress_every() == 0.0 and progress_bar().every == 0.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(EVERY, bad)
        with pytest.raises(UserError, match=f"{EVERY}='{bad}': give the seconds"):
            progress_every()


def test_durations_are_short() -> None:
    assert [duration(s) for s in (0.4, 59, 106, 3599, 7380)] == [
        "0s",
        "59s",
        "1m46s",
        "59m59s",
        "2h03m",
    ]


class Count(Task):
    """The smallest task: updates of nothing, checkpointed by their count."""

    name, checkpoint = "count", "count"

    def __init__(self) -> None:
        self.x = torch.zeros(1, requires_grad=True)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"x": self.x}

    def step(self, at: int, check: object) -> None:
        return None

    def validate(self, done: int) -> None:
        return None

    def saved_state(self, done: int) -> tuple[dict, dict]:
        return {"x": self.x.detach().clone()}, {"step": done}

    def load(self, tensors: dict, state: dict) -> int:
        return int(state["step"])

    def last_good(self, saved: object, step: int) -> tuple:
        raise AssertionError("never diverges")

    def stop_message(self, step: int, what: str, good: int, path: Path) -> str:
        raise AssertionError("never diverges")


def test_the_outer_loop_logs_its_plan_then_counts_down_outside_a_terminal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, lines = plain()
    task = Count()
    caplog.set_level(logging.INFO, "mmdistill")
    with progress_bar(out, every=0, say=lines.append) as progress:
        run = Run(tmp_path, "distill", "cpu", 0)
        ctx = SimpleNamespace(device="cpu", run=run, progress=progress)
        opt = torch.optim.SGD([task.x], lr=0.1)
        OuterLoop(ctx, task, opt, Schedule(steps=1200, checkpoint_every=1000)).run()
        OuterLoop(ctx, task, opt, Schedule(steps=1500)).run()  # resumes from step 1000
    plans = [r.getMessage() for r in caplog.records if r.name == "mmdistill.methods.loop"]
    assert plans == ["count: 1,200 steps", "count: 1,500 steps, resuming after step 1,000"]
    assert lines[0].startswith("count: step 1/1200, ")
    assert lines[1199].startswith("count: step 1200/1200, ") and "done in" in lines[1199]
    assert lines[1200].startswith("count: step 1001/1500, ") and len(lines) == 1700


def test_a_run_writing_to_a_file_says_where_every_stage_is(tmp_path: Path) -> None:
    """Its output is a pipe here, as a cluster job's file would be: no bar; plain lines in
    stdout and in the run's cli.log, timestamped; stderr keeps to the run's own lines."""
    env = {**os.environ, EVERY: "0", "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "threads=1", "method=covmatch",
         "dataset.split_sizes=[60,20,30]", "eval.students=2", "eval.steps=5",
         "method.steps=4", "method.reset_every=2", "budget.pairs=8", "device=cpu",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    logged = (tmp_path / "run" / "cli.log").read_text()
    stages = (("train images", 60, r"\d+"), ("covmatch", 4, "1"), ("students", 2, "1"))
    for text in (p.stdout, logged):
        lines = [line.split(" - ", 1)[-1] for line in text.splitlines()]
        assert "covmatch: 4 steps" in lines
        for stage, total, first in stages:
            said = [line for line in lines if line.startswith(f"{stage}: step ")]
            assert re.match(rf"{stage}: step {first}/{total}, ", said[0]), lines
            assert said[-1].startswith(f"{stage}: step {total}/{total}, "), lines
            assert "done in" in said[-1]
    assert "[mmdistill.progress][INFO] - covmatch: step 4/4, " in logged
    assert ": step " not in p.stderr and "\x1b[" not in p.stderr  # no lines, no bar
