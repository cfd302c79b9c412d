"""Speed benchmark for the runner (BENCHMARK.md): default run from a cold start, feature caching
on flickr8k-1k, and a cached rerun of the flickr8k distill. Prints a Markdown table.

    python scripts/bench_speed.py [--repeats 3] [--out docs/bench_speed.md]

Each figure is the median wall time of `--repeats` runs of the real CLI in a subprocess, with a
fresh feature cache where the row says "cold". Compare rows within one run on one machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLICKR = ["dataset=flickr8k", "encoder=lite0_minilm", "method=random"]


def timed_run(args: list[str], cache: Path, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "MMDISTILL_CACHE": str(cache), "MMDISTILL_OUTPUTS": str(out)}
    run_dir = out / f"run-{time.time_ns()}"
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(args)}\n{p.stderr[-2000:]}")
    meta = json.loads((run_dir / "meta.json").read_text())
    return wall, meta["timings"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--skip-flickr", action="store_true", help="only the built-in default run")
    a = ap.parse_args()
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls = []
        for i in range(a.repeats):
            wall, _ = timed_run(["distill"], tmp / f"cold-{i}", tmp / "out")
            walls.append(wall)
        rows.append(
            (
                "`mmdistill distill` (default), cold cache",
                statistics.median(walls),
                "target <= 60 s",
            )
        )
        if not a.skip_flickr:
            cache_walls, data_times, warm_walls = [], [], []
            for i in range(a.repeats):
                cache = tmp / f"flickr-{i}"
                # One short student: this row measures reading + encoding the data.
                wall, timings = timed_run(
                    ["distill", *FLICKR, "eval.students=1", "eval.steps=1"], cache, tmp / "out"
                )
                cache_walls.append(wall)
                data_times.append(timings["data"])
                wall, _ = timed_run(["distill", *FLICKR], cache, tmp / "out")
                warm_walls.append(wall)
            data = statistics.median(data_times)
            rows.append(
                (
                    "flickr8k-1k feature caching (data stage, cold)",
                    data,
                    f"target <= 120 s; {1000 / data:.1f} images/s "
                    f"+ {5000 / data:.1f} captions/s together",
                )
            )
            rows.append(
                (
                    "`mmdistill distill dataset=flickr8k encoder=lite0_minilm`, cached",
                    statistics.median(warm_walls),
                    "target <= 30 s",
                )
            )
    head = f"| what | seconds (median of {a.repeats}) | note |\n|---|---|---|\n"
    table = head + "".join(f"| {w} | {s:.1f} | {n} |\n" for w, s, n in rows)
    print(table)
    if a.out:
        a.out.write_text(table)


if __name__ == "__main__":
    main()
