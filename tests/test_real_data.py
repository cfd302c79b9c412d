"""Every method against random real pairs on real data: flickr8k-1k, lite0_minilm features,
100 pairs, the same students scoring both on the test split. This is the evidence that each
method optimises something useful, so it runs in CI (where the data is) and skips elsewhere.

Settings are shortened from the benchmark (fewer iterations, experts and students) to keep CI
short; `scripts/bench_quality.py` and `scripts/bench_noise.py` run the full settings. The
features are encoded once per session (the session's MMDISTILL_CACHE), and the noisy split
reuses them (same images and captions, reassigned).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mmdistill.config import compose
from mmdistill.data.noise import load_mask
from mmdistill.jobs import Prepared, distill_context, prepare
from mmdistill.methods import get_method
from mmdistill.methods.coresets import joint_features
from mmdistill.runs import Run
from mmdistill.training.cost import set_cost
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import run_protocol

PAIRS = 100
# 3 students x 1,000 steps: the recipe's steps, fewer students than the benchmark's 5; two
# at a time in forked one-thread workers (the tests themselves run at one thread).
EVAL = ["eval.students=3", "eval.workers=2"]
TRAJECTORY = ["expert.num_experts=3", "method.iterations=150", "method.eval_every=50"]
RANDOM_DRAWS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(root: Path, *overrides: str) -> DictConfig:
    return compose(
        "distill",
        [
            "dataset=flickr8k",
            f"dataset.root={root}",
            "encoder=lite0_minilm",
            "device=cpu",
            f"budget.pairs={PAIRS}",
            *EVAL,
            *overrides,
        ],
    )


class Bench:
    """One prepared dataset (clean or noisy) and its scores, shared by the tests of a module."""

    def __init__(self, root: Path, run_dir: Path, *overrides: str) -> None:
        self.root, self.overrides = root, overrides
        cfg = compose_cfg(root, *overrides)
        self.run = Run(run_dir, "distill", "cpu", 0)
        self.prep: Prepared = prepare(cfg, "cpu", self.run, None)
        self.cfg = cfg
        self._random: float | None = None
        self._scores: dict[tuple, tuple[float, PairSet]] = {}

    def score(self, method: str, *overrides: str, seed: int = 0) -> tuple[float, PairSet]:
        """Distil with `method` (and overrides), then the test r_mean of the protocol; the
        same students (seed 0) score every set. A setting asked again is not run again."""
        key = (method, overrides, seed)
        if key not in self._scores:
            self._scores[key] = self._score(method, *overrides, seed=seed)
        return self._scores[key]

    def _score(self, method: str, *overrides: str, seed: int) -> tuple[float, PairSet]:
        cfg = compose_cfg(
            self.root, *self.overrides, f"method={method}", f"seed={seed}", *overrides
        )
        p = self.prep
        run = Run(self.run.path / f"{method}-{seed}", "distill", "cpu", 0)  # own checkpoints
        ctx = distill_context(cfg, p, PAIRS, "cpu", run, None)
        pairs = get_method(cfg.method.family)(cfg.method).distill(ctx)
        res = run_protocol(p.encoder, pairs, cfg.eval, p.test, p.val, "cpu", 0)
        return res.summary["r_mean"]["mean"], pairs

    @property
    def random(self) -> float:
        """The floor: the best of RANDOM_DRAWS random selections (one draw is not a baseline;
        their spread at 100 pairs is several points)."""
        if self._random is None:
            self._random = max(self.score("random", seed=s)[0] for s in range(RANDOM_DRAWS))
        return self._random


@pytest.fixture(scope="module")
def clean(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(real_data, tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def noisy(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(real_data, tmp_path_factory.mktemp("noisy"), "noise=shuffle", "noise.ratio=0.5")


def test_coresets_optimise_their_objectives_on_real_features(clean: Bench) -> None:
    """Herding matches the full data's mean in the joint feature space, and k-center covers
    it, each better than every one of 20 random selections of the same size. (Their retrieval
    at 100 pairs lies inside random's draw spread: docs/results.md, multi-draw rows.)"""
    cfg = compose_cfg(clean.root)
    ctx = distill_context(cfg, clean.prep, PAIRS, "cpu", clean.run, None)
    x = joint_features(ctx)
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randperm(len(x), generator=gen)[:PAIRS] for _ in range(20)]

    def mean_error(idx: torch.Tensor) -> float:
        return float((x[idx].mean(0) - x.mean(0)).norm())

    def radius(idx: torch.Tensor) -> float:
        return float(torch.cdist(x, x[idx]).min(dim=1).values.max())

    picked = get_method("herding")(cfg.method).distill(ctx).meta["source_pairs"]
    assert mean_error(torch.tensor(picked)) < min(mean_error(d) for d in draws)
    cover = compose_cfg(clean.root, "method=kcenter")
    picked = get_method("kcenter")(cover.method).distill(ctx).meta["source_pairs"]
    assert radius(torch.tensor(picked)) < min(radius(d) for d in draws)


