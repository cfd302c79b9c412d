"""PairSet: what a student trains on, real or synthetic, with its save/load format.

Images are pixels `[N,3,H,W]` (a tensor, or for a real split a `PixelStore` read by rows) or
frozen-trunk features `[N,D]`; texts are features `[N,D]`,
token ids `[N,L]` or token embeddings `[N,L,E]` (with a mask). `image_index` lets many pairs
share one stored image (the real training set has 5 captions per image). A learned target
similarity (LoRS, MDW) and learned student step sizes travel with the set. A factorised set
(`factors`) stores a modality as coefficients on a shared basis plus an offset, or as int8
codes, so it holds more pairs in the same bytes; it is decoded once on load, and students never
see the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdistill import io
from mmdistill.data.images import PixelStore
from mmdistill.errors import UserError
from mmdistill.training.similarity import build_similarity
from mmdistill.training.storage import Factor

FORMAT_VERSION = 1
MODALITIES = ("images", "texts")


@dataclass
class PairSet:
    images: Tensor | PixelStore
    texts: Tensor
    text_mask: Tensor | None = None
    image_index: Tensor | None = None
    similarity: nn.Module | None = None
    similarity_args: dict[str, Any] = field(default_factory=dict)
    step_sizes: dict[str, float] = field(default_factory=dict)
    loss: str = "infonce"
    meta: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, Factor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.texts.shape[0]

    def batch(
        self, idx: Tensor, device: torch.device | str
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Images, texts, mask and target sub-matrix (None = identity) for pair indices."""
        img_idx = idx if self.image_index is None else self.image_index[idx]
        images = self.images[img_idx].to(device)
        texts = self.texts[idx].to(device)
        mask = None if self.text_mask is None else self.text_mask[idx].to(device)
        targets = None
        if self.similarity is not None:
            targets = self.similarity(idx.to(next(self.similarity.parameters()).device)).to(device)
        return images, texts, mask, targets

    def to(self, device: torch.device | str) -> PairSet:
        """The same set with its tensors on `device` (a no-op where they already are), so
        batches are gathered there instead of copied from host memory every step. Streamed
        pixels (a PixelStore) stay where they are: they are read from disk by rows per batch."""

        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if isinstance(t, Tensor) else t

        return replace(
            self,
            images=move(self.images),
            texts=move(self.texts),
            text_mask=move(self.text_mask),
            image_index=move(self.image_index),
        )

    def detached(self) -> PairSet:
        """A copy with plain tensors (no autograd history), for saving and evaluation."""
        sim = None
        if self.similarity is not None:
            sim = build_similarity(**self.similarity_args)
            sim.load_state_dict(
                {k: v.detach().clone() for k, v in self.similarity.state_dict().items()}
            )
            sim.requires_grad_(False)
        return PairSet(
            images=self.images.detach().clone(),
            texts=self.texts.detach().clone(),
            text_mask=None if self.text_mask is None else self.text_mask.clone(),
            image_index=None if self.image_index is None else self.image_index.clone(),
            similarity=sim,
            similarity_args=dict(self.similarity_args),
            step_sizes=dict(self.step_sizes),
            loss=self.loss,
            meta=dict(self.meta),
            factors=dict(self.factors),
        )

    def stored_factors(self) -> dict[str, Factor]:
        """The factors that still decode to this set's modality bit for bit: a set whose
        images or texts were replaced (a transfer to another encoder) is stored plainly."""
        return {
            name: f
            for name, f in self.factors.items()
            if isinstance(getattr(self, name), Tensor)
            and torch.equal(f.decode(), getattr(self, name).to(f.coef.device))
        }

    def save(self, path: Path) -> None:
        """Write `<path>.safetensors` + `<path>.json` atomically."""
        path = Path(path)
        factors = self.stored_factors()
        tensors: dict[str, Tensor] = {}
        for name in MODALITIES:
            if name in factors:
                tensors.update(factors[name].tensors(name))
            else:
                tensors[name] = getattr(self, name)
        if self.text_mask is not None:
            tensors["text_mask"] = self.text_mask
        if self.image_index is not None:
            tensors["image_index"] = self.image_index
        if self.similarity is not None:
            for k, v in self.similarity.state_dict().items():
                tensors[f"similarity.{k}"] = v
        io.save_tensors(path.with_suffix(".safetensors"), tensors)
        io.write_json(
            path.with_suffix(".json"),
            {
                "format_version": FORMAT_VERSION,
                "pairs": len(self),
                "image_shape": list(self.images.shape),
                "text_shape": list(self.texts.shape),
                "similarity": self.similarity_args or None,
                "step_sizes": self.step_sizes,
                "loss": self.loss,
                "partial": self.partial,
                "factored": sorted(factors),
                "meta": self.meta,
            },
        )

    @property
    def partial(self) -> bool:
        """A set kept when distillation stopped early (its last good checkpoint)."""
        return bool(self.meta.get("partial"))

    @classmethod
    def load(cls, path: Path, fix: str = "distil it again") -> PairSet:
        """Read `<path>.safetensors` + `<path>.json`; anything missing, inconsistent or not
        finite is a one-line error naming the file and `fix`."""
        path = Path(path)
        side, tensors_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not side.is_file() or not tensors_path.is_file():
            raise UserError(
                f"no distilled set at {path}: expected {tensors_path.name} and {side.name}; "
                "point at a finished distill run folder"
            )
        info = io.read_json(side, fix=fix, kind=dict)
        if info.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{side} has format version {info.get('format_version')}, this mmdistill reads "
                f"{FORMAT_VERSION}; re-run the distillation with this version"
            )
        t = io.load_tensors(tensors_path, fix=fix)
        factors = {}
        for name in MODALITIES:
            found = Factor.read(t, name)
            if found is not None:
                with io.reading(tensors_path, fix):
                    t[name] = found.decode()
                factors[name] = found
            elif name not in t:
                raise io.damaged(tensors_path, f"it has no tensor {name}", fix)
        with io.reading(side, fix):
            sim = None
            if info.get("similarity"):
                sim = build_similarity(**info["similarity"])
                sim.load_state_dict(
                    {
                        k[len("similarity.") :]: v
                        for k, v in t.items()
                        if k.startswith("similarity.")
                    }
                )
                sim.requires_grad_(False)
            pairs = cls(
                images=t["images"],
                texts=t["texts"],
                text_mask=t.get("text_mask"),
                image_index=t.get("image_index"),
                similarity=sim,
                similarity_args=info.get("similarity") or {},
                step_sizes={str(k): float(v) for k, v in (info.get("step_sizes") or {}).items()},
                loss=str(info.get("loss", "infonce")),
                meta=dict(info.get("meta") or {}),
                factors=factors,
            )
        problem = pairs.inconsistency(info.get("pairs"))
        if problem:
            raise io.damaged(tensors_path, problem, fix)
        return pairs

    def inconsistency(self, pairs: Any = None) -> str | None:
        """What makes a loaded set unusable (shapes that disagree, values that are not
        finite), or None."""
        n = len(self)
        if pairs is not None and pairs != n:
            return f"{n} texts but its JSON says {pairs} pairs"
        if not self.images.is_floating_point():
            return f"images are {self.images.dtype}, not floating point"
        index = self.image_index
        if index is None and self.images.shape[0] != n:
            return f"{self.images.shape[0]} images for {n} texts"
        if index is not None and (
            len(index) != n
            or index.is_floating_point()
            or int(index.max()) >= self.images.shape[0]
            or int(index.min()) < 0
        ):
            return "its image_index does not map each text to one of its images"
        if self.text_mask is not None and self.text_mask.shape != self.texts.shape[:2]:
            return f"text_mask {list(self.text_mask.shape)} does not fit texts"
        for name, x in (("images", self.images), ("texts", self.texts)):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                return f"{name} hold values that are not finite"
        return None
