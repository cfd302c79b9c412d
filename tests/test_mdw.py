"""MDW: the GMM split, the dual-track experts and their detection scores, correspondence maps,
the soft matrix P, the switches (shapes + tiny), and detection precision on real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from mmdistill.config import compose, conf_dir
from mmdistill.errors import UserError
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods import DistillContext, get_method
from mmdistill.methods.mdw import MDW, correspondence_maps
from mmdistill.methods.mdw_dual_track import (
    DualTrackSettings,
    clean_probability,
    complementary_loss,
    detect_clean_pairs,
    fit_gmm_1d,
    robust_buffer,
    robust_noise_cfg,
)
from mmdistill.models.factory import build_encoder
from mmdistill.runs import Run
from mmdistill.training.experts import Buffer, ExpertSettings, ExpertSource, buffer_key
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import student_loss_name, train_student

SMALL = [
    "dataset.split_sizes=[40,20,20]",
    "noise=shuffle",
    "noise.ratio=0.5",
    "expert.num_experts=2",
    "expert.epochs=2",
    "device=cpu",
    "budget.pairs=10",
    "eval.students=1",
    "eval.steps=20",
    "method=mdw",
    "method.iterations=2",
    "method.syn_steps=2",
    "method.max_start_epoch=1",
    "method.eval_every=0",
    "method.checkpoint_every=1",
    "method.dual.folds=2",
    "method.dual.rounds=1",
    "method.dual.scorer_steps=5",
    "method.dual.select_threshold=0.5",
    # tiny's token embeddings are ~0.02: the default lr_txt (100, for feature space) sends them
    # out of the sane range at the first step, and the run stops as diverged
    "method.lr_txt=1e-3",
]
FEATURE = [
    "encoder.train_image_trunk=false",
    "encoder.train_text_trunk=false",
    "method.lr_img=1",
    "method.lr_txt=1",
    "method.lr_lr=1e-4",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(*overrides: str, small: bool = True) -> DictConfig:
    return compose("distill", [*(SMALL if small else []), *overrides])


def context(run_dir: Path, cfg: DictConfig) -> DistillContext:
    run = Run(run_dir, "distill", "cpu", 0)
    prep = prepare(cfg, "cpu", run, None)
    return distill_context(cfg, prep, int(cfg.budget.pairs), "cpu", run, None)


def distill(run_dir: Path, cfg: DictConfig) -> tuple[PairSet, DistillContext]:
    ctx = context(run_dir, cfg)
    return get_method("mdw")(cfg.method).distill(ctx), ctx


# ------------------------------------------------------------------------------ the split


def test_gmm_recovers_a_planted_two_cluster_loss_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    clean = 0.8 + 0.3 * torch.randn(700, generator=g)  # small losses: clean pairs
    noisy = 3.0 + 0.6 * torch.randn(300, generator=g)
    x = torch.cat([clean, noisy])
    gmm = fit_gmm_1d(x)
    assert abs(gmm.means[0] - 0.8) < 0.05 and abs(gmm.means[1] - 3.0) < 0.1
    assert abs(gmm.variances[0].sqrt() - 0.3) < 0.05 and abs(gmm.variances[1].sqrt() - 0.6) < 0.1
    assert abs(gmm.weights[0] - 0.7) < 0.03
    prob = clean_probability(x)
    truth = torch.arange(1000) < 700
    assert ((prob > 0.5) == truth).float().mean() > 0.97
    # Never less clean for a smaller loss (the wide component cannot claim the low tail).
    order = torch.argsort(x)
    assert bool((prob[order][1:] <= prob[order][:-1] + 1e-6).all())


def test_complementary_loss_matches_its_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, -0.4, 1.5]])
    want = torch.tensor(0.0)
    for lg in (logits, logits.T):
        p = torch.softmax(lg, dim=1)
        off = ~torch.eye(3, dtype=torch.bool)
        want += 0.5 * (-torch.log(1 - p[off].view(3, 2))).sum(1).mean()
    assert torch.allclose(complementary_loss(logits), want.clone().detach(), atol=1e-6)
    # A masked entry (another caption of the same image) is no complementary label at all.
    ignore = torch.zeros(3, 3, dtype=torch.bool)
    ignore[0, 1] = ignore[1, 0] = True
    assert complementary_loss(logits, ignore) < complementary_loss(logits)


def planted(
    n_images: int = 160, ratio: float = 0.5, seed: int = 0
) -> tuple[RealSplit, torch.Tensor]:
    """Features from a shared 8-d latent, 5 captions per image, half the images' captions
    moved to other images as `noise=shuffle` does; returns the split and the clean mask."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_images, 8, generator=g)
    a, b = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    images = z @ a + 0.3 * torch.randn(n_images, 64, generator=g)
    caption_image = torch.arange(n_images).repeat_interleave(5)
    texts = z[caption_image] @ b + 0.3 * torch.randn(5 * n_images, 64, generator=g)
    chosen = torch.randperm(n_images, generator=g)[: int(ratio * n_images)]
    source = torch.arange(n_images)
    source[chosen] = chosen.roll(-1)
    texts = texts.view(n_images, 5, 64)[source].reshape(-1, 64)
    clean = (source == torch.arange(n_images))[caption_image]
    captions = [f"caption {i}" for i in range(len(texts))]
    return RealSplit("train", images, texts, None, caption_image, captions), clean


