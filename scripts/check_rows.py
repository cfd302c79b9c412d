"""Re-run the six pinned flickr8k-1k rows of docs/results.md and check them to the digit.

    python scripts/check_rows.py [--jobs 2] [--out outputs/check_rows/<sha>] [--rows random,herding]

Why it exists: these rows are the published numbers every other table is read against, and
they are deterministic at a fixed thread count. Any refactor (of the protocol, the students,
retrieval, the coresets or CovMatch) must keep them to the digit at 2 decimals; if it cannot,
the change is a change of results and the docs must be re-measured and say so.

Rows (flickr8k-1k, lite0_minilm, 5 students, seed 0, threads=1, device=cpu): full-data `train`,
random / herding / CovMatch at 100 pairs, full-data `train` on noise=shuffle ratio 0.5, and
int8 CovMatch at 100 pairs' bytes (seed 0 of its three-seed row; the slowest row).
Each row is an ordinary `mmdistill` run in `<out>/<row>`; a finished one (`done`) is reused.
Prints published vs measured r_mean (mean over the students) and exits 1 if any row differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "dataset=flickr8k",
    "encoder=lite0_minilm",
    "eval.students=5",
    "seed=0",
    "threads=1",
    "device=cpu",
]
# row -> (published r_mean, mmdistill arguments)
ROWS: dict[str, tuple[float, list[str]]] = {
    "full": (50.63, ["train"]),
    "random-100": (24.23, ["distill", "method=random", "budget.pairs=100"]),
    "herding-100": (27.53, ["distill", "method=herding", "budget.pairs=100"]),
    "covmatch-100": (46.94, ["distill", "method=covmatch", "budget.pairs=100"]),
    "noisy-full-0.5": (31.24, ["train", "noise=shuffle", "noise.ratio=0.5"]),
    "covmatch_int8-100": (50.23, ["distill", "method=covmatch_int8", "budget.pairs=100"]),
}


def short_sha() -> str:
    """The code's commit, with -dirty when tracked files differ from it."""
    cmd = ["git", "describe", "--always", "--dirty", "--abbrev=7"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def measure(row: str, out: Path) -> float | None:
    """Run one row unless it is done; its r_mean mean, or None if the run failed."""
    folder = out / row
    if not (folder / "done").is_file():
        args = ROWS[row][1]
        cmd = [sys.executable, "-m", "mmdistill.cli", *args[:1], *BASE, *args[1:]]
        cmd.append(f"hydra.run.dir={folder}")
        out.mkdir(parents=True, exist_ok=True)
        print(f"{row}: running", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(out / f"{row}.log", "w") as log:
            p = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode}, see {row}.log)"
        print(f"{row}: {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    try:
        return float(json.loads((folder / "results.json").read_text())["summary"]["r_mean"]["mean"])
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default outputs/check_rows/<sha>")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once (threads=1 each)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset")
    a = ap.parse_args()
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    out = a.out or REPO / "outputs" / "check_rows" / short_sha()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        measured = dict(zip(rows, pool.map(lambda r: measure(r, out), rows), strict=True))
    ok = True
    print(f"runs: {out}\n\n| row | published | measured | match |\n|---|---|---|---|")
    for row in rows:
        pub, got = ROWS[row][0], measured[row]
        match = got is not None and f"{got:.2f}" == f"{pub:.2f}"
        ok &= match
        shown = "failed" if got is None else f"{got:.2f}"
        print(f"| {row} | {pub:.2f} | {shown} | {'yes' if match else 'no'} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
