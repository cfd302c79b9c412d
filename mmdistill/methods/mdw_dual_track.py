"""Dual-track collaborative expert training on noisy pairs (MDW's robust experts).

MDW (Dang et al., 2025) trains its experts with "dual-track collaborative learning" so that their
trajectories carry the clean correspondences of a noisy set without memorising the mismatched
pairs. Only the abstract and a review are public; this is our reading, every knob a key of
`method.dual` and all of them hashed into the buffer key.

* Two tracks, A and B, each with its own random partition of the training *images* into
  `folds` folds (pairs follow their image).
* Per-pair split: a track scores every pair with a scorer student that never saw that pair:
  per fold, a fresh student trains `scorer_steps` steps on the other folds (the encoder's tuned
  student recipe: AdamW, weight decay, feature dropout) and computes each held-out pair's
  symmetric InfoNCE against the other held-out pairs (other captions of the same image
  masked). The losses are min-max scaled and split by a two-component 1-D Gaussian mixture
  fitted with EM (`fit_gmm_1d`, the DivideMix / NCR recipe); a pair's clean probability is its
  posterior under the low-loss component. Cross-fitting is our addition: a linear head
  memorises shuffled captions within a few epochs (in-sample loss AUC falls from 0.71 after
  one epoch to 0.50 after five on flickr8k-1k at ratio 0.5), so an in-sample split cannot
  find them; held out, the AUC is about 0.92.
* Co-teaching over `rounds`: from round 2 on, a track's scorers train their InfoNCE only on the
  pairs the *other* track called clean last round (posterior > `threshold`), plus
  `comp_weight` x a complementary contrastive loss on all pairs (RCL, Hu et al. TPAMI 2023:
  for each anchor, -sum_{j != i} log(1 - p_ij) with p the in-batch softmax; it learns from
  "image i is not text j" labels, which a random shuffle almost never corrupts, and its
  gradient stays bounded, hence the noise tolerance). Neither track confirms its own mistakes.
* The final clean set is the pairs both tracks give a posterior above `select_threshold`; its
  precision and recall against the saved noise mask are measured after every round.
* Detection runs once per buffer. Expert i then belongs to track i % 2 and trains from a fresh
  initialisation with the ordinary expert settings (SGD, `expert.*`) on InfoNCE over the
  *other* track's clean pairs plus the complementary loss on all pairs; its parameters are
  snapshot after every epoch. Trajectories start where evaluation students start (random
  heads), so a matched segment is robust training from scratch, not a warmed-up model.

The experts live in an ordinary `mmdistill.training.experts.Buffer` whose key hashes the noise node
extended with these settings (`robust_noise_cfg`), next to `detection.safetensors` (both
tracks' clean probabilities) and `detection.json` (per-round scores, the final clean set's).
"""

from __future__ import annotations

import hashlib
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
from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.models.student import Student
from mmdistill.training.experts import (
    Buffer,
    ExpertSettings,
    ExpertSource,
    ParamLayout,
    buffer_key,
    expert_curve,
    split_fingerprint,
    train_expert,
)
from mmdistill.training.features import RealSplit
from mmdistill.training.trainer import Batches, BatchLoss, LogHook, Recipe, Trainer

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


def dual_track_loss(
    train: RealSplit, keep: Tensor | None, comp_weight: float, device: str
) -> BatchLoss:
    """The trainer's batch loss: InfoNCE on all pairs (keep None), or on the kept ones plus the
    complementary loss on all."""
    pairs = train.pairset()

    def batch_loss(student: Student, idx: Tensor) -> Tensor:
        images, texts, mask, _ = pairs.batch(idx, device)
        ignore = _same_image_mask(train.caption_image[idx].to(device))
        logits = student.logits(images, texts, mask)
        if keep is None:
            return per_pair_infonce(logits, ignore).mean()
        loss = selected_infonce(logits, keep[idx].to(device), ignore)
        if comp_weight > 0:
            loss = loss + comp_weight * complementary_loss(logits, ignore)
        return loss

    return batch_loss


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
    scorer_steps: int = 600
    scorer_batch: int = 128
    scorer_lr: float = 1e-3
    scorer_trunk_lr: float = 1e-4
    scorer_weight_decay: float = 0.1
    scorer_dropout: float = 0.7
    comp_weight: float = 1.0
    threshold: float = 0.5
    select_threshold: float = 0.8
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
        if not (0.0 < s.threshold < 1.0 and 0.0 < s.select_threshold < 1.0):
            raise UserError("method.dual.threshold and select_threshold must be in (0, 1)")
        if s.eval_batch < 2 or s.comp_weight < 0:
            raise UserError("method.dual.eval_batch must be >= 2 and comp_weight >= 0")
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
    recipe = Recipe(
        optimizer="adamw",
        lr=dual.scorer_lr,
        trunk_lr=dual.scorer_trunk_lr,
        weight_decay=dual.scorer_weight_decay,
    )
    loss = dual_track_loss(train, keep, dual.comp_weight, device)
    losses = torch.empty(train.n_pairs)
    for f in range(dual.folds):
        fit = torch.nonzero(fold_of_pair != f).flatten()
        held = torch.nonzero(fold_of_pair == f).flatten()
        student = encoder.new_student(seed * 100 + f, feature_dropout=dual.scorer_dropout)
        trainer = Trainer(
            student.to(device).train(),
            recipe,
            loss,
            what=f"dual-track scorer (fold {f})",
            hint="lower method.dual.scorer_lr or method.dual.comp_weight",
        )
        batches = Batches(train.n_pairs, dual.scorer_batch, gen, order="fresh", pool=fit)
        trainer.run(batches, dual.scorer_steps)
        losses[held] = heldout_losses(student, train, held, dual.eval_batch, device, gen)
    return losses