@pytest.fixture(scope="module")
def feature_encoder():
    cfg = OmegaConf.load(conf_dir() / "encoder" / "tiny.yaml")
    cfg.train_image_trunk = cfg.train_text_trunk = False
    return build_encoder(cfg)


def test_dual_track_detects_planted_noise(feature_encoder, tmp_path: Path) -> None:
    train, clean = planted()
    dual = DualTrackSettings(
        folds=2, rounds=2, scorer_steps=150, scorer_dropout=0.0, scorer_weight_decay=0.0
    )
    det = detect_clean_pairs(feature_encoder, train, dual, 0, "cpu", clean, say=lambda s: None)
    final = det.history[-1]["consensus"]
    assert final["precision"] >= 0.9, det.history
    assert final["recall"] >= 0.5, det.history
    # The tracks disagree somewhere (two partitions, two seeds), and each scores its pairs.
    assert not torch.equal(det.prob[0], det.prob[1])
    assert det.history[-1]["track_A"]["precision"] >= 0.85


def test_robust_buffer_is_keyed_apart_and_cached(feature_encoder, tmp_path: Path) -> None:
    train, clean = planted(n_images=60)
    dual = DualTrackSettings(folds=2, rounds=1, scorer_steps=20, select_threshold=0.5)
    expert_cfg = OmegaConf.create(
        {"num_experts": 3, "epochs": 2, "lr": 0.1, "momentum": 0.0, "batch_size": 64, "seed": 3}
    )
    noise = OmegaConf.create({"name": "shuffle", "ratio": 0.5, "seed": 0})
    said: list[str] = []
    source = ExpertSource(
        expert_cfg, feature_encoder, train, None, "planted", noise, tmp_path, "cpu", say=said.append
    )
    rb = robust_buffer(source, dual, true_clean=clean)
    assert rb.buffer.indices() == [0, 1, 2]
    assert any("detection" in s for s in said)
    settings = ExpertSettings.from_cfg(expert_cfg)
    plain_key, _ = buffer_key(feature_encoder, train, "planted", noise, settings)
    robust_key, _ = buffer_key(
        feature_encoder, train, "planted", robust_noise_cfg(noise, dual), settings
    )
    assert rb.buffer.key == robust_key != plain_key
    stats = json.loads(rb.buffer.metadata(1)["stats"])
    assert stats["track"] == "B" and "precision" in stats["detection"]
    assert stats["detection"]["precision"] == pytest.approx(rb.scores["precision"])
    assert rb.buffer.segment(2, 0, 2).shape[0] == 3
    said.clear()
    again = robust_buffer(source, dual, true_clean=clean)
    assert not said  # everything came from the cache
    assert torch.equal(again.clean, rb.clean)
    # Other dual-track settings are other experts.
    other = DualTrackSettings(folds=2, rounds=1, scorer_steps=20, comp_weight=0.0)
    key3, _ = buffer_key(
        feature_encoder, train, "planted", robust_noise_cfg(noise, other), settings
    )
    assert key3 != robust_key