def test_covmatch_beats_random(clean: Bench) -> None:
    """1,000 of the 10,000 steps (benchmark: 47.4 vs random 24.2)."""
    score, _ = clean.score("covmatch", "method.steps=1000")
    print(f"covmatch {score:.2f} vs best random {clean.random:.2f}")
    assert score > clean.random + 5, (score, clean.random)


def test_lowrank_covmatch_beats_covmatch_at_equal_storage(clean: Bench) -> None:
    """A factorised set in the bytes of 100 plain pairs against plain CovMatch's 100 pairs,
    1,000 steps each (the benchmark's rows: docs/results.md, low-rank CovMatch)."""
    plain, _ = clean.score("covmatch", "method.steps=1000")
    low, pairs = clean.score("covmatch_lowrank", "method.steps=1000")
    print(f"covmatch_lowrank {low:.2f} ({len(pairs)} pairs) vs covmatch {plain:.2f}")
    assert set_cost(pairs)["pairs_equiv"] <= PAIRS and len(pairs) > 5 * PAIRS
    assert low > plain, (low, plain)


def test_int8_covmatch_beats_covmatch_at_equal_storage(clean: Bench) -> None:
    """394 int8 pairs that also match the within-modality covariances, in the bytes of 100
    float32 pairs, against plain CovMatch's 100 pairs: 500 steps against CovMatch's 1,000,
    which the low-rank test shares (the benchmark's rows: docs/results.md, int8 rows)."""
    plain, _ = clean.score("covmatch", "method.steps=1000")
    q, pairs = clean.score("covmatch_int8", "method.steps=500")
    print(f"covmatch_int8 {q:.2f} ({len(pairs)} pairs) vs covmatch {plain:.2f}")
    assert set_cost(pairs)["pairs_equiv"] <= PAIRS and len(pairs) > 3 * PAIRS
    assert pairs.factors["images"].coef.dtype == torch.int8
    assert q > plain + 1.5, (q, plain)  # measured 49.18 vs 46.72


def test_within_matches_each_modality_and_lifts_int8_covmatch(clean: Bench) -> None:
    """int8 CovMatch with its within-modality term against the same run without it (500
    steps each): the set's image and text covariances sit nearer the real ones, and its
    students score higher (fails if `within` did nothing)."""
    from mmdistill.methods.covmatch.loss import cross_covariance

    q, pairs = clean.score("covmatch_int8", "method.steps=500")
    q0, pairs0 = clean.score("covmatch_int8", "method.steps=500", "method.within=0")
    train = clean.prep.train
    real = (train.images[train.caption_image].float(), train.texts.float())

    def error(p: PairSet) -> float:
        return sum(
            float(
                (cross_covariance(r, r) - cross_covariance(s, s)).norm()
                / cross_covariance(r, r).norm()
            )
            for r, s in zip(real, (p.images, p.texts), strict=True)
        )

    print(
        f"within 0.1: {q:.2f} (error {error(pairs):.3f}); within 0: {q0:.2f} ({error(pairs0):.3f})"
    )
    assert error(pairs) < 0.8 * error(pairs0), (error(pairs), error(pairs0))
    assert q > q0, (q, q0)


