"""`mmdistill export`: grids show the real pixels, captions decode to the right real caption.

A random coreset is made of real pairs, so every export of it has a known answer: the grid tile
is the training image itself, the nearest caption is the pair's own caption, and in feature
space the nearest real image of each synthetic feature is its own source image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.config import register_resolvers, run_config
from mmdistill.data import build_dataset
from mmdistill.errors import UserError
from mmdistill.report.visuals import MIN_TILE, THUMB, export_run
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import LowRankSimilarity

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "dataset.split_sizes=[60,20,20]",
    "eval.students=1",
    "eval.steps=5",
    "budget.pairs=8",
    "device=cpu",
    "method=random",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random-coreset run in pixel space and one in feature space (frozen tiny trunks)."""
    root = tmp_path_factory.mktemp("export")
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "-m", *FAST,
         "encoder.train_image_trunk=true,false", "encoder.train_text_trunk=false",
         f"hydra.sweep.dir={root}", "hydra.sweep.subdir=${encoder.train_image_trunk}"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    register_resolvers()
    return {"pixel": root / "True", "feature": root / "False"}


def source_images(run: Path) -> tuple[list[int], list[Image.Image], list[str], list[str]]:
    """The coreset's source pairs: their image rows, images, image ids and captions."""
    cfg = run_config(run)
    train = build_dataset(cfg.dataset).split("train")
    src = PairSet.load(run / "distilled").meta["source_pairs"]
    rows = [int(train.caption_image[i]) for i in src]
    ids = train.rows["image_id"]
    return (
        rows,
        [train.image(r) for r in rows],
        [ids[r] for r in rows],
        [train.captions[i] for i in src],
    )


def test_pixel_grid_shows_the_real_images_and_captions_decode(runs: dict, tmp_path: Path) -> None:
    assert (runs["pixel"] / "grid.png").is_file()  # distill exports at its end too
    assert (runs["pixel"] / "captions.txt").is_file()
    files = export_run(runs["pixel"], out=tmp_path)
    assert sorted(f.name for f in files) == ["captions.txt", "grid.png"]
    _, images, _, captions = source_images(runs["pixel"])
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(float)
    size = images[0].size[0]
    scale = max(1, MIN_TILE // size)
    tile = scale * size
    for k in (0, 5):  # tiles in the first and second grid rows (3 per row for 8 images)
        r, c = divmod(k, 3)
        y, x = 2 + r * (tile + 2), 2 + c * (tile + 2)
        shown = grid[y : y + tile : scale, x : x + tile : scale]
        real = np.asarray(images[k].convert("RGB")).astype(float)
        assert np.abs(shown - real).mean() < 2.0, k  # de-normalised back to the real pixels
    lines = (tmp_path / "captions.txt").read_text().splitlines()
    assert len(lines) == 8
    for line, caption in zip(lines, captions, strict=True):
        i, cos, text = line.split("\t")
        assert text == caption and float(cos) == pytest.approx(1.0, abs=1e-3)


def test_feature_space_shows_nearest_real_images(runs: dict, tmp_path: Path) -> None:
    assert (runs["feature"] / "grid_nearest.png").is_file()
    files = export_run(runs["feature"], out=tmp_path, neighbours=2)
    names = sorted(f.name for f in files)
    assert names == ["captions.txt", "grid_nearest.png", "grid_nearest.txt"]
    _, _, ids, captions = source_images(runs["feature"])
    rows = (tmp_path / "grid_nearest.txt").read_text().splitlines()
    assert len(rows) == 8
    for line, image_id in zip(rows, ids, strict=True):
        first = line.split("\t")[1].split()[0]
        assert first.startswith(f"{image_id}(") and first.endswith("(1.000)")
    with Image.open(tmp_path / "grid_nearest.png") as im:
        assert im.size == (2 * (THUMB + 2) + 2, 8 * (THUMB + 2) + 2)
    texts = [line.split("\t")[2] for line in (tmp_path / "captions.txt").read_text().splitlines()]
    assert texts == captions


def test_similarity_heatmap_when_the_set_has_one(runs: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["pixel"], run)
    pairs = PairSet.load(run / "distilled")
    sim = LowRankSimilarity(len(pairs), rank=2, alpha=1.0)
    with torch.no_grad():
        sim.right.normal_()
    pairs.similarity = sim
    pairs.similarity_args = {"kind": "lowrank", "n": len(pairs), "rank": 2, "alpha": 1.0}
    pairs.save(run / "distilled")
    files = export_run(run)
    assert run / "similarity.png" in files
    with Image.open(run / "similarity.png") as im:
        assert im.size[0] > 300
    assert not (runs["pixel"] / "similarity.png").exists()


def test_bad_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    shutil.copy(REPO / "tests/golden/runs/random-10-seed0/.hydra/config.yaml", tmp_path / ".hydra")
    with pytest.raises(UserError, match="no distilled.safetensors"):
        export_run(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "export", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:")
