"""Choose the tiny encoder's CovMatch step sizes on the shapes *val* split, then score the
choice once on test against several random draws (issue 16: margins that mean something).

    python scripts/tune_tiny_covmatch.py [--steps 300] [--pairs 20] [--students 3]

Prints one row per candidate (val r_mean), the pick, and the test rows: CovMatch at the pick
and random pairs at seeds 0, 1, 2. The test split is read only for the final rows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mmdistill.config import compose
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods import get_method
from mmdistill.runs import Run
from mmdistill.training.protocol import run_protocol

CANDIDATES = [(1.0, 1.0), (1e-2, 1e-3), (1e-3, 1e-4), (3e-4, 3e-5), (1e-4, 1e-5), (3e-5, 3e-6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument(
        "--test-only", nargs=2, type=float, metavar=("LR", "LR_TEXT"), help="skip the val sweep"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = ["device=cpu", "dataset.split_sizes=[400,100,200]", f"eval.students={a.students}"]
    steps = [f"method.steps={a.steps}", "method.syn_batch=all"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("distill", [*base, "method=covmatch"])
        run = Run(Path(tmp), "distill", "cpu", 0)
        prep = prepare(cfg, "cpu", run, None)

        def score(method: str, split, *over: str, seed: int = 0) -> float:
            extra = steps if method == "covmatch" else []
            c = compose("distill", [*base, f"method={method}", f"seed={seed}", *extra, *over])
            ctx = distill_context(
                c, prep, a.pairs, "cpu", Run(Path(tmp) / "m", "distill", "cpu", 0), None
            )
            for f in (Path(tmp) / "m" / "checkpoints").glob("*"):
                f.unlink()  # every candidate starts fresh
            pairs = get_method(c.method.family)(c.method).distill(ctx)
            return run_protocol(prep.encoder, pairs, c.eval, split, None, "cpu", 0).summary[
                "r_mean"
            ]["mean"]

        val = {}
        for lr, lr_text in CANDIDATES if not a.test_only else []:
            val[(lr, lr_text)] = score(
                "covmatch", prep.val, f"method.lr={lr}", f"method.lr_text={lr_text}"
            )
            print(f"val  covmatch lr {lr:g} / text {lr_text:g}: {val[(lr, lr_text)]:.2f}")
        for s in (0, 1, 2):
            print(f"val  random seed {s}: {score('random', prep.val, seed=s):.2f}")
        pick = max(val, key=val.get) if val else tuple(a.test_only)
        print(f"pick (val): lr {pick[0]:g} / text {pick[1]:g}")
        test = score("covmatch", prep.test, f"method.lr={pick[0]}", f"method.lr_text={pick[1]}")
        print(f"test covmatch at the pick: {test:.2f}")
        for s in (0, 1, 2):
            print(f"test random seed {s}: {score('random', prep.test, seed=s):.2f}")


if __name__ == "__main__":
    main()
