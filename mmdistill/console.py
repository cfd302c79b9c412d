"""The one terminal console and progress bar every verb prints through."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# soft_wrap: paths and one-line errors stay one line, whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)


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


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        InfoColumn(),
        console=console,
        transient=True,
    )