def test_dual_track_settings_errors() -> None:
    with pytest.raises(UserError, match="unknown method.dual keys"):
        DualTrackSettings.from_cfg({"fold": 2})
    with pytest.raises(UserError, match="folds >= 2"):
        DualTrackSettings.from_cfg({"folds": 1})
    with pytest.raises(UserError, match="threshold"):
        DualTrackSettings.from_cfg({"select_threshold": 1.0})


# --------------------------------------------------------------------------- maps and P


def test_correspondence_maps_follow_the_top_texts(tmp_path: Path) -> None:
    ctx = context(tmp_path, compose_cfg())
    student = ctx.encoder.new_student(0).eval()
    real = ctx.train.pairset(torch.arange(6))
    texts = ctx.encoder.text_trunk.embed_tokens(real.texts).float()
    eye = torch.eye(6)
    w = correspondence_maps(student, real.images, texts, real.text_mask, eye, 1)
    assert w.shape == (6, 1, *real.images.shape[-2:])
    assert float(w.min()) >= 0 and float(w.max()) <= 1 + 1e-6
    assert float(w.amax(dim=(1, 2, 3)).min()) > 0.99  # each map is scaled to peak at 1
    assert float(w.std()) > 0.01  # a spatial map, not a constant
    # Pointing every image at another text changes the maps.
    shifted = correspondence_maps(
        student, real.images, texts, real.text_mask, eye.roll(1, dims=1), 1
    )
    assert not torch.allclose(w, shifted)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "nfnet_l0"])
def test_correspondence_maps_vary_across_pixels_on_a_timm_conv_trunk(arch: str) -> None:
    """On timm conv trunks (Lite0, the papers' NFNet) the last 4-D output is the global pool,
    C x 1 x 1: Grad-CAM there gives one constant per image. The maps must come from the last
    spatial feature map instead, and the trunk must still compute what timm's forward does."""
    import timm

    from mmdistill.models.pretrained import TimmTrunk
    from mmdistill.models.student import Student

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    trunk = TimmTrunk(model).eval()
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(trunk(images), model(images))
    student = Student(
        image_head=torch.nn.Linear(trunk.out_dim, 16),
        text_head=torch.nn.Linear(16, 16),
        image_trunk=trunk,
    ).eval()
    texts = torch.randn(3, 16)
    w = correspondence_maps(student, images, texts, None, torch.eye(3), 1)
    assert w.shape == (3, 1, 96, 96)
    spread = w.amax(dim=(1, 2, 3)) - w.amin(dim=(1, 2, 3))
    assert float(spread.min()) > 0.2, spread  # every image's map varies across its pixels


def test_budget_counts_the_matrix_and_memory_errors(tmp_path: Path) -> None:
    method = MDW(compose_cfg().method)
    method._pair_floats = 1664  # lite0_minilm: 1280 + 384 floats per pair
    assert method.budget(100) == 94  # 94 + ceil(94^2 / 1664) = 100
    assert MDW(compose_cfg("method.similarity_budget=one_pair").method).budget(100) == 99
    assert MDW(compose_cfg("method.soft_matrix=false").method).budget(100) == 100
    with pytest.raises(UserError, match="similarity_budget"):
        MDW(compose_cfg("method.similarity_budget=free").method)
    cfg = compose_cfg(*FEATURE, "method.max_matrix_memory=1e-12")
    ctx = context(tmp_path, cfg)
    with pytest.raises(UserError, match="soft correspondence matrix") as err:
        get_method("mdw")(cfg.method).distill(ctx)
    assert "\n" not in str(err.value) and "method.soft_matrix=false" in str(err.value)


