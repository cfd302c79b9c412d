"""The `cost` block: bytes counted per part by hand, the equivalent budget in pairs (LoRS's
N-1 pairs + S against N plain pairs), expert-buffer bytes, and the run's side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdistill.training import cost
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import LowRankSimilarity

REPO = Path(__file__).resolve().parents[1]


def pixel_set() -> PairSet:
    """4 pairs: 3x8x8 float32 pixels, 6x5 float32 token embeddings, an int64 mask, a rank-2 S
    and two learned step sizes."""
    return PairSet(
        images=torch.zeros(4, 3, 8, 8),
        texts=torch.zeros(4, 6, 5),
        text_mask=torch.ones(4, 6, dtype=torch.long),
        similarity=LowRankSimilarity(4, rank=2, alpha=1.0),
        similarity_args={"kind": "lowrank", "n": 4, "rank": 2, "alpha": 1.0},
        step_sizes={"image": 0.1, "text": 0.2},
    )


def test_bytes_are_counted_per_part_exactly() -> None:
    c = cost.set_cost(pixel_set())
    assert c["bytes_parts"] == {
        "images": 4 * 3 * 8 * 8 * 4,
        "texts": 4 * 6 * 5 * 4 + 4 * 6 * 8,
        "similarity": (4 + 4 * 2 + 4 * 2) * 4,
        "step_sizes": 2 * 4,
        "other": 0,
    }
    assert c["bytes"] == 3072 + 672 + 80 + 8
    assert c["pair_bytes"] == 3 * 8 * 8 * 4 + 6 * 5 * 4 + 6 * 8
    assert c["pairs_equiv"] == pytest.approx(3832 / 936, abs=1e-4)
    assert c["buffer_bytes"] is None


def feature_set(n: int, rank: int | None) -> PairSet:
    """Lite0 + MiniLM features (1280 + 384 float32), with LoRS's low-rank S when `rank`."""
    sim = None if rank is None else LowRankSimilarity(n, rank=rank, alpha=1.0)
    return PairSet(
        images=torch.zeros(n, 1280),
        texts=torch.zeros(n, 384),
        similarity=sim,
        similarity_args={} if rank is None else {"kind": "lowrank", "n": n, "rank": rank},
        step_sizes={} if rank is None else {"image": 0.1, "text": 0.1},
    )


def test_plain_pairs_are_their_own_budget_and_s_weighs_extra() -> None:
    plain = cost.set_cost(feature_set(100, None))
    assert plain["pairs_equiv"] == 100 and plain["pair_bytes"] == (1280 + 384) * 4
    lors = cost.set_cost(feature_set(99, 10))
    # 99 pairs + S (99 x (1 + 2 x 10) floats) + 2 step sizes, in pairs of 6656 bytes
    expected = 99 + (99 * 21 * 4 + 8) / 6656
    assert lors["pairs_equiv"] == pytest.approx(expected, abs=1e-4)
    # more than its 99 pairs: in Lite0 + MiniLM space a rank-10 S outweighs the pair it replaces
    assert lors["pairs_equiv"] > 100 > 99


def test_pairs_sharing_images_store_each_image_once() -> None:
    real = PairSet(
        images=torch.zeros(2, 16),
        texts=torch.zeros(10, 4),
        image_index=torch.arange(10) // 5,
    )
    c = cost.set_cost(real)
    assert c["bytes_parts"]["images"] == 2 * 16 * 4 and c["bytes_parts"]["other"] == 10 * 8
    assert c["pairs_equiv"] == pytest.approx((128 + 160 + 80) / 80)


def fake_buffer(folder: Path, sizes: list[int]) -> None:
    folder.mkdir()
    (folder / "buffer.json").write_text(json.dumps({"key": "k"}))
    for i, size in enumerate(sizes):
        (folder / f"expert_{i:03d}.safetensors").write_bytes(b"x" * size)


