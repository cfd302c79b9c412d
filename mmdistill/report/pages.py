"""`report.html`: one self-contained page per run or sweep (`mmdistill report <folder>`).

Everything a person judges a run by, in one file that opens offline: images are inline (base64
PNG / JPEG), there is no script and no link off the page. A run page shows the recall table
(with random-pairs and full-data references where the tree around the run holds them, see
`references`), the curves from `metrics.jsonl` with a note per loss term, the distilled set as a
square grid with each pair's decoded caption, the learned similarity / correspondence matrix,
timings and cost, and the config. A sweep page shows the paper-layout table (one per budget,
wrapping), recall against pairs and a link to each run's page. Pages name folders relative to
the working directory or the outputs root, never by an absolute path.

Bad input never stops a page: a missing or damaged file costs its section, with one line in
`Page.problems` (printed by the verb) and the same line on the page.
"""

from __future__ import annotations

import base64
import io as stdio
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image

from mmdistill import io, metrics
from mmdistill.config import run_config
from mmdistill.data.base import ImageTextSplit
from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.report import curves, references, table_files, tables
from mmdistill.report.html import table as _table
from mmdistill.report.recall import COLUMNS
from mmdistill.report.visuals import heatmap_png, real_train, set_entries
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet

PAGE = "report.html"
HEATMAP_LIMIT = 256  # pairs shown in the similarity matrix
THUMB = 160  # longest side of a real photo in the grid (pixels)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1240px;
padding:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;
padding-bottom:4px}.sub{color:#555;margin:0 0 8px}nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f5f5f7}
td.l,th.l{text-align:left}.problem{color:#a40000}.note{color:#555;font-size:12px}
img.plot{max-width:100%;display:block;margin:6px 0}
.grid{display:grid;gap:8px}.grid figure{margin:0}.grid img{width:100%;display:block;
border:1px solid #ccc;aspect-ratio:1/1;object-fit:cover}.grid img.px{image-rendering:pixelated}
.grid figcaption{font-size:11px;line-height:1.25;margin-top:2px;overflow-wrap:anywhere}
.grid .n{color:#888}.wide{overflow-x:auto;max-width:100%}
.budgets{display:flex;flex-wrap:wrap;gap:4px 24px;align-items:flex-start}
.budgets table{font-size:12.5px}.budgets th,.budgets td{padding:2px 5px}
pre{background:#f5f5f7;padding:8px;overflow:auto;font-size:12px}
"""


@dataclass
class Page:
    """A written page and one line per problem met while building it."""

    path: Path
    problems: list[str] = field(default_factory=list)


class Missing(Exception):
    """An input a section needs is absent or unreadable (the message says which and why)."""


# ------------------------------------------------------------------------------- building


def _img(data: bytes, kind: str = "png", alt: str = "", css: str = "plot") -> str:
    b64 = base64.b64encode(data).decode()
    return f'<img class="{css}" alt="{escape(alt)}" src="data:image/{kind};base64,{b64}">'


def _encode(image: Image.Image, photo: bool) -> tuple[bytes, str]:
    """Photos (nearest real images) as JPEG thumbnails, synthetic pixels exactly, as PNG."""
    buffer = stdio.BytesIO()
    if photo:
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMB, THUMB))
        thumb.save(buffer, format="JPEG", quality=82)
        return buffer.getvalue(), "jpeg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _document(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{escape(name)}</h2>{content}</section>'
        for sid, name, content in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="sub">{subtitle}</p><nav>{nav}</nav>{body}'
        "</body></html>\n"
    )


class _Sections:
    """Sections of a page; one that fails becomes a problem line instead of content."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.items: list[tuple[str, str, str]] = []
        self.problems: list[str] = []

    def add(self, sid: str, name: str, build: Callable[[], str | None]) -> None:
        try:
            content = build()
        except Missing as err:
            line = f"{self.where}: {name}: {err}"
            self.problems.append(line)
            content = f'<p class="problem">{escape(str(err))}</p>'
        except Exception as err:  # a damaged input must cost its section, not the page
            line = f"{self.where}: {name} not shown ({type(err).__name__}: {err})"
            self.problems.append(line)
            content = f'<p class="problem">{escape(line)}</p>'
        if content:
            self.items.append((sid, name, content))

    def finish(self) -> list[tuple[str, str, str]]:
        if not self.problems:
            return self.items
        lines = "".join(f"<li>{escape(p)}</li>" for p in self.problems)
        return [("problems", "Problems", f'<ul class="problem">{lines}</ul>'), *self.items]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise Missing(f"no {path.name}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Missing(f"{path.name} is unreadable ({err})") from None


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        data = _read_json(path)
    except Missing:
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------ run page


def _stat(summary: dict[str, Any], key: str) -> str:
    s = summary.get(key) or {}
    return f"{float(s['mean']):.2f}±{float(s['std']):.2f}" if "mean" in s else "-"


def _recall(run_dir: Path, meta: dict[str, Any], refs: list[references.Reference]) -> str:
    path = run_dir / "results.json"
    if not path.is_file():
        status = meta.get("status", "unknown")
        error = f": {meta['error']}" if meta.get("error") else ""
        raise Missing(f"no results.json: the run has not finished (status {status}{error})")
    res = _read_json(path)
    summary, students = res.get("summary") or {}, res.get("students") or []
    head = ["", *COLUMNS]
    rows = [[f"mean±std over {len(students)} students", *(_stat(summary, c) for c in COLUMNS)]]
    per = [
        [f"student {s.get('student', i)} (seed {s.get('seed', '?')})"]
        + [f"{float(s[c]):.2f}" if c in s else "-" for c in COLUMNS]
        for i, s in enumerate(students)
    ]
    protocol = res.get("protocol") or {}
    shown = ", ".join(f"{k}={v}" for k, v in protocol.items() if k != "name")
    return (
        _table(head, rows)
        + f"<details><summary>every student</summary>{_table(head, per)}</details>"
        + f'<p class="note">test split, recall in %. Protocol: {escape(shown)}</p>'
        + references.html(refs, run_dir)
    )


def _curves(run_dir: Path, problems: list[str], refs: list[references.Reference]) -> str:
    path = run_dir / metrics.FILE
    if not path.is_file():
        raise Missing(f"no {metrics.FILE}: this run recorded no curves")
    records, damaged = metrics.read(path)
    problems.extend(damaged)
    if not records:
        raise Missing(f"{metrics.FILE} holds no readable record")
    lines = references.lines(refs, _optional_json(run_dir / "results.json"))
    figs = curves.figures(metrics.series(records), references.method_family(run_dir), lines)
    if not figs:
        raise Missing(f"{metrics.FILE} holds no numeric values to plot")
    parts = []
    for fig in figs:
        parts.append(f"<h3>{escape(fig.title)}</h3>{_img(fig.png, alt=fig.text)}")
        parts.append(f'<p class="note">{escape(fig.text)}</p>')
        notes = "".join(f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in fig.notes)
        parts.append(f'<ul class="note">{notes}</ul>' if notes else "")
    return "".join(parts)


@dataclass
class _Held:
    """What the distill job already holds (so its page costs no re-encoding)."""

    cfg: DictConfig | None = None
    pairs: PairSet | None = None
    encoder: Encoder | None = None
    train: RealSplit | None = None
    train_images: ImageTextSplit | None = None

    def load(self, run_dir: Path, device: str) -> None:
        """Read what is missing from the run folder (config, set, training split)."""
        if self.cfg is None:
            self.cfg = run_config(run_dir)
        if self.pairs is None:
            if not (run_dir / "distilled.safetensors").is_file():
                raise Missing("no distilled.safetensors: nothing was distilled in this run")
            self.pairs = PairSet.load(run_dir / "distilled")
        if self.train is None:
            try:
                self.encoder, self.train, self.train_images = real_train(self.cfg, run_dir, device)
            except UserError as err:
                raise Missing(f"the training split cannot be read back ({err})") from None


def _distilled_set(held: _Held, run_dir: Path, limit: int, device: str) -> str:
    held.load(run_dir, device)
    assert held.cfg is not None and held.pairs is not None and held.train is not None
    entries = set_entries(
        held.cfg, held.pairs, held.encoder, held.train, held.train_images, max(1, limit)
    )
    photo = any(e.image_note for e in entries)
    cols = math.ceil(math.sqrt(len(entries)))
    figures = []
    for i, e in enumerate(entries):
        data, kind = _encode(e.image, photo)
        img = _img(data, kind, alt=f"pair {i}", css="" if photo else "px")
        cos = "" if e.caption_cos >= 0.995 else f" <span class=n>(cos {e.caption_cos:.2f})</span>"
        note = f'<br><span class="n">{escape(e.image_note)}</span>' if e.image_note else ""
        figures.append(
            f'<figure>{img}<figcaption><span class="n">{i}</span> {escape(e.caption)}{cos}'
            f"{note}</figcaption></figure>"
        )
    n = len(held.pairs)
    shown = f"the first {len(entries)} of {n} pairs" if len(entries) < n else f"all {n} pairs"
    how = (
        "each synthetic image feature shown as its nearest real training image"
        if photo
        else "the synthetic images themselves (de-normalised)"
    )
    note = (
        f"{shown}; {how}; each caption is the nearest real training caption to the "
        "synthetic text (its cosine when below 1)."
    )
    grid = f'<div class="grid" style="grid-template-columns:repeat({cols},minmax(0,150px))">'
    return f'<p class="note">{escape(note)}</p>{grid}{"".join(figures)}</div>'


def _similarity(held: _Held) -> str | None:
    if held.pairs is None or held.pairs.similarity is None:
        return None
    kind = held.pairs.similarity_args.get("kind", "learned")
    png = heatmap_png(held.pairs, HEATMAP_LIMIT)
    return _img(png, alt=f"{kind} target similarity") + (
        '<p class="note">the learned target similarity / correspondence matrix that every '
        "student trains against (rows: images, columns: texts).</p>"
    )


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def _timings(run_dir: Path, meta: dict[str, Any], held: _Held) -> str:
    if not meta:
        raise Missing("no readable meta.json")
    timings = meta.get("timings") or {}
    rows = [[escape(k), _seconds(float(v))] for k, v in timings.items()]
    rows.append(["<b>total</b>", f"<b>{_seconds(sum(float(v) for v in timings.values()))}</b>"])
    cost: list[list[str]] = []
    results = _optional_json(run_dir / "results.json")
    pairs_meta = held.pairs.meta if held.pairs is not None else {}
    if "seconds_per_step" in pairs_meta:
        cost.append(["distillation step", f"{1000 * float(pairs_meta['seconds_per_step']):.1f} ms"])
    if "seconds_per_iteration" in pairs_meta:
        per = float(pairs_meta["seconds_per_iteration"])
        cost.append(["distillation iteration", f"{per:.3f} s"])
    stored = run_dir / "distilled.safetensors"
    if stored.is_file():
        cost.append(["distilled set on disk", f"{stored.stat().st_size / 1e6:.2f} MB"])
    if results.get("pairs") and results.get("train_pairs"):
        share = 100 * int(results["pairs"]) / int(results["train_pairs"])
        cost.append(
            [
                "pairs / training pairs",
                f"{results['pairs']} / {results['train_pairs']} ({share:.2g}%)",
            ]
        )
    cost += _cost_rows(results.get("cost"))
    cost.append(["device", escape(f"{meta.get('device')} ({meta.get('device_name')})")])
    git = meta.get("git") or {}
    sha = str(git.get("sha") or "?")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    cost.append(["commit", escape(sha)])
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    return (
        _table(["stage", "wall"], rows)
        + _table(["cost", ""], cost)
        + f'<p class="note">{escape(versions)}</p>'
    )


def _cost_rows(block: Any) -> list[list[str]]:
    """The results' cost block (bytes per part, budget in pairs, buffers, device-hours,
    peaks) as rows; none for results written before it existed."""
    if not isinstance(block, dict):
        return []
    parts = block.get("bytes_parts") or {}
    rows = [
        [
            "stored bytes",
            escape(
                f"{block.get('bytes')} ("
                + ", ".join(f"{k} {v}" for k, v in parts.items() if v)
                + f") = {block.get('pairs_equiv')} pairs of {block.get('pair_bytes')} bytes"
            ),
        ]
    ]
    if block.get("buffer_bytes") is not None:
        rows.append(["expert buffers used", f"{float(block['buffer_bytes']) / 1e6:.2f} MB"])
    rows.append(["device-hours (to scoring)", escape(str(block.get("device_hours")))])
    peaks = [("host RSS", "peak_rss_mib"), ("largest child", "peak_rss_children_mib")]
    peaks.append(("GPU", "peak_gpu_mib"))
    shown = [f"{name} {block[k]:.0f} MiB" for name, k in peaks if block.get(k) is not None]
    if shown:
        rows.append(["peak memory", escape(", ".join(shown))])
    return rows


def _config(run_dir: Path) -> str:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise Missing("no .hydra/config.yaml")
    text = f"<pre>{escape(saved.read_text())}</pre>"
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        text = f"<p>overrides:</p><pre>{escape(overrides.read_text())}</pre>" + text
    return text


def _title(run_dir: Path, meta: dict[str, Any]) -> str:
    res = _optional_json(run_dir / "results.json")
    if res:
        what = "full data" if res.get("verb") == "train" else res.get("method", "?")
        return f"{what} · {res.get('pairs', '?')} pairs · {res.get('dataset', '?')}"
    return f"{meta.get('verb', 'run')} · {run_dir.name}"


def run_report(
    run_dir: Path,
    cfg: DictConfig | None = None,
    pairs: PairSet | None = None,
    encoder: Encoder | None = None,
    train: RealSplit | None = None,
    train_images: ImageTextSplit | None = None,
    out: Path | None = None,
    max_images: int = 256,
    device: str = "cpu",
) -> Page:
    """Write one run's page (default `<run>/report.html`); the job passes what it holds."""
    run_dir = Path(run_dir)
    out = Path(out or run_dir / PAGE)
    held = _Held(cfg, pairs, encoder, train, train_images)
    sections = _Sections(run_dir)
    meta: dict[str, Any] = {}
    try:
        meta = _read_json(run_dir / "meta.json")
    except Missing as err:
        sections.problems.append(f"{run_dir}: {err}")
    refs: list[references.Reference] = []
    try:
        refs = references.find(run_dir)
    except Exception as err:  # a strange tree around the run costs the references only
        sections.problems.append(
            f"{run_dir}: references not searched ({type(err).__name__}: {err})"
        )
    sections.add("recall", "Recall", lambda: _recall(run_dir, meta, refs))
    sections.add("curves", "Curves", lambda: _curves(run_dir, sections.problems, refs))
    distilled = held.pairs is not None or (run_dir / "distilled.safetensors").is_file()
    if distilled or meta.get("verb") == "distill":
        sections.add(
            "set", "Distilled set", lambda: _distilled_set(held, run_dir, max_images, device)
        )
        sections.add("similarity", "Similarity", lambda: _similarity(held))
    sections.add("cost", "Timings and cost", lambda: _timings(run_dir, meta, held))
    sections.add("config", "Config", lambda: _config(run_dir))
    finished = (run_dir / "results.json").is_file()
    state = "finished" if finished else f"status {meta.get('status', '?')}"
    sub = escape(
        f"{references.shown_path(run_dir)} · {meta.get('verb', '?')} · {state} · "
        f"seed {meta.get('seed', '?')} · "
        f"started {meta.get('started', '?')}"
    )
    io.write_text(out, _document(_title(run_dir, meta), sub, sections.finish()))
    return Page(out, sections.problems)


# ---------------------------------------------------------------------------- sweep page


def _html_table(table: tables.Table) -> str:
    """The paper layout, methods x budgets with TR/IR@1/5/10 and r_mean, best in bold, as one
    table per budget: they sit side by side where the page has room and wrap below where it
    has not (a single wide table hid its last budgets past the page's edge), and each scrolls
    sideways on a screen narrower than itself."""
    blocks = "".join(f'<div class="wide">{_budget_table(table, [b])}</div>' for b in table.budgets)
    return f'<div class="budgets">{blocks}</div>'


def _budget_table(table: tables.Table, budgets: list[tuple[str, float]]) -> str:
    """The rows of `table` at `budgets`, one column group per budget."""
    lead = ["Method", "Draws"] + (["Setting"] if table.has_setting else [])
    k = len(tables.METRICS)
    top = "".join(f'<th class=l rowspan="2">{escape(h)}</th>' for h in lead)
    top += "".join(f'<th colspan="{k}">{escape(table.budget_label(b))}</th>' for b in budgets)
    sub = "".join(f"<th>{escape(m)}</th>" for m in tables.METRICS) * len(budgets)
    rows = []
    markers = table.markers()
    for row in table.rows:
        cells = [table.label(row), table.draws(row)]
        cells += [table.setting(row)] if table.has_setting else []
        html_cells = "".join(f"<td class=l>{escape(c)}</td>" for c in cells)
        for b in budgets:
            mark = f"<sup>{markers[(row, b)]}</sup>" if (row, b) in markers else ""
            for m in tables.METRICS:
                text = escape(tables.fmt(table.cell(row, b), m))
                best = table.best(b, m)
                cell = table.cell(row, b)
                bold = (
                    best is not None
                    and row[0] != tables.FULL
                    and cell is not None
                    and round(cell.stat(m)[0], 1) == round(best, 1)
                )
                html_cells += f"<td>{'<b>' + text + '</b>' if bold else text}{mark}</td>"
        rows.append(f"<tr>{html_cells}</tr>")
    notes = "".join(
        f'<p class="note"><sup>{markers[(row, b)]}</sup> {escape(text)}</p>'
        for row, b, text in table.notes()
        if b in budgets
    )
    return f"<table><tr>{top}</tr><tr>{sub}</tr>{''.join(rows)}</table>{notes}"


def _settings(table: tables.Table) -> str:
    """Every row's full settings (protocol and method), which the table itself leaves out."""
    items = []
    for row in table.rows:
        text = "\n".join(f"{k}={v}" for k, v in row[1])
        items.append(
            f"<details><summary>{escape(table.label(row))}</summary><pre>{escape(text)}</pre></details>"
        )
    return "".join(items)


def _plot(table: tables.Table) -> bytes:
    buffer = stdio.BytesIO()
    table_files.plot(table, buffer)
    return buffer.getvalue()


def find_runs(folder: Path) -> list[Path]:
    """Run folders below `folder`: those with meta.json, results.json or a Hydra `.hydra/`."""
    found = set()
    for marker in ("meta.json", "results.json", ".hydra"):
        for path in folder.rglob(marker):
            if path.parent != folder and path.parent.name != ".hydra":
                found.add(path.parent)
    return sorted(found)


def sweep_report(
    folder: Path, out: Path | None = None, max_images: int = 256, device: str = "cpu"
) -> Page:
    """The sweep's page, building the page of every finished run that has none yet."""
    folder = Path(folder)
    out = Path(out or folder / PAGE)
    sections = _Sections(folder)
    runs = find_runs(folder)
    if not runs:  # a page that says nothing would pass for a report
        raise UserError(
            f"{folder}: no runs here (no folder with meta.json, results.json or .hydra/); "
            "give a run folder or a sweep folder"
        )
    listing = []
    for run in runs:
        meta = _optional_json(run / "meta.json")
        res = _optional_json(run / "results.json")
        page = run / PAGE
        if not res:
            why = meta.get("error") or f"status {meta.get('status', 'unknown: no meta.json')}"
            sections.problems.append(f"{run}: no results.json ({why})")
        elif not page.is_file():
            built = run_report(run, max_images=max_images, device=device)
            sections.problems.extend(built.problems)
        link = os.path.relpath(page, out.parent)
        name = escape(str(run.relative_to(folder)))
        cell = f'<a href="{escape(link)}">{name}</a>' if page.is_file() else name
        r_mean = _stat(res.get("summary") or {}, "r_mean") if res else "-"
        listing.append(
            [
                cell,
                escape(str(res.get("method", "full data" if res.get("verb") == "train" else "-"))),
                escape(str(res.get("pairs", "-"))),
                escape(str(res.get("seed", meta.get("seed", "-")))),
                r_mean,
                escape(str(meta.get("status", "-"))),
            ]
        )

    def table_sections() -> str:
        try:
            results, problems = tables.collect([folder])
            built = tables.build(results, problems)
        except UserError as err:  # no usable results, or a seed twice: said, not tabled
            raise Missing(str(err)) from None
        sections.problems.extend(w for w in built.warnings if w.startswith("skipped"))
        warnings = [w for w in built.warnings if not w.startswith("skipped")]
        notes = "".join(f'<p class="note">{escape(w)}</p>' for w in warnings)
        return (
            f'<p class="note">mean±std over students; {escape(built.pooling())}; best method '
            f"per column in bold. Shared protocol: {escape(tables.protocol_line(built))}</p>"
            + _html_table(built)
            + notes
            + "<h3>Recall against pairs</h3>"
            + _img(_plot(built), alt="r_mean against the number of pairs")
            + "<h3>Full settings of each row</h3>"
            + _settings(built)
        )

    if runs:
        sections.add("table", "Retrieval recall (%)", table_sections)
    if listing:
        head = ["run", "method", "pairs", "seed", "r_mean", "status"]
        sections.add("runs", "Runs", lambda: _table(head, listing, left=2))
    sub = escape(f"{references.shown_path(folder)} · {len(runs)} runs")
    io.write_text(out, _document(f"sweep {folder.name}", sub, sections.finish()))
    return Page(out, sections.problems)


def folder_report(
    folder: Path, out: Path | None = None, max_images: int = 256, device: str = "cpu"
) -> Page:
    """A run folder gets a run page; any other folder is read as a sweep of runs."""
    folder = Path(folder)
    if any((folder / m).exists() for m in ("meta.json", "results.json", ".hydra")):
        return run_report(folder, out=out, max_images=max_images, device=device)
    return sweep_report(folder, out=out, max_images=max_images, device=device)
