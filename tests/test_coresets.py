"""Coreset baselines: the selection rules on known geometry, each method end to end on shapes,
and on the real flickr8k-1k features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mmdistill.config import compose
from mmdistill.errors import UserError
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods import DistillContext, get_method
from mmdistill.methods.coresets import _retrieved, forgetting_counts, herding, kcenter
from mmdistill.runs import Run
from mmdistill.training.pairs import PairSet

REPO = Path(__file__).resolve().parents[1]
CORESETS = ("random", "herding", "kcenter", "forgetting")


def compose_cfg(*overrides: str) -> DictConfig:
    return compose("distill", ["device=cpu", *overrides])


def context(tmp: Path, cfg: DictConfig, pairs: int) -> DistillContext:
    run = Run(tmp, "distill", "cpu", int(cfg.seed))
    prep = prepare(cfg, "cpu", run, None)
    return distill_context(cfg, prep, pairs, "cpu", run, None)


# --------------------------------------------------------------------------- selection rules


def test_herding_tracks_the_full_mean_better_than_random_subsets() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen) * torch.linspace(0.2, 3, 8)
    idx = herding(x, 20)
    assert len(set(idx.tolist())) == 20
    err = (x[idx].mean(0) - x.mean(0)).norm()
    rand = [
        (x[torch.randperm(400, generator=gen)[:20]].mean(0) - x.mean(0)).norm() for _ in range(50)
    ]
    assert err < min(rand)
    # The first pick is the point nearest the mean.
    assert idx[0] == (x - x.mean(0)).norm(dim=1).argmin()


def test_kcenter_covers_better_than_random_and_takes_outliers() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    x[123] = 40.0  # a far outlier must be the second pick
    idx = kcenter(x, 15, first=0)
    assert idx[0] == 0 and idx[1] == 123 and len(set(idx.tolist())) == 15

    def radius(sel: torch.Tensor) -> float:
        return torch.cdist(x, x[sel]).min(dim=1).values.max().item()

    rand = [radius(torch.randperm(300, generator=gen)[:15]) for _ in range(20)]
    assert radius(idx) < min(rand)


def test_in_batch_retrieval_counts_a_sibling_caption_as_a_hit() -> None:
    # Pairs 0 and 1 share image 7; pair 2 is image 9.
    rows = torch.tensor([7, 7, 9])
    logits = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
    # Pair 0: i2t hits caption 1 (same image), t2i hits pair 1's image (same) -> right.
    # Pair 2: i2t picks caption 0 (image 7) -> wrong.
    assert _retrieved(logits, rows).tolist() == [True, True, False]


# --------------------------------------------------------------------------- methods on shapes


SHAPES = ["dataset.split_sizes=[60,20,30]", "eval.students=1", "eval.steps=5"]
# A short forgetting run: 2 epochs of 3 batches over the 300 shapes pairs.
SHORT = {"forgetting": ["method.epochs=2", "method.batch_size=100"]}


def method_cfg(name: str) -> DictConfig:
    return compose_cfg(*SHAPES, f"method={name}", *SHORT.get(name, [])).method


@pytest.fixture(scope="module")
def shapes_ctx(tmp_path_factory: pytest.TempPathFactory) -> DistillContext:
    return context(tmp_path_factory.mktemp("run"), compose_cfg(*SHAPES), 24)


@pytest.fixture(scope="module")
def selections(shapes_ctx) -> dict[str, PairSet]:
    return {name: get_method(name)(method_cfg(name)).distill(shapes_ctx) for name in CORESETS}


@pytest.mark.parametrize("name", CORESETS)
def test_each_coreset_returns_distinct_valid_real_pairs(name: str, shapes_ctx, selections) -> None:
    ctx, pairs = shapes_ctx, selections[name]
    idx = pairs.meta["source_pairs"]
    assert len(pairs) == ctx.pairs == len(set(idx))
    assert all(0 <= i < ctx.train.n_pairs for i in idx)
    t = torch.tensor(idx)
    assert torch.equal(pairs.images, ctx.train.images[ctx.train.caption_image[t]])
    assert torch.equal(pairs.texts, ctx.train.texts[t])
    if name != "random":
        assert "our re-run" in pairs.meta["provenance"]


def test_forgetting_keeps_the_most_forgotten_pairs(shapes_ctx, selections) -> None:
    ctx, pairs = shapes_ctx, selections["forgetting"]
    counts, learned = forgetting_counts(ctx, epochs=2, batch=100)
    assert counts.shape == (ctx.train.n_pairs,) and (counts >= 0).all()
    assert (counts[~learned] == counts.max()).all()
    chosen = torch.tensor(pairs.meta["source_pairs"])
    rest = torch.ones(len(counts), dtype=torch.bool)
    rest[chosen] = False
    # Same seed, same training: the chosen pairs are the top of this count.
    assert counts[chosen].min() >= counts[rest].max()
    assert pairs.meta["forgetting_events"] == counts[chosen].tolist()


def test_kcenter_start_is_checked() -> None:
    cfg = compose_cfg("method=kcenter", "method.start=middle")
    with pytest.raises(UserError, match="method.start"):
        get_method("kcenter")(cfg.method)


# --------------------------------------------------------------------------- storage (bits)

FROZEN = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", CORESETS)
def test_fewer_bits_store_more_real_pairs_in_the_same_bytes(
    name: str, bits: int, tmp_path: Path
) -> None:
    """A coreset at `bits` fills the budget's bytes: more pairs, every stored byte counted
    (`cost.pairs_equiv` within half a pair of the budget), rows within int8's half step."""
    from mmdistill.training.cost import set_cost

    quick = ["method.epochs=1"] if name == "forgetting" else []
    cfg = compose_cfg(f"method={name}", f"method.bits={bits}", *quick, *FROZEN)
    ctx = context(tmp_path, cfg, 10)
    pairs = get_method(name)(cfg.method).distill(ctx)
    dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
    per_pair = 4 * sum(dims)
    assert len(pairs) > 10 and pairs.meta["bits"] == bits
    cost = set_cost(pairs)
    assert 10 - 1 < cost["bytes"] / per_pair <= 10 and cost["pairs_equiv"] <= 10.5
    real = ctx.train.pairset(torch.tensor(pairs.meta["source_pairs"]))
    step = real.texts.abs().amax(1, keepdim=True) / 127 + 1e-3  # int8's step (float16: finer)
    assert (pairs.texts - real.texts).abs().le(step).all()
    saved = tmp_path / "set"
    pairs.save(saved)
    back = PairSet.load(saved)
    assert torch.equal(back.texts, pairs.texts) and set(back.factors) == {"images", "texts"}


def test_bits_below_32_need_feature_rows(tmp_path: Path) -> None:
    cfg = compose_cfg("method=random", "method.bits=8")  # tiny: trains its trunks on pixels
    ctx = context(tmp_path, cfg, 10)
    with pytest.raises(UserError, match="method.bits=8 stores feature rows"):
        get_method("random")(cfg.method).distill(ctx)
