"""One CovMatch run inside the shared outer loop: the synthetic update against the online
student, then the online student's own contrastive step on real pairs, every step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mmdistill.errors import UserError
from mmdistill.methods.base import DistillContext, monitored_val, out_of_range, sane_bounds
from mmdistill.methods.covmatch.loss import covmatch_loss
from mmdistill.methods.covmatch.robust import PairWeights, RobustSettings
from mmdistill.methods.covmatch.start import nearest_captions
from mmdistill.methods.covmatch.storage import stored_set
from mmdistill.methods.covmatch.targets import Within
from mmdistill.methods.loop import Diverged, OuterLoop, Schedule, Task
from mmdistill.training.pairs import PairSet
from mmdistill.training.storage import PairStorage
from mmdistill.training.trainer import Batches, FiniteCheck, Trainer

log = logging.getLogger(__name__)
CHECKPOINT = "covmatch"

LR_PAIRS = 100  # the synthetic batch the step sizes are set for (the paper's 100 pairs)


@dataclass
class Plan:
    """What one run distils with, fixed before the first update."""

    n_syn: int
    rho: float
    lam: float
    steps: int
    syn_batch: int
    gen: torch.Generator
    weights: PairWeights | None
    real_cov: Tensor | None  # C_real of all real pairs (None: from each real batch)
    real_means: tuple[Tensor, Tensor] | None
    storage: PairStorage
    within: Within | None
    rank: int
    bits: int

    @property
    def pool(self) -> Tensor | None:
        return None if self.weights is None else self.weights.pool

    @property
    def lr_scale(self) -> float:
        """The step sizes' factor: C_syn averages `syn_batch` rows, so the loss's gradient per
        row grows as 1 / syn_batch. The step sizes are the paper's at 100 pairs; below that
        they shrink with the batch, so a per-row step stays what it is at 100 pairs (a
        10-pair set diverges at step 5 with the unscaled 1.0). Larger batches keep them."""
        return min(1.0, self.syn_batch / LR_PAIRS)


class Settings(Protocol):
    """What the run reads of the method's settings."""

    lr: Any
    lr_text: Any
    momentum: float
    reset_every: int
    reset_to: str
    checkpoint_every: int
    log_every: int
    real_batch: int
    within: float
    robust: RobustSettings

    def _init_synthetic(
        self, ctx: DistillContext, gen: torch.Generator, n: int, pool: Tensor | None = None
    ) -> dict[str, Tensor]: ...

    def _online(self, ctx: DistillContext, round_idx: int, real: PairSet) -> Trainer: ...


