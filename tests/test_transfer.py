"""Cross-architecture evaluation: sets converted into another encoder's spaces, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdistill import io
from mmdistill.data.images import PixelRule
from mmdistill.errors import UserError
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import build_similarity
from mmdistill.training.transfer import convert, nearest_rows, repixel

REPO = Path(__file__).resolve().parents[1]
SMALL = ["dataset.split_sizes=[60,20,30]", "eval.students=2", "eval.steps=20", "device=cpu"]
FROZEN = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]
# Another encoder for the tests: the tiny one at 48 px under its own name.
OTHER = ["encoder.name=tiny48", "encoder.image_size=48"]


def feature_encoder(name: str) -> SimpleNamespace:
    """What `convert` reads of a frozen-trunk encoder whose splits are all features."""
    return SimpleNamespace(name=name, image_space="feature", text_space="feature")


def split(images: torch.Tensor, texts: torch.Tensor) -> RealSplit:
    return RealSplit(
        name="train",
        images=images,
        texts=texts,
        text_mask=None,
        caption_image=torch.arange(len(texts)) % len(images),
        captions=[f"caption {i}" for i in range(len(texts))],
    )


def test_nearest_rows_are_the_brute_force_cosine_nearest() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=gen)
    queries = torch.randn(40, 16, generator=gen) * 7.0  # scale never changes a cosine
    got = nearest_rows(queries, real)
    for i, q in enumerate(queries):
        cos = [F.cosine_similarity(q, r, dim=0).item() for r in real]
        assert got[i].item() == int(np.argmax(cos))


def test_decoded_coreset_takes_the_target_rows_of_the_true_nearest_images() -> None:
    gen = torch.Generator().manual_seed(1)
    src = split(torch.randn(50, 8, generator=gen), torch.randn(100, 6, generator=gen))
    tgt = split(torch.randn(50, 12, generator=gen), torch.randn(100, 5, generator=gen))
    picked = torch.tensor([3, 17, 17, 40])
    caps = torch.tensor([9, 0, 55, 99])
    noise = 0.01 * torch.randn(4, 8, generator=gen)
    pairs = PairSet(
        images=2.5 * src.images[picked] + noise,
        texts=src.texts[caps] * 3.0,
        meta={"encoder": "a", "method": "covmatch", "budget": 4},
    )
    out = convert(pairs, feature_encoder("a"), feature_encoder("b"), src, tgt)
    assert torch.equal(out.images, tgt.images[picked])
    assert torch.equal(out.texts, tgt.texts[caps])
    rec = out.meta["transfer"]
    assert rec["decoded_coreset"] and rec["distinct_images"] == 3 and rec["distinct_captions"] == 4
    assert rec["texts"].startswith("decoded") and (
        rec["source_encoder"],
        rec["target_encoder"],
    ) == (
        "a",
        "b",
    )
    assert out.meta["encoder"] == "b" and out.meta["method"] == "covmatch" and rec["budget"] == 4


def test_shared_text_trunk_keeps_the_synthetic_text_features() -> None:
    gen = torch.Generator().manual_seed(2)
    texts = torch.randn(100, 6, generator=gen)
    src = split(torch.randn(50, 8, generator=gen), texts)
    tgt = split(torch.randn(50, 12, generator=gen), texts.clone())  # the same text trunk
    synthetic = torch.randn(7, 6, generator=gen)  # not near any real caption: must not move
    sim = build_similarity("lowrank", 7, rank=2)
    pairs = PairSet(
        images=torch.randn(7, 8, generator=gen),
        texts=synthetic,
        similarity=sim,
        similarity_args={"kind": "lowrank", "n": 7, "rank": 2},
        step_sizes={"image": 0.1, "text": 0.2},
        loss="wbce",
        meta={"encoder": "a"},
    )
    out = convert(pairs, feature_encoder("a"), feature_encoder("b"), src, tgt)
    assert torch.equal(out.texts, synthetic)
    rec = out.meta["transfer"]
    assert rec["texts"].startswith("kept") and "distinct_captions" not in rec
    assert out.similarity is sim and out.loss == "wbce"  # S travels with the pairs
    assert out.step_sizes == {} and rec["step_sizes"].startswith("dropped")
    # transfer.texts=decode: real captions even where the synthetic features could stay.
    real = convert(pairs, feature_encoder("a"), feature_encoder("b"), src, tgt, texts="decode")
    nearest = nearest_rows(synthetic, texts)
    assert torch.equal(real.texts, texts[nearest]) and not torch.equal(real.texts, synthetic)
    assert real.meta["transfer"]["texts"].startswith("decoded")
    assert real.meta["transfer"]["texts_mode"] == "decode"
    with pytest.raises(UserError, match="transfer.texts='keep'"):
        convert(pairs, feature_encoder("a"), feature_encoder("b"), src, tgt, texts="keep")


def test_pixels_are_renormalised_for_the_target_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    a = PixelRule(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    b = PixelRule(16, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    assert torch.allclose(repixel(a.normalise(raw), a, b, None), b.normalise(raw), atol=1e-5)
    c = PixelRule(24, b.mean, b.std)
    assert repixel(a.normalise(raw), a, c, "bicubic").shape == (4, 3, 24, 24)


def test_a_pixel_size_mismatch_without_a_resize_rule_is_one_line() -> None:
    a, c = PixelRule(16, (0.5,) * 3, (0.5,) * 3), PixelRule(24, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UserError) as err:
        repixel(torch.zeros(2, 3, 16, 16), a, c, None)
    assert "\n" not in str(err.value) and "transfer.resize=bicubic" in str(err.value)


# ------------------------------------------------------------------------------- the CLI


def mmdistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=600,
    )


def test_cli_evaluates_a_feature_space_set_as_a_decoded_coreset(tmp_path: Path) -> None:
    """Random real pairs are their own nearest neighbours: the decoded coreset is exactly the
    chosen pairs, read by the other encoder."""
    src, out = tmp_path / "src", tmp_path / "eval"
    p = mmdistill(
        "distill",
        *SMALL,
        *FROZEN,
        "method=random",
        "budget.pairs=12",
        "threads=1",
        f"hydra.run.dir={src}",
    )
    assert p.returncode == 0, p.stderr
    p = mmdistill(
        "evaluate", f"source={src}", *SMALL, *FROZEN, *OTHER, "threads=1", f"hydra.run.dir={out}"
    )
    assert p.returncode == 0, p.stderr
    res = io.read_json(out / "results.json")
    rec = res["transfer"]
    assert (rec["source_encoder"], rec["target_encoder"]) == ("tiny", "tiny48")
    assert rec["decoded_coreset"] and res["encoder"] == "tiny48" and res["method"] == "random"
    assert "decoded coreset" in (out / "recall.md").read_text()
    chosen = PairSet.load(src / "distilled")
    moved = PairSet.load(out / "transferred")
    assert moved.images.dim() == 2 and len(moved) == 12
    assert rec["distinct_images"] == len(torch.unique(chosen.images, dim=0))
    # Rows that were one real image in the source's space are one real image in the target's.
    same_src = (chosen.images[:, None] == chosen.images[None]).all(-1)
    same_out = (moved.images[:, None] == moved.images[None]).all(-1)
    assert torch.equal(same_src, same_out)
    assert json.loads((out / "transferred.json").read_text())["meta"]["transfer"] == rec
    # From its Hugging Face export (which keeps the distill config) it converts the same way.
    p = mmdistill("export", str(src), "--format", "hf")
    assert p.returncode == 0, p.stderr
    out_hf = tmp_path / "eval-hf"
    p = mmdistill(
        "evaluate",
        f"source={src / 'hf'}",
        *SMALL,
        *FROZEN,
        *OTHER,
        "threads=1",
        f"hydra.run.dir={out_hf}",
    )
    assert p.returncode == 0, p.stderr
    res_hf = io.read_json(out_hf / "results.json")
    assert res_hf["transfer"] == rec and res_hf["summary"] == res["summary"]


def test_cli_resizes_pixel_sets_only_when_told(tmp_path: Path) -> None:
    src = tmp_path / "src"
    p = mmdistill(
        "distill", *SMALL, "method=random", "budget.pairs=12", "threads=1", f"hydra.run.dir={src}"
    )
    assert p.returncode == 0, p.stderr
    p = mmdistill(
        "evaluate",
        f"source={src}",
        *SMALL,
        *OTHER,
        "threads=1",
        f"hydra.run.dir={tmp_path / 'refused'}",
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "transfer.resize=bicubic" in p.stderr
    assert not (tmp_path / "refused" / "results.json").exists()
    out = tmp_path / "resized"
    p = mmdistill(
        "evaluate",
        f"source={src}",
        *SMALL,
        *OTHER,
        "transfer.resize=bicubic",
        "threads=1",
        f"hydra.run.dir={out}",
    )
    assert p.returncode == 0, p.stderr
    rec = io.read_json(out / "results.json")["transfer"]
    assert not rec["decoded_coreset"] and "resized to 48 px (bicubic)" in rec["images"]
    assert PairSet.load(out / "transferred").images.shape[1:] == (3, 48, 48)
