"""CovMatch: the loss and its gradients, the per-budget settings, bad input, resume, a CLI run
on shapes, and the real-data comparison with random pairs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mmdistill import io
from mmdistill.config import compose
from mmdistill.errors import UserError
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods import DistillContext, get_method
from mmdistill.methods import covmatch as covmatch_module
from mmdistill.methods.coresets import herding, joint_features, kcenter
from mmdistill.methods.covmatch import (
    CovMatch,
    PairWeights,
    covmatch_loss,
    cross_covariance,
    weighted_statistics,
)
from mmdistill.methods.covmatch import robust as covmatch_robust
from mmdistill.methods.loop import OuterLoop
from mmdistill.models.factory import build_encoder
from mmdistill.models.student import TextTrunk
from mmdistill.runs import Run
from mmdistill.training.cost import set_cost
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import run_protocol
from mmdistill.training.storage import int8_rows

REPO = Path(__file__).resolve().parents[1]
SMALL = ["dataset.split_sizes=[60,20,30]", "eval.students=1", "eval.steps=5"]
# Frozen tiny trunks: the feature-space code path (what lite0_minilm uses) at shapes speed.
FROZEN = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]
SHORT = ["method.steps=20", "method.reset_every=5", "method.checkpoint_every=10"]


def compose_cfg(*overrides: str) -> DictConfig:
    return compose("distill", ["device=cpu", "method=covmatch", *overrides])


def context(run_dir: Path, cfg: DictConfig, pairs: int) -> tuple[DistillContext, object]:
    run = Run(run_dir, "distill", "cpu", int(cfg.seed))
    prep = prepare(cfg, "cpu", run, None)
    ctx = distill_context(cfg, prep, pairs, "cpu", run, None)
    return ctx, prep


# --------------------------------------------------------------------------- the loss


def test_cross_covariance_is_the_centred_unbiased_cross_block() -> None:
    gen = torch.Generator().manual_seed(0)
    v, t = torch.randn(50, 6, generator=gen) + 3, torch.randn(50, 4, generator=gen)
    full = torch.cov(torch.cat([v, t], 1).T)  # divisor n - 1
    torch.testing.assert_close(cross_covariance(v, t), full[:6, 6:])


def _features(n: int, seed: int, centre: bool = False) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 12, generator=gen)
    t = v[:, :5] @ torch.randn(5, 7, generator=gen) + 0.3 * torch.randn(n, 7, generator=gen)
    if centre:
        v, t = v - v.mean(0), t - t.mean(0)
    return v, t


def _heads() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(12, 3), nn.Linear(7, 3)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_loss_is_zero_exactly_when_synthetic_statistics_are_rho_times_real(rho: float) -> None:
    real = _features(64, 0, centre=True)
    # Scaling both modalities by sqrt(rho) scales the cross-covariance by rho; means stay 0.
    matched = tuple(x * rho**0.5 for x in _features(64, 0, centre=True))
    loss, parts = covmatch_loss(real, matched, _heads(), rho, 0.5)
    assert abs(loss.item()) < 1e-3 * parts["cov"] + 1e-4
    other = _features(30, 1)
    loss, parts = covmatch_loss(real, other, _heads(), rho, 0.5)
    assert parts["cov"] > 0.1 and parts["mean"] > 0.01 and loss.item() > parts["cov"]


def test_loss_matches_the_direct_formula_in_both_real_statistics_paths() -> None:
    real, syn, heads = _features(80, 0), _features(20, 1), _heads()
    cov = (2 * cross_covariance(*real) - cross_covariance(*syn)).pow(2).sum()
    mean = sum(
        (h(r).mean(0) - h(s).mean(0)).pow(2).sum() for h, r, s in zip(heads, real, syn, strict=True)
    )
    batch, _ = covmatch_loss(real, syn, heads, 2.0, 0.3)
    means = tuple(x.mean(0, keepdim=True) for x in real)
    full, _ = covmatch_loss(means, syn, heads, 2.0, 0.3, real_cov=cross_covariance(*real))
    torch.testing.assert_close(batch, cov + 0.3 * mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, cov + 0.3 * mean, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_pixels_and_token_embeddings() -> None:
    cfg = compose_cfg()
    enc = build_encoder(cfg.encoder)
    student = enc.new_student(0)
    tok = enc.tokenize(["a red circle on the left", "a small blue square", "two shapes", "x"])
    pixels = torch.randn(4, 3, 32, 32, requires_grad=True)
    tokens = enc.text_trunk.embed_tokens(tok.ids).detach().requires_grad_(True)
    with torch.no_grad():
        real = (
            student.image_features(torch.randn(8, 3, 32, 32)),
            student.text_features(
                enc.tokenize(["a green triangle"] * 4 + ["a yellow circle"] * 4).ids,
                torch.ones(8, tok.ids.shape[1], dtype=torch.long),
            ),
        )
    syn = (student.image_features(pixels), student.text_features(tokens, tok.mask))
    loss, _ = covmatch_loss(real, syn, (student.image_head, student.text_head), 2.0, 0.1)
    g_pix, g_tok = torch.autograd.grad(loss, [pixels, tokens])
    assert g_pix.abs().sum() > 0
    real_tokens = tok.mask.bool()
    assert (g_tok[real_tokens].abs().sum(-1) > 0).all()  # every real token position moves
    assert g_tok[~real_tokens].abs().sum() == 0  # padding is masked out of the trunk


def test_random_init_students_read_token_embeddings_like_the_encoder() -> None:
    """Synthetic token embeddings are made with the encoder's token table; every fresh
    random-init student must share it (the rest of the trunk is a new draw)."""
    enc = build_encoder(compose_cfg().encoder)
    ids = enc.tokenize(["a red circle"]).ids
    a, b = enc.new_student(1).text_trunk, enc.new_student(2).text_trunk
    assert torch.equal(a.embed_tokens(ids), enc.text_trunk.embed_tokens(ids))
    assert torch.equal(b.embed_tokens(ids), enc.text_trunk.embed_tokens(ids))
    assert not torch.equal(a.text.positional_embedding, b.text.positional_embedding)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("pairs", "rho", "lam", "steps", "syn_batch"),
    [
        (100, 2.0, 0.1, 10000, 100),
        (150, 2.0, 0.1, 10000, 150),
        (200, 1.0, 0.1, 10000, 200),
        (500, 1.0, 0.5, 20000, 256),
        (1000, 1.0, 0.5, 20000, 256),
        (50, 2.0, 0.1, 10000, 50),
    ],
)
def test_paper_defaults_by_budget(pairs, rho, lam, steps, syn_batch) -> None:
    s = CovMatch(compose_cfg("encoder=lite0_minilm").method).settings(pairs)
    assert (s["rho"], s["lambda"], s["steps"], s["syn_batch"]) == (rho, lam, steps, syn_batch)


def test_the_tiny_encoder_sets_a_short_run() -> None:
    """The paper's step counts are for pretrained trunks on real data; `tiny` (the default
    run on shapes) sets its own, and an explicit method.steps still wins."""
    assert CovMatch(compose_cfg().method).settings(100)["steps"] == 100
    assert CovMatch(compose_cfg("method.steps=7").method).settings(100)["steps"] == 7


def test_feature_space_takes_every_synthetic_pair_unless_told() -> None:
    """The paper's 256-of-500 mini-batch is a pixel-space memory bound (module doc)."""
    assert CovMatch(compose_cfg().method).settings(500, feature_space=True)["syn_batch"] == 500
    told = CovMatch(compose_cfg("method.syn_batch=128").method)
    assert told.settings(500, feature_space=True)["syn_batch"] == 128


