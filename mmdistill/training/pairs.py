"""PairSet: what a student trains on, real or synthetic, with its save/load format.

Images are pixels `[N,3,H,W]` (a tensor, or for a real split a `PixelStore` read by rows) or
frozen-trunk features `[N,D]`; texts are features `[N,D]`,
token ids `[N,L]` or token embeddings `[N,L,E]` (with a mask). `image_index` lets many pairs
share one stored image (the real training set has 5 captions per image). A learned target
similarity (LoRS, MDW) and learned student step sizes travel with the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdistill import io
from mmdistill.data.images import PixelStore
from mmdistill.errors import UserError
from mmdistill.training.similarity import build_similarity

FORMAT_VERSION = 1


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
        )

    def save(self, path: Path) -> None:
        """Write `<path>.safetensors` + `<path>.json` atomically."""
        path = Path(path)
        tensors = {"images": self.images, "texts": self.texts}
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
                "meta": self.meta,
            },
        )

    @classmethod
    def load(cls, path: Path) -> PairSet:
        path = Path(path)
        side, tensors_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not side.is_file() or not tensors_path.is_file():
            raise UserError(
                f"no distilled set at {path}: expected {tensors_path.name} and {side.name}; "
                "point at a finished distill run folder"
            )
        info = io.read_json(side)
        if info.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{side} has format version {info.get('format_version')}, this mmdistill reads "
                f"{FORMAT_VERSION}; re-run the distillation with this version"
            )
        t = io.load_tensors(tensors_path)
        sim = None
        if info.get("similarity"):
            sim = build_similarity(**info["similarity"])
            sim.load_state_dict(
                {k[len("similarity.") :]: v for k, v in t.items() if k.startswith("similarity.")}
            )
            sim.requires_grad_(False)
        return cls(
            images=t["images"],
            texts=t["texts"],
            text_mask=t.get("text_mask"),
            image_index=t.get("image_index"),
            similarity=sim,
            similarity_args=info.get("similarity") or {},
            step_sizes=info.get("step_sizes", {}),
            loss=info.get("loss", "infonce"),
            meta=info.get("meta", {}),
        )
