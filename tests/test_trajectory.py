"""Trajectory matching (MTT-VL, TESLA, LoRS) on shapes + tiny, and LoRS vs random on real data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mmdistill.config import compose, conf_dir
from mmdistill.errors import UserError
from mmdistill.jobs import Prepared, distill_context, prepare
from mmdistill.methods import DistillContext, get_method
from mmdistill.methods.trajectory import Synthetic, TrajectoryMatching, _Embed
from mmdistill.runs import Run
from mmdistill.training.experts import ParamLayout, build_student
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import run_protocol, student_loss_name
from mmdistill.training.similarity import build_similarity

SMALL = [
    "dataset.split_sizes=[40,20,20]",
    "expert.num_experts=2",
    "expert.epochs=2",
    "device=cpu",
    "budget.pairs=10",
    "eval.students=1",
    "eval.steps=20",
    "method.iterations=3",
    "method.syn_steps=2",
    "method.eval_every=2",
    "method.checkpoint_every=1",
]
# The tiny encoder with frozen (random) trunks: feature space, heads only, fast. Its features
# are O(1), so the synthetic-data learning rates are far below the lite0 defaults.
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
    return prepared_context(run_dir, cfg)[0]


def prepared_context(run_dir: Path, cfg: DictConfig) -> tuple[DistillContext, Prepared]:
    run = Run(run_dir, "distill", "cpu", 0)
    prep = prepare(cfg, "cpu", run, None)
    ctx = distill_context(cfg, prep, int(cfg.budget.pairs), "cpu", run, None)
    return ctx, prep


def distill(run_dir: Path, cfg: DictConfig) -> tuple[PairSet, DistillContext]:
    ctx = context(run_dir, cfg)
    return get_method(cfg.method.family)(cfg.method).distill(ctx), ctx


# ------------------------------------------------------------------ first-order gradient


def _grads(
    ctx: DistillContext,
    method: TrajectoryMatching,
    gradient: str,
    n: int,
    steps: int,
    step_size: float = 0.05,
):
    """Gradients of one matching step w.r.t. every learnable tensor, from a fixed state."""
    student = build_student(ctx.encoder, 0, None).train()
    layout = ParamLayout.of(student)
    method.logit_scale = student.logit_scale
    images, texts, mask = method._init_data(ctx, n)
    torch.manual_seed(1)
    sim = build_similarity("lowrank", n, 3, 1.0)
    with torch.no_grad():  # a non-trivial similarity, so its gradient is exercised too
        sim.right.normal_(0, 0.3)
    syn = Synthetic(images, texts, mask, step_size, sim, {})
    start = layout.flatten(student)
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randperm(n, generator=gen)[: n - 1] for _ in range(steps)]
    fn = method.grad_unroll if gradient == "unroll" else method.grad_first_order
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        loss = fn(_Embed(student), layout, syn, start, target, batches)
    return loss, {k: v.grad.clone() for k, v in syn.tensors().items()}


@pytest.mark.parametrize("space", ["feature", "pixel"])
def test_first_order_equals_unroll_for_one_step(tmp_path: Path, space: str) -> None:
    """With one inner step nothing is dropped: TESLA's gradient is MTT's, to rounding."""
    extra = FEATURE if space == "feature" else []
    cfg = compose_cfg("method=lors", *extra)
    ctx = context(tmp_path, cfg)
    method = TrajectoryMatching(cfg.method)
    loss_u, unroll = _grads(ctx, method, "unroll", 6, 1)
    loss_f, first = _grads(ctx, method, "first_order", 6, 1)
    assert torch.allclose(loss_u, loss_f)
    assert set(unroll) == set(first)
    for k in unroll:
        assert unroll[k].abs().max() > 0, k
        assert torch.allclose(unroll[k], first[k], rtol=1e-3, atol=1e-6 * unroll[k].abs().max())


def test_first_order_tracks_unroll_over_several_steps(tmp_path: Path) -> None:
    """Over several steps TESLA drops terms of order step_size * Hessian: its gradient tends
    to the unrolled one as the step size shrinks, and differs from it at a large one."""
    cfg = compose_cfg("method=lors", *FEATURE)
    ctx = context(tmp_path, cfg)
    method = TrajectoryMatching(cfg.method)

    def cosines(step_size: float) -> dict[str, float]:
        _, unroll = _grads(ctx, method, "unroll", 8, 4, step_size)
        _, first = _grads(ctx, method, "first_order", 8, 4, step_size)
        return {
            k: torch.nn.functional.cosine_similarity(
                unroll[k].flatten(), first[k].flatten(), dim=0
            ).item()
            for k in ("images", "texts", "similarity.right")
        }

    small, large = cosines(5e-4), cosines(5e-2)
    for k in small:
        assert small[k] > 0.999, (k, small)
        assert large[k] < small[k], (k, large)


# ----------------------------------------------------------------------- the methods run


@pytest.mark.parametrize("name", ["mtt", "tesla", "lors"])
def test_methods_produce_valid_sets(tmp_path: Path, name: str) -> None:
    cfg = compose_cfg(f"method={name}", *FEATURE, "method.select=last")
    pairs, ctx = distill(tmp_path / "run", cfg)
    assert pairs.meta["selected_iteration"] == 3
    n = 9 if name == "lors" else 10  # LoRS counts its similarity as one pair of the budget
    assert len(pairs) == n and pairs.meta["budget_pairs"] == 10
    assert pairs.images.shape == (n, ctx.encoder.image_dim)
    assert pairs.texts.shape == (n, ctx.encoder.text_dim) and pairs.texts.is_floating_point()
    assert set(pairs.step_sizes) == {"image", "text"}
    assert all(v > 0 for v in pairs.step_sizes.values())
    assert pairs.meta["iterations"] == 3 and pairs.meta["buffer_key"]
    assert [h[0] for h in pairs.meta["val_history"]] == [0, 2, 3]
    assert torch.isfinite(pairs.images).all() and torch.isfinite(pairs.texts).all()
    pairs.save(tmp_path / "set")
    back = PairSet.load(tmp_path / "set")
    assert back.loss == ("wbce" if name == "lors" else "infonce")
    if name == "lors":
        idx = torch.arange(n)
        learned = back.similarity(idx)
        assert torch.allclose(learned, pairs.similarity(idx))
        assert not torch.allclose(learned, torch.eye(n))  # it trained
        assert back.similarity_args == {"kind": "lowrank", "n": n, "rank": 10, "alpha": 3.0}
        # The students train against it with the set's own loss.
        assert student_loss_name(ctx.eval, back) == "wbce"
        res = run_protocol(ctx.encoder, back, ctx.eval, ctx.val, None, "cpu", 0)
        assert math.isfinite(res.summary["r_mean"]["mean"])
    else:
        assert back.similarity is None


def test_matching_loss_falls(tmp_path: Path) -> None:
    """Distillation lowers the matching loss over every (expert, start epoch) it can draw."""
    cfg = compose_cfg("method=mtt", *FEATURE, "method.iterations=30", "method.eval_every=0")
    ctx = context(tmp_path / "run", cfg)
    method = get_method("trajectory")(cfg.method)
    pairs = method.distill(ctx)
    from mmdistill.training.experts import Buffer

    buf = Buffer(Path(pairs.meta["buffer"]))
    student = build_student(ctx.encoder, 0, None).train()
    layout = ParamLayout.of(student)

    def mean_loss(images, texts, steps) -> float:
        syn = Synthetic(images, texts, None, 0.1, None, {})
        syn.step_image.data.fill_(steps["image"])
        syn.step_text.data.fill_(steps["text"])
        losses = []
        for e in range(2):
            for s in range(2):
                seg = buf.segment(e, s, s + 1)
                full = [torch.arange(len(images))] * 2
                losses.append(
                    method.grad_unroll(_Embed(student), layout, syn, seg[0], seg[1], full).item()
                )
        return sum(losses) / len(losses)

    init_images, init_texts, _ = method._init_data(ctx, 10)
    before = mean_loss(init_images, init_texts, {"image": 0.1, "text": 0.1})
    after = mean_loss(pairs.images, pairs.texts, pairs.step_sizes)
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------- failures and resume


def test_non_finite_loss_keeps_the_last_good_set(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg("method=tesla", *FEATURE, "method.iterations=5", "method.eval_every=0")
    calls = {"n": 0}
    original = TrajectoryMatching.grad_first_order

    def flaky(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(TrajectoryMatching, "grad_first_order", flaky)
    ctx = context(tmp_path / "run", cfg)
    with pytest.raises(UserError, match=r"iteration 3.*lower method\.lr_img / method\.lr_txt"):
        get_method("trajectory")(cfg.method).distill(ctx)
    good = PairSet.load(ctx.run.path / "distilled")  # the last checkpoint, flagged partial
    assert good.partial and good.meta["partial"]["stopped_at"] == 3
    tensors, state = ctx.run.load_checkpoint("trajectory")
    assert state["iteration"] == good.meta["partial"]["checkpoint"] == 2  # not overwritten
    assert torch.equal(good.images, tensors["syn.images"])


def test_blown_up_step_size_stops_with_a_hint(tmp_path: Path) -> None:
    cfg = compose_cfg("method=mtt", *FEATURE, "method.lr_teacher=1e30", "method.eval_every=0")
    ctx = context(tmp_path / "run", cfg)
    with pytest.raises(UserError, match="stopped at iteration 1: .*(finite|reach)"):
        get_method("trajectory")(cfg.method).distill(ctx)
    good = PairSet.load(ctx.run.path / "distilled")
    assert good.partial and torch.isfinite(good.images).all()


def test_finite_divergence_stops_at_the_range_bound(tmp_path: Path) -> None:
    """A huge learning rate sends the set far out of the real data's range while it stays
    finite: caught there, and the partial set is the last checkpoint, within the range."""
    cfg = compose_cfg(
        "method=tesla", *FEATURE, "method.lr_img=1e12", "method.eval_every=0", "method.iterations=4"
    )
    ctx = context(tmp_path / "run", cfg)
    with pytest.raises(UserError, match=r"synthetic (images|texts) reach \|x\|.*marked partial"):
        get_method("trajectory")(cfg.method).distill(ctx)
    good = PairSet.load(ctx.run.path / "distilled")
    start = ctx.train.images.abs().max()
    assert good.partial and good.images.abs().max() <= 100 * start


def test_resume_continues_where_the_run_stopped(tmp_path: Path) -> None:
    base = ["method=lors", *FEATURE, "method.eval_every=0"]
    straight, _ = distill(tmp_path / "a", compose_cfg(*base, "method.iterations=4"))
    distill(tmp_path / "b", compose_cfg(*base, "method.iterations=2"))  # "killed" after 2
    resumed, ctx = distill(tmp_path / "b", compose_cfg(*base, "method.iterations=4"))
    assert ctx.run.load_checkpoint("trajectory")[1]["iteration"] == 4
    assert torch.allclose(resumed.images, straight.images, atol=1e-6)
    assert torch.allclose(resumed.similarity.right, straight.similarity.right, atol=1e-6)
    assert resumed.step_sizes == pytest.approx(straight.step_sizes)


# ---------------------------------------------------------------------------- LoRA, pixels


def test_lora_matching_runs_in_pixel_space(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "method=mtt_lora",
        "budget.pairs=4",
        "expert.num_experts=1",
        "method.syn_steps=1",
        "method.iterations=2",
        "method.eval_every=0",
        "method.lr_img=10",
        "method.lr_txt=1e-3",  # token embeddings are ~0.02: at 10 they leave the sane range
    )
    pairs, ctx = distill(tmp_path / "run", cfg)
    assert pairs.meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["c_fc", "c_proj"]}
    full = ParamLayout.of(ctx.encoder.new_student(0)).numel
    assert 0 < pairs.meta["matched_parameters"] < full
    assert pairs.images.shape == (4, 3, 32, 32)
    assert pairs.texts.dim() == 3 and pairs.text_mask.shape == pairs.texts.shape[:2]
    assert torch.isfinite(pairs.images).all()


def test_lora_needs_trunks_that_read_raw_inputs(tmp_path: Path) -> None:
    cfg = compose_cfg("method=mtt_lora", *FEATURE)
    with pytest.raises(UserError, match="train_image_trunk"):
        distill(tmp_path / "run", cfg)


def test_paper_presets_compose_and_dry_run(tmp_path: Path) -> None:
    names = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
    presets = [n for n in names if n.startswith(("mtt_", "lors_"))]
    assert len(presets) == 12
    for name in presets:
        cfg = compose_cfg(f"experiment={name}", small=False)
        pairs = int(name.rsplit("_", 1)[1])
        assert cfg.budget.pairs == pairs and cfg.encoder.name == "nfnet_bert"
        # MTT-VL evaluates with the learned image step size for both encoders; LoRS per branch.
        learned = "learned" if name.startswith("lors_") else "learned_image"
        assert cfg.expert.num_experts == 20 and cfg.eval.lr == learned
        if name.startswith("lors_"):
            assert cfg.method.count_similarity_in_budget and cfg.eval.selection == "best_test"
    env = dict(os.environ, MMDISTILL_OUTPUTS=str(tmp_path / "out"))
    scaled = [
        "dataset=shapes",
        "encoder=tiny",
        "dataset.split_sizes=[20,10,10]",
        "budget.pairs=6",
        "expert.num_experts=1",
        "expert.epochs=3",
        "method.iterations=2",
        "method.syn_steps=1",
        "method.batch_syn=4",
        "method.eval_every=0",
        # The papers' step sizes (1000) are for 224-px pixels and BERT features; tiny's token
        # embeddings (~0.02) leave the sane range at once, and the run would stop there.
        "method.lr_txt=1e-3",
        "eval.students=1",
        "eval.steps=4",
        "eval.eval_every=2",
    ]
    cmd = [
        sys.executable,
        "-m",
        "mmdistill.cli",
        "distill",
        "experiment=lors_flickr30k_500",
        "threads=1",
    ]
    done = subprocess.run(cmd + scaled, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = (tmp_path / "out").rglob("results.json")
    info = json.loads(result.read_text())
    assert info["pairs"] == 5 and info["protocol"]["name"] == "paper_lors"
    assert info["protocol"]["selection"] == "best_test"


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_repblend_presets_freeze_the_image_trunk_and_use_their_own_protocol(dataset: str) -> None:
    for pairs in (100, 200, 500):
        cfg = compose_cfg(f"experiment=repblend_{dataset}_{pairs}", small=False)
        lors = compose_cfg(f"experiment=lors_{dataset}_{pairs}", small=False)
        assert cfg.method.name == "repblend" and cfg.method.blend_alpha == 1.0
        assert not cfg.encoder.train_image_trunk and cfg.encoder.head.image == "projection"
        assert cfg.eval.name == "paper_repblend" and cfg.eval.selection == "best_test"
        for key in ("lr_img", "lr_sim", "sim_rank", "iterations", "syn_steps"):
            assert cfg.method[key] == lors.method[key], key
        assert cfg.method.batch_syn == (20 if pairs == 500 else lors.method.batch_syn)


def test_repblend_needs_frozen_trunks(tmp_path: Path) -> None:
    ctx = context(tmp_path, compose_cfg("method=repblend"))  # tiny trains both trunks
    with pytest.raises(UserError, match="train_image_trunk=false") as err:
        get_method("lors")(compose_cfg("method=repblend").method).distill(ctx)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["mtt", "tesla", "lors", "mdw"])
def test_default_encoder_step_sizes_stay_in_range(tmp_path: Path, method: str) -> None:
    """`mmdistill distill method=<trajectory method>` runs on the default pixel-space encoder:
    tiny's own step sizes (encoder.trajectory_lr) keep pixels and token embeddings in range,
    where the feature-space defaults (100 / 100, lr_lr 0.01) stop as divergence."""
    # MDW's clean-pair detection is not what this checks: the least of it (its defaults train
    # 24 pixel-space scorers for 600 steps each, 12 minutes of CI)
    quick_detection = (
        [
            "method.dual.folds=2",
            "method.dual.rounds=1",
            "method.dual.scorer_steps=5",
            "method.dual.select_threshold=0.01",
        ]
        if method == "mdw"
        else []
    )
    cfg = compose_cfg(
        f"method={method}",
        "method.iterations=8",
        "method.checkpoint_every=4",
        "method.eval_every=0",
        *quick_detection,
    )
    assert (cfg.method.lr_img, cfg.method.lr_txt, cfg.method.lr_lr) == (1e-2, 1e-3, 1e-5)
    pairs, _ = distill(tmp_path, cfg)
    assert torch.isfinite(pairs.images).all() and torch.isfinite(pairs.texts).all()