def test_explicit_settings_override_the_budget_table() -> None:
    cfg = compose_cfg(
        "encoder=lite0_minilm", "method.rho=1.5", "method.lambda=0", "method.syn_batch=64"
    )
    s = CovMatch(cfg.method).settings(100)
    assert (s["rho"], s["lambda"], s["steps"], s["syn_batch"]) == (1.5, 0, 10000, 64)


@pytest.mark.parametrize(
    ("override", "pairs", "match"),
    [
        ("method.syn_batch=256", 100, "larger than the budget"),
        ("method.rho=-1", 100, "method.rho=-1"),
        ("method.lambda=-0.1", 100, "method.lambda=-0.1"),
        ("method.syn_batch=all", 1, "at least 2"),
    ],
)
def test_bad_settings_are_one_user_error(override: str, pairs: int, match: str) -> None:
    with pytest.raises(UserError, match=match):
        CovMatch(compose_cfg(override).method).settings(pairs)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("method.checkpoint_every=7", "multiple of"),
        ("method.reset_to=sometimes", "method.reset_to"),
        ("method.real_batch=1", "at least 2"),
    ],
)
def test_bad_loop_settings_are_one_user_error(override: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        CovMatch(compose_cfg(override).method)


class _IdsOnlyTrunk(TextTrunk):
    """A text tower that reads token ids only (no embedding input)."""

    out_dim, token_dim = 4, 4

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.zeros(len(x), 4)


def test_text_training_needs_a_trunk_that_reads_embeddings(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL)
    ctx, _ = context(tmp_path, cfg, 10)
    ctx.encoder._trunks = (ctx.encoder.image_trunk, _IdsOnlyTrunk())  # swap the built trunks
    with pytest.raises(UserError, match="cannot read token embeddings"):
        CovMatch(cfg.method).distill(ctx)


def test_full_real_statistics_need_frozen_trunks(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, "method.real_stats=full")
    ctx, _ = context(tmp_path, cfg, 10)
    with pytest.raises(UserError, match="real_stats=batch"):
        CovMatch(cfg.method).distill(ctx)


@pytest.mark.parametrize("init", ["herding", "kcenter"])
def test_coreset_init_starts_from_that_coreset(tmp_path: Path, init: str) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, f"method.init={init}")
    ctx, _ = context(tmp_path, cfg, 10)
    feats = joint_features(ctx)
    gen = torch.Generator().manual_seed(0)
    syn = CovMatch(cfg.method)._init_synthetic(ctx, gen, 10)
    first = int(torch.randint(len(feats), (1,), generator=torch.Generator().manual_seed(0)))
    want = herding(feats, 10) if init == "herding" else kcenter(feats, 10, first)
    assert torch.equal(syn["source"], want)
    train = ctx.train
    assert torch.equal(syn["images"], train.images[train.caption_image[want]].float())
    assert torch.equal(syn["texts"], train.texts[want].float())
    # Robust mode's clean pool: the same coreset, taken among the pool's pairs.
    pool = torch.arange(0, train.n_pairs, 2)
    in_pool = CovMatch(cfg.method)._init_synthetic(ctx, torch.Generator().manual_seed(0), 10, pool)
    sub = feats[pool]
    first = int(torch.randint(len(sub), (1,), generator=torch.Generator().manual_seed(0)))
    picked = herding(sub, 10) if init == "herding" else kcenter(sub, 10, first)
    assert torch.equal(in_pool["source"], pool[picked])
    # The default stays the paper's random real pairs.
    plain = compose_cfg(*SMALL, *FROZEN)
    assert plain.method.init == "random"
    rand = CovMatch(plain.method)._init_synthetic(ctx, torch.Generator().manual_seed(0), 10)
    assert torch.equal(
        rand["source"],
        torch.randperm(train.n_pairs, generator=torch.Generator().manual_seed(0))[:10],
    )


