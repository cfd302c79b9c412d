"""Recall tables for one run: rich for the terminal, Markdown for recall.md."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mmdistill.training.retrieval import METRICS

COLUMNS = (*METRICS, "r_mean")


def cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.1f}±{stat['std']:.1f}"


def markdown(title: str, summary: dict[str, dict[str, float]], n_students: int) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    row = "| " + " | ".join(cell(summary[c]) for c in COLUMNS) + " |"
    return (
        f"# {title}\n\nmean±std over {n_students} students (recall, %)\n\n{head}\n{rule}\n{row}\n"
    )


def print_table(
    console: Console, title: str, summary: dict[str, dict[str, float]], n_students: int
) -> None:
    table = Table(title=f"{title} — mean±std over {n_students} students")
    for c in COLUMNS:
        table.add_column(c, justify="right", style="bold" if c == "r_mean" else None)
    table.add_row(*(cell(summary[c]) for c in COLUMNS))
    console.print(table)
