"""Dual-track collaborative expert training on noisy pairs (MDW's robust experts).

MDW (Dang et al., 2025) trains its experts with "dual-track collaborative learning" so that their
trajectories carry the clean correspondences of a noisy set without memorising the mismatched
pairs. Only the abstract and a review are public; this is our reading, every knob a key of
`method.dual` and all of them hashed into the buffer key.

* Two tracks, A and B, each with its own random partition of the training *images* into
  `folds` folds (pairs follow their image).
* Per-pair split (detection): a track scores every pair with a scorer student that never saw
  that pair: for each fold, a fresh student trains `scorer_steps` steps on the other folds (the
  encoder's tuned student recipe: AdamW, weight decay, feature dropout) and computes the
  held-out pairs' symmetric InfoNCE against the other held-out pairs (other captions of the
  same image masked). The losses are min-max scaled and split by a two-component 1-D Gaussian
  mixture fitted with EM (`fit_gmm_1d`, the DivideMix / NCR recipe); a pair is clean when its
  posterior under the low-loss component exceeds `threshold`. Cross-fitting is our addition:
  a linear head memorises shuffled captions within two epochs (in-sample loss AUC falls from
  0.71 to 0.50 on flickr8k-1k at ratio 0.5), so an in-sample split cannot find them.
* Co-teaching: from round 2 on (`rounds`), a track's scorers train their standard InfoNCE only
  on the pairs the *other* track called clean, plus `comp_weight` x a complementary contrastive
  loss on all pairs (RCL, Hu et al. TPAMI 2023: for each anchor, -sum_{j != i} log(1 - p_ij) with
  p the in-batch softmax; it learns from "image i is not text j" labels, which a random shuffle
  almost never corrupts, and its gradient stays bounded, hence the noise tolerance). Neither
  track confirms its own mistakes.
* The final clean set is the pairs both tracks call clean; its precision and recall against the
  saved noise mask are measured after every round.
* Recorded experts: both tracks then train from a fresh initialisation with the ordinary expert
  settings (SGD, `expert.*`), each on the other track's clean pairs (InfoNCE) plus the
  complementary loss on all pairs, and their parameters are snapshot after every epoch. The
  trajectories start where evaluation students start (random heads), so a matched segment is
  robust training from scratch, not a warmed-up model.

Each run r stores its two tracks as experts 2r and 2r+1 of an ordinary
`mmdistill.experts.Buffer`, plus `clean_prob_<r>.safetensors` (per-pair clean probability, mean
of the tracks, and the consensus selection) and the detection scores in the metadata.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from mmdistill import io
from mmdistill.data.features import RealSplit
from mmdistill.errors import UserError
from mmdistill.experts import (
    Buffer,
    ExpertSettings,
    ParamLayout,
    buffer_dir,
    buffer_key,
    build_student,
)
from mmdistill.models.encoders import Encoder
from mmdistill.models.student import Student
from mmdistill.protocol import evaluate, make_optimizer

log = logging.getLogger(__name__)
ROBUST_VERSION = 1


# ------------------------------------------------------------------------------ the mixture


@dataclass
class Gmm1d:
    """A two-component 1-D Gaussian mixture (component 0 has the lower mean)."""

    means: Tensor
    variances: Tensor
    weights: Tensor

    def log_joint(self, x: Tensor) -> Tensor:
        """log(w_k N(x | mu_k, var_k)), `[N, 2]`."""
        x = x.double()[:, None]
        return (
            self.weights.log()
            - 0.5 * torch.log(2 * math.pi * self.variances)
            - 0.5 * (x - self.means) ** 2 / self.variances
        )

    def posterior(self, x: Tensor) -> Tensor:
        """Responsibilities `[N, 2]`."""
        return torch.softmax(self.log_joint(x), dim=1)


def fit_gmm_1d(x: Tensor, iters: int = 100, tol: float = 1e-8, reg: float = 1e-4) -> Gmm1d:
    """EM for two Gaussians on 1-D data (init: means at the 10th / 90th percentiles)."""
    x = x.detach().double().flatten()
    if x.numel() < 2:
        raise ValueError("a two-component mixture needs at least 2 values")
    means = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=x.dtype))
    var = x.var().clamp(min=reg)
    gmm = Gmm1d(means, torch.stack([var, var]), torch.tensor([0.5, 0.5], dtype=x.dtype))
    prev = -math.inf
    for _ in range(iters):
        log_joint = gmm.log_joint(x)
        ll = torch.logsumexp(log_joint, dim=1)
        resp = torch.exp(log_joint - ll[:, None])
        nk = resp.sum(0).clamp(min=1e-10)
        means = (resp * x[:, None]).sum(0) / nk
        variances = (resp * (x[:, None] - means) ** 2).sum(0) / nk + reg
        gmm = Gmm1d(means, variances, nk / nk.sum())
        total = ll.mean().item()
        if abs(total - prev) < tol:
            break
        prev = total
    if gmm.means[0] > gmm.means[1]:
        gmm = Gmm1d(gmm.means.flip(0), gmm.variances.flip(0), gmm.weights.flip(0))
    return gmm


def clean_probability(losses: Tensor) -> Tensor:
    """Posterior of the low-loss component for each (min-max scaled) per-pair loss.

    Made non-increasing in the loss (p(x) = max over x' >= x of the posterior): with unequal
    variances the wider component also wins the far low-loss tail, which would call the very
    cleanest pairs noisy.
    """
    x = losses.detach().double()
    span = (x.max() - x.min()).clamp(min=1e-12)
    x = (x - x.min()) / span
    post = fit_gmm_1d(x).posterior(x)[:, 0]
    order = torch.argsort(x, descending=True)
    monotone = torch.cummax(post[order], dim=0).values
    out = torch.empty_like(post)
    out[order] = monotone
    return out.float()


def detection_scores(selected: Tensor, clean: Tensor | None) -> dict[str, float]:
    """Precision / recall of `selected` (predicted clean) against the true clean mask."""
    out = {"selected": float(selected.float().mean())}
    if clean is None:
        return out
    tp = float((selected & clean).sum())
    out["precision"] = tp / max(float(selected.sum()), 1.0)
    out["recall"] = tp / max(float(clean.sum()), 1.0)
    return out


# -------------------------------------------------------------------------------- losses


def _same_image_mask(img_idx: Tensor) -> Tensor:
    """True where two different pairs of a batch share their image (both are positives)."""
    same = img_idx[:, None] == img_idx[None, :]
    return same & ~torch.eye(len(img_idx), dtype=torch.bool, device=img_idx.device)


def complementary_loss(logits: Tensor, ignore: Tensor | None = None) -> Tensor:
    """RCL's complementary contrastive loss: -sum_{j != i} log(1 - p_ij), both directions."""
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    total = logits.new_zeros(())
    for lg in (logits, logits.T):
        p = torch.softmax(lg, dim=1)
        term = -torch.log1p(-p.clamp(max=1 - 1e-6))
        total = total + term.masked_fill(eye, 0.0).sum(dim=1).mean()
    return 0.5 * total


def per_pair_infonce(logits: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of each diagonal pair, `[B]`."""
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    i2t = -torch.log_softmax(logits, dim=1).diagonal()
    t2i = -torch.log_softmax(logits.T, dim=1).diagonal()
    return 0.5 * (i2t + t2i)


def selected_infonce(logits: Tensor, keep: Tensor, ignore: Tensor | None = None) -> Tensor:
    """InfoNCE over the kept pairs only (all pairs of the batch stay as negatives)."""
    if not keep.any():
        return logits.new_zeros(())
    return per_pair_infonce(logits, ignore)[keep].mean()


def _batch_loss(
    student: Student,
    train: RealSplit,
    idx: Tensor,
    keep: Tensor | None,
    comp_weight: float,
    device: str,
) -> Tensor:
    """InfoNCE on all pairs (keep None), or on the kept ones + complementary on all."""
    images, texts, mask, _ = train.pairset().batch(idx, device)
    ignore = _same_image_mask(train.caption_image[idx].to(device))
    logits = student.logits(images, texts, mask)
    if keep is None:
        loss = per_pair_infonce(logits, ignore).mean()
    else:
        loss = selected_infonce(logits, keep[idx].to(device), ignore)
        if comp_weight > 0:
            loss = loss + comp_weight * complementary_loss(logits, ignore)
    if not torch.isfinite(loss):
        raise UserError(
            f"dual-track loss became {loss.item()}; lower expert.lr / method.dual.scorer_lr or "
            "method.dual.comp_weight"
        )
    return loss


@torch.no_grad()
def heldout_losses(
    student: Student, train: RealSplit, idx: Tensor, batch: int, device: str, gen: torch.Generator
) -> Tensor:
    """Per-pair symmetric InfoNCE of pairs `idx` against each other, in chunks of `batch`."""
    student.eval()
    out = torch.empty(len(idx))
    order = torch.randperm(len(idx), generator=gen)
    chunks = max(1, math.ceil(len(idx) / batch))
    for part in order.chunk(chunks):
        sel = idx[part]
        images, texts, mask, _ = train.pairset().batch(sel, device)
        ignore = _same_image_mask(train.caption_image[sel].to(device))
        out[part] = per_pair_infonce(student.logits(images, texts, mask), ignore).float().cpu()
    student.train()
    return out


@dataclass(frozen=True)
class DualTrackSettings:
    """The dual-track knobs (`method.dual`); all of them are part of the buffer key."""

    folds: int = 4
    rounds: int = 3
    scorer_steps: int = 300
    scorer_batch: int = 128
    scorer_lr: float = 1e-3
    scorer_trunk_lr: float = 1e-4
    scorer_weight_decay: float = 0.1
    scorer_dropout: float = 0.7
    comp_weight: float = 1.0
    threshold: float = 0.5
    eval_batch: int = 1024

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict | None) -> DualTrackSettings:
        if cfg is None:
            return cls()
        d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(
                f"unknown method.dual keys {sorted(unknown)}; known: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        s = cls(**d)
        if s.folds < 2 or s.rounds < 1 or s.scorer_steps < 1 or s.scorer_batch < 2:
            raise UserError(
                "method.dual needs folds >= 2, rounds >= 1, scorer_steps >= 1, scorer_batch >= 2"
            )
        if not 0.0 < s.threshold < 1.0 or s.eval_batch < 2 or s.comp_weight < 0:
            raise UserError(
                "method.dual.threshold must be in (0, 1), eval_batch >= 2, comp_weight >= 0"
            )
        return s

    def as_dict(self) -> dict[str, Any]:
        return {"version": ROBUST_VERSION, **asdict(self)}


def _image_folds(n_images: int, folds: int, gen: torch.Generator) -> Tensor:
    """A random fold id per image, fold sizes within one of each other."""
    fold = torch.empty(n_images, dtype=torch.long)
    fold[torch.randperm(n_images, generator=gen)] = torch.arange(n_images) % folds
    return fold


def _scorer_losses(
    encoder: Encoder,
    train: RealSplit,
    dual: DualTrackSettings,
    fold_of_pair: Tensor,
    keep: Tensor | None,
    seed: int,
    device: str,
    gen: torch.Generator,
) -> Tensor:
    """Every pair's loss under a scorer trained on the other folds (cross-fitted)."""
    recipe = OmegaConf.create(
        {
            "optimizer": "adamw",
            "lr": dual.scorer_lr,
            "trunk_lr": dual.scorer_trunk_lr,
            "weight_decay": dual.scorer_weight_decay,
            "momentum": 0.9,
        }
    )
    losses = torch.empty(train.n_pairs)
    for f in range(dual.folds):
        fit = torch.nonzero(fold_of_pair != f).flatten()
        held = torch.nonzero(fold_of_pair == f).flatten()
        student = encoder.new_student(seed * 100 + f, feature_dropout=dual.scorer_dropout)
        student = student.to(device).train()
        opt = make_optimizer(student, recipe, train.pairset())
        for _ in range(dual.scorer_steps):
            idx = fit[torch.randperm(len(fit), generator=gen)[: dual.scorer_batch]]
            loss = _batch_loss(student, train, idx, keep, dual.comp_weight, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses[held] = heldout_losses(student, train, held, dual.eval_batch, device, gen)
    return losses


def detect_clean_pairs(
    encoder: Encoder,
    train: RealSplit,
    dual: DualTrackSettings,
    seeds: tuple[int, int],
    device: str,
    true_clean: Tensor | None = None,
    say: Callable[[str], None] = log.info,
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Cross-fitted co-teaching: per-track clean probabilities and selections, and history."""
    gens = [torch.Generator().manual_seed(s * 7919 + 1) for s in seeds]
    folds = [_image_folds(int(train.caption_image.max()) + 1, dual.folds, g) for g in gens]
    fold_of_pair = [f[train.caption_image] for f in folds]
    probs: list[Tensor] = [torch.ones(train.n_pairs)] * 2
    keeps: list[Tensor | None] = [None, None]
    history: list[dict[str, Any]] = []
    for r in range(dual.rounds):
        new_probs, new_keeps = [], []
        for k in range(2):
            # Track k's scorers learn from the pairs the other track called clean.
            losses = _scorer_losses(
                encoder, train, dual, fold_of_pair[k], keeps[1 - k], seeds[k], device, gens[k]
            )
            prob = clean_probability(losses)
            keep = prob > dual.threshold
            if keep.sum() < 2:  # a degenerate fit: keep everything rather than nothing
                keep = torch.ones_like(keep)
            new_probs.append(prob)
            new_keeps.append(keep)
        probs, keeps = new_probs, new_keeps
        both = keeps[0] & keeps[1]
        entry = {"round": r + 1, "consensus": detection_scores(both, true_clean)}
        entry.update({f"track_{'AB'[k]}": detection_scores(keeps[k], true_clean) for k in (0, 1)})
        history.append(entry)
        say(
            f"dual-track round {r + 1}: consensus "
            + ", ".join(f"{a} {b:.3f}" for a, b in entry["consensus"].items())
        )
    return probs, [keeps[0], keeps[1]], history


@dataclass
class DualTrackRun:
    trajectories: tuple[Tensor, Tensor]
    layout: ParamLayout
    stats: tuple[dict[str, Any], dict[str, Any]]
    clean_prob: Tensor
    clean: Tensor


def train_dual_track(
    encoder: Encoder,
    train: RealSplit,
    val: RealSplit | None,
    settings: ExpertSettings,
    dual: DualTrackSettings,
    run: int,
    device: str,
    true_clean: Tensor | None = None,
    on_epoch: Callable[[int], None] | None = None,
    say: Callable[[str], None] = log.info,
) -> DualTrackRun:
    """Detection, then the recorded trajectories of tracks 2*run and 2*run+1."""
    seeds = (settings.seed + 2 * run, settings.seed + 2 * run + 1)
    t0 = time.perf_counter()
    probs, keeps, history = detect_clean_pairs(encoder, train, dual, seeds, device, true_clean, say)
    consensus = keeps[0] & keeps[1]
    if consensus.sum() < 2:
        consensus = keeps[0] | keeps[1]
    detect_seconds = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(seeds[0] * 7919 + 2)
    students, layouts, snaps, opts = [], [], [], []
    for s in seeds:
        student = build_student(encoder, s, settings.lora).to(device).train()
        layout = ParamLayout.of(student)
        params = dict(student.named_parameters())
        opts.append(
            torch.optim.SGD(
                [params[n] for n in layout.names], lr=settings.lr, momentum=settings.momentum
            )
        )
        students.append(student)
        layouts.append(layout)
        snaps.append([layout.flatten(student).cpu()])
    n = train.n_pairs
    for epoch in range(settings.epochs):
        for k in range(2):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, settings.batch_size):
                idx = order[start : start + settings.batch_size]
                if len(idx) < 2:
                    continue
                loss = _batch_loss(students[k], train, idx, keeps[1 - k], dual.comp_weight, device)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
            snaps[k].append(layouts[k].flatten(students[k]).cpu())
        if on_epoch:
            on_epoch(epoch + 1)
    final = detection_scores(consensus, true_clean)
    stats = []
    for k in range(2):
        s: dict[str, Any] = {
            "index": 2 * run + k,
            "seed": seeds[k],
            "track": "AB"[k],
            "seconds": time.perf_counter() - t0,
            "detect_seconds": detect_seconds,
            "dual_track": dual.as_dict(),
            "trained_on": "pairs the other track called clean (InfoNCE) + all (complementary)",
            "detection_final": final,
            "detection_history": history,
        }
        if val is not None:
            s["val_r_mean"] = evaluate(students[k], val, device)["r_mean"]
        stats.append(s)
    return DualTrackRun(
        trajectories=(torch.stack(snaps[0]), torch.stack(snaps[1])),
        layout=layouts[0],
        stats=(stats[0], stats[1]),
        clean_prob=0.5 * (probs[0] + probs[1]),
        clean=consensus,
    )


# ------------------------------------------------------------------------------ the buffer


def robust_noise_cfg(noise: DictConfig, dual: DualTrackSettings) -> DictConfig:
    """The noise node with the dual-track settings added, so buffer keys tell the kinds apart."""
    out = noise.copy()
    with open_dict(out):
        out.expert_training = {"kind": "dual_track", **dual.as_dict()}
    return out


def clean_prob_path(buf: Buffer, run: int) -> Path:
    return buf.path / f"clean_prob_{run:03d}.safetensors"


@dataclass
class RobustBuffer:
    buffer: Buffer
    clean_prob: Tensor  # [n_pairs], mean over runs
    clean: Tensor  # [n_pairs] bool, the consensus of the first run
    detection: list[dict[str, Any]]  # each run's final scores


def find_or_build_robust_buffer(
    expert_cfg: DictConfig,
    dual: DualTrackSettings,
    encoder: Encoder,
    train: RealSplit,
    val: RealSplit | None,
    dataset_name: str,
    noise: DictConfig,
    cache_dir: Path,
    device: str,
    true_clean: Tensor | None = None,
    say: Callable[[str], None] = log.info,
    progress: Any = None,
) -> RobustBuffer:
    """The dual-track buffer for this data, training the runs it lacks.

    The key is `buffer_key` over the noise node extended with the dual-track settings
    (`robust_noise_cfg`), so plain and dual-track experts never mix, and a plain
    `find_or_build_buffer` call with that node finds these experts.
    """
    settings = ExpertSettings.from_cfg(expert_cfg)
    key, parts = buffer_key(encoder, train, dataset_name, robust_noise_cfg(noise, dual), settings)
    path = buffer_dir(cache_dir, dataset_name, encoder, key)
    if not (path / "buffer.json").is_file():
        io.write_json(path / "buffer.json", {"key": key, "parts": parts})
    buf = Buffer(path)
    probs, cleans, finals = [], [], []
    for r in range(math.ceil(int(expert_cfg.num_experts) / 2)):
        have = all(buf.expert_path(i).is_file() for i in (2 * r, 2 * r + 1))
        if have and clean_prob_path(buf, r).is_file():
            saved = io.load_tensors(clean_prob_path(buf, r))
            probs.append(saved["clean_prob"])
            cleans.append(saved["clean"].bool())
            finals.append(json.loads(buf.metadata(2 * r)["stats"])["detection_final"])
            continue
        say(f"dual-track experts {2 * r}, {2 * r + 1}: training ({settings.epochs} epochs)")
        task = progress.add_task(f"dual-track run {r}", total=settings.epochs) if progress else None

        def on_epoch(e: int, t: Any = task) -> None:
            if t is not None:
                progress.update(t, completed=e)

        res = train_dual_track(
            encoder,
            train,
            val,
            settings,
            dual,
            r,
            device,
            true_clean,
            on_epoch=on_epoch,
            say=say,
        )
        if task is not None:
            progress.remove_task(task)
        for k in range(2):
            buf.write_expert(2 * r + k, res.trajectories[k], res.layout, res.stats[k])
        io.save_tensors(
            clean_prob_path(buf, r),
            {"clean_prob": res.clean_prob, "clean": res.clean.to(torch.uint8)},
        )
        probs.append(res.clean_prob)
        cleans.append(res.clean)
        finals.append(res.stats[0]["detection_final"])
        say(
            f"dual-track run {r}: {res.stats[0]['seconds']:.1f}s, clean-pair detection "
            + ", ".join(f"{a} {b:.3f}" for a, b in res.stats[0]["detection_final"].items())
        )
    io.write_json(path / "detection.json", {"runs": finals})
    return RobustBuffer(buf, torch.stack(probs).mean(0), cleans[0], finals)