# --------------------------------------------------------------------------- low rank


def test_factored_pairs_fill_the_bytes_of_the_budget() -> None:
    # lite0_minilm: (100 - 56 - 1) x (1280 + 384) / 112 = 638.9 pairs of rank 56.
    assert covmatch_module.factored_pairs(100, 56, (1280, 384)) == 638
    for budget, rank, dims in [(100, 56, (1280, 384)), (12, 2, (32, 20)), (50, 7, (9, 300))]:
        n = covmatch_module.factored_pairs(budget, rank, dims)
        stored = rank * sum(dims) + sum(dims) + n * 2 * rank  # bases, offsets, coefficients
        assert stored <= budget * sum(dims) < stored + 2 * rank


def test_lowrank_set_lies_in_the_cross_covariance_subspace_and_fits_the_budget(
    tmp_path: Path,
) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT, "method=covmatch_lowrank", "method.rank=2")
    ctx, _ = context(tmp_path, cfg, 12)
    pairs = CovMatch(cfg.method).distill(ctx)
    dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
    assert len(pairs) == covmatch_module.factored_pairs(12, 2, dims) > 12
    cost = set_cost(pairs)
    assert cost["pairs_equiv"] <= 12 and pairs.meta["rank"] == 2
    # The bases are the top singular directions of the real cross-covariance, the offsets the
    # real means, and every synthetic row is offset + its coefficients on the basis.
    v = ctx.train.images[ctx.train.caption_image].float()
    t = ctx.train.texts.float()
    u, _, vh = torch.linalg.svd(cross_covariance(v, t))
    for key, real, top in (("images", v, u[:, :2].T), ("texts", t, vh[:2])):
        f = pairs.factors[key]
        torch.testing.assert_close(f.basis @ f.basis.T, torch.eye(2))
        torch.testing.assert_close((f.basis @ top.T).abs(), torch.eye(2), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.offset, real.mean(0))
        assert torch.equal(getattr(pairs, key), f.decode())
    # Saved as factors (the bytes the cost counts), read back to the same pairs.
    pairs.save(tmp_path / "set")
    loaded = PairSet.load(tmp_path / "set")
    assert sorted(loaded.factors) == ["images", "texts"]
    assert torch.equal(loaded.images, pairs.images) and torch.equal(loaded.texts, pairs.texts)
    assert set_cost(loaded)["bytes"] == cost["bytes"]
    # A set whose images were replaced (a transfer) no longer decodes from them: stored plainly.
    moved = replace(loaded, images=loaded.images + 1)
    assert sorted(moved.stored_factors()) == ["texts"]
    moved.save(tmp_path / "moved")
    assert torch.equal(PairSet.load(tmp_path / "moved").images, moved.images)


