"""The CovMatch method: its settings, the checks they need, and the plan of one run (how many
pairs the storage fits, the per-budget hyper-parameters, the real statistics and the extra
loss terms), which `matching.Matching` then runs inside the shared outer loop."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mmdistill.errors import UserError
from mmdistill.methods import settings
from mmdistill.methods.base import DistillContext
from mmdistill.methods.covmatch.matching import Matching, Plan
from mmdistill.methods.covmatch.robust import PairWeights, RobustSettings, pair_weights
from mmdistill.methods.covmatch.start import init_synthetic
from mmdistill.methods.covmatch.storage import factored_pairs, fitted, storage_for
from mmdistill.methods.covmatch.targets import Plain, Statistics, Weighted, Within
from mmdistill.settings import from_cfg
from mmdistill.training.pairs import PairSet
from mmdistill.training.trainer import Recipe, Trainer, pair_loss

log = logging.getLogger(__name__)
PER_BUDGET = ("rho", "lambda", "steps", "syn_batch")


def budget_row(table: dict[int, object], pairs: int) -> object:
    """The row of a per-budget table for the largest key <= `pairs` (the smallest key below
    all of them)."""
    below = [k for k in table if k <= pairs]
    return table[max(below) if below else min(table)]


class CovMatch:
    """Synthetic pairs whose trunk-feature cross-covariance matches rho times the real one."""

    def __init__(self, cfg: DictConfig) -> None:
        # Read once, as the typed settings (the schema's rules and messages); what no single
        # key can check (checkpoints on resets) is the settings class's own joint check.
        s = from_cfg(settings.CovMatch, cfg, "method.")
        settings.CovMatch.check_together({"method": cfg}, None)
        self.reset_to, self.reset_every = s.reset_to, s.reset_every
        self.checkpoint_every, self.real_batch = s.checkpoint_every, s.real_batch
        self.log_every, self.proj_dim = s.log_every, s.proj_dim
        self.lr, self.lr_text, self.momentum = s.lr, s.lr_text, s.momentum
        self.online_cfg = cfg.online  # a student recipe, read by Recipe.from_cfg
        self.real_stats = s.real_stats
        self.by_budget = {int(k): v for k, v in s.by_budget.items()}
        self.per_budget = {
            "rho": s.rho,
            "lambda": s.lam,
            "steps": s.steps,
            "syn_batch": s.syn_batch,
        }
        self.bits, self.rank_setting = s.bits, s.rank
        self.rank_by_budget = s.rank_by_budget or {}
        self.within, self.init = s.within, s.init
        self.robust = RobustSettings.from_typed(s.robust, cfg.robust.get("dual"))

    def budget_settings(self, pairs: int) -> dict[str, object]:
        """rho, lambda, steps and syn_batch: explicit values win, `auto` reads `by_budget`.

        The table row is the largest budget key <= `pairs` (the smallest key below all of
        them), so the paper's 100/200/500 settings also cover budgets in between.
        """
        row = budget_row(self.by_budget, pairs)
        return {k: row[k] if str(v) == "auto" else v for k, v in self.per_budget.items()}

    def settings(self, pairs: int, feature_space: bool = False) -> dict[str, object]:
        """The per-budget hyper-parameters, checked against the budget.

        The paper's synthetic mini-batch (256 of 500 pairs) bounds the memory of pixel forward
        passes; frozen-trunk features cost nothing comparable, so there `syn_batch: auto` takes
        every synthetic pair, the exact C_syn. Measured (flickr8k-1k, lite0_minilm, 500 pairs,
        5 students): val r_mean 61.1 with 256, 65.0 with all; test 45.4 vs 49.4.
        """
        s = self.budget_settings(pairs)
        if feature_space and str(self.per_budget["syn_batch"]) == "auto":
            s["syn_batch"] = "all"
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

    # ------------------------------------------------------------------ checks

    def _need_full_statistics(self, ctx: DistillContext, setting: str, off: str = "0") -> None:
        """`rank`, `bits` and `within` read statistics of all real pairs, which only frozen
        trunks fix; `off` is the value that turns the setting off."""
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        if not frozen or self.real_stats == "batch":
            key = setting.split("=")[0]
            raise UserError(
                f"{setting} needs fixed frozen-trunk features, but encoder {ctx.encoder.name} "
                f"trains a trunk or method.real_stats=batch; set {key}={off}"
            )

    def _bits(self, ctx: DistillContext) -> int:
        """`method.bits`, checked: 32 stores float32 rows, 16 float16, 8 int8 codes (frozen
        trunks only)."""
        bits = self.bits
        if bits != 32:
            self._need_full_statistics(ctx, f"method.bits={bits}", off="32")
        return bits

    def _rank(self, ctx: DistillContext, bits: int = 32) -> int:
        """`method.rank`, checked: 0 (plain pairs) or a factorised set's rank."""
        rank = self.rank_setting
        if str(rank) == "auto":
            table = {int(k): int(v) for k, v in self.rank_by_budget.items()}
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
        self, ctx: DistillContext, stats: Statistics
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """Cross-covariance and means of all real pairs, when `real_stats` asks for them.

        Only frozen trunks give fixed real features, so `full` (the default there: the exact
        expectation the paper estimates per batch) needs a feature-space encoder.
        """
        mode = self.real_stats
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        if mode == "full" and not frozen:
            raise UserError(
                f"method.real_stats=full needs frozen trunks, but encoder {ctx.encoder.name} "
                "trains one; use method.real_stats=batch"
            )
        if mode == "batch" or not frozen:
            return None, None
        train = ctx.train
        v = train.images[train.caption_image].float().to(ctx.device)
        return stats.cross(v, train.texts.float().to(ctx.device))

    # ------------------------------------------------------------------ the plan

    def pair_weights(self, ctx: DistillContext) -> PairWeights:
        return pair_weights(ctx, self.robust)

    def _weights(self, ctx: DistillContext) -> PairWeights | None:
        """Robust mode's pair weights (None otherwise), checked to leave a clean pool."""
        if not self.robust.enabled:
            return None
        weights = self.pair_weights(ctx)
        if len(weights.pool) < 2:
            raise UserError(
                f"robust CovMatch found {len(weights.pool)} clean pairs; lower "
                "method.robust.threshold or set method.robust.enabled=false"
            )
        return weights

    def plan(self, ctx: DistillContext) -> Plan:
        frozen = ctx.encoder.image_space == "feature" and ctx.encoder.text_space == "feature"
        bits = self._bits(ctx)
        rank = self._rank(ctx, bits)
        dims = (ctx.train.images.shape[1], ctx.train.texts.shape[1])
        n_syn = factored_pairs(ctx.pairs, rank, dims, bits)
        s = self.settings(n_syn, feature_space=frozen)
        rho = float(s["rho"])
        gen = torch.Generator().manual_seed(ctx.seed)
        weights = self._weights(ctx)
        if weights is not None and self.robust.rescale_rho:
            rho *= weights.rho_scale
        stats = Plain() if weights is None else Weighted(weights.weight)
        real_cov, real_means = self._full_statistics(ctx, stats)
        storage = storage_for(bits, rank)
        if not storage.plain:
            assert real_cov is not None and real_means is not None  # checked real_stats
            storage = fitted(storage, real_cov, real_means)
            log.info(
                "covmatch: %d pairs (rank %s, %d bits) in the bytes of %d",
                n_syn,
                rank or "full",
                bits,
                ctx.pairs,
            )
        within = None
        if self.within != 0.0:
            self._need_full_statistics(ctx, f"method.within={self.within}")
            within = Within.of(self.within, ctx.train, stats, storage, ctx.device)
        return Plan(
            n_syn, rho, float(s["lambda"]), ctx.steps(int(s["steps"])), int(s["syn_batch"]), gen,
            weights, real_cov, real_means, storage, within, rank, bits,
        )  # fmt: skip

    def _init_synthetic(
        self, ctx: DistillContext, gen: torch.Generator, n: int, pool: Tensor | None = None
    ) -> dict[str, Tensor]:
        return init_synthetic(ctx, gen, n, self.init, pool)

    def _online(self, ctx: DistillContext, round_idx: int, real: PairSet) -> Trainer:
        """A freshly reset online student with linear heads, trained by one ordinary
        contrastive step on real pairs between synthetic updates."""
        enc = ctx.encoder
        seed = ctx.seed * 1_000_003 + round_idx + 1
        student = enc.new_student(seed if self.reset_to == "fresh" else ctx.seed)
        torch.manual_seed(seed)
        student.image_head = nn.Linear(enc.image_dim, self.proj_dim)
        student.text_head = nn.Linear(enc.text_dim, self.proj_dim)
        student.to(ctx.device)
        return Trainer(
            student,
            Recipe.from_cfg(self.online_cfg).without_schedule(),
            pair_loss(real, "infonce", ctx.device),
            pairs=real,
            what="CovMatch's online student",
            hint=f"lower method.online.lr (now {self.online_cfg.lr})",
        )

    def distill(self, ctx: DistillContext) -> PairSet:
        return Matching(self, ctx, self.plan(ctx)).run()
