"""Quality benchmark on flickr8k-1k (BENCHMARK.md): full-data `train` plus each method at each
budget, 5 students each, all with one student recipe; then one paper-layout table.

    python scripts/bench_quality.py [--methods random lors covmatch] [--budgets 100 200 500]
        [--out outputs/bench/flickr8k] [--into docs/results.md] [--extra eval.students=5 ...]

Each row is a real `mmdistill` run in its own folder under --out; finished rows (`done`) are
skipped, so an interrupted benchmark continues where it stopped. The table comes from
`mmdistill table`, which writes Markdown/CSV/LaTeX + a recall-vs-pairs plot and, with --into,
refreshes that section of the document.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["dataset=flickr8k", "encoder=lite0_minilm"]
DEFAULT_METHODS = ["random", "herding", "kcenter", "forgetting", "mtt", "tesla", "lors", "covmatch"]


def run(args: list[str], folder: Path) -> None:
    if (folder / "done").is_file():
        print(f"done already: {folder.name}", file=sys.stderr)
        return
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mmdistill.cli", *args, f"hydra.run.dir={folder}"]
    p = subprocess.run(cmd, cwd=REPO)
    status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode})"
    print(f"{folder.name}: {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 200, 500])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "flickr8k")
    ap.add_argument("--into", type=Path, default=None, help="refresh a section of this document")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    a = ap.parse_args()
    run(["train", *BASE, *a.extra], a.out / "train-full")
    for method in a.methods:
        for pairs in a.budgets:
            run(
                ["distill", *BASE, f"method={method}", f"budget.pairs={pairs}", *a.extra],
                a.out / f"{method}-{pairs}",
            )
    table = [sys.executable, "-m", "mmdistill.cli", "table", str(a.out)]
    if a.into:
        table += ["--into", str(a.into), "--section", "flickr8k-1k quality"]
    subprocess.run(table, cwd=REPO, check=True)


if __name__ == "__main__":
    main()
