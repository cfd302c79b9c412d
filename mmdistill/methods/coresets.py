"""Coreset baselines: select real pairs instead of synthesising them.

Herding, k-center and forgetting have no public multimodal implementation (the papers copy one
table), so these are our re-runs, labelled as such in every set they return. Herding and
k-center work in the joint feature space of the encoder's frozen trunks: each pair is the
concatenation of its L2-normalised image and caption features. For a pixel-space encoder those
trunks are the encoder's shared copies (random for `tiny`, pretrained otherwise), run here over
the pixels and token ids.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from mmdistill.errors import UserError
from mmdistill.methods import settings
from mmdistill.methods.base import DistillContext
from mmdistill.models.encoders import Tokens
from mmdistill.models.student import Student, is_image_features, is_text_features
from mmdistill.settings import from_cfg
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet
from mmdistill.training.storage import float32_bytes, rows_storage
from mmdistill.training.trainer import Batches, Recipe, Trainer

log = logging.getLogger(__name__)
PROVENANCE = "our re-run (no public implementation of this multimodal coreset exists)"


def stored_count(ctx: DistillContext, bits: int) -> int:
    """How many real pairs a coreset keeps: the budget's pairs in float32, else as many as the
    budget's bytes hold at `bits` (frozen-trunk feature rows only), at most all of them."""
    if bits == 32:
        return ctx.pairs
    train = ctx.train
    if not (is_image_features(train.images) and is_text_features(train.texts)):
        raise UserError(
            f"method.bits={bits} stores feature rows, but this encoder trains a trunk; use "
            "frozen trunks (e.g. encoder=lite0_minilm) or method.bits=32"
        )
    dims = (train.images.shape[1], train.texts.shape[1])
    n = rows_storage(bits).pairs_that_fit(float32_bytes(ctx.pairs, dims), dims)
    if n > train.n_pairs:
        log.warning("%d pairs fit at %d bits; the data has %d", n, bits, train.n_pairs)
    return min(n, train.n_pairs)


def _selected(
    ctx: DistillContext,
    idx: Tensor,
    method: str,
    bits: int = 32,
    provenance: str | None = PROVENANCE,
    **meta: object,
) -> PairSet:
    """The selected real pairs as the set stores them: float32 rows, or rows encoded at `bits`
    (int8 codes about the real means) and decoded back, with their records; `provenance`
    labels our re-runs of coresets that have no public implementation."""
    pairs = ctx.train.pairset(idx)
    if bits != 32:
        train = ctx.train
        means = (train.images[train.caption_image].float().mean(0), train.texts.float().mean(0))
        parts = rows_storage(bits, means).encode(pairs.images, pairs.texts)
        pairs = replace(
            pairs,
            images=parts["images"].decode(),
            texts=parts["texts"].decode(),
            factors=parts,
        )
        meta = {"bits": bits, **meta}
    pairs.meta.update(method=method, **meta)
    if provenance is not None:
        pairs.meta["provenance"] = provenance
    return pairs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def joint_features(ctx: DistillContext, batch: int = 256) -> Tensor:
    """One row per training pair: [normalised image feature, normalised caption feature]."""
    enc, train = ctx.encoder, ctx.train
    if is_image_features(train.images):
        img = train.images.float()
    else:
        trunk = enc.image_trunk.to(ctx.device)
        img = torch.cat(
            [
                trunk(train.images[s : s + batch].to(ctx.device)).float().cpu()
                for s in range(0, len(train.images), batch)
            ]
        )
    if is_text_features(train.texts):
        txt = train.texts.float()
    else:
        txt = torch.cat(
            [
                enc.encode_texts(
                    Tokens(
                        train.texts[s : s + batch].to(ctx.device),
                        train.text_mask[s : s + batch].to(ctx.device),
                    )
                )
                .float()
                .cpu()
                for s in range(0, train.n_pairs, batch)
            ]
        )
    return torch.cat([F.normalize(img, dim=-1)[train.caption_image], F.normalize(txt, dim=-1)], 1)


class RandomPairs:
    """Uniformly sampled real pairs: the floor every method must beat."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = from_cfg(settings.Coreset, cfg, "method.")

    def distill(self, ctx: DistillContext) -> PairSet:
        n = stored_count(ctx, self.cfg.bits)
        idx = torch.randperm(ctx.train.n_pairs, generator=_gen(ctx.seed))[:n]
        return _selected(ctx, idx, "random", self.cfg.bits, provenance=None)


def herding(x: Tensor, k: int) -> Tensor:
    """Greedy running-mean matching: each pick brings the selected mean closest to the full mean.

    With running sum s after j picks, candidate x minimises ||(j+1) mu - s - x||^2, i.e.
    maximises 2 <(j+1) mu - s, x> - ||x||^2. Deterministic (ties go to the lowest index).
    """
    mu = x.mean(0)
    sq = (x * x).sum(1)
    total = torch.zeros_like(mu)
    taken = torch.zeros(len(x), dtype=torch.bool)
    out = []
    for j in range(k):
        score = 2 * (x @ ((j + 1) * mu - total)) - sq
        score[taken] = -float("inf")
        i = int(score.argmax())
        out.append(i)
        taken[i] = True
        total += x[i]
    return torch.tensor(out)


def kcenter(x: Tensor, k: int, first: int) -> Tensor:
    """Greedy farthest point: each pick is the pair farthest from everything picked so far."""
    out = [first]
    dist = (x - x[first]).pow(2).sum(1)
    for _ in range(k - 1):
        i = int(dist.argmax())
        out.append(i)
        dist = torch.minimum(dist, (x - x[i]).pow(2).sum(1))
    return torch.tensor(out)


class Herding:
    """Real pairs whose running mean tracks the full data's mean in the joint feature space."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = from_cfg(settings.Coreset, cfg, "method.")

    def distill(self, ctx: DistillContext) -> PairSet:
        bits = self.cfg.bits
        idx = herding(joint_features(ctx), stored_count(ctx, bits))
        return _selected(ctx, idx, "herding", bits)


