"""`mmdistill export --format hf` and reading it back.

The round trip must be exact: the PairSet rebuilt from the folder equals the saved one tensor
for tensor (similarity, step sizes and image index included), and `evaluate` of the export
gives the same students, to the digit, as `evaluate` of the run folder at the same seed and
threads. A folder that is not an export, or a damaged one, is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mmdistill.config import register_resolvers
from mmdistill.errors import UserError
from mmdistill.report import share
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import LowRankSimilarity

REPO = Path(__file__).resolve().parents[1]
DATA = ["dataset.split_sizes=[60,20,20]", "device=cpu", "threads=1"]
EVAL = ["eval.students=2", "eval.steps=5"]
PIXEL_ENCODER = ["encoder.train_image_trunk=true", "encoder.train_text_trunk=false"]


def mmdistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", *args],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random coreset in pixel space and in feature space (frozen tiny image trunk)."""
    root = tmp_path_factory.mktemp("share")
    p = mmdistill(
        "distill", "-m", *DATA, *EVAL, "budget.pairs=8", "method=random",
        "encoder.train_image_trunk=true,false", "encoder.train_text_trunk=false",
        f"hydra.sweep.dir={root}", "hydra.sweep.subdir=${encoder.train_image_trunk}",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    register_resolvers()
    return {"pixel": root / "True", "feature": root / "False"}


def same_sets(a: PairSet, b: PairSet) -> None:
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert torch.equal(a.texts, b.texts) and a.texts.dtype == b.texts.dtype
    for x, y in ((a.text_mask, b.text_mask), (a.image_index, b.image_index)):
        assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype)
    assert (a.similarity is None) == (b.similarity is None)
    if a.similarity is not None:
        sa, sb = a.similarity.state_dict(), b.similarity.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.step_sizes == b.step_sizes and a.loss == b.loss and a.meta == b.meta
    assert a.similarity_args == b.similarity_args


def test_pixel_export_loads_in_datasets_and_evaluates_to_the_same_digits(
    runs: dict, tmp_path: Path
) -> None:
    run = runs["pixel"]
    meta = json.loads((run / "meta.json").read_text())
    meta["git"] = {"sha": "0123456789abcdef", "dirty": True}  # as if made by another commit
    (run / "meta.json").write_text(json.dumps(meta))
    p = mmdistill("export", str(run), "--format", "hf")
    assert p.returncode == 0, p.stderr
    folder = run / "hf"
    ds = datasets.load_from_disk(str(folder))
    assert ds.num_rows == 8 and not any(ds["image_is_nearest_neighbour"])
    image = ds[0]["image"]  # decoded by datasets: the de-normalised synthetic pixels
    assert image.size == (32, 32) and image.mode == "RGB"
    saved = PairSet.load(run / "distilled")
    src = saved.meta["source_pairs"]
    real = share.real_train(share.run_config(run), run, "cpu")[2]
    assert ds["caption"] == [real.captions[i] for i in src]  # real pairs decode to themselves
    card = (folder / "README.md").read_text()
    assert "# random · 8 pairs · shapes (tiny)" in card and "r_mean" in card
    assert "equivalent budget: 8.0 pairs" in card
    assert "(commit 0123456789, with uncommitted changes)" in card  # the run's, not this one's
    same_sets(saved, share.read_set(folder))
    scores = {}
    for name, source in (("run", run), ("hf", folder)):
        out = tmp_path / name
        p = mmdistill(
            "evaluate", f"source={source}", *DATA, *EVAL, *PIXEL_ENCODER, f"hydra.run.dir={out}"
        )
        assert p.returncode == 0, p.stderr
        scores[name] = json.loads((out / "results.json").read_text())
    assert scores["hf"]["students"] == scores["run"]["students"]
    assert scores["hf"]["summary"] == scores["run"]["summary"]
    stored = saved.images.nbytes + saved.texts.nbytes  # text features, no mask
    assert scores["hf"]["cost"]["bytes"] == scores["run"]["cost"]["bytes"] == stored
    assert scores["hf"]["cost"]["pairs_equiv"] == 8


