"""The formulas each method's paper states, pinned against independent references written here
in plain Python (loops and `math`), not against the code under test: MTT's normalised matching
loss and its closed-form gradient, LoRS's weighted BCE, MDW's soft-target InfoNCE, S = I and
P = I + eps at the start, CovMatch's reset / one-online-step schedule, and MDW's co-teaching
wiring (each track selects the pairs the other one trains on)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.config import compose
from mmdistill.jobs import distill_context, prepare
from mmdistill.methods import covmatch as covmatch_module
from mmdistill.methods import mdw_dual_track as dual_module
from mmdistill.methods.covmatch import CovMatch
from mmdistill.methods.covmatch import matching as covmatch_matching
from mmdistill.methods.mdw import MDW
from mmdistill.methods.trajectory import TrajectoryMatching, _Embed, blend
from mmdistill.runs import Run
from mmdistill.training.experts import ExpertSource, ParamLayout, build_student
from mmdistill.training.losses import infonce, soft_infonce, wbce
from mmdistill.training.similarity import build_similarity
from mmdistill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURE = ["encoder.train_image_trunk=false", "encoder.train_text_trunk=false"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rows(t: torch.Tensor) -> list[list[float]]:
    return t.double().tolist()


# ------------------------------------------------------------------------------- MTT


@pytest.mark.parametrize("merge", [False, True])
def test_mtt_matching_loss_is_the_normalised_parameter_distance(merge: bool) -> None:
    """sum_branch ||theta_hat - theta*_{s+R}||^2 / ||theta*_s - theta*_{s+R}||^2 (MTT-VL), or
    one ratio of the summed distances (`merge_loss_branches`)."""
    cfg = compose("distill", ["method=mtt", f"method.merge_loss_branches={merge}"])
    method = TrajectoryMatching(cfg.method)
    g = torch.Generator().manual_seed(0)
    theta, start, target = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(3))
    slices = {"image": slice(0, 5), "text": slice(5, 9)}
    dist, norm = [], []
    for sl in slices.values():
        th, st, tg = theta[sl].tolist(), start[sl].tolist(), target[sl].tolist()
        dist.append(sum((a - c) ** 2 for a, c in zip(th, tg, strict=True)))
        norm.append(sum((b - c) ** 2 for b, c in zip(st, tg, strict=True)))
    expected = (
        sum(dist) / sum(norm) if merge else sum(d / n for d, n in zip(dist, norm, strict=True))
    )
    got = method.matching_loss(theta, start, target, slices)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # TESLA's closed-form dL/dtheta_hat equals autograd's.
    theta.requires_grad_(True)
    (auto,) = torch.autograd.grad(method.matching_loss(theta, start, target, slices), theta)
    closed = method._matching_grad(theta.detach(), start, target, slices)
    assert torch.allclose(auto, closed, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ losses


def test_wbce_is_the_mean_of_positive_and_negative_bce() -> None:
    """LoRS: BCE with logits against the (soft) targets, averaged over positives (target > 0.5)
    and over negatives separately, then the two means averaged."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.eye(4, dtype=torch.float64) * 0.8 + 0.05
    targets[0, 2] = 0.7  # a soft positive off the diagonal
    pos, neg = [], []
    for x, t in zip(sum(rows(logits), []), sum(rows(targets), []), strict=True):
        bce = -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))
        (pos if t > 0.5 else neg).append(bce)
    expected = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    assert float(wbce(logits, targets)) == pytest.approx(expected, rel=1e-10)
    eye = torch.eye(4, dtype=torch.float64)
    assert float(wbce(logits, None)) == pytest.approx(float(wbce(logits, eye)), rel=1e-12)