class KCenter:
    """Greedy k-center cover of the joint feature space.

    `start: random` begins from a seeded random pair (Sener & Savarese's greedy); `start: mean`
    from the pair nearest the mean, which makes the selection independent of the seed.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = from_cfg(settings.KCenter, cfg, "method.")  # checked as the schema does

    def distill(self, ctx: DistillContext) -> PairSet:
        x = joint_features(ctx)
        if self.cfg.start == "mean":
            first = int((x - x.mean(0)).pow(2).sum(1).argmin())
        else:
            first = int(torch.randint(len(x), (1,), generator=_gen(ctx.seed)))
        bits = self.cfg.bits
        idx = kcenter(x, stored_count(ctx, bits), first)
        return _selected(ctx, idx, "kcenter", bits, start=self.cfg.start)


@torch.no_grad()
def _retrieved(logits: Tensor, image_rows: Tensor) -> Tensor:
    """Per pair in a batch: both directions' top hit shows the pair's own image.

    Pairs share images (5 captions each), so a caption of the same image counts as a hit.
    """
    i2t = image_rows[logits.argmax(1)] == image_rows
    t2i = image_rows[logits.argmax(0)] == image_rows
    return i2t & t2i


def forgetting_counts(ctx: DistillContext, epochs: int, batch: int) -> tuple[Tensor, Tensor]:
    """Forgetting events per pair while a student trains on all real pairs.

    An event is a pair retrieved correctly in its batch (before the step) at one visit and
    wrongly at the next, as in Toneva et al. Pairs never retrieved correctly get the largest
    count (they count as forgotten throughout), following the same paper. Returns the counts
    and which pairs were ever retrieved correctly.
    """
    real = ctx.train.pairset()
    n = len(real)
    student = ctx.encoder.new_student(ctx.seed).to(ctx.device)
    loss_fn = LOSSES.get("infonce")
    prev = torch.zeros(n, dtype=torch.bool)
    learned = torch.zeros(n, dtype=torch.bool)
    events = torch.zeros(n, dtype=torch.long)
    rows = ctx.train.caption_image

    def batch_loss(student: Student, idx: Tensor) -> Tensor:
        """The batch's InfoNCE, recording each pair's in-batch retrieval before the step."""
        images, texts, mask, _ = real.batch(idx, ctx.device)
        logits = student.logits(images, texts, mask)
        ok = _retrieved(logits.detach(), rows[idx].to(ctx.device)).cpu()
        events[idx] += (prev[idx] & ~ok).long()
        prev[idx] = ok
        learned[idx] |= ok
        return loss_fn(logits)

    recipe = Recipe.from_cfg(ctx.eval).without_schedule()
    trainer = Trainer(
        student,
        recipe,
        batch_loss,
        pairs=real,
        what="forgetting student",
        on_log=lambda record: ctx.run.metrics.write("forgetting", **record),
    )
    task = ctx.progress.add_task("forgetting", total=epochs) if ctx.progress else None

    def advance(epoch: int) -> None:
        if task is not None:
            ctx.progress.advance(task)

    batches = Batches(n, batch, _gen(ctx.seed), order="epoch", min_last=None)
    trainer.run_epochs(batches, epochs, advance)
    events[~learned] = events.max() + 1
    return events, learned


class Forgetting:
    """The most-forgotten real pairs while a student trains on the full data."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = from_cfg(settings.Forgetting, cfg, "method.")  # checked as the schema does

    def distill(self, ctx: DistillContext) -> PairSet:
        batch = min(self.cfg.batch_size, ctx.train.n_pairs)
        counts, learned = forgetting_counts(ctx, self.cfg.epochs, batch)
        # Ties (many pairs share a count) are broken by a seeded shuffle before the stable sort.
        perm = torch.randperm(len(counts), generator=_gen(ctx.seed))
        order = perm[torch.argsort(counts[perm], descending=True, stable=True)]
        idx = order[: stored_count(ctx, self.cfg.bits)]
        return _selected(
            ctx,
            idx,
            "forgetting",
            self.cfg.bits,
            forgetting_events=counts[idx].tolist(),
            never_learned=int((~learned).sum()),
        )
