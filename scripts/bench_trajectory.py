"""Peak memory and speed of trajectory matching as syn_steps grows (MTT vs TESLA vs LoRS).

Each (method, syn_steps) runs in its own subprocess, so peaks do not leak between settings.
The expert buffer is built first (a run with 0 iterations); each child then reads the data and
builds the encoder, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`) and runs a
fixed number of matching iterations without val checks or checkpoints. It reports the peak RSS
of that phase (`VmHWM`), the RSS before it, and seconds per iteration. TESLA and LoRS should
stay flat in syn_steps; MTT keeps every unrolled step's graph, so it grows.

    python scripts/bench_trajectory.py                     # flickr8k-1k + lite0_minilm
    python scripts/bench_trajectory.py --data shapes       # no real data: shapes + tiny
    python scripts/bench_trajectory.py --steps 8 16 32 --iterations 20 --repeats 3
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

SETTINGS = {
    "flickr8k": ["dataset=flickr8k", "encoder=lite0_minilm"],
    # Shapes with frozen tiny trunks: the same feature-space path, no real data needed.
    "shapes": [
        "dataset=shapes",
        "encoder=tiny",
        "encoder.train_image_trunk=false",
        "encoder.train_text_trunk=false",
    ],
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(overrides: list[str], threads: int) -> dict:
    """One measured run (in a fresh process)."""
    import torch

    torch.set_num_threads(threads)
    from mmdistill.config import compose
    from mmdistill.jobs import distill_context, prepare
    from mmdistill.methods import get_method
    from mmdistill.runs import Run

    cfg = compose("distill", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), "distill", "cpu", 0)
        prep = prepare(cfg, "cpu", run, None)
        ctx = distill_context(cfg, prep, int(cfg.budget.pairs), "cpu", run, None)
        method = get_method(cfg.method.family)(cfg.method)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        t0 = time.perf_counter()
        pairs = method.distill(ctx)
        wall = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - before) / 1024,
        "s_per_iteration": pairs.meta["seconds_per_iteration"],
        "wall_s": wall,
    }


def _run_child(overrides: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(overrides)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(SETTINGS), default="flickr8k")
    ap.add_argument("--methods", nargs="+", default=["mtt", "tesla", "lors"])
    ap.add_argument("--steps", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_trajectory.json"))
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads)))
        return

    base = SETTINGS[args.data] + [
        f"budget.pairs={args.pairs}",
        f"method.iterations={args.iterations}",
        "method.eval_every=0",
        "method.checkpoint_every=0",
        "device=cpu",
    ]
    rows = []
    for method in args.methods:  # build (or find) the expert buffer outside the measurement
        _run_child(base + [f"method={method}", "method.iterations=0"], args.threads)
    for method in args.methods:
        for steps in args.steps:
            overrides = base + [f"method={method}", f"method.syn_steps={steps}"]
            runs = [_run_child(overrides, args.threads) for _ in range(args.repeats)]
            row = {"method": method, "syn_steps": steps, "runs": runs}
            for k in ("peak_mib", "extra_mib", "rss_before_mib", "s_per_iteration"):
                row[k] = statistics.median(r[k] for r in runs)
            rows.append(row)
            print(
                f"{method:6s} syn_steps {steps:3d}: peak {row['peak_mib']:7.1f} MiB "
                f"(+{row['extra_mib']:6.1f} over {row['rss_before_mib']:.0f}), "
                f"{row['s_per_iteration']:.3f} s/it",
                flush=True,
            )
    lo, hi = min(args.steps), max(args.steps)
    summary = {}
    for method in args.methods:
        at = {r["syn_steps"]: r for r in rows if r["method"] == method}
        summary[method] = {
            f"peak_ratio_{hi}_vs_{lo}": at[hi]["peak_mib"] / at[lo]["peak_mib"],
            f"extra_ratio_{hi}_vs_{lo}": at[hi]["extra_mib"] / max(at[lo]["extra_mib"], 1e-9),
            f"s_per_iteration_{lo}": at[lo]["s_per_iteration"],
        }
    print(
        "\n| method | " + " | ".join(f"peak MiB @{s}" for s in args.steps) + " | "
        f"peak {hi}/{lo} | extra {hi}/{lo} | s/it @{lo} |"
    )
    print("|---" * (len(args.steps) + 4) + "|")
    for method in args.methods:
        at = {r["syn_steps"]: r for r in rows if r["method"] == method}
        s = summary[method]
        print(
            f"| {method} | "
            + " | ".join(f"{at[k]['peak_mib']:.0f} (+{at[k]['extra_mib']:.0f})" for k in args.steps)
            + f" | {s[f'peak_ratio_{hi}_vs_{lo}']:.3f} | {s[f'extra_ratio_{hi}_vs_{lo}']:.2f}"
            + f" | {s[f's_per_iteration_{lo}']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"args": {k: str(v) for k, v in vars(args).items() if k != "child"}}
    args.out.write_text(json.dumps({**info, "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