def test_rank_auto_reads_the_row_of_the_budget(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, "method=covmatch_lowrank")
    assert cfg.method.rank == "auto" and dict(cfg.method.rank_by_budget)[100] == 56
    cfg.method.rank_by_budget = {5: 1, 10: 2, 100: 56}
    ctx, _ = context(tmp_path, cfg, 12)
    assert CovMatch(cfg.method)._rank(ctx) == 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method.rank=11"], "leaves room for 0 pairs in the bytes of 12; lower method.rank"),
        (["method.rank=2", "method.real_stats=batch"], "set method.rank=0"),
    ],
)
def test_bad_rank_is_one_user_error(tmp_path: Path, overrides: list[str], match: str) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT, "method=covmatch_lowrank", *overrides)
    ctx, _ = context(tmp_path, cfg, 12)
    with pytest.raises(UserError, match=match):
        CovMatch(cfg.method).distill(ctx)


def test_lowrank_needs_frozen_trunks(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, *SHORT, "method=covmatch_lowrank", "method.rank=2")
    ctx, _ = context(tmp_path, cfg, 12)
    with pytest.raises(UserError, match="trains a trunk"):
        CovMatch(cfg.method).distill(ctx)


# --------------------------------------------------------------------------- int8 rows


def test_int8_pairs_fill_the_bytes_of_the_budget() -> None:
    # lite0_minilm: 99 x 6,656 bytes (the float32 offsets take one pair) / (1,664 + 8) = 394.
    assert covmatch_module.factored_pairs(100, 0, (1280, 384), bits=8) == 394
    for budget, rank, dims in [(100, 0, (1280, 384)), (100, 56, (1280, 384)), (12, 2, (32, 20))]:
        n = covmatch_module.factored_pairs(budget, rank, dims, bits=8)
        row = 2 * rank if rank else sum(dims)
        stored = 4 * (rank + 1) * sum(dims) + n * (row + 8)  # bases, offsets, codes, scales
        assert stored <= 4 * budget * sum(dims) < stored + row + 8