def _soft_ce(logits: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum_j (t_ij / sum_j t_ij) log softmax(logits_i)_j."""
    out = []
    for lg, t in zip(logits, targets, strict=True):
        lse = math.log(sum(math.exp(v) for v in lg))
        total = sum(max(v, 0.0) for v in t)
        out.append(-sum(max(tv, 0.0) / total * (lv - lse) for lv, tv in zip(lg, t, strict=True)))
    return sum(out) / len(out)


def test_soft_infonce_is_cross_entropy_against_normalised_rows_and_columns() -> None:
    """MDW's student loss against its soft correspondence P (clamped at 0), both directions;
    with P = I it is the ordinary symmetric InfoNCE."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64)
    p = torch.eye(5, dtype=torch.float64) + 0.3 * torch.rand(5, 5, generator=g, dtype=torch.float64)
    p[1, 3] = -0.2  # clamped to 0
    lg, pt = rows(logits), rows(p)
    cols = [list(c) for c in zip(*lg, strict=True)]
    pcols = [list(c) for c in zip(*pt, strict=True)]
    expected = 0.5 * (_soft_ce(lg, pt) + _soft_ce(cols, pcols))
    assert float(soft_infonce(logits, p)) == pytest.approx(expected, rel=1e-10)
    eye = rows(torch.eye(5, dtype=torch.float64))
    plain = 0.5 * (_soft_ce(lg, eye) + _soft_ce(cols, eye))
    assert float(soft_infonce(logits, torch.eye(5, dtype=torch.float64))) == pytest.approx(plain)
    assert float(infonce(logits)) == pytest.approx(plain, rel=1e-10)


# ------------------------------------------------------------------ learned matrices at start


def test_lors_similarity_starts_at_the_identity() -> None:
    """S = diag(a) + (alpha / r) L R^T with a = 1 and R = 0: exactly I before any update."""
    torch.manual_seed(0)
    s = build_similarity("lowrank", n=7, rank=3, alpha=2.0)
    assert torch.equal(s(torch.arange(7)).detach(), torch.eye(7))
    assert s(torch.tensor([4, 1])).detach().tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_mdw_correspondence_starts_at_identity_plus_eps(tmp_path: Path) -> None:
    cfg = compose(
        "distill",
        ["method=mdw", "device=cpu", "dataset.split_sizes=[40,20,20]", *FEATURE],
    )
    run = Run(tmp_path, "distill", "cpu", 0)
    ctx = distill_context(cfg, prepare(cfg, "cpu", run, None), 6, "cpu", run, None)
    syn = MDW(cfg.method)._synthetic(ctx, 6)
    eps = float(cfg.method.p_offdiag_init)
    p = syn.similarity(torch.arange(6)).detach().tolist()
    for i in range(6):
        for j in range(6):
            assert p[i][j] == pytest.approx(1.0 if i == j else eps, rel=1e-6)  # float32


# --------------------------------------------------------------------------- CovMatch


def test_covmatch_alternates_one_synthetic_update_and_one_online_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step: one update of the synthetic set against the current online student, then one
    contrastive step of that student on real pairs; the student is rebuilt every reset_every
    steps (fresh heads, a new seed per round)."""
    cfg = compose(
        "distill",
        [
            "method=covmatch",
            "device=cpu",
            "dataset.split_sizes=[40,20,20]",
            *FEATURE,
            "method.steps=25",
            "method.reset_every=10",
            "method.checkpoint_every=10",
        ],
    )
    run = Run(tmp_path, "distill", "cpu", 0)
    ctx = distill_context(cfg, prepare(cfg, "cpu", run, None), 8, "cpu", run, None)
    events: list[str] = []
    rounds: list[int] = []
    real_loss, real_step, real_online = (
        covmatch_module.covmatch_loss,
        Trainer.step,
        CovMatch._online,
    )
    monkeypatch.setattr(
        covmatch_matching,
        "covmatch_loss",
        lambda *a, **k: events.append("syn") or real_loss(*a, **k),
    )
    monkeypatch.setattr(
        Trainer, "step", lambda self, idx: events.append("on") or real_step(self, idx)
    )

    def online(self, ctx, round_idx, real):
        events.append("reset")
        rounds.append(round_idx)
        return real_online(self, ctx, round_idx, real)

    monkeypatch.setattr(CovMatch, "_online", online)
    CovMatch(cfg.method).distill(ctx)
    expected = []
    for r in range(3):
        expected += ["reset"] + ["syn", "on"] * (10 if r < 2 else 5)
    assert events == expected and rounds == [0, 1, 2]


# ------------------------------------------------------------------------- MDW wiring


def test_each_dual_track_trains_on_the_other_tracks_selection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Co-teaching: in every round after the first, track A's scorers learn from the pairs
    track B called clean in the round before, and B's from A's; robust expert i belongs to
    track i % 2 and trains on the other track's clean pairs."""
    n = 40
    calls: list[tuple[int, torch.Tensor | None]] = []

    def fake_losses(encoder, train, dual, fold_of_pair, keep, seed, device, gen):
        calls.append((seed, None if keep is None else keep.clone()))
        # Track A (seed 10) finds the even pairs clean, track B (seed 11) the first half.
        low = torch.arange(n) % 2 == 0 if seed == 10 else torch.arange(n) < n // 2
        return torch.where(low, 0.1, 5.0) + 0.01 * torch.arange(n) / n

    monkeypatch.setattr(dual_module, "_scorer_losses", fake_losses)

    class Train:
        n_pairs = n
        caption_image = torch.arange(n)

    settings = dual_module.DualTrackSettings.from_cfg({"rounds": 3})
    det = dual_module.detect_clean_pairs(None, Train(), settings, 10, "cpu")
    a_clean, b_clean = torch.arange(n) % 2 == 0, torch.arange(n) < n // 2
    assert [s for s, _ in calls] == [10, 11] * 3
    assert calls[0][1] is None and calls[1][1] is None  # round 1: nobody has selected yet
    for r in (1, 2):
        assert torch.equal(calls[2 * r][1], b_clean)  # A learns from B's clean pairs
        assert torch.equal(calls[2 * r + 1][1], a_clean)  # B learns from A's
    assert torch.equal(det.consensus(0.5), a_clean & b_clean)

    trained_on = []

    def fake_expert(
        encoder, train, val, settings, keep, comp, index, device, on_epoch=None, on_log=None
    ):
        trained_on.append((index, keep.clone()))
        layout = ParamLayout(("image_head.weight",), ((2,),), ("image",))
        return torch.zeros(2, 2), layout, {"seconds": 0.0}

    monkeypatch.setattr(dual_module, "detect_clean_pairs", lambda *a, **k: det)
    monkeypatch.setattr(dual_module, "train_robust_expert", fake_expert)
    monkeypatch.setattr(dual_module, "buffer_key", lambda *a, **k: ("k" * 16, {}))
    expert_cfg = compose("buffer", ["expert.num_experts=4"]).expert
    noise = OmegaConf.create({"name": "shuffle", "ratio": 0.5})
    source = ExpertSource(
        expert_cfg, SimpleNamespace(name="tiny"), Train(), None, "shapes", noise, tmp_path, "cpu"
    )
    dual_module.robust_buffer(source, settings)
    for index, keep in trained_on:  # expert i: track i % 2, the other track's clean pairs
        assert torch.equal(keep, b_clean if index % 2 == 0 else a_clean), index
    assert [i for i, _ in trained_on] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- RepBlend


def test_repblend_blends_both_modalities_with_one_lambda_and_one_permutation() -> None:
    """x -> lambda x + (1 - lambda) x[pi] on images and texts with the same lambda and pi,
    recovered here from the output and checked against a plain-Python mix."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 4, generator=g, dtype=torch.float64)
    texts = torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    mixed_i, mixed_t = blend(images, texts, 1.0)
    torch.manual_seed(11)
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(6).tolist()
    for x, out in ((images, mixed_i), (texts, mixed_t)):
        ref = [
            [
                lam * a + (1 - lam) * b
                for a, b in zip(x[i].tolist(), x[perm[i]].tolist(), strict=True)
            ]
            for i in range(6)
        ]
        for got, want in zip(out.tolist(), ref, strict=True):
            assert got == pytest.approx(want, rel=1e-6)  # lambda is a float32 draw
    assert 0 < lam < 1 and sorted(perm) == list(range(6)) and perm != list(range(6))


def test_repblend_inner_loss_keeps_the_target_similarity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The student loss sees blended features but the unchanged S sub-matrix of the batch."""
    cfg = compose(
        "distill",
        ["method=repblend", "device=cpu", "dataset.split_sizes=[40,20,20]", *FEATURE],
    )
    run = Run(tmp_path, "distill", "cpu", 0)
    ctx = distill_context(cfg, prepare(cfg, "cpu", run, None), 8, "cpu", run, None)
    method = TrajectoryMatching(cfg.method)
    assert method.blend_alpha == 1.0 and method.loss_name == "wbce"
    method.logit_scale = 1.0
    syn = method._synthetic(ctx, 7)
    with torch.no_grad():  # a non-identity S, so "unchanged" means something
        syn.similarity.right.normal_()
    seen = {}

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen["t"] = targets
        return logits.sum()

    method.loss_fn = loss_fn
    student = build_student(ctx.encoder, 0, None)
    layout = ParamLayout.of(student)
    idx = torch.tensor([4, 0, 6, 2])
    data = (syn.images, syn.texts, syn.mask, syn.similarity)
    method._inner_loss(_Embed(student), layout, layout.flatten(student), idx, data)
    assert torch.equal(seen["t"], syn.similarity(idx))
