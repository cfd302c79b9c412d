"""Reference rows for a run page: random pairs at the run's budget, and full data.

A recall alone does not say whether a method helped: a reader asks whether it beat random pairs
of the same budget and how far it sits below students trained on every real pair. Those runs
are often on disk already, beside this one (a sweep's `method=random` jobs, a `train` run under
`outputs/train/`). This module finds them in the folder tree around a run and pools their
students as the table does (`tables.read_result`, `tables.Cell`). Only runs that share the run's
dataset, training-set size, encoder, noise and evaluation protocol count: a reference from
another setting would mislead more than no reference.

It also names folders for a page without an absolute path (`shown_path`): a shared page should
not carry its author's home directory and disk layout.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from html import escape
from pathlib import Path

from mmdistill.report.html import table
from mmdistill.report.recall import COLUMNS
from mmdistill.report.tables import FULL, Cell, Result, read_result

VERBS = ("distill", "train", "evaluate", "buffer")  # outputs/<verb>/... (conf/hydra/default.yaml)
MULTIRUN = "multirun"  # outputs/multirun/<verb>/<sweep>/<job>
RANDOM = "random"
UP = 5  # ancestors of a run looked at for its outputs root or its sweep
DOWN = 6  # levels read below the search root: outputs/multirun/distill/<sweep>/<job>/results.json
MAX_FOLDERS = 20_000  # a reference search must stay cheap on a large outputs tree
SKIP = ("checkpoints",)  # folders that never hold a run
SAME = ("dataset", "encoder", "noise")  # + every eval.* switch and the training-set size


@dataclass
class Reference:
    """One reference row: what it is and the runs (one per seed) whose students it pools."""

    kind: str  # "random" | "full"
    label: str  # "random at 100 pairs", "full data (300 pairs)"
    cell: Cell

    @property
    def folders(self) -> list[Path]:
        return [r.path.parent for r in self.cell.results]


def outputs_root(path: Path) -> Path | None:
    """The outputs folder `path` lies in, recognised by the run-folder layout
    (`<root>/<verb>/...` or `<root>/multirun/<verb>/...`); None outside that layout."""
    path = Path(path).absolute()
    for up in list(path.parents)[:UP]:
        first = path.relative_to(up).parts[0]
        if up.name != MULTIRUN and (first in VERBS or first == MULTIRUN):
            return up
    return None


def sweep_root(path: Path) -> Path | None:
    """The sweep folder `path` is a job of (Hydra writes `multirun.yaml` there), if any."""
    for up in list(Path(path).absolute().parents)[:UP]:
        if (up / "multirun.yaml").is_file():
            return up
    return None


def search_root(run_dir: Path) -> Path:
    """Where references are looked for: the outputs root, else the run's sweep, else the
    folder holding the run (its siblings)."""
    run_dir = Path(run_dir).absolute()
    return outputs_root(run_dir) or sweep_root(run_dir) or run_dir.parent


def shown_path(folder: Path) -> str:
    """`folder` as a page names it: relative to the working directory when inside it, else
    from its outputs root (`outputs/distill/...`), else just its name; never absolute."""
    path, cwd = Path(folder).absolute(), Path.cwd()
    if cwd != Path(cwd.anchor) and path != cwd and path.is_relative_to(cwd):
        return path.relative_to(cwd).as_posix()
    root = outputs_root(path)
    if root is not None:
        return (Path(root.name) / path.relative_to(root)).as_posix()
    return path.name


def result_files(root: Path) -> list[Path]:
    """results.json files at most DOWN levels below `root`, breadth first, hidden folders and
    checkpoints skipped, at most MAX_FOLDERS folders read."""
    found: list[Path] = []
    queue: deque[tuple[Path, int]] = deque([(Path(root), 0)])
    read = 0
    while queue and read < MAX_FOLDERS:
        folder, depth = queue.popleft()
        read += 1
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folders hold no reference we could use anyway
            continue
        for e in entries:
            if e.name == "results.json" and e.is_file():
                found.append(Path(e.path))
            elif (
                depth < DOWN
                and e.name[:1] != "."
                and e.name not in SKIP
                and e.is_dir(follow_symlinks=False)
            ):
                queue.append((Path(e.path), depth + 1))
    return sorted(found)


def _setting(r: Result) -> tuple:
    """What a reference must share with the run: data, training-set size, encoder, noise and
    the evaluation protocol (the eval.* switches the table splits rows by)."""
    keep = {k: v for k, v in r.switches.items() if k in SAME or k.startswith("eval.")}
    return tuple(sorted(keep.items())), r.train_pairs


def _candidate(path: Path) -> bool:
    """Whether a results.json is a random or full-data run, read before the full parse
    (which also reads the run's saved config) so a large tree stays cheap."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("verb") == "train" or data.get("method") == RANDOM)


def _kind(r: Result, me: Result) -> str | None:
    if r.method == FULL:
        return "full"
    if r.method == RANDOM and r.data.get("verb") == "distill" and r.budget == me.budget:
        return "random"
    return None


def _budget(budget: tuple[str, float]) -> str:
    kind, value = budget
    return f"ratio {value:g}" if kind == "ratio" else f"{int(value)} pairs"


def find(run_dir: Path) -> list[Reference]:
    """The random and full-data references of the run at `run_dir` (the newest run of each
    seed); none when the run has no readable results.json or the tree holds no match."""
    run_dir = Path(run_dir).absolute()
    try:
        me = read_result(run_dir / "results.json")
    except (ValueError, OSError):
        return []
    by_kind: dict[str, dict[int, Result]] = {"random": {}, "full": {}}
    for path in result_files(search_root(run_dir)):
        if path.parent == run_dir or not _candidate(path):
            continue
        try:
            r = read_result(path)
        except (ValueError, OSError):  # another run's damaged file is not this page's problem
            continue
        kind = _kind(r, me)
        if kind is None or _setting(r) != _setting(me):
            continue
        seeds = by_kind[kind]
        if r.seed not in seeds or r.mtime > seeds[r.seed].mtime:
            seeds[r.seed] = r
    refs = []
    for kind, seeds in by_kind.items():
        if not seeds:
            continue
        cell = Cell(sorted(seeds.values(), key=lambda r: r.seed))
        label = (
            f"random at {_budget(me.budget)}"
            if kind == "random"
            else f"{FULL} ({cell.pairs} pairs)"
        )
        refs.append(Reference(kind, label, cell))
    return refs


def sources(ref: Reference, page_dir: Path) -> list[tuple[str, str | None]]:
    """Each run of a reference as (its folder relative to `page_dir`, the relative link to its
    report.html, or None when it has no page)."""
    out = []
    for folder in ref.folders:
        rel = os.path.relpath(folder, page_dir)
        page = folder / "report.html"
        out.append((rel, os.path.relpath(page, page_dir) if page.is_file() else None))
    return out


def lines(refs: list[Reference], results: dict) -> dict[str, float]:
    """The test r_mean of the run (from its results) and of each reference, for dashed lines
    on its val curve; the run's own line shows how its val and test scales differ. Empty
    without references."""
    mean = ((results.get("summary") or {}).get("r_mean") or {}).get("mean")
    if not refs or not isinstance(mean, int | float):
        return {}
    return {"this run": float(mean), **{r.label: r.cell.stat("r_mean")[0] for r in refs}}


def method_family(run_dir: Path) -> str | None:
    """The method family the run's saved config names (`method.family`), which picks the
    notes of its loss terms; None without a readable config (a `train` run has no method)."""
    import yaml

    try:
        raw = yaml.safe_load((Path(run_dir) / ".hydra" / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    method = raw.get("method") if isinstance(raw, dict) else None
    family = method.get("family") if isinstance(method, dict) else None
    return family if isinstance(family, str) else None


def html(refs: list[Reference], run_dir: Path) -> str:
    """The reference rows under a run's recall table, each naming (and linking) the runs it
    pools; nothing when there is none."""
    if not refs:
        return ""
    line = ", ".join(f"{r.label}: {r.cell.stat('r_mean')[0]:.1f}" for r in refs)
    rows = [
        [escape(r.label), *(f"{m:.2f}±{sd:.2f}" for m, sd in map(r.cell.stat, COLUMNS))]
        for r in refs
    ]
    where = []
    for r in refs:
        links = [
            f'<a href="{escape(link)}">{escape(rel)}</a>' if link else escape(rel)
            for rel, link in sources(r, run_dir)
        ]
        students = f"{r.cell.n_students} students of {len(links)} run(s)"
        where.append(f"<li>{escape(r.label)}, {students}: {', '.join(links)}</li>")
    return (
        f'<h3 id="references">References: {escape(line)}</h3>{table(["", *COLUMNS], rows)}'
        '<p class="note">runs found in this folder tree with the same dataset, training pairs, '
        "encoder, noise and evaluation protocol; mean±std over their students, test split:</p>"
        f'<ul class="note">{"".join(where)}</ul>'
    )