class Matching(Task):
    name = "covmatch"
    checkpoint = CHECKPOINT

    def __init__(self, method: Settings, ctx: DistillContext, plan: Plan) -> None:
        self.m, self.ctx, self.p = method, ctx, plan
        pool = plan.pool
        syn = method._init_synthetic(
            ctx, plan.gen, plan.n_syn, pool if method.robust.clean_init else None
        )
        for key in ("images", "texts"):  # a factorised set optimises its coefficients
            syn[key] = getattr(plan.storage, key).params(syn[key])
        self.bounds = sane_bounds(images=syn["images"], texts=syn["texts"])
        self.real = ctx.train.pairset().to(ctx.device)  # on the device once, not per batch
        n_real = len(self.real) if pool is None else len(pool)
        batch = min(method.real_batch, n_real)
        self.batches = Batches(len(self.real), batch, plan.gen, pool=pool, device=ctx.device)
        self.images = syn["images"].to(ctx.device).requires_grad_(True)
        self.texts = syn["texts"].to(ctx.device).requires_grad_(True)
        mask = syn.get("text_mask")
        self.mask = None if mask is None else mask.to(ctx.device)
        self.source = syn["source"]
        self.opt = torch.optim.SGD(
            [
                {"params": [self.images], "lr": float(method.lr) * plan.lr_scale},
                {"params": [self.texts], "lr": float(method.lr_text) * plan.lr_scale},
            ],
            momentum=method.momentum,
        )
        self.history: list[dict] = []
        self.online: Trainer | None = None
        self.every_pair = torch.arange(plan.n_syn, device=ctx.device)
        self.live = plan.storage.to(ctx.device)  # decodes coefficients on the device
        # The curve gets at least about 100 points; meta's loss history keeps log_every.
        self.curve_every = min(method.log_every, max(1, plan.steps // 100))

    def parameters(self) -> dict[str, Tensor]:
        return {"images": self.images, "texts": self.texts}

    # ------------------------------------------------------------------ one step

    def _loss(self, student: Any) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The synthetic loss against the current online student (no gradient to it)."""
        p, n_syn = self.p, self.p.n_syn
        sidx = (
            self.every_pair
            if p.syn_batch == n_syn
            else torch.randperm(n_syn, generator=p.gen)[: p.syn_batch].to(self.ctx.device)
        )
        student.eval()
        if p.real_means is not None:
            feats_real = p.real_means
        else:
            ri, rt, rm, _ = self.real.batch(self.batches.next(), self.ctx.device)
            with torch.no_grad():
                feats_real = (student.image_features(ri), student.text_features(rt, rm))
        feats_syn = (
            student.image_features(self.live.images.features(self.images[sidx])),
            student.text_features(
                self.live.texts.features(self.texts[sidx]),
                None if self.mask is None else self.mask[sidx],
            ),
        )
        heads = (student.image_head, student.text_head)
        loss, parts = covmatch_loss(feats_real, feats_syn, heads, p.rho, p.lam, p.real_cov)
        if p.within is not None:
            auto = p.within((self.images[sidx], self.texts[sidx]))
            loss = loss + p.within.weight * auto
            parts[p.within.name] = auto.detach()
        return loss, parts, sidx

    def step(self, at: int, check: FiniteCheck) -> dict[str, Any] | None:
        m = self.m
        if self.online is None or at % m.reset_every == 0:
            if self.online is not None:
                self.online.flush()
            self.online = m._online(self.ctx, at // m.reset_every, self.real)
        # 1. Synthetic update against the current online student.
        loss, parts, _ = self._loss(self.online.student)
        grads = torch.autograd.grad(loss, [self.images, self.texts])
        check.watch(at, loss, *grads)
        self.images.grad, self.texts.grad = grads
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # 2. One ordinary contrastive step of the online student on the next real batch.
        online_loss = self.online.step(self.batches.next())
        logged = at % m.log_every == 0 or at + 1 == self.p.steps
        if not (logged or at % self.curve_every == 0):
            return None
        row = {"step": at, "loss": loss.item(), "online": online_loss.item()}
        row.update({k: v.item() for k, v in parts.items()})
        if logged:
            self.history.append(row)
            log.info("covmatch %s", " ".join(f"{k} {v:.4g}" for k, v in row.items()))
        return row

    def validate(self, done: int) -> dict[str, Any] | None:
        """Val r_mean of the current set, for the curves; it changes nothing."""
        current = PairSet(
            images=self.images.detach().cpu(),
            texts=self.texts.detach().cpu(),
            text_mask=None if self.mask is None else self.mask.cpu(),
        )
        score = monitored_val(self.ctx, current, "covmatch")
        return None if score is None else {"step": done, "val_r_mean": score}

    # ------------------------------------------------------------------ checkpoints

    def saved_state(self, done: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.online is not None:
            self.online.flush()
        tensors = {
            "images": self.images,
            "texts": self.texts,
            "source": self.source,
            "rng": self.p.gen.get_state(),
            "real_order": self.batches.order,
        }
        if self.mask is not None:
            tensors["text_mask"] = self.mask
        far = out_of_range(self.bounds, images=self.images, texts=self.texts)
        if far:  # never checkpoint a diverged set: the previous checkpoint stays the last good
            raise Diverged(done, far)
        return tensors, {"step": done, "real_pos": self.batches.pos, "history": self.history}

    def load(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> int:
        """Take a checkpoint back; refuse one from another setting."""
        for key, live in self.parameters().items():
            if tensors[key].shape != live.shape:
                raise UserError(
                    f"the CovMatch checkpoint holds {key} of shape {list(tensors[key].shape)} but "
                    f"this run makes {list(live.shape)}; start a new run folder"
                )
            with torch.no_grad():
                live.copy_(tensors[key])
        if "text_mask" in tensors:
            self.mask = tensors["text_mask"].to(self.ctx.device)
        self.source = tensors.get("source", self.source)
        self.p.gen.set_state(tensors["rng"])
        self.batches.order = tensors["real_order"].to(self.batches.device)
        self.batches.pos = int(state["real_pos"])
        self.history = list(state.get("history", []))
        log.info("covmatch: resuming at step %d of %d", int(state["step"]), self.p.steps)
        return int(state["step"])

    def last_good(
        self, saved: tuple[dict[str, Tensor], dict] | None, step: int
    ) -> tuple[PairSet, int]:
        assert saved is not None  # the run saves step 0 before the first update
        tensors, state = saved
        meta = {"method": "covmatch", "init_pairs": tensors["source"].tolist()}
        pairs = stored_set(
            self.p.storage,
            tensors["images"],
            tensors["texts"],
            text_mask=tensors.get("text_mask"),
            meta=meta,
        )
        return pairs, int(state["step"])

    def stop_message(self, step: int, what: str, good: int, path: Path) -> str:
        return (
            f"CovMatch stopped at step {step}: {what}; the last good set (step {good}) "
            f"is saved as {path}, marked partial; lower method.lr (now {self.m.lr}, "
            f"method.lr_text {self.m.lr_text}) and continue with resume={self.ctx.run.path} "
            "method.lr=..."
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> PairSet:
        ctx, p = self.ctx, self.p
        val_every = int(ctx.monitor.val_every) if ctx.monitor is not None else 0
        schedule = Schedule(p.steps, self.m.checkpoint_every, val_every, first_checkpoint=True)
        loop = OuterLoop(ctx, self, self.opt, schedule)
        loop.run()
        if self.online is not None:
            self.online.flush()
        sec_per_step = loop.step_seconds / max(p.steps - loop.start, 1)
        far = out_of_range(self.bounds, images=self.images, texts=self.texts)
        if far:
            loop.diverged(p.steps, far)
        return self.result(sec_per_step)

    def result(self, sec_per_step: float) -> PairSet:
        ctx, p, m = self.ctx, self.p, self.m
        mask = None if self.mask is None else self.mask.cpu()
        pairs = stored_set(
            p.storage, self.images.detach().cpu(), self.texts.detach().cpu(), text_mask=mask
        )
        nearest = nearest_captions(ctx.encoder, ctx.train, pairs.texts, mask, ctx.device)
        pairs.meta = {
            "method": "covmatch",
            "rank": p.rank or None,
            "bits": p.bits,
            "within": m.within,
            "rho": p.rho,
            "lambda": p.lam,
            "steps": p.steps,
            "syn_batch": p.syn_batch,
            "lr_scale": p.lr_scale,
            "reset_every": m.reset_every,
            "reset_to": m.reset_to,
            "real_stats": "full" if p.real_cov is not None else "batch",
            "seconds_per_step": round(sec_per_step, 5),
            "init_pairs": self.source.tolist(),
            "nearest_caption_index": nearest,
            "nearest_captions": [ctx.train.captions[i] for i in nearest],
            "loss_history": self.history,
            "robust": None
            if p.weights is None
            else {**p.weights.report, "rho_scale": p.weights.rho_scale},
        }
        return pairs