@dataclass
class Detection:
    """Both tracks' final per-pair clean probabilities and the per-round scores."""

    prob: tuple[Tensor, Tensor]  # [n_pairs] each
    history: list[dict[str, Any]]
    seconds: float

    def selected(self, track: int, threshold: float) -> Tensor:
        return self.prob[track] > threshold

    def consensus(self, threshold: float) -> Tensor:
        """The final clean set: pairs both tracks call clean at `threshold`."""
        return self.selected(0, threshold) & self.selected(1, threshold)


def _keep(prob: Tensor, threshold: float) -> Tensor:
    keep = prob > threshold
    return keep if keep.sum() >= 2 else torch.ones_like(keep)  # degenerate fit: keep all


def detect_clean_pairs(
    encoder: Encoder,
    train: RealSplit,
    dual: DualTrackSettings,
    seed: int,
    device: str,
    true_clean: Tensor | None = None,
    say: Callable[[str], None] = log.info,
) -> Detection:
    """Cross-fitted co-teaching of tracks A and B over `dual.rounds` rounds."""
    t0 = time.perf_counter()
    seeds = (seed, seed + 1)
    gens = [torch.Generator().manual_seed(s * 7919 + 1) for s in seeds]
    n_images = int(train.caption_image.max()) + 1
    fold_of_pair = [_image_folds(n_images, dual.folds, g)[train.caption_image] for g in gens]
    probs: list[Tensor] = []
    keeps: list[Tensor | None] = [None, None]
    history: list[dict[str, Any]] = []
    for r in range(dual.rounds):
        # Track k's scorers learn from the pairs the other track called clean last round.
        probs = [
            clean_probability(
                _scorer_losses(
                    encoder, train, dual, fold_of_pair[k], keeps[1 - k], seeds[k], device, gens[k]
                )
            )
            for k in (0, 1)
        ]
        keeps = [_keep(p, dual.threshold) for p in probs]
        det = Detection((probs[0], probs[1]), history, 0.0)
        entry: dict[str, Any] = {
            "round": r + 1,
            "consensus": detection_scores(det.consensus(dual.select_threshold), true_clean),
        }
        for k in (0, 1):
            entry[f"track_{'AB'[k]}"] = detection_scores(
                det.selected(k, dual.select_threshold), true_clean
            )
        history.append(entry)
        say(
            f"dual-track round {r + 1}: clean set "
            + ", ".join(f"{a} {b:.3f}" for a, b in entry["consensus"].items())
        )
    return Detection((probs[0], probs[1]), history, time.perf_counter() - t0)


@dataclass(frozen=True)
class DetectionData:
    """The split a detection scores and what keys its cache entry: encoder, dataset name and
    noise node; where it runs and is cached; the true clean pairs, when known, for its scores."""

    encoder: Encoder
    train: RealSplit
    dataset: str
    noise: DictConfig | None
    device: str
    cache_dir: Path
    true_clean: Tensor | None = None


def cached_detection(
    data: DetectionData, dual: DualTrackSettings, seed: int, say: Callable[[str], None] = log.info
) -> Detection:
    """`detect_clean_pairs`, run once per data, encoder, detection settings and seed and kept
    under `<cache_dir>/detections/` (robust CovMatch reads it; MDW keeps its own copy beside
    its experts, whose key also covers the expert settings)."""
    enc = OmegaConf.to_container(data.encoder.cfg, resolve=True)
    enc.pop("recipe", None)
    noise = data.noise
    parts = {
        "version": ROBUST_VERSION,
        "dataset": data.dataset,
        "data": split_fingerprint(data.train),
        "encoder": enc,
        "noise": None if noise is None else OmegaConf.to_container(noise, resolve=True),
        "dual": dual.as_dict(),
        "seed": seed,
    }
    key = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = f"{data.dataset}-{data.encoder.name}-{key}"
    path = Path(data.cache_dir).expanduser() / "detections" / name
    tensors, info = path / "detection.safetensors", path / "detection.json"
    if tensors.is_file() and info.is_file():
        t = io.load_tensors(tensors)
        saved = io.read_json(info)
        return Detection((t["prob_a"], t["prob_b"]), saved["history"], saved["seconds"])
    say("dual-track detection: cross-fitted co-teaching of two tracks")
    det = detect_clean_pairs(
        data.encoder, data.train, dual, seed, data.device, data.true_clean, say
    )
    io.save_tensors(tensors, {"prob_a": det.prob[0], "prob_b": det.prob[1]})
    io.write_json(info, {"parts": parts, "history": det.history, "seconds": det.seconds})
    return det


