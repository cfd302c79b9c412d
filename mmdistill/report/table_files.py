"""The files `mmdistill table` writes from a built Table: table.md, table.csv, table.tex and
recall_vs_pairs.png, the rich tables it prints, and the section of a Markdown document that
`--into` replaces. Kept apart from tables.py, which reads runs and builds the Table, so that
each file reads as one job."""

from __future__ import annotations

import csv
import io as stdio
import re
from pathlib import Path
from typing import BinaryIO

from mmdistill.errors import UserError
from mmdistill.report.tables import FULL, METRICS, Table, fmt, method_line, protocol_line
from mmdistill.runs import check_folders


def _is_best(table: Table, row: tuple, budget: tuple, metric: str) -> bool:
    if metric not in METRICS:
        return False
    best = table.best(budget, metric)
    cell = table.cell(row, budget)
    return (
        best is not None
        and row[0] != FULL
        and cell is not None
        and round(cell.stat(metric)[0], 1) == round(best, 1)
    )


COST_NOTE = (
    "Cost columns (`cost.*` of results.json): the mean over each cell's runs (seeds); "
    "blank where its runs recorded none."
)


def _marked(text: str, mark: str) -> str:
    """A cell with its footnote marker; a blank one (a cost its runs did not record) stays
    blank."""
    return text + mark if text else text


def _has_cost(table: Table) -> bool:
    return any(c not in METRICS for c in table.columns)


def markdown(table: Table, heading: str = "#") -> str:
    lead = ["Method", "Draws"] + (["Setting"] if table.has_setting else [])
    head, sub = list(lead), [""] * len(lead)
    for b in table.budgets:
        head += [table.budget_label(b)] + [""] * (len(table.columns) - 1)
        sub += list(table.columns)
    lines = [
        f"{heading} Retrieval recall (%)",
        "",
        f"mean±std over students; {table.pooling()}; best method per column in bold.",
        "",
        *([f"{COST_NOTE}", ""] if _has_cost(table) else []),
        f"Shared protocol: {protocol_line(table)}",
        "",
        *([f"Method settings: {method_line(table)}", ""] if method_line(table) else []),
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(sub) + " |",
    ]
    markers = table.markers()
    for row in table.rows:
        cells = [table.label(row), table.draws(row)]
        cells += [table.setting(row)] if table.has_setting else []
        for b in table.budgets:
            mark = f" [{markers[(row, b)]}]" if (row, b) in markers else ""
            for m in table.columns:
                text = fmt(table.cell(row, b), m)
                text = f"**{text}**" if _is_best(table, row, b, m) else text
                cells.append(_marked(text, mark))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- [{i}] {text}" for i, (*_, text) in enumerate(table.notes(), 1)]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
    """One line per row and budget: `pairs` is what the budget's bytes are worth in plain
    float32 pairs, `pairs_stored` and `storage` what its sets hold (counts per seed, when
    they differ; storage blank where the runs did not record it)."""
    out = stdio.StringIO()
    w = csv.writer(out, lineterminator="\n")
    stats = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    extra = [c for c in table.columns if c not in METRICS]
    w.writerow(
        ["method", "setting", "budget", "pairs", "pairs_stored", "storage", "ratio", "seeds"]
        + ["students", *stats, *extra, "protocol"]
    )
    for (row, budget), cell in sorted(
        table.cells.items(), key=lambda kv: (table.rows.index(kv[0][0]), kv[0][1])
    ):
        train = {r.train_pairs for r in cell.results}
        if budget[0] == "ratio":
            ratio = f"{budget[1]:g}"
        elif budget[0] == "full":
            ratio = "1"
        elif len(train) == 1 and None not in train:
            ratio = f"{budget[1] / train.pop():.6g}"  # the budget's share: bytes, not pairs held
        else:
            ratio = ""
        values = [f"{v:.4f}" for m in METRICS for v in cell.stat(m)]
        values += ["" if (v := cell.mean(c)) is None else f"{v:.6g}" for c in extra]
        w.writerow(
            [
                row[0],
                table.setting(row),
                table.budget_label(budget),
                int(budget[1]) if budget[0] == "pairs" else cell.pairs,  # the bytes' worth
                " ".join(map(str, cell.stored)),
                " ".join(cell.storages),
                ratio,
                " ".join(map(str, cell.seeds)),
                cell.n_students,
                *values,
                "; ".join(f"{k}={v}" for k, v in row[1]),
            ]
        )
    return out.getvalue()


TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(s: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: TEX_ESCAPES[m.group()], s)


