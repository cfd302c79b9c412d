"""CovMatch (Lee & Chung, NeurIPS 2025): cross-covariance matching with online encoders.

With linear heads and a linearised contrastive loss, the heads' optimum depends on the data
only through the image-text cross-covariance of trunk features, so distillation reduces to
matching it: loss = ||rho C_real - C_syn||_F^2 + lambda (mean-matching of projected features per
modality). No experts and no unrolling: only the synthetic data is updated by this loss, while
an online student (trunks where the encoder trains them, plus fresh linear heads) takes one
ordinary contrastive step on real data between synthetic updates and is reset every
`reset_every` steps.

Where the data live follows the encoder: pixels when the image trunk trains, token-embedding
sequences `[N, L, E]` (fed to the text trunk like `inputs_embeds`) when the text trunk trains,
and frozen-trunk features otherwise. In feature space C_syn is the cross-covariance of the
synthetic features themselves, and the heads enter only through the mean term.

Factorised sets (`rank`, our extension, feature space only): each modality is stored as
coefficients on the top-`rank` singular directions of the real cross-covariance plus the real
mean, so a budget of N pairs' bytes holds many more pairs, all inside the subspace where the
best rank-`rank` approximation of C_real lives; the coefficients are what the loss updates.

Resetting: `reset_to: fresh` rebuilds the online student with a new seed each round, which for
a pretrained encoder is a pristine pretrained copy and for a random-init encoder (`tiny`) a
new random draw, like the students evaluation trains; `initial` keeps one trunk init for every
round (only differs from `fresh` for random-init encoders). Heads are always fresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.methods.base import (
    DistillContext,
    keep_partial,
    monitored_val,
    out_of_range,
    sane_bounds,
)
from mmdistill.methods.coresets import herding, joint_features, kcenter
from mmdistill.methods.mdw_dual_track import (
    DualTrackSettings,
    cached_detection,
    detection_scores,
)
from mmdistill.models.encoders import Encoder, Tokens
from mmdistill.models.student import is_text_features
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import Factor, PairSet, int8_rows
from mmdistill.training.trainer import (
    Batches,
    FiniteCheck,
    Recipe,
    Trainer,
    default_check_every,
    pair_loss,
)

log = logging.getLogger(__name__)
# Where the synthetic pairs start (`method.init`), besides random real pairs: a coreset of the
# joint (image, text) trunk features, so the matching starts from pairs that already cover them.
INITS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "herding": lambda x, k, gen: herding(x, k),
    "kcenter": lambda x, k, gen: kcenter(x, k, int(torch.randint(len(x), (1,), generator=gen))),
}
CHECKPOINT = "covmatch"
RESETS = ("fresh", "initial")
BITS = (32, 8)
PER_BUDGET = ("rho", "lambda", "steps", "syn_batch")
WEIGHTINGS = ("soft", "hard")
LOW_CLEAN_FRACTION = 0.05


@dataclass(frozen=True)
class RobustSettings:
    """`method.robust`: pair weights from clean-pair detection (our extension)."""

    enabled: bool
    weighting: str
    threshold: float
    rescale_rho: bool
    clean_init: bool
    dual: DualTrackSettings

    @classmethod
    def from_cfg(cls, cfg: DictConfig | None) -> RobustSettings:
        if cfg is None:
            return cls(False, "soft", 0.5, True, True, DualTrackSettings())
        s = cls(
            enabled=bool(cfg.enabled),
            weighting=str(cfg.weighting),
            threshold=float(cfg.threshold),
            rescale_rho=bool(cfg.rescale_rho),
            clean_init=bool(cfg.clean_init),
            dual=DualTrackSettings.from_cfg(cfg.get("dual")),
        )
        if s.weighting not in WEIGHTINGS:
            raise UserError(f"method.robust.weighting={s.weighting!r}: choose soft or hard")
        if not 0.0 < s.threshold < 1.0:
            raise UserError(f"method.robust.threshold={s.threshold} must be in (0, 1)")
        return s


@dataclass
class PairWeights:
    """Each real pair's estimated clean probability, the weights and clean pool it gives."""

    prob: Tensor  # [n_pairs]
    weight: Tensor  # [n_pairs]: prob (soft) or prob > threshold (hard)
    pool: Tensor  # pair indices with prob > threshold
    report: dict[str, Any]

    @property
    def rho_scale(self) -> float:
        """1 / the estimated share of clean pairs in the weighted statistics: shuffled pairs
        add no expected cross-covariance, so they shrink C_real by that share."""
        return float(self.weight.sum() / (self.weight * self.prob).sum().clamp(min=1e-12))


