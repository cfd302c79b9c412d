"""The real statistics CovMatch matches, as small objects plugged into the step loss.

`Plain` and `Weighted` say how real pairs are averaged (equally, or by their estimated clean
probability in robust mode); `Within` is an extra loss term, the within-modality covariances.
A new variant of the target is one more such class, not a branch of the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from mmdistill.methods.covmatch.loss import cross_covariance, weighted_statistics
from mmdistill.training.features import RealSplit
from mmdistill.training.storage import PairStorage


class Statistics(ABC):
    """How real pairs are averaged into C_real and the real means."""

    @abstractmethod
    def cross(self, v: Tensor, t: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The image-text cross-covariance and the two means `[1, D]`."""

    @abstractmethod
    def auto(self, x: Tensor) -> Tensor:
        """The covariance of one modality with itself."""


class Plain(Statistics):
    """Every pair counts the same (the paper)."""

    def cross(self, v: Tensor, t: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return cross_covariance(v, t), (v.mean(0, keepdim=True), t.mean(0, keepdim=True))

    def auto(self, x: Tensor) -> Tensor:
        return cross_covariance(x, x)


@dataclass(frozen=True)
class Weighted(Statistics):
    """Pairs weighted by `weight` (robust CovMatch: their estimated clean probability)."""

    weight: Tensor

    def cross(self, v: Tensor, t: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        cov, mv, mt = weighted_statistics(v, t, self.weight.to(v.device))
        return cov, (mv, mt)

    def auto(self, x: Tensor) -> Tensor:
        return weighted_statistics(x, x, self.weight.to(x.device))[0]


@dataclass(frozen=True)
class Within:
    """`weight` x sum_m ||C_mm - C_mm,syn||^2 over images and texts, in the space the
    synthetic rows live in (a factorised set's coefficients: B C B^T).

    CovMatch's linearised loss sees only C_vt; the contrastive loss's normaliser is quadratic in
    the projected features, so at second order the students also see these. The targets are
    not scaled by rho: rho scales the cross-covariance target (the paper's choice per budget,
    and in robust mode the undoing of its shrinkage under shuffled pairs), and shuffling
    captions leaves each modality's own covariance as it is.
    """

    weight: float
    targets: tuple[Tensor, Tensor]
    name = "within"

    @classmethod
    def of(
        cls, weight: float, train: RealSplit, stats: Statistics, storage: PairStorage, device: str
    ) -> Within:
        """The real within-modality covariances of all real pairs, as targets."""
        out = []
        rows = (train.images[train.caption_image], train.texts)
        for x, store in zip(rows, (storage.images, storage.texts), strict=True):
            out.append(store.to(device).covariance(stats.auto(x.float().to(device))))
        return cls(weight, (out[0], out[1]))

    def __call__(self, rows: tuple[Tensor, Tensor]) -> Tensor:
        return sum(
            (target - cross_covariance(x, x)).pow(2).sum()
            for target, x in zip(self.targets, rows, strict=True)
        )
