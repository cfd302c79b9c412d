"""`mmdistill table <folder>...`: every results.json below the folders, in the papers' layout.

Rows are methods, split further by every protocol switch that differs between runs (dataset,
encoder, noise, the student recipe, method hyper-parameters), so results that are not comparable
never share a row; column groups are budgets (pairs, with the compression ratio when the training
set size is known); cells are TR/IR@1/5/10 and r_mean as mean±std over every student of every
seed. A budget is bytes (those of N plain float32 pairs): a cell whose sets hold another number
of pairs in them (int8 rows, LoRS's pairs + S) gets a note with the count and storage, and sets
of different storage never share a row. Writes table.md, table.csv (one line per row and
budget), table.tex and recall_vs_pairs.png, and prints one rich table per budget. Unreadable
files are skipped with one line each.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdistill.config import NEUTRAL
from mmdistill.errors import UserError
from mmdistill.methods import presets
from mmdistill.report import stored
from mmdistill.training import cost

METRICS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean")
FULL = "full data"
# Eval keys that do not split columns: the neutral ones (config.NEUTRAL), and the protocol's
# label and student count (a row reports its students' mean and spread).
NEUTRAL_PROTOCOL = ("name", "students") + tuple(
    k.split(".", 1)[1] for k in NEUTRAL if k.startswith("eval.")
)


@dataclass
class Result:
    """One readable results.json: its row identity, budget and per-student recalls."""

    path: Path
    method: str
    switches: dict[str, str]
    budget: tuple[str, float]  # ("pairs", n) | ("ratio", r) | ("full", 0)
    pairs: int
    train_pairs: int | None
    seed: int
    students: list[dict[str, float]]
    mtime: float
    commit: str | None = None  # the git commit (+ "-dirty") the run's meta.json records
    data: dict[str, Any] = field(default_factory=dict)  # the whole results.json

    def number(self, column: str) -> float | None:
        """The value at a dotted path of results.json (`cost.bytes`), None where it has none
        (results written before the field existed)."""
        value: Any = self.data
        for key in column.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if _is_number(value) else None

    transfer: dict | None = None  # how `evaluate encoder=<other>` converted the set, if it did
    storage: str | None = None  # how the set keeps its rows (report.stored), None: not recorded

    @property
    def row(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.method, tuple(sorted(self.switches.items()))


@dataclass
class Cell:
    """Students of every seed of one row at one budget."""

    results: list[Result] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [float(s[metric]) for r in self.results for s in r.students]

    def stat(self, metric: str) -> tuple[float, float]:
        v = self.values(metric)
        mean = sum(v) / len(v)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))

    def mean(self, column: str) -> float | None:
        """A results.json field averaged over the cell's runs (seeds) that record it."""
        v = [x for r in self.results if (x := r.number(column)) is not None]
        return sum(v) / len(v) if v else None

    @property
    def pairs(self) -> int:
        return round(sum(r.pairs for r in self.results) / len(self.results))

    @property
    def stored(self) -> list[int]:
        """Every pair count the cell's sets hold (one, unless its seeds differ)."""
        return sorted({r.pairs for r in self.results})

    @property
    def storages(self) -> list[str]:
        """Every storage its sets record (float32 and not recorded may share a row)."""
        return sorted({r.storage for r in self.results if r.storage})

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.results})

    @property
    def n_students(self) -> int:
        return sum(len(r.students) for r in self.results)


