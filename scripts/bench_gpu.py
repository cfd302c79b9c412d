"""GPU speed benchmark (issue "paper scale on a GPU"): per method at 100 pairs, on flickr8k-1k,
for lite0_minilm (cached features) and nfnet_bert (random init, 224 px, pixel space):

* s/iteration of the method (seconds per CovMatch step / trajectory iteration, from the set's
  meta), peak GPU memory (torch, from meta.json), mean GPU utilisation while the job ran
  (nvidia-smi, sampled every 0.5 s) and the students' evaluation wall (meta.json timings);
* the feature-space CovMatch row at precision fp32, tf32 and bf16, with its r_mean.

    python scripts/bench_gpu.py [--device cuda] [--quick] [--into docs/results.md]
        [--rows covmatch-lite0,lors-nfnet] [--data ../shared/data/flickr8k-1k]

`--quick` shrinks every job (a CPU dry run: `--device cpu --quick`). Each job is an ordinary
`mmdistill distill` in a subprocess; the table (device, date, commit) is printed and, with
`--into`, replaces the generated "GPU speed" section of that document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LITE0 = ["dataset=flickr8k", "encoder=lite0_minilm"]
NFNET = [
    "dataset=flickr8k",
    "encoder=nfnet_bert",
    "encoder.image_weights=null",
    "encoder.text_weights=false",
]
TRAJ = [
    "expert.num_experts=2",
    "expert.epochs=2",
    "method.max_start_epoch=1",
    "method.eval_every=0",
]
# row -> (method, extra overrides); every row distils 100 pairs
ROWS: dict[str, tuple[str, list[str]]] = {
    "covmatch-lite0-fp32": ("covmatch", [*LITE0, "precision=fp32"]),
    "covmatch-lite0-tf32": ("covmatch", [*LITE0, "precision=tf32"]),
    "covmatch-lite0-bf16": ("covmatch", [*LITE0, "precision=bf16"]),
    "lors-lite0": ("lors", [*LITE0, *TRAJ, "method.iterations=100"]),
    "full-students-lite0": ("", LITE0),
    "covmatch-nfnet": ("covmatch", [*NFNET, "method.steps=200", "eval.students=1"]),
    "lors-nfnet": ("lors", [*NFNET, *TRAJ, "method.iterations=20", "eval.students=1"]),
}
# --quick: the same jobs shrunk to seconds (a dry run of the script, not a measurement)
QUICK = {
    "": ["eval.students=1", "eval.steps=20"],
    "covmatch": ["method.steps=20", "method.reset_every=5", "method.checkpoint_every=10"],
    "lors": ["method.iterations=2", "method.syn_steps=2"],
    "nfnet": ["encoder.image_size=64", "dataset.split_sizes=[40,10,10]", "budget.pairs=10"],
}


class Utilisation:
    """Mean GPU utilisation over a job, from nvidia-smi samples (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        if shutil.which("nvidia-smi"):
            cmd = [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                "500",
            ]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def run_row(name: str, a: argparse.Namespace, out: Path) -> dict:
    method, extra = ROWS[name]
    quick = a.quick
    args = ["distill", f"method={method}", "budget.pairs=100"] if method else ["train"]
    args += [*extra, f"dataset.root={a.data}", f"device={a.device}"]
    if "nfnet" in name:
        args.append(f"encoder.text_model={a.bert_tok.resolve()}")
    if quick:
        args += QUICK[""] + QUICK.get(method, []) + (QUICK["nfnet"] if "nfnet" in name else [])
    run_dir = out / name
    t0 = time.perf_counter()
    with Utilisation() as util:
        p = subprocess.run(
            [sys.executable, "-m", "mmdistill.cli", *args, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    row = {"row": name, "wall_s": round(time.perf_counter() - t0, 1), "rc": p.returncode}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    meta = json.loads((run_dir / "meta.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    distilled = run_dir / "distilled.json"
    set_meta = json.loads(distilled.read_text())["meta"] if distilled.is_file() else {}
    row.update(
        s_per_it=set_meta.get("seconds_per_step") or set_meta.get("seconds_per_iteration"),
        peak_gpu_mib=(meta.get("peaks") or {}).get("gpu_mib"),
        gpu_util=util.mean,
        eval_s=meta.get("timings", {}).get("evaluate"),
        r_mean=results["summary"]["r_mean"]["mean"],
        precision=results.get("precision"),
    )
    return row


def markdown(rows: list[dict], device_name: str, commit: str) -> str:
    def cell(value: object, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"Device: {device_name}; date {time.strftime('%Y-%m-%d')}; commit {commit}.",
        "",
        "| row | s/it | peak GPU MiB | GPU util % | eval s | r_mean | precision | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['row']} | failed: {r.get('error', '')} | | | | | | {r['wall_s']} |")
            continue
        lines.append(
            f"| {r['row']} | {cell(r['s_per_it'], '.4f')} | {cell(r['peak_gpu_mib'], '.0f')} | "
            f"{cell(r['gpu_util'], '.0f')} | {cell(r['eval_s'], '.1f')} | "
            f"{cell(r['r_mean'], '.2f')} | {r['precision']} | {r['wall_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a CPU dry run)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/flickr8k-1k")
    ap.add_argument("--into", type=Path, help="replace the 'GPU speed' section of this doc")
    ap.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    ap.add_argument(
        "--bert-tok",
        type=Path,
        default=REPO / ".gpu" / "bert-tok",
        help="a local bert-base-uncased config + tokenizer folder for the nfnet rows (offline)",
    )
    a = ap.parse_args()
    import torch

    from mmdistill.report.table_files import update_section
    from mmdistill.runs import git_state

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    commit = (git_state().get("sha") or "?")[:7]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        for name in a.rows.split(","):
            rows.append(run_row(name, a, out))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, device_name, commit)
    print(table)
    if a.into:
        update_section(a.into, "GPU speed", table)


if __name__ == "__main__":
    main()
