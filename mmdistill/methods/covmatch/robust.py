"""Robust CovMatch (our extension): real pairs weighted by their estimated clean probability,
from MDW's dual-track detection (cached per data, encoder and detection settings)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from mmdistill.methods.base import DistillContext
from mmdistill.methods.mdw_dual_track import (
    DetectionData,
    DualTrackSettings,
    cached_detection,
    detection_scores,
)
from mmdistill.methods.settings import Robust

log = logging.getLogger(__name__)
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
    def from_typed(cls, s: Robust, dual: DictConfig | None) -> RobustSettings:
        """From the checked `method.robust` settings; the detection knobs keep their own
        reader, whose values key the detection and expert caches."""
        return cls(
            s.enabled, s.weighting, s.threshold, s.rescale_rho, s.clean_init,
            DualTrackSettings.from_cfg(dual),
        )  # fmt: skip


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


def pair_weights(ctx: DistillContext, r: RobustSettings) -> PairWeights:
    """Clean probabilities from dual-track detection (cached), the mean of both tracks'."""
    true_clean = None
    mask = ctx.noise_mask
    if mask is not None and len(mask.pair_clean) == ctx.train.n_pairs:
        true_clean = mask.pair_clean
    data = DetectionData(
        ctx.encoder, ctx.train, ctx.dataset, ctx.noise, ctx.device, ctx.cache_dir, true_clean
    )
    det = cached_detection(data, r.dual, ctx.seed, say=log.info)
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