def latex(table: Table) -> str:
    n_lead = 2 if table.has_setting else 1
    k = len(table.columns)
    spec = "l" * n_lead + "r" * k * len(table.budgets)
    lines = [
        f"% Shared protocol: {_tex(protocol_line(table))}",
        f"% {_tex(table.pooling())}",
        *([f"% Method settings: {_tex(method_line(table))}"] if method_line(table) else []),
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
    ]
    groups = " & ".join(
        f"\\multicolumn{{{k}}}{{c}}{{{_tex(table.budget_label(b))}}}" for b in table.budgets
    )
    lines.append("&" * (n_lead - 1) + f" & {groups} \\\\")
    lines.append(
        " ".join(
            f"\\cmidrule(lr){{{n_lead + 1 + i * k}-{n_lead + (i + 1) * k}}}"
            for i in range(len(table.budgets))
        )
    )
    lead = ["Method"] + (["Setting"] if table.has_setting else [])
    metric_head = " & ".join(_tex(m) for m in table.columns)
    lines.append(" & ".join(lead + [metric_head] * len(table.budgets)) + r" \\")
    lines.append(r"\midrule")
    markers = table.markers()
    for row in table.rows:
        if row[0] == FULL:
            lines.append(r"\midrule")
        cells = [_tex(table.label(row))] + ([_tex(table.setting(row))] if table.has_setting else [])
        for b in table.budgets:
            mark = f"\\textsuperscript{{{markers[(row, b)]}}}" if (row, b) in markers else ""
            cells += [_marked(_tex_cell(table, row, b, m), mark) for m in table.columns]
        lines.append(" & ".join(cells) + r" \\")
    lines.append(r"\bottomrule")
    width = n_lead + k * len(table.budgets)
    for i, (*_, text) in enumerate(table.notes(), 1):
        lines.append(
            f"\\multicolumn{{{width}}}{{l}}{{\\footnotesize $^{{{i}}}$ {_tex(text)}}} \\\\"
        )
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def _tex_cell(table: Table, row: tuple, budget: tuple, metric: str) -> str:
    """One cell in math mode (a recall, bold when best) or as text (a cost column)."""
    cell = table.cell(row, budget)
    if cell is None:
        return "-"
    if metric not in METRICS:
        return _tex(fmt(cell, metric))
    mean, std = cell.stat(metric)
    text = f"{mean:.1f}\\pm{std:.1f}"
    if _is_best(table, row, budget, metric):
        text = f"\\mathbf{{{text}}}"
    return f"${text}$"


def _x(table: Table, budget: tuple) -> int:
    """Where a budget sits on the pairs axis: the pairs asked for (LoRS's 99 pairs + S and
    MDW's 94 + P sit at 100, as their column does), or a ratio's pairs."""
    if budget[0] == "pairs":
        return int(budget[1])
    pairs = [c.pairs for (_, b), c in table.cells.items() if b == budget]
    return round(sum(pairs) / len(pairs))


def budget_ticks(xs: list[int]) -> tuple[list[int], bool]:
    """The budgets to label on the pairs axis, and whether it is logarithmic (budgets spanning
    4x or more): a budget too close to the last labelled one (under 1.25x on a log axis, 6% of
    the range on a linear one) is left unlabelled, so labels never overprint."""
    if not xs:
        return [], False
    log = max(xs) >= 4 * min(xs)
    ticks: list[int] = []
    for x in sorted(set(xs)):
        if not ticks:
            ticks.append(x)
            continue
        gap = x / ticks[-1] if log else (x - ticks[-1]) / (max(xs) - min(xs))
        if gap >= (1.25 if log else 0.06):
            ticks.append(x)
    return ticks, log


def plot(table: Table, path: Path | BinaryIO) -> None:
    """r_mean against the number of pairs, one line per row, a log axis where budgets span a
    wide range (ticks at the budgets, labels that would overprint left out); full data as a
    dashed line in its mean±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs_all = []
    for row in table.rows:
        label = table.label(row) + (f" ({table.setting(row)})" if table.has_setting else "")
        if row[0] == FULL:
            mean, std = table.cells[(row, ("full", 0))].stat("r_mean")
            line = ax.axhline(mean, linestyle="--", color="gray", label=f"{label}, ±std")
            ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.15)
            continue
        points = sorted(
            (_x(table, b), *table.cells[(row, b)].stat("r_mean"))
            for b in table.budgets
            if (row, b) in table.cells
        )
        xs = [p[0] for p in points]
        xs_all += xs
        ax.errorbar(
            xs,
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    ticks, log = budget_ticks(xs_all)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if ticks:  # label the budgets themselves, as plain numbers
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("pairs" + (" (log scale)" if log else ""))
    ax.set_ylabel("r_mean (%)")
    ax.set_title("Retrieval r_mean vs budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def print_rich(table: Table) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(f"shared protocol: {protocol_line(table)}", soft_wrap=True)
    if method_line(table):
        console.print(f"method settings: {method_line(table)}", soft_wrap=True)
    for b in table.budgets:
        t = RichTable(title=table.budget_label(b))
        t.add_column("method")
        t.add_column("draws", justify="right")
        if table.has_setting:
            t.add_column("setting")
        for m in table.columns:
            t.add_column(m, justify="right", style="bold" if m == "r_mean" else None)
        markers = table.markers()
        for row in table.rows:
            cell = table.cell(row, b)
            if cell is None:
                continue
            lead = [table.label(row), str(len(cell.seeds))]
            lead += [table.setting(row)] if table.has_setting else []
            mark = f" [{markers[(row, b)]}]" if (row, b) in markers else ""
            t.add_row(*lead, *(_marked(fmt(cell, m), mark) for m in table.columns))
        console.print(t)
        for row, budget, text in table.notes():
            if budget == b:
                console.print(f"\\[{markers[(row, budget)]}] {text}", soft_wrap=True)


def write(table: Table, out: Path) -> list[Path]:
    from mmdistill import io

    check_folders({"--out": out})
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "table.md", out / "table.csv", out / "table.tex", out / "recall_vs_pairs.png"]
    io.write_text(files[0], markdown(table))
    io.write_text(files[1], csv_text(table))
    io.write_text(files[2], latex(table))
    plot(table, files[3])
    return files


def check_into(doc: Path) -> None:
    """`--into` names a Markdown document: never a folder, nor a run's JSON or tensors."""
    if doc.is_dir() or doc.suffix.lower() not in (".md", ".markdown"):
        raise UserError(f"--into {doc} is not a Markdown document (.md); give the one to update")


def update_section(doc: Path, name: str, text: str) -> None:
    """Replace the generated section `name` of a Markdown document (appended if absent)."""
    from mmdistill import io

    begin = f"<!-- BEGIN generated: {name} (mmdistill table --into; edits here are replaced) -->"
    end = f"<!-- END generated: {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    check_into(doc)
    old = io.read_text(doc, fix="re-save it as UTF-8") if doc.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    io.write_text(doc, new)