def test_int8_rows_are_within_half_a_step() -> None:
    x = torch.randn(30, 17, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale = int8_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == (30, 1)
    assert ((codes.float() * scale - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    assert int8_rows(torch.zeros(2, 3))[0].abs().sum() == 0  # a zero row stays finite


@pytest.mark.parametrize("method", ["covmatch", "covmatch_lowrank"])
def test_int8_set_fits_the_budget_and_saves_as_codes(tmp_path: Path, method: str) -> None:
    rank = ["method.rank=8"] if method == "covmatch_lowrank" else []
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT, f"method={method}", "method.bits=8", *rank)
    ctx, _ = context(tmp_path, cfg, 12)
    pairs = CovMatch(cfg.method).distill(ctx)
    dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
    assert len(pairs) == covmatch_module.factored_pairs(12, 8 if rank else 0, dims, 8) > 12
    cost = set_cost(pairs)
    assert cost["pairs_equiv"] <= 12 and pairs.meta["bits"] == 8
    for key in ("images", "texts"):
        f = pairs.factors[key]
        assert f.coef.dtype == torch.int8 and torch.equal(getattr(pairs, key), f.decode())
    pairs.save(tmp_path / "set")
    loaded = PairSet.load(tmp_path / "set")
    assert torch.equal(loaded.images, pairs.images) and torch.equal(loaded.texts, pairs.texts)
    assert loaded.factors["images"].coef.dtype == torch.int8
    assert set_cost(loaded)["bytes"] == cost["bytes"]
    # the name `mmdistill table` shows beside a cell holding more pairs than its budget
    assert set_cost(loaded)["storage"] == cost["storage"] == ("rank-8 int8" if rank else "int8")


def test_bad_bits_is_one_user_error(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT, "method.bits=4")
    with pytest.raises(UserError, match="method.bits=4 is not a valid choice; choose one of: 32"):
        CovMatch(cfg.method)
    cfg = compose_cfg(*SMALL, *SHORT, "method.bits=8")
    ctx, _ = context(tmp_path, cfg, 12)
    with pytest.raises(UserError, match="set method.bits=32"):
        CovMatch(cfg.method).distill(ctx)


# --------------------------------------------------------------------------- robust mode


def test_weighted_statistics_with_0_1_weights_are_those_of_the_kept_pairs() -> None:
    gen = torch.Generator().manual_seed(3)
    v, t = torch.randn(40, 6, generator=gen) + 2, torch.randn(40, 5, generator=gen) - 1
    keep = torch.rand(40, generator=gen) > 0.4
    cov, mv, mt = weighted_statistics(v, t, keep.float())
    torch.testing.assert_close(cov, cross_covariance(v[keep], t[keep]))
    torch.testing.assert_close(mv, v[keep].mean(0, keepdim=True))
    torch.testing.assert_close(mt, t[keep].mean(0, keepdim=True))
    # Reliability weights: scaling every weight changes nothing.
    soft = torch.rand(40, generator=gen)
    scaled = weighted_statistics(v, t, 7 * soft)
    for a, b in zip(weighted_statistics(v, t, soft), scaled, strict=True):
        torch.testing.assert_close(a, b)


def test_rho_scale_undoes_the_share_of_mismatched_pairs() -> None:
    clean = torch.tensor([1.0, 1.0, 1.0, 0.0])
    exact = PairWeights(prob=clean, weight=clean, pool=torch.arange(3), report={})
    assert exact.rho_scale == pytest.approx(1.0)  # only clean pairs weigh: nothing shrinks
    unsure = torch.full((4,), 0.5)
    half = PairWeights(prob=unsure, weight=unsure, pool=torch.arange(4), report={})
    assert half.rho_scale == pytest.approx(2.0)  # half the weighted pairs add no covariance


def test_an_estimated_clean_fraction_near_zero_is_one_warning_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, "method=covmatch_robust")
    ctx, _ = context(tmp_path, cfg, 10)
    n = ctx.train.n_pairs
    low = SimpleNamespace(prob=(torch.full((n,), 0.01), torch.full((n,), 0.03)))
    monkeypatch.setattr(covmatch_robust, "cached_detection", lambda *a, **k: low)
    with caplog.at_level("WARNING"):
        weights = CovMatch(cfg.method).pair_weights(ctx)
    assert weights.report["estimated_clean_fraction"] == pytest.approx(0.02)
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "method.robust.enabled=false" in warning.getMessage()
    assert "\n" not in warning.getMessage()


# --------------------------------------------------------------------------- runs


def mmdistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmdistill.cli", "distill", "threads=1", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=600,
    )