def train_robust_expert(
    encoder: Encoder,
    train: RealSplit,
    val: RealSplit | None,
    settings: ExpertSettings,
    keep: Tensor,
    comp_weight: float,
    index: int,
    device: str,
    on_epoch: Callable[[int], None] | None = None,
    on_log: LogHook | None = None,
) -> tuple[Tensor, ParamLayout, dict[str, Any]]:
    """An expert with the ordinary SGD settings on InfoNCE(kept pairs) + complementary(all)."""
    return train_expert(
        encoder,
        train,
        val,
        settings,
        index,
        device,
        on_epoch,
        batch_loss=dual_track_loss(train, keep, comp_weight, device),
        on_log=on_log,
    )


# ------------------------------------------------------------------------------ the buffer


def robust_noise_cfg(noise: DictConfig, dual: DualTrackSettings) -> DictConfig:
    """The noise node with the dual-track settings added, so buffer keys tell the kinds apart."""
    out = noise.copy()
    with open_dict(out):
        out.expert_training = {"kind": "dual_track", **dual.as_dict()}
    return out


@dataclass
class RobustBuffer:
    buffer: Buffer
    detection: Detection
    clean: Tensor  # [n_pairs] bool: the final clean set (both tracks agree)
    scores: dict[str, float]  # its precision / recall against the noise mask (if known)


def robust_buffer(
    source: ExpertSource, dual: DualTrackSettings, true_clean: Tensor | None = None
) -> RobustBuffer:
    """The dual-track buffer for this data: detection once, then the experts it lacks.

    Expert i belongs to track i % 2 and trains on the pairs the *other* track selected. The key
    is `buffer_key` over the noise node extended with the dual-track settings
    (`robust_noise_cfg`), so plain and dual-track experts never mix, and a plain
    `ExpertSource.buffer` given that node finds these experts.
    """
    settings = source.settings
    noise = robust_noise_cfg(source.noise, dual)
    buf = source.cached(*buffer_key(source.encoder, source.train, source.dataset, noise, settings))
    det = _buffer_detection(source, buf, dual, settings.seed, true_clean)
    clean = det.consensus(dual.select_threshold)
    scores = detection_scores(clean, true_clean)
    io.write_json(
        buf.path / "detection.json",
        {"history": det.history, "seconds": det.seconds, "final": scores},
    )
    for i in range(int(source.expert.num_experts)):
        if buf.expert_path(i).is_file():
            continue
        keep = _keep(det.prob[1 - i % 2], dual.select_threshold)
        curve = expert_curve(source.metrics, f"robust/{i}")
        with source.progress_task(f"robust expert {i}", settings.epochs) as on_epoch:
            traj, layout, stats = train_robust_expert(
                source.encoder, source.train, source.val, settings, keep, dual.comp_weight, i,
                source.device, on_epoch, on_log=curve,
            )  # fmt: skip
            stats.update(
                track="AB"[i % 2],
                trained_on=f"InfoNCE on track {'BA'[i % 2]}'s clean pairs + complementary on all",
                kept_pairs=int(keep.sum()),
                detection=scores,
                detection_history=det.history,
                dual_track=dual.as_dict(),
            )
            buf.write_expert(i, traj, layout, stats)
        source.say(
            f"robust expert {i}: {stats['seconds']:.1f}s"
            + (f", val r_mean {stats['val_r_mean']:.2f}" if "val_r_mean" in stats else "")
        )
    return RobustBuffer(buf, det, clean, scores)


def _buffer_detection(
    source: ExpertSource, buf: Buffer, dual: DualTrackSettings, seed: int, true_clean: Tensor | None
) -> Detection:
    """The detection kept beside the robust experts, run first when it is not there."""
    det_path = buf.path / "detection.safetensors"
    if not det_path.is_file():
        source.say("dual-track detection: cross-fitted co-teaching of two tracks")
        det = detect_clean_pairs(
            source.encoder, source.train, dual, seed, source.device, true_clean, source.say
        )
        io.save_tensors(det_path, {"prob_a": det.prob[0], "prob_b": det.prob[1]})
        return det
    fix = f"delete {det_path}; the detection runs again"
    t = io.load_tensors(det_path, fix=fix, need=("prob_a", "prob_b"))
    info = io.read_json(buf.path / "detection.json", fix=fix, kind=dict)
    with io.reading(buf.path / "detection.json", fix):
        return Detection((t["prob_a"], t["prob_b"]), info["history"], info["seconds"])