def test_buffer_bytes_count_the_experts_used(tmp_path: Path) -> None:
    fake_buffer(tmp_path / "buf", [100, 200, 400])
    meta = {"buffer": str(tmp_path / "buf"), "experts": 2}
    assert cost.buffer_bytes(meta) == 300
    assert cost.buffer_bytes({"buffer": str(tmp_path / "buf")}) == 700
    assert cost.buffer_record(meta) == {"buffer_bytes": 300}
    # the number recorded with the set wins: its buffer may be on another machine
    assert cost.buffer_bytes({"buffer": "/nowhere", "buffer_bytes": 5}) == 5
    assert cost.buffer_bytes({"buffer": "/nowhere"}) is None
    assert cost.buffer_record({}) == {}


def test_run_side_sums_stages_into_device_hours() -> None:
    meta = {"timings": {"data": 1.5, "distill": 1800.0, "evaluate": 1798.5}, "device": "cpu"}
    c = cost.block(feature_set(3, None), meta, threads=1)
    assert c["wall_s"] == 3600.0 and c["stages_s"]["distill"] == 1800.0
    assert c["device_hours"] == 1.0 and c["devices"] == 1 and c["device"] == "cpu"
    assert c["peak_rss_mib"] > 0 and c["peak_gpu_mib"] is None
    assert set(cost.FIELDS) <= set(c) and set(cost.GROUPS) <= set(c)


def test_train_results_count_the_real_split_as_stored(tmp_path: Path) -> None:
    """Full shapes data on the tiny encoder: 60 images kept as 32 px uint8 rows in the image
    cache, 300 captions as 24 token ids + 24 mask values (int64), 300 image indices."""
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "train", "dataset.split_sizes=[60,20,20]",
         "eval.students=1", "eval.steps=5", "device=cpu", "threads=1",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    c = json.loads((tmp_path / "results.json").read_text())["cost"]
    assert c["bytes_parts"] == {
        "images": 60 * 3 * 32 * 32,
        "texts": 300 * 2 * 24 * 8,
        "similarity": 0,
        "step_sizes": 0,
        "other": 300 * 8,
    }
    assert c["pair_bytes"] == 3 * 32 * 32 + 2 * 24 * 8
    assert c["pairs_equiv"] == pytest.approx(301920 / 3456, abs=1e-4)  # < 300: shared images
    assert set(c["stages_s"]) == {"data", "evaluate"} and c["threads"] == 1
    assert c["wall_s"] == pytest.approx(sum(c["stages_s"].values()), abs=1e-3)


def test_a_lors_set_counts_s_its_step_sizes_and_its_buffer(tmp_path: Path) -> None:
    """A real LoRS run at budget 9 (frozen tiny trunks): 8 pairs + S + 2 step sizes weigh more
    than 8 pairs, its expert buffer is recorded with the set, and its page shows both."""
    p = subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "dataset.split_sizes=[60,20,30]",
         "eval.students=1", "eval.steps=5", "budget.pairs=9", "device=cpu", "threads=1",
         "method=lors", "encoder.train_image_trunk=false", "encoder.train_text_trunk=false",
         "expert.num_experts=1", "expert.epochs=2", "method.iterations=2",
         "method.syn_steps=2", "method.max_start_epoch=1", "method.eval_every=0",
         "method.batch_syn=4", "method.lr_img=1", "method.lr_txt=1",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    c = json.loads((tmp_path / "results.json").read_text())["cost"]
    saved = json.loads((tmp_path / "distilled.json").read_text())
    rank = saved["similarity"]["rank"]
    assert saved["pairs"] == 8 and c["bytes_parts"]["similarity"] == 8 * (1 + 2 * rank) * 4
    assert c["bytes_parts"]["step_sizes"] == 8
    assert c["pairs_equiv"] > 9 > 8  # more than the budget it is filed under
    buffer = Path(saved["meta"]["buffer"])
    expert = sum(f.stat().st_size for f in buffer.glob("expert_*.safetensors"))
    assert c["buffer_bytes"] == saved["meta"]["buffer_bytes"] == expert > 0
    page = (tmp_path / "report.html").read_text()
    assert f"= {c['pairs_equiv']} pairs of" in page and "expert buffers used" in page