def test_cli_run_on_shapes_synthesises_pixels_and_token_embeddings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = mmdistill("method=covmatch", *SMALL, *SHORT, "budget.pairs=16", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    pairs = PairSet.load(run / "distilled")
    assert pairs.images.shape == (16, 3, 32, 32)
    assert pairs.texts.dim() == 3 and pairs.texts.is_floating_point()
    assert pairs.text_mask.shape == pairs.texts.shape[:2]
    meta = pairs.meta
    assert meta["method"] == "covmatch" and (meta["rho"], meta["lambda"]) == (2.0, 0.1)
    assert meta["real_stats"] == "batch" and meta["seconds_per_step"] > 0
    assert len(meta["nearest_captions"]) == 16 and all(
        isinstance(c, str) for c in meta["nearest_captions"]
    )
    assert len(set(meta["init_pairs"])) == 16
    assert (run / "checkpoints" / "covmatch.safetensors").is_file()
    assert io.read_json(run / "results.json")["method"] == "covmatch"


def test_cli_bad_synthetic_batch_is_one_line(tmp_path: Path) -> None:
    p = mmdistill(
        *SMALL,
        "method=covmatch",
        "budget.pairs=16",
        "method.syn_batch=32",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "method.syn_batch=32" in errors[0], p.stderr[-2000:]
    assert "method.syn_batch=all" in errors[0]


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_paper_presets_carry_the_paper_settings(dataset: str) -> None:
    cfg = compose("distill", [f"experiment=covmatch_{dataset}_500"])
    assert cfg.dataset.name == dataset and cfg.encoder.name == "nfnet_bert"
    assert (
        cfg.encoder.train_text_trunk and cfg.encoder.head.image == cfg.encoder.head.text == "linear"
    )
    assert cfg.method.proj_dim == 2304 and cfg.budget.pairs == 500
    s = CovMatch(cfg.method).settings(500)
    assert (s["rho"], s["lambda"], s["steps"], s["syn_batch"]) == (1.0, 0.5, 20000, 256)
    assert (cfg.eval.optimizer, cfg.eval.lr, cfg.eval.trunk_lr, cfg.eval.steps) == (
        "sgd",
        0.1,
        0.01,
        400,
    )


def test_paper_preset_dry_run_on_shapes(tmp_path: Path) -> None:
    """The Flickr30K preset's code path (trainable text trunk, SGD online student, SGD
    multistep evaluation), scaled down onto shapes + tiny."""
    p = mmdistill(
        "experiment=covmatch_flickr30k_500",
        "dataset=shapes",
        "encoder=tiny",
        "dataset.split_sizes=[20,10,10]",
        "budget.pairs=6",
        "method.syn_batch=all",
        "method.steps=4",
        "method.reset_every=2",
        "method.checkpoint_every=2",
        "eval.students=1",
        "eval.steps=4",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    info = io.read_json(tmp_path / "results.json")
    assert info["pairs"] == 6 and info["protocol"]["optimizer"] == "sgd"
    assert PairSet.load(tmp_path / "distilled").texts.dim() == 3


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_set(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT)
    ctx, _ = context(tmp_path / "whole", cfg, 12)
    whole = CovMatch(cfg.method).distill(ctx)

    save = OuterLoop.save

    def save_then_die(self, done: int) -> None:
        save(self, done)
        if done == 10:
            raise _Killed

    killed_ctx, _ = context(tmp_path / "killed", cfg, 12)
    monkeypatch.setattr(OuterLoop, "save", save_then_die)
    with pytest.raises(_Killed):
        CovMatch(cfg.method).distill(killed_ctx)
    monkeypatch.setattr(OuterLoop, "save", save)
    resumed = CovMatch(cfg.method).distill(killed_ctx)
    assert resumed.meta["loss_history"][0]["step"] == 0  # history came back with the state
    torch.testing.assert_close(resumed.images, whole.images)
    torch.testing.assert_close(resumed.texts, whole.texts)


def test_divergence_stops_with_a_hint_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, *FROZEN, *SHORT, "method.lr=1e30", "method.real_stats=batch")
    ctx, _ = context(tmp_path, cfg, 12)
    with pytest.raises(UserError, match="marked partial; lower method.lr"):
        CovMatch(cfg.method).distill(ctx)
    tensors, state = ctx.run.load_checkpoint("covmatch")
    assert state["step"] == 0 and torch.isfinite(tensors["images"]).all()
    kept = PairSet.load(ctx.run.path / "distilled")  # the last checkpoint, readable
    assert kept.partial and torch.equal(kept.images, tensors["images"])


def test_pixel_space_covmatch_improves_its_own_random_start_on_shapes(tmp_path: Path) -> None:
    """Both tiny trunks trainable (pixels + token embeddings). CovMatch starts from the random
    pairs of its seed (the `random` method's selection at that seed); the same students score
    the distilled set and that start on shapes' test split. Step sizes were chosen on val
    (scripts/tune_tiny_covmatch.py: val 21.5 vs its start 18.0); test: 10.8 vs 7.8. Against
    the best of 3 random draws (test 10.8) it is level: see docs/results.md."""
    cfg = compose_cfg(
        "dataset.split_sizes=[400,100,200]",
        "eval.students=3",
        "method.steps=300",
        "method.syn_batch=all",
    )
    assert (cfg.method.lr, cfg.method.lr_text) == (1e-4, 1e-5)  # tiny's covmatch_lr
    ctx, prep = context(tmp_path, cfg, 20)
    torch.set_num_threads(1)
    scores, sets = {}, {}
    for name in ("covmatch", "random"):
        sets[name] = get_method(name)(cfg.method).distill(ctx)
        res = run_protocol(prep.encoder, sets[name], cfg.eval, prep.test, prep.val, "cpu", 0)
        scores[name] = res.summary["r_mean"]["mean"]
    assert sets["covmatch"].meta["init_pairs"] == sets["random"].meta["source_pairs"]
    assert scores["covmatch"] > scores["random"] + 1.5, scores


# --------------------------------------------------------------------------- within


def test_within_targets_the_real_covariances_and_pulls_rows_to_them() -> None:
    """The real rows have no within loss; synthetic rows descend to the real covariances of
    each modality. The targets are not scaled (rho is the cross-covariance's)."""
    from mmdistill.methods.covmatch.loss import cross_covariance
    from mmdistill.methods.covmatch.targets import Within

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen) * torch.linspace(0.5, 2.0, 6)
    t = torch.randn(60, 4, generator=gen) @ torch.randn(4, 4, generator=gen)
    within = Within(0.1, (cross_covariance(x, x), cross_covariance(t, t)))
    assert float(within((x, t))) < 1e-8
    assert float(within((2 * x, t))) > 1.0  # twice the rows: four times the covariance
    rows = [x[:12].clone().requires_grad_(True), t[:12].clone().requires_grad_(True)]
    opt = torch.optim.SGD(rows, lr=0.02)
    start = within((rows[0], rows[1])).item()
    for _ in range(300):
        opt.zero_grad()
        within((rows[0], rows[1])).backward()
        opt.step()
    assert within((rows[0], rows[1])).item() < 0.05 * start
