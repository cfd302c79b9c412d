"""The learnable state of trajectory matching (MTT, TESLA, LoRS, RepBlend, MDW): synthetic
images and texts, the learned step sizes and the target similarity, and the student towers as
one module that `torch.func.functional_call` runs from a flat parameter vector."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmdistill.errors import UserError
from mmdistill.models.student import Student
from mmdistill.training.pairs import PairSet


class _Embed(nn.Module):
    """Both towers of a student as one callable, so functional_call can swap its parameters."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor, texts: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.student.encode_image(images), self.student.encode_text(texts, mask)


class Synthetic:
    """The learnable state: images, texts (+ fixed mask), step sizes and the similarity."""

    def __init__(
        self,
        images: Tensor,
        texts: Tensor,
        mask: Tensor | None,
        step_size: float,
        similarity: nn.Module | None,
        similarity_args: dict[str, Any],
    ) -> None:
        self.images = images.detach().clone().requires_grad_(True)
        self.texts = texts.detach().clone().requires_grad_(True)
        self.mask = mask
        self.step_image = torch.tensor(float(step_size), requires_grad=True)
        self.step_text = torch.tensor(float(step_size), requires_grad=True)
        self.similarity = similarity
        self.similarity_args = similarity_args

    def tensors(self) -> dict[str, Tensor]:
        """Every learnable tensor by name (the checkpoint and last-good copy use these)."""
        out = {
            "images": self.images,
            "texts": self.texts,
            "step_image": self.step_image,
            "step_text": self.step_text,
        }
        if self.similarity is not None:
            out.update({f"similarity.{k}": v for k, v in self.similarity.named_parameters()})
        return out

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors().items()}

    def restore(self, saved: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.tensors().items():
                if tuple(saved[k].shape) != tuple(v.shape):
                    raise UserError(
                        f"checkpoint tensor {k} has shape {list(saved[k].shape)}, this run "
                        f"needs {list(v.shape)}; start a new run instead of resuming"
                    )
                v.copy_(saved[k])

    def finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.tensors().values())

    def pairset(self, loss: str, meta: dict[str, Any]) -> PairSet:
        return PairSet(
            images=self.images,
            texts=self.texts,
            text_mask=self.mask,
            similarity=self.similarity,
            similarity_args=dict(self.similarity_args),
            step_sizes={"image": self.step_image.item(), "text": self.step_text.item()},
            loss=loss,
            meta=dict(meta),
        ).detached()
