"""Memory and image-cache benchmark (issue #11): peak RSS of a pixel-space run against the number
of training images, and the throughput of a cold (decoding) vs a cached image pass.

    python scripts/bench_memory.py [--sizes 1000 4000 16000] [--out docs/bench_memory.md]

Peak RSS: each size runs `mmdistill train` (full-data students, so every training batch is read
from the split's pixels) on `shapes` drawn at 224 px with the `tiny` encoder at 224 px, whose
image trunk trains, in a fresh process with a fresh cache; the figure is that process's VmHWM
(students train in it: `eval.workers=1`). Image passes: the flickr8k-1k images (all three
splits, 1,000 images) at 224 px, decoded into a fresh image cache (DataLoader workers, and one
process), decoded by the per-image torchvision transform the encoders used before the cache,
and read back from the cache as normalised float batches. Prints a Markdown table.
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

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "train",
    "dataset=shapes",
    "dataset.image_size=224",
    "encoder=tiny",
    "encoder.image_size=224",
    "debug=tiny",
    "eval.students=1",
    "eval.workers=1",
    "eval.batch_size=32",
]


def vmhwm_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def point(size: int) -> None:
    """One run in this (fresh) process; prints its peak RSS as JSON on the last line."""
    import torch

    from mmdistill.cli import main

    sizes = f"dataset.split_sizes=[{size},50,100]"
    t0 = time.perf_counter()
    main([*RUN, sizes, f"hydra.run.dir={os.environ['MMDISTILL_OUTPUTS']}/run"])
    wall = time.perf_counter() - t0
    print(json.dumps({"peak_mib": vmhwm_mib(), "wall": wall, "threads": torch.get_num_threads()}))


def measure_point(size: int, tmp: Path) -> dict:
    env = {
        **os.environ,
        "MMDISTILL_CACHE": str(tmp / f"cache-{size}"),
        "MMDISTILL_OUTPUTS": str(tmp / f"out-{size}"),
    }
    p = subprocess.run(
        [sys.executable, __file__, "--point", str(size)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        sys.exit(f"benchmark run at {size} images failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def image_passes(tmp: Path) -> list[tuple[str, float]]:
    """(what, images/s) for the cold and cached passes over flickr8k-1k at 224 px."""
    from omegaconf import OmegaConf

    from mmdistill.data.images import ImageCache, PixelRule
    from mmdistill.data.readers import read_flickr8k
    from mmdistill.models.encoders import CLIP_MEAN, CLIP_STD, clip_preprocess

    root = os.environ.get("MMDISTILL_FLICKR8K", str(REPO.parent / "shared/data/flickr8k-1k"))
    data = read_flickr8k(OmegaConf.create({"root": root}))
    splits = [data.split(s) for s in ("train", "val", "test")]
    n = sum(s.n_images for s in splits)
    rule = PixelRule(224, CLIP_MEAN, CLIP_STD)
    rows = []

    def rate(what: str, work) -> None:
        t0 = time.perf_counter()
        work()
        rows.append((what, n / (time.perf_counter() - t0)))

    def per_image() -> None:
        transform = clip_preprocess(rule.size, rule.mean, rule.std)
        for split in splits:
            for s in range(0, split.n_images, 256):
                [transform(im) for im in split.images(range(s, min(s + 256, split.n_images)))]

    def cold(workers: int | str, cache: str) -> None:
        """A first run: decode into a fresh cache, normalising each batch as it comes."""
        for split in splits:
            for pixels in ImageCache(split, rule, tmp / cache, "flickr8k", workers).batches(256):
                rule.normalise(pixels)

    def cached() -> None:
        """A second run: the same float batches, read from the cache."""
        for split in splits:
            for pixels in ImageCache(split, rule, tmp / "cache-auto", "flickr8k").batches(256):
                rule.normalise(pixels)

    rate("before the cache: per-image torchvision transform, one process", per_image)
    rate("cold: decode into a fresh image cache + normalise, one process", lambda: cold(0, "one"))
    rate("cold: the same, data_workers=auto", lambda: cold("auto", "cache-auto"))
    rate("cached: read the image cache + normalise (a second run)", cached)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", type=int, nargs="*", default=[1000, 4000, 16000], help="none: passes only"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    ap.add_argument("--skip-passes", action="store_true", help="only the peak-RSS points")
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.point is not None:
        point(a.point)
        return
    lines = []
    if a.sizes:
        lines += ["| training images | peak RSS (MiB) | vs first | run wall (s) | torch threads |"]
        lines.append("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = None
        for size in a.sizes:
            got = measure_point(size, tmp)
            first = first or got["peak_mib"]
            lines.append(
                f"| {size:,} | {got['peak_mib']:.0f} | {got['peak_mib'] / first:.3f} | "
                f"{got['wall']:.0f} | {got['threads']} |"
            )
            print(lines[-1], flush=True)
        if not a.skip_passes:
            if lines:
                lines.append("")
            lines.append("| image pass (flickr8k-1k, 1,000 images, 224 px) | images/s |")
            lines.append("|---|---|")
            for what, per_s in image_passes(tmp):
                lines.append(f"| {what} | {per_s:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        a.out.write_text(table)


if __name__ == "__main__":
    main()