# ------------------------------------------------------------------- end to end, switches


def test_mdw_pixel_space_with_maps_saves_p_and_detection(tmp_path: Path) -> None:
    cfg = compose_cfg()
    pairs, ctx = distill(tmp_path / "run", cfg)
    assert ctx.encoder.image_space == "pixel"
    n = len(pairs)
    assert n == 9  # 10 - ceil(9^2 / floats per pair) for the 32 px tiny encoder
    assert pairs.loss == "soft_infonce" and pairs.similarity_args == {"kind": "full", "n": n}
    info = pairs.meta["mdw"]
    assert info["correspondence_maps"] is True and info["dual_track"] is True
    assert 0.0 <= info["detection"]["precision"] <= 1.0
    det = json.loads((tmp_path / "run" / "detection.json").read_text())
    assert det["against_noise_mask"] and det["clean_set"] == info["detection"]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["detection"] == info["detection"]
    # The set was distilled from dual-track experts: their buffer carries the robust key.
    buf = Buffer(Path(pairs.meta["buffer"]))
    assert buf.info["parts"]["noise"]["expert_training"]["kind"] == "dual_track"
    # P round-trips with the set and is what the students train against.
    pairs.save(tmp_path / "set")
    loaded = PairSet.load(tmp_path / "set")
    assert torch.equal(loaded.similarity.matrix, pairs.similarity.matrix)
    assert student_loss_name(cfg.eval, loaded) == "soft_infonce"
    idx = torch.arange(n)
    _, _, _, targets = loaded.batch(idx, "cpu")
    assert torch.equal(targets, loaded.similarity.matrix)
    with torch.no_grad():
        loaded.similarity.matrix.copy_(torch.eye(n).roll(1, dims=1))
    a, _ = train_student(ctx.encoder.new_student(1), pairs, cfg.eval, 1, "cpu")
    b, _ = train_student(ctx.encoder.new_student(1), loaded, cfg.eval, 1, "cpu")
    images, texts, mask, _ = pairs.batch(idx, "cpu")
    with torch.no_grad():
        assert not torch.allclose(a.logits(images, texts, mask), b.logits(images, texts, mask))


def test_switches_change_behaviour(tmp_path: Path) -> None:
    base, _ = distill(tmp_path / "base", compose_cfg())
    no_maps, _ = distill(tmp_path / "no_maps", compose_cfg("method.correspondence_maps=false"))
    assert no_maps.meta["mdw"]["correspondence_maps"] is False
    assert not torch.allclose(base.images, no_maps.images)  # same seed: only the maps differ
    plain, _ = distill(
        tmp_path / "plain",
        compose_cfg("method.soft_matrix=false", "method.dual_track=false"),
    )
    assert plain.similarity is None and plain.loss == "infonce"
    assert "detection" not in plain.meta["mdw"] and len(plain) == 10
    assert Buffer(Path(plain.meta["buffer"])).key != Buffer(Path(base.meta["buffer"])).key
    assert not (tmp_path / "plain" / "detection.json").exists()


def test_mdw_feature_space_runs_without_maps(tmp_path: Path) -> None:
    pairs, ctx = distill(tmp_path / "run", compose_cfg(*FEATURE))
    assert ctx.encoder.image_space == "feature" and pairs.images.dim() == 2
    assert pairs.meta["mdw"]["correspondence_maps"] == "off (feature space)"
    assert pairs.similarity is not None and math.isfinite(float(pairs.images.sum()))
    assert pairs.loss == "soft_infonce"  # its formula is pinned in test_math_pins.py
