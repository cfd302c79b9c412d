"""`mmdistill table --cross-arch`: the papers' cross-architecture matrix.

Rows are the encoder a set was distilled with x method (x budget); columns are the encoders
whose students trained on it (the distill run itself, or `evaluate source=<run> encoder=...`);
cells are r_mean as mean±std over every student of every seed. A cell whose set was converted
for another encoder is marked with what the conversion did (a decoded coreset holds real
images, not the synthetic ones), and full-data `train` runs give each column's upper bound.
Writes cross_arch.md and cross_arch.csv.
"""

from __future__ import annotations

import csv
import io as stdio
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mmdistill.report.tables import FULL, METRICS, Cell, Result, fmt, method_rank

DECODED = "*"  # marks a decoded-coreset cell


@dataclass
class Matrix:
    rows: list[tuple[str, str, str]]  # (dataset, source encoder, method @ budget)
    columns: list[str]  # evaluation encoders
    cells: dict[tuple, Cell]  # (row, column) -> students of every seed
    warnings: list[str]

    def transfers(self, row: tuple, column: str) -> list[dict]:
        """The distinct conversion records of a cell's runs (none for a set's own encoder)."""
        found = [r.transfer for r in self.cells[(row, column)].results if r.transfer]
        return [t for i, t in enumerate(found) if t not in found[:i]]

    def decoded(self, row: tuple, column: str) -> bool:
        return any(t.get("decoded_coreset") for t in self.transfers(row, column))

    @property
    def datasets(self) -> list[str]:
        return sorted({row[0] for row in self.rows})


def source_encoder(result: Result) -> str:
    """The encoder a result's set was distilled with; full-data rows have none."""
    if result.method == FULL:
        return "-"
    return str((result.transfer or {}).get("source_encoder") or result.switches["encoder"])


def _label(result: Result) -> str:
    """The row's method @ budget; sets whose texts were decoded on request (transfer.texts=
    decode) get their own row, since their own-encoder column kept the synthetic texts."""
    if result.method == FULL:
        return FULL
    kind, value = result.budget
    budget = f"{int(value)} pairs" if kind == "pairs" else f"ratio {value:g}"
    decoded = (result.transfer or {}).get("texts_mode") == "decode"
    return f"{result.method} @ {budget}" + (", texts decoded" if decoded else "")


def build(results: list[Result], problems: list[str] | None = None) -> Matrix:
    """Group results by (dataset, source encoder, method and budget) x evaluation encoder; a
    newer run of the same seed replaces an older one, with a warning."""
    warnings = list(problems or [])
    by_seed: dict[tuple, Result] = {}
    for r in sorted(results, key=lambda r: r.mtime):
        row = (r.switches["dataset"], source_encoder(r), _label(r))
        key = (row, r.switches["encoder"], r.seed)
        if key in by_seed:
            warnings.append(
                f"warning: {r.path} repeats {row[2]} ({row[1]} -> {key[1]}) seed {r.seed} of "
                f"{by_seed[key].path}; using the newer"
            )
        by_seed[key] = r
    cells: dict[tuple, Cell] = defaultdict(Cell)
    for (row, column, _), r in by_seed.items():
        cells[(row, column)].results.append(r)
    for cell in cells.values():
        cell.results.sort(key=lambda r: r.seed)

    def order(row: tuple) -> tuple:
        method = row[2].split(" @ ")[0]
        return (row[0], method == FULL, row[1], *method_rank(method), row[2])

    rows = sorted({row for row, _ in cells}, key=order)
    noisy = sorted({r.switches.get("noise", "none") for r in by_seed.values()} - {"none"})
    if noisy:
        warnings.append(f"warning: noisy runs ({', '.join(noisy)}) share cells with clean ones")
    return Matrix(rows, sorted({c for _, c in cells}), dict(cells), warnings)


def _cell_text(matrix: Matrix, row: tuple, column: str) -> str:
    cell = matrix.cells.get((row, column))
    if cell is None:
        return "-"
    return fmt(cell, "r_mean") + (f" {DECODED}" if matrix.decoded(row, column) else "")


