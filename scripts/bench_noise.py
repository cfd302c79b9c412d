"""The noisy-correspondence benchmark: flickr8k-1k, lite0_minilm, 100 pairs, noise=shuffle.

    python scripts/bench_noise.py                         # ratios 0.2 0.5 0.8, every row
    python scripts/bench_noise.py --ratios 0.5 --rows noisy_full,lors,mdw
    python scripts/bench_noise.py --ratios 0 --rows lors,mdw   # ratio 0 = clean data
    python scripts/bench_noise.py --dry-run               # print the commands only
    python scripts/bench_noise.py --jobs 2                # two runs at once (one per core)

Rows: clean full-data training (once), noisy full-data training, random, LoRS, CovMatch, robust
CovMatch (its detection precision / recall as MDW's), MDW
and one MDW ablation per switch (`soft_matrix`, `dual_track`, `clean_init`; the
`correspondence_maps` row is only run for a pixel-space encoder: in feature space the term is
off, so it would repeat the MDW row). Every job is an ordinary `mmdistill` run in
`<runs>/<ratio>/<row>`; a finished one (`done`) is reused, so the script resumes. The table
(r_mean mean+-std over the students, its share of the clean full-data r_mean, and MDW's
clean-pair detection precision / recall) goes to `--out` and stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE = ["dataset=flickr8k", "encoder=lite0_minilm", "device=cpu"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "clean_full": ("train", []),
    "noisy_full": ("train", []),
    "random": ("distill", ["method=random"]),
    "lors": ("distill", ["method=lors"]),
    "covmatch": ("distill", ["method=covmatch"]),
    "covmatch_robust": ("distill", ["method=covmatch_robust"]),
    "mdw": ("distill", ["method=mdw"]),
    "mdw-soft_matrix": ("distill", ["method=mdw", "method.soft_matrix=false"]),
    "mdw-dual_track": ("distill", ["method=mdw", "method.dual_track=false"]),
    "mdw-clean_init": ("distill", ["method=mdw", "method.clean_init=false"]),
    "mdw-correspondence_maps": ("distill", ["method=mdw", "method.correspondence_maps=false"]),
}
LABELS = {
    "clean_full": "full data, clean (upper bound)",
    "noisy_full": "full data, noisy",
    "random": "random",
    "lors": "LoRS",
    "covmatch": "CovMatch",
    "covmatch_robust": "**robust CovMatch** (ours)",
    "mdw": "**MDW**",
    "mdw-soft_matrix": "MDW − soft matrix",
    "mdw-dual_track": "MDW − dual track (plain experts, random init)",
    "mdw-clean_init": "MDW − clean init",
    "mdw-correspondence_maps": "MDW − correspondence maps",
}
FEATURE_SPACE = {"lite0_minilm"}


def noise_args(ratio: float) -> list[str]:
    return ["noise=none"] if ratio == 0 else ["noise=shuffle", f"noise.ratio={ratio}"]


def job(row: str, ratio: float, args: argparse.Namespace) -> tuple[list[str], Path]:
    verb, extra = ROWS[row]
    folder = args.runs / ("clean" if row == "clean_full" else f"ratio{ratio}") / row
    noise = ["noise=none"] if row == "clean_full" else noise_args(ratio)
    budget = [f"budget.pairs={args.pairs}"] if verb == "distill" else []
    cmd = [
        sys.executable,
        "-m",
        "mmdistill.cli",
        verb,
        *BASE,
        *noise,
        *budget,
        *extra,
        f"eval.students={args.students}",
        f"threads={args.threads}",
        f"hydra.run.dir={folder}",
        *args.extra,
    ]
    return cmd, folder


def result(folder: Path) -> dict | None:
    path = folder / "results.json"
    if not (folder / "done").is_file() or not path.is_file():
        return None
    res = json.loads(path.read_text())
    out = {
        "mean": res["summary"]["r_mean"]["mean"],
        "std": res["summary"]["r_mean"]["std"],
        "pairs": res["pairs"],
    }
    det = folder / "detection.json"
    if det.is_file():  # MDW's dual-track clean set
        out["detection"] = json.loads(det.read_text())["clean_set"]
    made = folder / "distilled.json"  # absent for full-data training
    robust = json.loads(made.read_text()).get("meta", {}).get("robust") if made.is_file() else None
    if isinstance(robust, dict) and robust.get("against_noise_mask"):  # robust CovMatch's
        out["detection"] = robust["detection"]
    meta = json.loads((folder / "meta.json").read_text())
    out["minutes"] = sum(meta.get("timings", {}).values()) / 60
    return out


def run(cmd: list[str], folder: Path, dry: bool) -> None:
    if (folder / "done").is_file():
        return
    print(" ".join(cmd[2:]), flush=True)
    if dry:
        return
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
    else:
        print(f"  done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def table(ratios: list[float], rows: list[str], args: argparse.Namespace) -> str:
    clean = result(job("clean_full", 0.0, args)[1])
    head = "| row | " + " | ".join(f"noise {r}" for r in ratios) + " |"
    lines = [
        f"Noisy-correspondence benchmark: flickr8k-1k, lite0_minilm, {args.pairs} pairs, "
        f"{args.students} students; r_mean mean±std (share of clean full-data r_mean). "
        "MDW and robust CovMatch rows add their clean-pair detection precision / recall.",
        "",
        head,
        "|" + "---|" * (len(ratios) + 1),
    ]
    for row in rows:
        cells = []
        for r in ratios:
            res = result(job(row, r, args)[1])
            if res is None:
                cells.append("not run")
                continue
            cell = f"{res['mean']:.2f}±{res['std']:.2f}"
            if clean is not None:
                cell += f" ({100 * res['mean'] / clean['mean']:.0f}%)"
            if "detection" in res and "precision" in res["detection"]:
                d = res["detection"]
                cell += f"; P {d['precision']:.2f} / R {d['recall']:.2f}"
            if res["pairs"] != args.pairs and row not in ("noisy_full", "clean_full"):
                cell += f"; {res['pairs']} pairs"
            cells.append(cell)
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r != "mdw-correspondence_maps"))
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--students", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=Path("outputs/bench_noise"))
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_noise/noise.md"))
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each at --threads)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    for ratio in args.ratios:
        if not 0.0 <= ratio < 1.0:
            sys.exit(f"noise ratio {ratio} is outside [0, 1)")
    shown = ["clean_full", *[r for r in rows if r != "clean_full"]]
    todo = [
        job(row, ratio, args)
        for row in shown
        for ratio in ([0.0] if row == "clean_full" else args.ratios)
        if not (row == "noisy_full" and ratio == 0)  # that is the clean full-data row
    ]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda j: run(*j, args.dry_run), todo))
    text = table(args.ratios, shown, args)
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