@dataclass
class Table:
    rows: list[tuple[str, tuple[tuple[str, str], ...]]]
    budgets: list[tuple[str, float]]
    cells: dict[tuple, Cell]
    shared: dict[str, str]  # protocol switches every row agrees on
    varying: list[str]  # protocol switches that differ between rows
    method_shared: dict[str, dict[str, str]]  # per method: hyper-parameters its rows agree on
    method_varying: dict[str, list[str]]  # per method: hyper-parameters that differ
    warnings: list[str]
    columns: tuple[str, ...] = METRICS  # what each budget shows (`--columns`)

    def label(self, row: tuple) -> str:
        if row[0] == FULL:
            return f"{FULL} ({self.cells[(row, ('full', 0))].pairs} pairs)"
        return row[0]

    def pooling(self) -> str:
        """How many seeds and students each cell pools, for the table's caption."""
        shapes = {(len(c.seeds), c.n_students) for c in self.cells.values()}
        if len(shapes) == 1:
            seeds, students = shapes.pop()
            return f"each cell pools {students} students over {seeds} draw(s) (seeds)"
        return "cells pool different numbers of draws (seeds) and students (see table.csv)"

    def draws(self, row: tuple) -> str:
        """How many seeds (selection / init draws) the row's cells pool: "5", or "1-5"."""
        counts = sorted({len(c.seeds) for (r, _), c in self.cells.items() if r == row})
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"

    def setting(self, row: tuple) -> str:
        sw = dict(row[1])
        keys = self.varying + self.method_varying.get(row[0], [])
        return ", ".join(f"{k}={sw.get(k, '-')}" for k in keys)

    @property
    def has_setting(self) -> bool:
        return bool(self.varying or any(self.method_varying.values()))

    def cell(self, row: tuple, budget: tuple) -> Cell | None:
        """A full-data row has one cell; it is shown under every budget as the bar to reach."""
        if row[0] == FULL:
            return self.cells.get((row, ("full", 0)))
        return self.cells.get((row, budget))

    def budget_label(self, budget: tuple) -> str:
        kind, value = budget
        if kind == "full":
            return "full data"
        column = [c for (row, b), c in self.cells.items() if b == budget]
        if kind == "ratio":
            pairs = {c.pairs for c in column}
            extra = f" ({pairs.pop()} pairs)" if len(pairs) == 1 else ""
            return f"ratio {value:g}{extra}"
        train = {r.train_pairs for c in column for r in c.results}
        extra = ""
        if len(train) == 1 and None not in train:
            extra = f" ({percent(100 * value / train.pop())})"
        return f"{int(value)} pairs{extra}"

    def notes(self) -> list[tuple[tuple, tuple, str]]:
        """(row, budget, text) of every cell whose sets hold other than its column's plain
        float32 pairs, in reading order; a cell's marker is its place in this list + 1."""
        out = []
        for row in self.rows:
            for b in self.budgets:
                c = self.cells.get((row, b))
                if row[0] == FULL or c is None or not stored.differs(c.stored, c.storages, b):
                    continue
                name = self.label(row) + (f" ({self.setting(row)})" if self.setting(row) else "")
                where = self.budget_label(b)
                text = stored.note(c.stored, c.storages, b, where)
                out.append((row, b, f"{name} at {where}: {text}"))
        return out

    def markers(self) -> dict[tuple, str]:
        """(row, budget) -> the footnote number its cells carry."""
        return {(row, b): str(i) for i, (row, b, _) in enumerate(self.notes(), 1)}

    def best(self, budget: tuple, metric: str) -> float | None:
        """The highest mean among method rows (full data excluded), for bold face."""
        means = [
            self.cells[(row, budget)].stat(metric)[0]
            for row in self.rows
            if row[0] != FULL and (row, budget) in self.cells
        ]
        return max(means) if len(means) > 1 else None


def percent(p: float) -> str:
    """Two significant digits, never in exponent form: 2.9%, 14%, 100%."""
    text = f"{p:.2g}"
    return f"{p:.0f}%" if "e" in text else f"{text}%"


# ------------------------------------------------------------------------------------ reading


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)


