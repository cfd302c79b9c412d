"""Quality benchmark on flickr8k-1k (BENCHMARK.md): full-data `train` plus each method at each
budget, 5 students each, all with one student recipe; then one paper-layout table.

    python scripts/bench_quality.py [--methods random lors covmatch] [--budgets 100 200 500]
        [--out outputs/bench/flickr8k] [--into docs/results.md] [--extra eval.students=5 ...]
        [--seeds 0 1 2 3 4] [--jobs 2]

Each row is a real `mmdistill` run in its own folder under --out; finished rows (`done`) are
skipped, so an interrupted benchmark continues where it stopped. The table comes from
`mmdistill table`, which writes Markdown/CSV/LaTeX + a recall-vs-pairs plot and, with --into,
refreshes that section of the document.

With --seeds, every method x budget runs once per seed (a selection / init draw) into
`<method>-<pairs>/seed<k>`, and a second table gives per method and budget the mean ± sample std
(n-1) and the min-max across draws of each draw's r_mean (itself the mean over its students).
--jobs runs that many runs at once (pass `--extra threads=1` with it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["dataset=flickr8k", "encoder=lite0_minilm"]
DEFAULT_METHODS = ["random", "herding", "kcenter", "forgetting", "mtt", "tesla", "lors", "covmatch"]


def run(args: list[str], folder: Path) -> None:
    if (folder / "done").is_file():
        print(f"done already: {folder}", file=sys.stderr)
        return
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mmdistill.cli", *args, f"hydra.run.dir={folder}"]
    p = subprocess.run(cmd, cwd=REPO)
    status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode})"
    print(f"{folder}: {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def draws_table(out: Path, methods: list[str], budgets: list[int], seeds: list[int]) -> str:
    """Mean ± sample std and min-max over the seeds of each draw's r_mean, per method x budget."""
    lines = [
        f"r_mean across {len(seeds)} draws (seeds {', '.join(map(str, seeds))}): "
        "mean ± sample std (n-1) [min-max]",
        "",
        "| method | " + " | ".join(f"{b} pairs" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in methods:
        cells = []
        for pairs in budgets:
            v = []
            for seed in seeds:
                path = out / f"{method}-{pairs}" / f"seed{seed}" / "results.json"
                if path.is_file():
                    v.append(json.loads(path.read_text())["summary"]["r_mean"]["mean"])
            if len(v) < 2:
                cells.append(f"{len(v)} draw(s)")
                continue
            sd = statistics.stdev(v)
            cells.append(f"{statistics.mean(v):.2f}±{sd:.2f} [{min(v):.2f}-{max(v):.2f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 200, 500])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "flickr8k")
    ap.add_argument("--into", type=Path, default=None, help="refresh a section of this document")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    a = ap.parse_args()
    jobs = [(["train", *BASE, *a.extra], a.out / "train-full")]
    for method in a.methods:
        for pairs in a.budgets:
            args = ["distill", *BASE, f"method={method}", f"budget.pairs={pairs}", *a.extra]
            if a.seeds is None:
                jobs.append((args, a.out / f"{method}-{pairs}"))
            else:
                jobs += [
                    ([*args, f"seed={s}"], a.out / f"{method}-{pairs}" / f"seed{s}")
                    for s in a.seeds
                ]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        list(pool.map(lambda job: run(*job), jobs))
    if a.seeds is not None:
        text = draws_table(a.out, a.methods, a.budgets, a.seeds)
        (a.out / "draws.md").write_text(text)
        print(text)
    table = [sys.executable, "-m", "mmdistill.cli", "table", str(a.out)]
    if a.into:
        table += ["--into", str(a.into), "--section", "flickr8k-1k quality"]
    subprocess.run(table, cwd=REPO, check=True)


if __name__ == "__main__":
    main()