def test_feature_export_shows_nearest_real_images(runs: dict, tmp_path: Path) -> None:
    run = runs["feature"]
    folder = share.export_hf(run, out=tmp_path / "hf")
    ds = datasets.load_from_disk(str(folder))
    assert all(ds["image_is_nearest_neighbour"])
    cfg = share.run_config(run)
    real = share.real_train(cfg, run, "cpu")[2]
    src = PairSet.load(run / "distilled").meta["source_pairs"]
    ids = real.rows["image_id"]
    # a random coreset's features are real images' own features: their nearest is themselves
    assert ds["image_nearest_id"] == [str(ids[int(real.caption_image[i])]) for i in src]
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in ds["image_nearest_cos"])
    same_sets(PairSet.load(run / "distilled"), share.read_set(folder))


def test_similarity_step_sizes_and_image_index_survive_exactly(runs: dict, tmp_path: Path) -> None:
    """A LoRS-like set (S, learned step sizes, pairs sharing images) comes back bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(runs["pixel"], run)
    base = PairSet.load(run / "distilled")
    torch.manual_seed(0)
    sim = LowRankSimilarity(8, rank=3, alpha=2.0)
    with torch.no_grad():
        sim.diag.uniform_(0.5, 1.5)
        sim.right.normal_()
    sim.requires_grad_(False)
    lors = PairSet(
        images=base.images[:5] + 1e-3 * torch.randn(5, 3, 32, 32),
        texts=base.texts,
        text_mask=base.text_mask,
        image_index=torch.tensor([0, 1, 2, 3, 4, 4, 0, 2]),
        similarity=sim,
        similarity_args={"kind": "lowrank", "n": 8, "rank": 3, "alpha": 2.0},
        step_sizes={"image": 0.123456789, "text": 1e-7 / 3},
        loss="wbce",
        meta={**base.meta, "method": "lors"},
    )
    lors.save(run / "distilled")
    folder = share.export_hf(run, out=tmp_path / "hf")
    back = share.read_set(folder)
    same_sets(lors, back)
    ds = datasets.load_from_disk(str(folder))
    target = torch.from_numpy(np.stack(ds.with_format("numpy")["target_similarity"]))
    assert torch.equal(target, sim(torch.arange(8)))


def test_not_an_export_and_damaged_exports_are_one_line(runs: dict, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"caption": ["a", "b"]}).save_to_disk(str(plain))
    with pytest.raises(UserError, match="not an mmdistill export .*--format hf"):
        share.read_set(plain)
    p = mmdistill("evaluate", f"source={plain}", *DATA, *EVAL, f"hydra.run.dir={tmp_path / 'e'}")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "not an mmdistill export" in p.stderr
    with pytest.raises(UserError, match="no distilled.safetensors and no Hugging Face"):
        share.read_set(tmp_path)

    folder = share.export_hf(runs["pixel"], out=tmp_path / "hf")
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])  # cut short
    with pytest.raises(UserError, match="is damaged .*export the distill run again"):
        share.read_set(folder)
    arrow.unlink()
    with pytest.raises(UserError, match="is damaged"):
        share.read_set(folder)

    folder = share.export_hf(runs["pixel"], out=tmp_path / "hf2")
    marker = json.loads((folder / share.MARKER).read_text())
    marker["tensors"]["syn_text"]["shape"] = [8, 99]
    (folder / share.MARKER).write_text(json.dumps(marker))
    with pytest.raises(UserError, match="syn_text has shape"):
        share.read_set(folder)
    (folder / share.MARKER).write_text("{not json")
    with pytest.raises(UserError, match="mmdistill.json"):
        share.read_set(folder)


def test_export_never_overwrites_a_foreign_folder(runs: dict, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an mmdistill export; give an empty --out"):
        share.export_hf(runs["pixel"], out=tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not an mmdistill export"):
        share.export_hf(runs["pixel"], out=tmp_path / "mine.txt")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    first = share.export_hf(runs["pixel"], out=tmp_path / "again")
    assert share.export_hf(runs["pixel"], out=first) == first  # an earlier export is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_unknown_export_format_is_one_line(runs: dict) -> None:
    from mmdistill.jobs import export

    with pytest.raises(UserError, match="argument --format: invalid choice: 'zip'"):
        export([str(runs["pixel"]), "--format", "zip"])