def cross_covariance(v: Tensor, t: Tensor) -> Tensor:
    """Centred image-text cross-covariance `[D_v, D_t]` of a batch, divisor n - 1."""
    n = v.shape[0]
    return (v - v.mean(0)).T @ (t - t.mean(0)) / (n - 1)


def weighted_statistics(v: Tensor, t: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted cross-covariance and means with reliability weights `w` (divisor
    sum w - sum w^2 / sum w: with 0/1 weights, the n - 1 covariance of the kept pairs)."""
    w = w.to(v.dtype)
    total = w.sum()
    mv, mt = (w @ v) / total, (w @ t) / total
    cov = ((v - mv) * w[:, None]).T @ (t - mt) / (total - (w * w).sum() / total)
    return cov, mv[None], mt[None]


def _centred(x: Tensor) -> Tensor:
    return x - x.mean(0, keepdim=True)


def _cov_inner(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """<C_a, C_b>_F from the two batches' Gram matrices, never forming a `[D_v, D_t]` matrix.

    <A_v^T A_t, B_v^T B_t> = sum_ij (A_v B_v^T)_ij (A_t B_t^T)_ij: O(n_a n_b (D_v + D_t)) instead
    of O((n_a + n_b) D_v D_t), which is what makes a step cheap with 1000-2000-d trunks.
    """
    av, at = map(_centred, a)
    bv, bt = map(_centred, b)
    return ((av @ bv.T) * (at @ bt.T)).sum() / ((len(av) - 1) * (len(bv) - 1))


def covmatch_loss(
    real: tuple[Tensor, Tensor],
    syn: tuple[Tensor, Tensor],
    heads: tuple[nn.Module, nn.Module],
    rho: float,
    lam: float,
    real_cov: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """||rho C_real - C_syn||_F^2 + lam * sum over modalities of ||mean G h_real - mean G h_syn||^2.

    `real` and `syn` are (image, text) trunk features; `heads` the current linear projections G
    (affine, so the projected mean is the projection of the mean). For a real batch the
    Frobenius term is expanded as rho^2 |C_r|^2 - 2 rho <C_r, C_s> + |C_s|^2 (see `_cov_inner`).
    With `real_cov` given (statistics of all real pairs, precomputed), `real` only supplies
    the real means (a single row each is enough). The two terms come back detached, still on
    the device: reading them is a host sync, done only when a step is logged.
    """
    if real_cov is None:
        cov = (
            rho**2 * _cov_inner(real, real).detach()
            - 2 * rho * _cov_inner(real, syn)
            + _cov_inner(syn, syn)
        )
    else:
        cov = (rho * real_cov - cross_covariance(*syn)).pow(2).sum()
    mean = sum(
        (head(r.mean(0, keepdim=True)) - head(s.mean(0, keepdim=True))).pow(2).sum()
        for head, r, s in zip(heads, real, syn, strict=True)
    )
    return cov + lam * mean, {"cov": cov.detach(), "mean": mean.detach()}


def factored_pairs(budget: int, rank: int, dims: tuple[int, int], bits: int = 32) -> int:
    """How many pairs fit in the bytes of `budget` plain float32 pairs.

    Rank k > 0: rank-k coefficients beside the two bases `[k, D]` and offsets `[D]`, so
    (budget - k - 1) (D_v + D_t) / 2k pairs in float32. Rank 0 stores feature rows. With 8
    bits the rows (or coefficients) are int8 codes plus a float32 scale per row and modality,
    beside float32 offsets.
    """
    row = 4 * sum(dims)  # bytes of one float32 pair, or of one basis row / offset per modality
    shared = rank + 1 if rank else int(bits != 32)  # bases and offsets, in rows
    per_pair = (2 * rank if rank else sum(dims)) * bits // 8 + (2 * 4 if bits != 32 else 0)
    return (budget - shared) * row // per_pair


def subspace(real_cov: Tensor, means: tuple[Tensor, Tensor], rank: int) -> tuple[Factor, Factor]:
    """Bases (the top-`rank` left / right singular vectors of C_real) and offsets (the real
    means) of a factorised set, with no coefficients yet."""
    u, _, vh = torch.linalg.svd(real_cov, full_matrices=False)
    empty = real_cov.new_zeros(0, rank)
    return (
        Factor(empty, u[:, :rank].T.contiguous(), means[0].flatten()),
        Factor(empty, vh[:rank].contiguous(), means[1].flatten()),
    )


def with_rows(
    factors: tuple[Factor, Factor], images: Tensor, texts: Tensor, bits: int = 32
) -> dict[str, Factor]:
    """A stored set's factors: these rows (coefficients on `factors`' bases, or features
    without a basis, stored less the offset), as int8 codes with 8 bits."""
    out = {}
    for key, f, rows in zip(("images", "texts"), factors, (images, texts), strict=True):
        coef = rows if f.basis is not None else rows - f.offset
        scale = None
        if bits == 8:
            coef, scale = int8_rows(coef)
        out[key] = Factor(coef, f.basis, f.offset, scale)
    return out


def budget_row(table: dict[int, Any], pairs: int) -> Any:
    """The row of a per-budget table for the largest key <= `pairs` (the smallest key below
    all of them)."""
    below = [k for k in table if k <= pairs]
    return table[max(below) if below else min(table)]


def budget_settings(cfg: DictConfig, pairs: int) -> dict[str, object]:
    """rho, lambda, steps and syn_batch: explicit values win, `auto` reads `by_budget`.

    The table row is the largest budget key <= `pairs` (the smallest key below all of them),
    so the paper's 100/200/500 settings also cover budgets in between.
    """
    row = budget_row({int(k): v for k, v in cfg.by_budget.items()}, pairs)
    return {k: row[k] if str(cfg[k]) == "auto" else cfg[k] for k in PER_BUDGET}


class CovMatch:
    """Synthetic pairs whose trunk-feature cross-covariance matches rho times the real one."""

    def __init__(self, cfg: DictConfig) -> None:
        if cfg.reset_to not in RESETS:
            raise UserError(f"method.reset_to={cfg.reset_to!r}: choose one of {', '.join(RESETS)}")
        for key in ("reset_every", "checkpoint_every", "real_batch"):
            if int(cfg[key]) <= 0:
                raise UserError(f"method.{key}={cfg[key]} must be positive")
        if int(cfg.checkpoint_every) % int(cfg.reset_every):
            raise UserError(
                f"method.checkpoint_every={cfg.checkpoint_every} must be a multiple of "
                f"method.reset_every={cfg.reset_every} (checkpoints fall on online-model resets)"
            )
        if int(cfg.real_batch) < 2:
            raise UserError(f"method.real_batch={cfg.real_batch}: a covariance needs at least 2")
        self.cfg = cfg
        self.robust = RobustSettings.from_cfg(cfg.get("robust"))
        self.stored: tuple[Factor, Factor] | None = None
        self.bits = 32

    def pair_weights(self, ctx: DistillContext) -> PairWeights:
        """Clean probabilities from dual-track detection (cached), the mean of both tracks'."""
        r = self.robust
        true_clean = None
        mask = ctx.noise_mask
        if mask is not None and len(mask.pair_clean) == ctx.train.n_pairs:
            true_clean = mask.pair_clean
        det = cached_detection(
            ctx.encoder,
            ctx.train,
            ctx.dataset,
            ctx.noise,
            r.dual,
            ctx.seed,
            ctx.device,
            ctx.cache_dir,
            true_clean,
            say=log.info,
        )
        prob = 0.5 * (det.prob[0] + det.prob[1])
        clean = prob > r.threshold
        weight = prob if r.weighting == "soft" else clean.float()
        fraction = float(prob.mean())
        report = {
            "estimated_clean_fraction": round(fraction, 4),
            "clean_pool": int(clean.sum()),
            "detection": detection_scores(clean, true_clean),
            "against_noise_mask": true_clean is not None,
            "weighting": r.weighting,
        }
        if fraction < LOW_CLEAN_FRACTION:
            log.warning(
                "robust CovMatch: estimated clean fraction %.3f: almost every pair looks "
                "mismatched; check the data, or set method.robust.enabled=false",
                fraction,
            )
        return PairWeights(prob, weight, torch.nonzero(clean).flatten(), report)

    def settings(self, pairs: int, feature_space: bool = False) -> dict[str, object]:
        """The per-budget hyper-parameters, checked against the budget.

        The paper's synthetic mini-batch (256 of 500 pairs) bounds the memory of pixel forward
        passes; frozen-trunk features cost nothing comparable, so there `syn_batch: auto` takes
        every synthetic pair, the exact C_syn. Measured (flickr8k-1k, lite0_minilm, 500 pairs,
        5 students): val r_mean 61.1 with 256, 65.0 with all; test 45.4 vs 49.4.
        """
        s = budget_settings(self.cfg, pairs)
        if feature_space and str(self.cfg.syn_batch) == "auto":
            s["syn_batch"] = "all"
        for key in ("rho", "lambda"):
            if float(s[key]) < 0:
                raise UserError(
                    f"method.{key}={s[key]} must be >= 0 (paper: rho 1-2, lambda 0.1-0.5)"
                )
        if int(s["steps"]) < 0:
            raise UserError(f"method.steps={s['steps']} must be >= 0")
        syn_batch = pairs if str(s["syn_batch"]) == "all" else int(s["syn_batch"])
        if syn_batch > pairs:
            raise UserError(
                f"method.syn_batch={syn_batch} is larger than the budget ({pairs} pairs); "
                "lower it or set method.syn_batch=all"
            )
        if syn_batch < 2:
            raise UserError(
                f"CovMatch needs a synthetic batch of at least 2 pairs (got {syn_batch}); "
                "raise budget.pairs or method.syn_batch"
            )
        return {**s, "syn_batch": syn_batch}

    # ------------------------------------------------------------------ synthetic state

    def _init_synthetic(
        self, ctx: DistillContext, gen: torch.Generator, n: int, pool: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Real pairs of `pool` (the clean pool, when given; else every pair): random ones, or
        the herding / k-center coreset that `method.init` names; pixels or image features,
        token embeddings or text features."""
        train, enc = ctx.train, ctx.encoder
        if pool is not None and len(pool) < n:
            raise UserError(
                f"the clean pool holds {len(pool)} pairs, fewer than the {n} to distil; "
                "lower method.robust.threshold or set method.robust.clean_init=false"
            )
        cand = torch.arange(train.n_pairs) if pool is None else pool
        if len(cand) < n:
            raise UserError(
                f"{n} synthetic pairs to start from {len(cand)} real ones; lower budget.pairs "
                "(a factorised or int8 set: raise method.rank or set method.bits=32, which "
                "fit fewer pairs)"
            )
        init = str(self.cfg.get("init", "random"))
        if init == "random":
            idx = cand[torch.randperm(len(cand), generator=gen)[:n]]
        else:
            idx = cand[INITS[init](joint_features(ctx)[cand], n, gen)]
        out = {"images": train.images[train.caption_image[idx]].float().clone(), "source": idx}
        if _token_text(train):
            _check_embeddable(enc)
            with torch.no_grad():
                out["texts"] = enc.text_trunk.embed_tokens(train.texts[idx]).float().clone()
            out["text_mask"] = train.text_mask[idx].clone()
        else:
            out["texts"] = train.texts[idx].float().clone()
        return out

    def _online(self, ctx: DistillContext, round_idx: int, real: PairSet) -> Trainer:
        """A freshly reset online student with linear heads, trained by one ordinary
        contrastive step on real pairs between synthetic updates."""
        enc = ctx.encoder
        seed = ctx.seed * 1_000_003 + round_idx + 1
        student = enc.new_student(seed if self.cfg.reset_to == "fresh" else ctx.seed)
        torch.manual_seed(seed)
        dim = int(self.cfg.proj_dim)
        student.image_head = nn.Linear(enc.image_dim, dim)
        student.text_head = nn.Linear(enc.text_dim, dim)
        student.to(ctx.device)
        return Trainer(
            student,
            Recipe.from_cfg(self.cfg.online).without_schedule(),
            pair_loss(real, "infonce", ctx.device),
            pairs=real,
            what="CovMatch's online student",
            hint=f"lower method.online.lr (now {self.cfg.online.lr})",
        )

    def _need_full_statistics(self, ctx: DistillContext, setting: str, off: str = "0") -> None:
        """`rank`, `bits` and `within` read statistics of all real pairs, which only frozen
        trunks fix; `off` is the value that turns the setting off."""
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        if not frozen or str(self.cfg.real_stats) == "batch":
            key = setting.split("=")[0]
            raise UserError(
                f"{setting} needs fixed frozen-trunk features, but encoder {ctx.encoder.name} "
                f"trains a trunk or method.real_stats=batch; set {key}={off}"
            )

    def _bits(self, ctx: DistillContext) -> int:
        """`method.bits`, checked: 32 stores float32 rows, 8 int8 codes (frozen trunks only)."""
        bits = int(self.cfg.get("bits", 32))
        if bits not in BITS:
            raise UserError(f"method.bits={bits}: choose one of {', '.join(map(str, BITS))}")
        if bits != 32:
            self._need_full_statistics(ctx, f"method.bits={bits}", off="32")
        return bits

    def _rank(self, ctx: DistillContext, bits: int = 32) -> int:
        """`method.rank`, checked: 0 (plain pairs) or a factorised set's rank."""
        rank = self.cfg.get("rank", 0)
        if str(rank) == "auto":
            table = {int(k): int(v) for k, v in (self.cfg.get("rank_by_budget") or {}).items()}
            if not table:
                raise UserError("method.rank=auto reads method.rank_by_budget; give a number")
            rank = budget_row(table, ctx.pairs)
        rank = int(rank)
        if rank == 0:
            return 0
        self._need_full_statistics(ctx, f"method.rank={rank}")
        dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
        n = factored_pairs(ctx.pairs, rank, dims, bits)
        if rank > min(dims) or n < 2:
            raise UserError(
                f"method.rank={rank} leaves room for {max(n, 0)} pairs in the bytes of "
                f"{ctx.pairs}; lower method.rank (at most {min(dims)}) or raise budget.pairs"
            )
        return rank

    def _full_statistics(
        self, ctx: DistillContext, weights: PairWeights | None = None
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """Cross-covariance and means of all real pairs, when `real_stats` asks for them
        (weighted by `weights` in robust mode).

        Only frozen trunks give fixed real features, so `full` (the default there: the exact
        expectation the paper estimates per batch) needs a feature-space encoder.
        """
        mode = str(self.cfg.real_stats)
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        if mode not in ("auto", "batch", "full"):
            raise UserError(f"method.real_stats={mode!r}: choose auto, batch or full")
        if mode == "full" and not frozen:
            raise UserError(
                f"method.real_stats=full needs frozen trunks, but encoder {ctx.encoder.name} "
                "trains one; use method.real_stats=batch"
            )
        if mode == "batch" or not frozen:
            return None, None
        train = ctx.train
        v = train.images[train.caption_image].float().to(ctx.device)
        t = train.texts.float().to(ctx.device)
        if weights is not None:
            cov, mv, mt = weighted_statistics(v, t, weights.weight.to(ctx.device))
            return cov, (mv, mt)
        return cross_covariance(v, t), (v.mean(0, keepdim=True), t.mean(0, keepdim=True))

    def _within_targets(
        self,
        ctx: DistillContext,
        weights: PairWeights | None,
        factors: tuple[Factor, Factor] | None,
    ) -> tuple[Tensor, Tensor] | None:
        """The real within-modality covariances C_vv and C_tt (weighted in robust mode), in the
        space the synthetic rows live in: features, or a factorised set's coefficients (B C B^T,
        where a set of more rows than the rank can match them exactly). None when `within` is 0.

        CovMatch's linearised loss sees only C_vt; the contrastive loss's normaliser is
        quadratic in the projected features, so at second order the students also see these.
        """
        if float(self.cfg.get("within", 0.0)) == 0.0:
            return None
        self._need_full_statistics(ctx, f"method.within={self.cfg.within}")
        train = ctx.train
        out = []
        for i, x in enumerate((train.images[train.caption_image], train.texts)):
            x = x.float().to(ctx.device)
            if weights is None:
                cov = cross_covariance(x, x)
            else:
                cov = weighted_statistics(x, x, weights.weight.to(ctx.device))[0]
            if factors is not None:
                basis = factors[i].basis.to(ctx.device)
                cov = basis @ cov @ basis.T
            out.append(cov)
        return out[0], out[1]

    # ------------------------------------------------------------------ main loop

    def distill(self, ctx: DistillContext) -> PairSet:
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        bits = self._bits(ctx)
        rank = self._rank(ctx, bits)
        dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
        n_syn = factored_pairs(ctx.pairs, rank, dims, bits)
        s = self.settings(n_syn, feature_space=frozen)
        rho, lam, steps = float(s["rho"]), float(s["lambda"]), int(s["steps"])
        syn_batch = int(s["syn_batch"])
        gen = torch.Generator().manual_seed(ctx.seed)
        weights = self.pair_weights(ctx) if self.robust.enabled else None
        pool = None if weights is None else weights.pool
        if weights is not None and len(pool) < 2:
            raise UserError(
                f"robust CovMatch found {len(pool)} clean pairs; lower method.robust.threshold "
                "or set method.robust.enabled=false"
            )
        if weights is not None and self.robust.rescale_rho:
            rho *= weights.rho_scale
        real_cov, real_means = self._full_statistics(ctx, weights)
        factors = None  # the subspace of a factorised set: its rows are coefficients
        stored: tuple[Factor, Factor] | None = None  # how the rows are stored
        if rank or bits != 32:
            assert real_cov is not None and real_means is not None  # checked real_stats
            means = (real_means[0].cpu().flatten(), real_means[1].cpu().flatten())
            empty = torch.zeros(0, 0)
            stored = (Factor(empty, None, means[0]), Factor(empty, None, means[1]))
            if rank:
                factors = stored = subspace(real_cov.cpu(), means, rank)
            log.info(
                "covmatch: %d pairs (rank %s, %d bits) in the bytes of %d",
                n_syn,
                rank or "full",
                bits,
                ctx.pairs,
            )
        self.stored, self.bits = stored, bits  # _diverged stores a partial set the same way
        within = float(self.cfg.get("within", 0.0))
        within_targets = self._within_targets(ctx, weights, factors)
        syn = self._init_synthetic(ctx, gen, n_syn, pool if self.robust.clean_init else None)
        if factors is not None:
            for key, f in zip(("images", "texts"), factors, strict=True):
                syn[key] = (syn[key] - f.offset) @ f.basis.T
        self.bounds = sane_bounds(images=syn["images"], texts=syn["texts"])
        real = ctx.train.pairset().to(ctx.device)  # on the device once, not per batch
        n_real = len(real) if pool is None else len(pool)
        batches = Batches(
            len(real), min(int(self.cfg.real_batch), n_real), gen, pool=pool, device=ctx.device
        )
        start, history = 0, []
        saved = ctx.run.load_checkpoint(CHECKPOINT)
        if saved is not None:
            with io.reading(ctx.run.checkpoint_path(CHECKPOINT), ctx.run.checkpoint_fix()):
                start, history = self._restore(saved, syn, gen, batches)
            log.info("covmatch: resuming at step %d of %d", start, steps)
        images = syn["images"].to(ctx.device).requires_grad_(True)
        texts = syn["texts"].to(ctx.device).requires_grad_(True)
        mask = syn.get("text_mask")
        mask = None if mask is None else mask.to(ctx.device)
        opt = torch.optim.SGD(
            [
                {"params": [images], "lr": float(self.cfg.lr)},
                {"params": [texts], "lr": float(self.cfg.lr_text)},
            ],
            momentum=float(self.cfg.momentum),
        )
        if saved is not None and "momentum.images" in saved[0]:
            for p, key in ((images, "images"), (texts, "texts")):
                opt.state[p]["momentum_buffer"] = saved[0][f"momentum.{key}"].to(ctx.device)

        def checkpoint(at: int) -> None:
            self._save(ctx, at, images, texts, mask, syn["source"], opt, gen, batches, history)

        if saved is None:
            checkpoint(0)  # the initial set is the last good one until the first checkpoint
        reset_every, every = int(self.cfg.reset_every), int(self.cfg.checkpoint_every)
        log_every = int(self.cfg.log_every)
        # The curve gets at least about 100 points; meta's loss history keeps log_every.
        curve_every = min(log_every, max(1, steps // 100))
        task = (
            ctx.progress.add_task("covmatch", total=steps, completed=start)
            if ctx.progress
            else None
        )

        def diverged(value: float, at: int) -> None:
            self._diverged(ctx, at, f"the loss became {value}")

        check = FiniteCheck(default_check_every(ctx.device), diverged)
        every_pair = torch.arange(n_syn, device=ctx.device)
        on_device = (
            None
            if factors is None
            else [(f.basis.to(ctx.device), f.offset.to(ctx.device)) for f in factors]
        )

        def decoded(x: Tensor, which: int) -> Tensor:
            """Features of synthetic rows: the rows themselves, or coefficients decoded."""
            if on_device is None:
                return x
            basis, offset = on_device[which]
            return torch.addmm(offset, x, basis)

        online: Trainer | None = None
        val_every = int(ctx.monitor.val_every) if ctx.monitor is not None else 0
        watching = 0.0  # seconds spent in val checks, left out of seconds_per_step

        def watch(at: int) -> None:
            """Val r_mean of the current set, for the curves; it changes nothing."""
            nonlocal watching
            t = time.perf_counter()
            current = PairSet(
                images=images.detach().cpu(),
                texts=texts.detach().cpu(),
                text_mask=None if mask is None else mask.cpu(),
            )
            score = monitored_val(ctx, current, "covmatch")
            watching += time.perf_counter() - t
            if score is not None:
                ctx.run.metrics.write("method", at, val_r_mean=score)
                if task is not None:
                    ctx.progress.update(task, info=f"val r_mean {score:.2f}")

        ctx.run.metrics.start("method")
        if val_every > 0 and start == 0:
            watch(0)
        t0 = time.perf_counter()
        for step in range(start, steps):
            if online is None or step % reset_every == 0:
                if online is not None:
                    online.flush()
                online = self._online(ctx, step // reset_every, real)
            student = online.student
            # 1. Synthetic update against the current online student (no gradient to it).
            sidx = (
                every_pair
                if syn_batch == n_syn
                else torch.randperm(n_syn, generator=gen)[:syn_batch].to(ctx.device)
            )
            student.eval()
            if real_means is not None:
                feats_real = real_means
            else:
                ri, rt, rm, _ = real.batch(batches.next(), ctx.device)
                with torch.no_grad():
                    feats_real = (student.image_features(ri), student.text_features(rt, rm))
            feats_syn = (
                student.image_features(decoded(images[sidx], 0)),
                student.text_features(
                    decoded(texts[sidx], 1), None if mask is None else mask[sidx]
                ),
            )
            loss, parts = covmatch_loss(
                feats_real, feats_syn, (student.image_head, student.text_head), rho, lam, real_cov
            )
            if within_targets is not None:
                rows = (images[sidx], texts[sidx])
                auto = sum(
                    (rho * target - cross_covariance(x, x)).pow(2).sum()
                    for target, x in zip(within_targets, rows, strict=True)
                )
                loss = loss + within * auto
                parts["within"] = auto.detach()
            grads = torch.autograd.grad(loss, [images, texts])
            check.watch(step, loss, *grads)
            images.grad, texts.grad = grads
            opt.step()
            opt.zero_grad(set_to_none=True)
            # 2. One ordinary contrastive step of the online student on the next real batch.
            online_loss = online.step(batches.next())
            logged = step % log_every == 0 or step + 1 == steps
            if logged or step % curve_every == 0:
                row = {"step": step, "loss": loss.item(), "online": online_loss.item()}
                row.update({k: v.item() for k, v in parts.items()})
                ctx.run.metrics.write("method", **row)
                if logged:
                    history.append(row)
                    log.info("covmatch %s", " ".join(f"{k} {v:.4g}" for k, v in row.items()))
            if (step + 1) % every == 0 and step + 1 < steps:
                check.flush()  # a checkpoint is always a finite set
                online.flush()
                checkpoint(step + 1)
            if val_every > 0 and ((step + 1) % val_every == 0 or step + 1 == steps):
                check.flush()  # never score a diverged set
                watch(step + 1)
            if task is not None:
                ctx.progress.advance(task)
        check.flush()
        if online is not None:
            online.flush()
        sec_per_step = (time.perf_counter() - t0 - watching) / max(steps - start, 1)
        far = out_of_range(self.bounds, images=images, texts=texts)
        if far:
            self._diverged(ctx, steps, far)

        images, texts = images.detach().cpu(), texts.detach().cpu()
        mask = None if mask is None else mask.cpu()
        parts: dict[str, Factor] = {}
        if stored is not None:
            parts = with_rows(stored, images, texts, bits)
            images, texts = parts["images"].decode(), parts["texts"].decode()
        nearest = nearest_captions(ctx.encoder, ctx.train, texts, mask, ctx.device)
        return PairSet(
            images=images,
            texts=texts,
            text_mask=mask,
            factors=parts,
            meta={
                "method": "covmatch",
                "rank": rank or None,
                "bits": bits,
                "within": within,
                "rho": rho,
                "lambda": lam,
                "steps": steps,
                "syn_batch": syn_batch,
                "reset_every": reset_every,
                "reset_to": str(self.cfg.reset_to),
                "real_stats": "full" if real_cov is not None else "batch",
                "seconds_per_step": round(sec_per_step, 5),
                "init_pairs": syn["source"].tolist(),
                "nearest_caption_index": nearest,
                "nearest_captions": [ctx.train.captions[i] for i in nearest],
                "loss_history": history,
                "robust": None
                if weights is None
                else {**weights.report, "rho_scale": weights.rho_scale},
            },
        )

    # ------------------------------------------------------------------ checkpoints

    def _diverged(self, ctx: DistillContext, step: int, what: str) -> NoReturn:
        """Keep the last checkpoint (the initial set before the first) as the run's partial
        distilled set, and stop with the fix."""
        saved = ctx.run.load_checkpoint(CHECKPOINT)
        assert saved is not None  # distill() saves step 0 before the first update
        tensors, state = saved
        stored = {}
        if self.stored is not None:
            stored = with_rows(self.stored, tensors["images"], tensors["texts"], self.bits)
        pairs = PairSet(
            images=stored["images"].decode() if stored else tensors["images"],
            texts=stored["texts"].decode() if stored else tensors["texts"],
            text_mask=tensors.get("text_mask"),
            factors=stored,
            meta={"method": "covmatch", "init_pairs": tensors["source"].tolist()},
        )
        path = keep_partial(ctx.run, pairs, what, step, int(state["step"]))
        raise UserError(
            f"CovMatch stopped at step {step}: {what}; the last good set (step {state['step']}) "
            f"is saved as {path}, marked partial; lower method.lr (now {self.cfg.lr}, "
            f"method.lr_text {self.cfg.lr_text}) and continue with resume={ctx.run.path} "
            "method.lr=..."
        )

    def _save(
        self,
        ctx: DistillContext,
        step: int,
        images: Tensor,
        texts: Tensor,
        mask: Tensor | None,
        source: Tensor,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        batches: Batches,
        history: list[dict],
    ) -> None:
        tensors = {
            "images": images,
            "texts": texts,
            "source": source,
            "rng": gen.get_state(),
            "real_order": batches.order,
        }
        if mask is not None:
            tensors["text_mask"] = mask
        for p, key in ((images, "images"), (texts, "texts")):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{key}"] = buf
        far = out_of_range(self.bounds, images=images, texts=texts)
        if far:  # never checkpoint a diverged set: the previous checkpoint stays the last good
            self._diverged(ctx, step, far)
        ctx.run.save_checkpoint(
            CHECKPOINT, tensors, {"step": step, "real_pos": batches.pos, "history": history}
        )

    @staticmethod
    def _restore(
        saved: tuple[dict[str, Tensor], dict],
        syn: dict[str, Tensor],
        gen: torch.Generator,
        batches: Batches,
    ) -> tuple[int, list[dict]]:
        """Load a checkpoint into `syn` and `gen`; refuse one from another setting."""
        tensors, state = saved
        for key in ("images", "texts"):
            if tensors[key].shape != syn[key].shape:
                raise UserError(
                    f"the CovMatch checkpoint holds {key} of shape {list(tensors[key].shape)} but "
                    f"this run makes {list(syn[key].shape)}; start a new run folder"
                )
        for key in ("images", "texts", "text_mask", "source"):
            if key in tensors:
                syn[key] = tensors[key]
        gen.set_state(tensors["rng"])
        batches.order = tensors["real_order"].to(batches.device)
        batches.pos = int(state["real_pos"])
        return int(state["step"]), list(state.get("history", []))


def _token_text(train: RealSplit) -> bool:
    return not is_text_features(train.texts)


def _check_embeddable(enc: Encoder) -> None:
    """Token-space text needs a text trunk that reads token-embedding sequences."""
    try:
        with torch.no_grad():
            enc.text_trunk.embed_tokens(torch.zeros(1, 1, dtype=torch.long))
    except NotImplementedError:
        raise UserError(
            f"encoder {enc.name}'s text trunk cannot read token embeddings, so CovMatch cannot "
            "train it; set encoder.train_text_trunk=false (feature-space text)"
        ) from None


@torch.no_grad()
def nearest_captions(
    enc: Encoder, train: RealSplit, texts: Tensor, mask: Tensor | None, device: str
) -> list[int]:
    """Each synthetic text read back as the real training caption nearest by cosine.

    Token-embedding texts are compared through the encoder's shared text trunk (the same trunk
    embeds the real captions); feature texts directly with the real caption features.
    """
    if mask is None:
        syn, real = texts, train.texts.float()
    else:
        trunk = enc.text_trunk.to(device)
        syn = torch.cat(
            [
                trunk(texts[s : s + 256].to(device), mask[s : s + 256].to(device)).cpu()
                for s in range(0, len(texts), 256)
            ]
        )
        real = torch.cat(
            [
                enc.encode_texts(
                    Tokens(
                        train.texts[s : s + 256].to(device), train.text_mask[s : s + 256].to(device)
                    )
                ).cpu()
                for s in range(0, train.n_pairs, 256)
            ]
        )
    sim = F.normalize(syn.float(), dim=-1) @ F.normalize(real.float(), dim=-1).T
    return sim.argmax(1).tolist()