def _method_config(run_dir: Path) -> dict[str, Any]:
    """The method's hyper-parameters as the run saw them (.hydra/config.yaml), if saved."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return {}
    import yaml
    from omegaconf import OmegaConf

    try:
        raw = yaml.safe_load(saved.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"its .hydra/config.yaml is not readable ({type(err).__name__})") from None
    method = raw.get("method") if isinstance(raw, dict) else None
    if not isinstance(method, dict):
        return {}
    try:
        method = OmegaConf.to_container(OmegaConf.create(raw).method, resolve=True)
    except Exception:  # an interpolation this process cannot resolve: keep the raw text
        pass
    return {k: v for k, v in method.items() if k != "name"}


def read_result(path: Path) -> Result:
    """Parse one results.json; a ValueError says in one line why it cannot be used."""
    try:
        return _read_result(path)
    except (TypeError, AttributeError, KeyError) as err:  # a field of the wrong kind
        raise ValueError(f"a field has the wrong type ({type(err).__name__}: {err})") from None


def _read_result(path: Path) -> Result:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError("not a results object")
    students = data.get("students")
    if not isinstance(students, list) or not students:
        raise ValueError("no per-student recalls ('students' missing or empty)")
    for k, s in enumerate(students):
        bad = [m for m in METRICS if not isinstance(s, dict) or not _is_number(s.get(m))]
        if bad:
            raise ValueError(f"a student lacks numeric {', '.join(bad)}")
        wrong = [f"{m}={s[m]}" for m in METRICS if not 0 <= s[m] <= 100]
        if wrong:
            raise ValueError(f"student {k} has recalls outside [0, 100] ({', '.join(wrong)})")
    for key in ("verb", "method", "pairs", "dataset", "encoder"):
        if key not in data:
            raise ValueError(f"'{key}' missing")
    verb, method = str(data["verb"]), str(data["method"])
    if verb != "train" and method not in presets():  # a label no method made is not tabled
        raise ValueError(f"method {method!r} is none of mmdistill's")
    switches = {"dataset": str(data["dataset"]), "encoder": str(data["encoder"])}
    noise = data.get("noise") or {"name": "none"}
    switches["noise"] = str(noise.get("name", "none"))
    if noise.get("name", "none") != "none":
        switches["noise"] += f"@{noise.get('ratio')}"
    protocol = dict(data.get("protocol") or {})
    if protocol.get("selection", "final") == "final":
        protocol.pop("eval_every", None)  # only matters when checkpoints are selected
    for k in NEUTRAL_PROTOCOL:
        protocol.pop(k, None)
    _flatten("eval", protocol, switches)
    if verb == "train":
        method, budget = FULL, ("full", 0)
    else:
        _flatten("method", _method_config(path.parent), switches)
        if verb != "distill":
            switches["verb"] = verb
        b = data.get("budget") or {}
        ratio = b.get("ratio") if isinstance(b, dict) else None
        # The requested budget, not the pairs distilled: LoRS's 99 pairs + S and MDW's N pairs +
        # P are 100-pair entries, as the papers count them.
        asked = b.get("pairs") if isinstance(b, dict) else None
        if asked is None and isinstance(data.get("transfer"), dict):  # the source set's budget
            asked = data["transfer"].get("budget")
        budget = (
            ("ratio", float(ratio)) if ratio is not None else ("pairs", int(asked or data["pairs"]))
        )
    transfer = data.get("transfer")
    if transfer is not None:  # the same set read by another encoder: its own rows
        if not isinstance(transfer, dict) or "source_encoder" not in transfer:
            raise ValueError("'transfer' is not a conversion record")
        switches["source_encoder"] = str(transfer["source_encoder"])
        switches["transfer.texts"] = str(transfer.get("texts_mode", "auto"))
    train_pairs = data.get("train_pairs")
    storage = stored.storage_of(path.parent, data) if verb != "train" else None
    if storage not in (None, stored.PLAIN):  # its own rows: never pooled with plain sets
        switches["storage"] = storage
    return Result(
        path=path,
        method=method,
        switches=switches,
        budget=budget,
        pairs=int(data["pairs"]),
        train_pairs=int(train_pairs) if train_pairs is not None else None,
        seed=int(data.get("seed", 0)),
        students=students,
        mtime=path.stat().st_mtime,
        commit=_commit(path.parent / "meta.json"),
        data=data,
        transfer=transfer,
        storage=storage,
    )


def _commit(meta: Path) -> str | None:
    """The short commit a run folder's meta.json records, "-dirty" when uncommitted changes
    ran; None when it is missing or unreadable (the table still uses the results)."""
    try:
        git = json.loads(meta.read_text()).get("git") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    sha = git.get("sha") if isinstance(git, dict) else None
    if not sha:
        return None
    return str(sha)[:7] + ("-dirty" if git.get("dirty") else "")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def collect(folders: list[Path]) -> tuple[list[Result], list[str]]:
    """Every readable results.json below the folders, and one line per problem found."""
    results, problems = [], []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; give sweep or run folders")
        found = sorted(folder.rglob("results.json"))
        if not found:
            problems.append(f"warning: no results.json under {folder}")
        for path in found:
            try:
                results.append(read_result(path))
            except ValueError as err:
                problems.append(f"skipped {path}: {err}")
    if not results:
        where = ", ".join(str(f) for f in folders)
        why = [p for p in problems if p.startswith("skipped")]
        more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
        raise UserError(
            f"no readable results.json under {where}"
            + (f": {why[0]}{more}" if why else "")
            + "; point at sweep or run folders of finished `mmdistill distill` / `train` runs"
        )
    return results, problems


def method_rank(method: str) -> tuple[int, str]:
    """The papers' order (coresets, then distillation methods: the presets' order, by family);
    unknown names alphabetically after them, full data last."""
    order = presets()
    if method == FULL:
        return len(order) + 1, method
    if method in order:
        return order.index(method), method
    return len(order), method


def build(
    results: list[Result], problems: list[str] | None = None, columns: tuple[str, ...] = METRICS
) -> Table:
    """Group results into rows x budgets (a seed twice is refused), name the switches that vary."""
    warnings = list(problems or [])
    by_seed: dict[tuple, Result] = {}
    for r in sorted(results, key=lambda r: r.mtime):
        key = (r.row, r.budget, r.seed)
        if key in by_seed:  # which one counts is not ours to guess
            raise UserError(
                f"{r.path} repeats {r.method} seed {r.seed} of {by_seed[key].path} (same "
                "settings and budget); move one of them out of the folders tabled"
            )
        by_seed[key] = r
    commits = sorted({r.commit for r in by_seed.values() if r.commit})
    if len(commits) > 1:
        warnings.append(
            f"warning: the results come from {len(commits)} commits ({', '.join(commits)}); a "
            "sweep relaunched after a code change keeps its finished jobs, so re-run them into a "
            "new folder before comparing rows"
        )
    cells: dict[tuple, Cell] = defaultdict(Cell)
    for r in by_seed.values():
        cells[(r.row, r.budget)].results.append(r)
    for cell in cells.values():
        cell.results.sort(key=lambda r: r.seed)
    rows = sorted({r.row for r in by_seed.values()}, key=lambda row: (*method_rank(row[0]), row[1]))
    shared, varying = _split_switches(rows, lambda k: not _is_method_switch(k))
    for k in varying:
        values = sorted({dict(row[1]).get(k, "-") for row in rows})
        warnings.append(
            f"warning: results differ in {k} ({', '.join(values)}); kept as separate rows, "
            "compare only rows that agree"
        )
    # Methods have different hyper-parameters: compare them only among one method's rows.
    method_shared, method_varying = {}, {}
    for method in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == method]
        method_shared[method], method_varying[method] = _split_switches(mine, _is_method_switch)
        for k in method_varying[method]:
            values = sorted({dict(row[1]).get(k, "-") for row in mine})
            warnings.append(
                f"warning: {method} runs differ in {k} ({', '.join(values)}); kept as separate rows"
            )
    budgets = sorted({b for (_, b) in cells if b[0] != "full"}) or [("full", 0)]
    return Table(
        rows,
        budgets,
        dict(cells),
        shared,
        varying,
        method_shared,
        method_varying,
        warnings,
        columns,
    )


def _is_method_switch(key: str) -> bool:
    """Compared only among one method's rows: its hyper-parameters, and its storage (sets of
    other methods in other storage at the same bytes are the comparison a table is for)."""
    return key.startswith("method.") or key == "storage"


def _split_switches(rows: list[tuple], wanted: Any) -> tuple[dict[str, str], list[str]]:
    """Switches (those `wanted` picks) the rows agree on, and those that differ."""
    keys = sorted({k for row in rows for k, _ in row[1] if wanted(k)})
    shared, varying = {}, []
    for k in keys:
        values = {dict(row[1]).get(k, "-") for row in rows}
        if len(values) == 1:
            shared[k] = values.pop()
        else:
            varying.append(k)
    return shared, varying


# ------------------------------------------------------------------------------------ writing


def fmt(cell: Cell | None, metric: str) -> str:
    """A cell's text: a recall as mean±std over students, any other column as the mean over
    the cell's runs in its own unit (blank where no run records it)."""
    if cell is None:
        return "-"
    if metric not in METRICS:
        value = cell.mean(metric)
        return "" if value is None else COLUMN_FORMATS[metric.split(".")[1]](value)
    mean, std = cell.stat(metric)
    return f"{mean:.1f}±{std:.1f}"


