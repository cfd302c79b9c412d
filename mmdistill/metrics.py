"""A run's curves as a file: `metrics.jsonl`, one JSON record per line, appended as they come.

Every record names its `stream` and `step`, and carries `wall` (seconds since the stream began,
continued across a resume) and `time` (Unix seconds), then its values:

* `method`: the distillation method's loss terms, learned step sizes and `val_r_mean` checks;
* `student/<k>`: evaluation student k's loss and learning rate (and `val_r_mean` where the
  protocol selects checkpoints); `students` for students trained together as one model;
* `expert/<i>`: expert i's loss per logged step and its final `val_r_mean`;
* `forgetting`, `robust/<i>`: the forgetting coreset's student, MDW's dual-track experts.

One file per run keeps the report and the optional loggers (TensorBoard, W&B) reading one
thing. Only the parent process writes: forked evaluation students send their records back with
their results, so lines never interleave. A line is appended and flushed in one write, so a
killed run leaves at most one torn last line, which readers skip with a warning.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE = "metrics.jsonl"
RESERVED = ("stream", "step", "wall", "time")

Sink = Callable[[dict[str, Any]], None]
# Loggers attached to a metrics file: whoever writes that file feeds them.
_SINKS: dict[Path, list[Sink]] = {}


def add_sink(path: Path, sink: Sink) -> None:
    """Send every record written to the metrics file `path` (from now on) to `sink` too."""
    _SINKS.setdefault(Path(path).resolve(), []).append(sink)


def remove_sink(path: Path, sink: Sink) -> None:
    sinks = _SINKS.get(Path(path).resolve(), [])
    if sink in sinks:
        sinks.remove(sink)


class Metrics:
    """Appends records to one `metrics.jsonl`; each also goes to the file's sinks (loggers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._origin: dict[str, float] = {}  # stream -> perf_counter at its (continued) start
        self._previous: dict[str, float] | None = None  # last wall per stream already on disk

    def start(self, stream: str) -> None:
        """Start the stream's clock now (continuing from its last recorded wall, on resume)."""
        if self._previous is None:
            self._previous = {}
            records, _ = read(self.path) if self.path.is_file() else ([], [])
            for r in records:
                wall = r.get("wall")
                if isinstance(wall, int | float) and not isinstance(wall, bool):
                    self._previous[r["stream"]] = float(wall)
        self._origin[stream] = time.perf_counter() - self._previous.get(stream, 0.0)

    def write(self, stream: str, step: int, wall: float | None = None, **values: Any) -> None:
        """Append one record; `wall` defaults to seconds since `start(stream)` (or now)."""
        if wall is None:
            if stream not in self._origin:
                self.start(stream)
            wall = time.perf_counter() - self._origin[stream]
        record = {"stream": stream, "step": int(step), "wall": round(float(wall), 4)}
        record["time"] = round(time.time(), 3)
        record.update({k: _plain(v) for k, v in values.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for sink in _SINKS.get(self.path.resolve(), []):
            sink(record)


def values(record: dict[str, Any]) -> dict[str, float]:
    """A record's numeric, finite values (the curves), without stream, step, wall and time."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in RESERVED
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _plain(value: Any) -> Any:
    """Numbers as floats (tensors and numpy scalars included); anything else unchanged."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def read(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record of a metrics file, and one line per damaged line skipped."""
    records, problems = [], []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        return [], [f"{path}: cannot read it ({err})"]
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path} line {n}: not a JSON record (a torn or damaged line); skipped")
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("stream"), str)):
            problems.append(f"{path} line {n}: no 'stream' in the record; skipped")
            continue
        if not isinstance(rec.get("step"), int | float) or isinstance(rec.get("step"), bool):
            problems.append(f"{path} line {n}: no numeric 'step' in the record; skipped")
            continue
        records.append(rec)
    return records, problems


@dataclass
class Series:
    """One value of one stream over steps, with the wall time of each point."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)


def series(records: list[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """stream -> value name -> its points, sorted by step. A later record for the same stream,
    step and value replaces an earlier one (a resumed run repeats the steps after its last
    checkpoint). Non-numeric and non-finite values are left out."""
    latest: dict[tuple[str, str, float], tuple[float, float]] = {}
    for r in records:
        wall = r.get("wall", 0.0)
        wall = float(wall) if isinstance(wall, int | float) else 0.0
        for key, value in values(r).items():
            latest[(r["stream"], key, float(r["step"]))] = (value, wall)
    out: dict[str, dict[str, Series]] = {}
    for (stream, key, step), (value, wall) in sorted(latest.items()):
        s = out.setdefault(stream, {}).setdefault(key, Series())
        s.steps.append(step)
        s.values.append(value)
        s.walls.append(wall)
    return out
