"""The student: optional trunks + heads, scored by temperature-scaled cosine similarity.

Every method and the evaluation protocol train this one module type. Inputs say which path
they take by shape, so real and synthetic data flow through the same code:

* images: `[N, 3, H, W]` pixels go through the image trunk; `[N, D]` features (the output of a
  frozen trunk, cached) skip it.
* texts: `[N, L]` int token ids or `[N, L, E]` token embeddings (synthetic text that a
  trainable text trunk reads, as CovMatch does) go through the text trunk with a `[N, L]` mask;
  `[N, D]` float features skip it (the frozen-text-trunk space MTT-VL and LoRS synthesise in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_text_features(texts: Tensor) -> bool:
    """Texts given as frozen-trunk features `[N, D]`, not token ids `[N, L]` or token
    embeddings `[N, L, E]` that a text trunk still has to read."""
    return texts.dim() == 2 and texts.is_floating_point()


def is_image_features(images: Tensor) -> bool:
    """Images given as frozen-trunk features `[N, D]`, not pixels `[N, 3, H, W]`."""
    return images.dim() == 2


class ProjectionHead(nn.Module):
    """The papers' text projection: Linear-GELU-Linear-Dropout, residual, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        return self.norm(h + self.drop(self.fc(F.gelu(h))))


def make_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build a head by name: identity (no projection), linear, or the papers' projection."""
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "projection":
        return ProjectionHead(in_dim, out_dim)
    raise ValueError(f"unknown head {kind!r}; choose identity, linear or projection")


class FeatureDropout(nn.Module):
    """Inverted dropout whose mask is drawn as `rand >= p`: the same distribution as
    `nn.Dropout`, at about half its CPU cost (a per-element bernoulli draw is slow on CPU, and
    the input-feature dropout is the hottest op of a feature-space student step)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep / (1.0 - self.p)


class SpatialMap(nn.Identity):
    """Marks where an image trunk's last spatial feature map `[N, C, h, w]` passes (before
    pooling), so Grad-CAM reads that map and not a 1 x 1 pooled output."""


class TextTrunk(nn.Module):
    """A text tower without its projection: ids or token embeddings + mask -> one vector."""

    out_dim: int
    token_dim: int

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token ids -> input token embeddings (the space synthetic token text lives in)."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


class Student(nn.Module):
    """A CLIP-style student. Trunks are None where the data arrive as cached features."""

    def __init__(
        self,
        image_head: nn.Module,
        text_head: nn.Module,
        image_trunk: nn.Module | None = None,
        text_trunk: TextTrunk | None = None,
        temperature: float = 0.07,
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_trunk = image_trunk
        self.text_trunk = text_trunk
        self.image_head = image_head
        self.text_head = text_head
        self.logit_scale = 1.0 / temperature
        self.feature_dropout = FeatureDropout(feature_dropout)

    def image_features(self, images: Tensor) -> Tensor:
        if is_image_features(images):
            return images
        if self.image_trunk is None:
            raise ValueError("pixel images need an image trunk; this student has none")
        return self.image_trunk(images)

    def text_features(self, texts: Tensor, mask: Tensor | None = None) -> Tensor:
        if is_text_features(texts):
            return texts
        if self.text_trunk is None:
            raise ValueError("token text needs a text trunk; this student has none")
        if mask is None:
            raise ValueError("token text needs its attention mask")
        return self.text_trunk(texts, mask)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(
            self.image_head(self.feature_dropout(self.image_features(images))), dim=-1
        )

    def encode_text(self, texts: Tensor, mask: Tensor | None = None) -> Tensor:
        feats = self.text_features(texts, mask)
        return F.normalize(self.text_head(self.feature_dropout(feats)), dim=-1)

    def logits(self, images: Tensor, texts: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image x text similarity logits, `[N_img, N_txt]`."""
        return self.logit_scale * self.encode_image(images) @ self.encode_text(texts, mask).T