@pytest.mark.parametrize(
    ("method", "margin"), [("mtt", 3), ("tesla", 3), ("lors", 5), ("repblend", 5)]
)
def test_trajectory_matching_beats_random(clean: Bench, method: str, margin: float) -> None:
    score, pairs = clean.score(method, *TRAJECTORY)
    if method in ("lors", "repblend"):
        assert len(pairs) == PAIRS - 1 and pairs.loss == "wbce"
    print(f"{method} {score:.2f} vs best random {clean.random:.2f}")
    assert score > clean.random + margin, (score, clean.random)


def test_mdw_on_noisy_data_beats_random_and_detects_clean_pairs(noisy: Bench) -> None:
    """At noise 0.5 (benchmark: MDW 38.6 vs random 7.2, LoRS 23.4; detection precision 0.93).
    The dual-track detection runs 2 of its 3 co-teaching rounds (here round 2 reached precision
    0.93, recall 0.54); the matching is shortened."""
    score, pairs = noisy.score("mdw", *TRAJECTORY, "method.dual.rounds=2")
    detection = pairs.meta["mdw"]["detection"]
    assert detection["precision"] >= 0.9 and detection["recall"] >= 0.4, detection
    assert load_mask(noisy.run.path) is not None
    print(f"mdw {score:.2f} vs best random {noisy.random:.2f}; detection {detection}")
    assert score > noisy.random + 10, (score, noisy.random)


def test_robust_covmatch_beats_plain_covmatch_on_noisy_data(noisy: Bench) -> None:
    """At noise 0.5, the same 1,000 of 10,000 steps for both (benchmark: robust 41.4 vs plain
    36.2), the dual-track detection shortened to 2 of its 3 rounds. Plain CovMatch is already
    robust in expectation (shuffled pairs add no cross-covariance); weighting its statistics
    by the detected clean probabilities must still gain."""
    plain, _ = noisy.score("covmatch", "method.steps=1000")
    robust, pairs = noisy.score(
        "covmatch_robust", "method.steps=1000", "method.robust.dual.rounds=2"
    )
    report = pairs.meta["robust"]
    print(f"covmatch_robust {robust:.2f} vs covmatch {plain:.2f}; detection {report}")
    assert report["detection"]["precision"] >= 0.8, report
    assert robust > plain + 2, (robust, plain)


@pytest.mark.parametrize(
    ("sizes", "pairs"),
    [("[40,10,10]", 10), ("[40,10,10]", 100), ("[700,100,200]", 10), ("[700,100,200]", 1000)],
)
def test_default_covmatch_holds_from_10_to_1000_pairs_on_200_to_3500_real_pairs(
    real_data: Path, tmp_path: Path, sizes: str, pairs: int
) -> None:
    """The default method's step sizes at the corners of budget (10 to 1,000 pairs) and data
    (200 to 3,500 real pairs), 300 of its steps: no divergence (that is one UserError), and
    where the budget is at most a quarter of the real pairs, the set beats the best of three
    random draws of its budget (one short student each)."""
    scores = {}
    for method, seeds in (("covmatch", [0]), ("random", [0, 1, 2])):
        for seed in seeds:
            steps = ["method.steps=300"] if method == "covmatch" else []
            cfg = compose_cfg(
                real_data, f"method={method}", f"dataset.split_sizes={sizes}",
                f"budget.pairs={pairs}", *steps, f"seed={seed}", "eval.students=1",
                "eval.steps=300",
            )  # fmt: skip
            run = Run(tmp_path / f"{method}-{seed}", "distill", "cpu", seed)
            prep = prepare(cfg, "cpu", run, None)
            ctx = distill_context(cfg, prep, pairs, "cpu", run, None)
            made = get_method(cfg.method.family)(cfg.method).distill(ctx)
            assert not made.partial and torch.isfinite(made.images).all()
            res = run_protocol(prep.encoder, made, cfg.eval, prep.test, prep.val, "cpu", 0)
            scores.setdefault(method, []).append(res.summary["r_mean"]["mean"])
    print(f"{sizes} x {pairs}: covmatch {scores['covmatch'][0]:.2f}, random {scores['random']}")
    if pairs * 4 <= int(sizes.strip("[]").split(",")[0]) * 5:
        # (100 of 200 pairs is half the data, scored on 10 test images: random reaches 80 and
        # the two tie within that split's noise, measured 79.7 against 78.0-80.3)
        assert scores["covmatch"][0] > max(scores["random"]), scores
