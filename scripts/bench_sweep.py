"""Wall time of one sweep run sequentially vs with the joblib launcher, on the built-in data.

    python scripts/bench_sweep.py --methods random,herding,kcenter --budgets 10,20,40 --seeds 0,1

Variants: `sequential` (Hydra's basic launcher, torch's default thread count), `sequential1`
(the same with threads=1) and `joblib` (--workers processes; the sweep callback gives each
cores / workers torch threads). Each launch writes into its own fresh output folder (so nothing
is skipped as `done`), and the variants alternate `--repeats` times; the machine's load average
is recorded with each time because CPU figures are only comparable side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["debug=tiny", "device=cpu"]


def launch(label: str, extra: list[str], sweep: list[str], cache: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-sweep-{label}-"))
    env = {**os.environ, "MMDISTILL_OUTPUTS": str(out), "MMDISTILL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "mmdistill.cli", "distill", "-m", *SMALL, *sweep, *extra]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    done = len(list(out.rglob("done")))
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
    return {
        "launcher": label,
        "workers": workers,
        "wall_s": round(wall, 1),
        "jobs_done": done,
        "rc": p.returncode,
        "load_before": round(load, 2),
        "outputs": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="random,herding,kcenter")
    ap.add_argument("--budgets", default="10,20,40")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default="sequential,sequential1,joblib")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    sweep = [
        f"method={args.methods}",
        f"budget.pairs={args.budgets}",
        f"seed={args.seeds}",
        *args.extra,
    ]
    n_jobs = (
        len(args.methods.split(",")) * len(args.budgets.split(",")) * len(args.seeds.split(","))
    )
    cache = Path(tempfile.mkdtemp(prefix="bench-sweep-cache-"))
    variants = {
        "sequential": ([], 1),
        "sequential1": (["threads=1"], 1),
        "joblib": (
            ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.workers}"],
            args.workers,
        ),
    }
    chosen = args.variants.split(",")
    rows = []
    for _ in range(args.repeats):
        for label in chosen:
            extra, workers = variants[label]
            row = launch(label, extra, sweep, cache, workers)
            row["jobs"] = n_jobs
            rows.append(row)
            print(json.dumps(row), flush=True)
    median = {}
    for label in chosen:
        times = sorted(r["wall_s"] for r in rows if r["launcher"] == label)
        median[label] = times[len(times) // 2]
    summary = {
        "sweep": " ".join(sweep),
        "cores": os.cpu_count(),
        "median_wall_s": median,
        "all_jobs_done": all(r["jobs_done"] == n_jobs and r["rc"] == 0 for r in rows),
    }
    if "joblib" in median:
        for label in chosen:
            if label != "joblib":
                summary[f"joblib_over_{label}"] = round(median["joblib"] / median[label], 3)
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