def _bytes(n: float) -> str:
    """Bytes in decimal units, three significant digits: 936 B, 3.83 kB, 66.6 MB, 2.5 TB."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = 0
    while n >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.3g} {units[power]}"


# How a cost column prints, by its field (`cost.<field>` or `cost.<field>.<part>`); every
# field of training.cost.FIELDS and GROUPS has one (tests/test_tables.py checks).
COLUMN_FORMATS = {
    "bytes": _bytes,
    "bytes_parts": _bytes,
    "pair_bytes": _bytes,
    "buffer_bytes": _bytes,
    "pairs_equiv": "{:.2f}".format,
    "wall_s": "{:.1f}".format,
    "stages_s": "{:.1f}".format,
    "devices": "{:.0f}".format,
    "device_hours": "{:.4f}".format,
    "peak_rss_mib": "{:.0f}".format,
    "peak_rss_children_mib": "{:.0f}".format,
    "peak_gpu_mib": "{:.0f}".format,
}


def parse_columns(text: str) -> tuple[str, ...]:
    """`--columns r_mean,cost.bytes,...`: recall metrics and cost fields, checked by name."""
    columns = tuple(c.strip() for c in text.split(",") if c.strip())
    choices = [
        *METRICS,
        *(f"cost.{f}" for f in cost.FIELDS),
        *(f"cost.{g}.<name>" for g in cost.GROUPS),
    ]
    for c in columns:
        parts = c.split(".")
        known = c in METRICS or (
            parts[0] == "cost"
            and (
                (len(parts) == 2 and parts[1] in cost.FIELDS)
                or (len(parts) == 3 and parts[1] in cost.GROUPS)
            )
        )
        if not known:
            raise UserError(f"unknown table column {c!r}; choose from {', '.join(choices)}")
    if not columns:
        raise UserError("--columns is empty; give e.g. --columns r_mean,cost.bytes")
    return columns


def protocol_line(table: Table) -> str:
    return ", ".join(f"{k}={v}" for k, v in table.shared.items())


def method_line(table: Table) -> str:
    """Where each method's own hyper-parameters are, when any method has some: the rows'
    Setting column shows what differs between rows; every value is in table.csv (protocol)
    and the sweep's report.html (a full listing would run to thousands of characters)."""
    methods = [m for m, params in table.method_shared.items() if params]
    if not methods:
        return ""
    return (
        f"{', '.join(methods)} hyper-parameters in full: table.csv (protocol column) and "
        "`mmdistill report`"
    )