def _counts(records: list[dict], key: str) -> str:
    """' (96 distinct)', or one count per draw (' (96, 93 distinct)'); '' when not decoded."""
    counts = [str(r[key]) for r in records if key in r]
    return f" ({', '.join(counts)} distinct)" if counts else ""


def _notes(matrix: Matrix, row: tuple, column: str) -> list[str]:
    """One line per way a cell's sets were converted (draws differ only in their counts)."""
    kinds: dict[tuple, list[dict]] = {}
    for t in (r.transfer for r in matrix.cells[(row, column)].results if r.transfer):
        what = tuple(t.get(k) for k in ("images", "texts", "similarity", "step_sizes"))
        kinds.setdefault(what, []).append(t)
    lines = []
    for (images, texts, similarity, steps), records in kinds.items():
        line = (
            f"{row[1]} {row[2]} -> {column}: images {images}"
            f"{_counts(records, 'distinct_images')}; texts {texts}"
            f"{_counts(records, 'distinct_captions')}"
        )
        line += f"; similarity {similarity}" if similarity else ""
        line += f"; step sizes {steps}" if steps else ""
        lines.append(line)
    return lines


def markdown(matrix: Matrix, heading: str = "#") -> str:
    many = len(matrix.datasets) > 1
    lead = (["Dataset"] if many else []) + ["Distilled with", "Method", "Draws"]
    lines = [
        f"{heading} Cross-architecture r_mean (%)",
        "",
        "Rows: the encoder a set was distilled with and its method; columns: the encoder whose "
        "students train on it (each with its own default student recipe); mean±std of r_mean "
        f"over students. {DECODED}: a decoded coreset (each synthetic image feature replaced "
        "by its nearest real training image, so the column measures real images chosen by the "
        "method, not the synthetic ones); the texts were kept or decoded as the conversions "
        "listed under the table say.",
        "",
        *([f"Dataset: {matrix.datasets[0]}", ""] if not many else []),
        "| " + " | ".join(lead + matrix.columns) + " |",
        "|" + "---|" * (len(lead) + len(matrix.columns)),
    ]
    for row in matrix.rows:
        draws = sorted({len(c.seeds) for (r, _), c in matrix.cells.items() if r == row})
        cells = ([row[0]] if many else []) + [row[1], row[2], "-".join(map(str, draws))]
        cells += [_cell_text(matrix, row, c) for c in matrix.columns]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        line
        for row in matrix.rows
        for column in matrix.columns
        if (row, column) in matrix.cells
        for line in _notes(matrix, row, column)
    ]
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    return "\n".join(lines) + "\n"


def csv_text(matrix: Matrix) -> str:
    out = stdio.StringIO()
    w = csv.writer(out, lineterminator="\n")
    stats = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    w.writerow(
        ["dataset", "source_encoder", "method", "eval_encoder", "pairs", "seeds", "students"]
        + stats
        + ["decoded_coreset", "images", "texts"]
    )
    for row in matrix.rows:
        for column in matrix.columns:
            cell = matrix.cells.get((row, column))
            if cell is None:
                continue
            ts = matrix.transfers(row, column)
            w.writerow(
                [row[0], row[1], row[2], column, cell.pairs, " ".join(map(str, cell.seeds))]
                + [cell.n_students]
                + [f"{v:.4f}" for m in METRICS for v in cell.stat(m)]
                + [
                    str(matrix.decoded(row, column)).lower(),
                    " | ".join(dict.fromkeys(t.get("images", "") for t in ts)),
                    " | ".join(dict.fromkeys(t.get("texts", "") for t in ts)),
                ]
            )
    return out.getvalue()


def write(matrix: Matrix, out: Path) -> list[Path]:
    from mmdistill import io

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "cross_arch.md", out / "cross_arch.csv"]
    io.write_text(files[0], markdown(matrix))
    io.write_text(files[1], csv_text(matrix))
    return files
