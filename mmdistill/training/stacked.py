"""K head-only students as one batched model, so a GPU trains them together.

Evaluation students on frozen-trunk features are a few small linear heads each: one at a time
they leave a GPU idle (a kernel launch per tiny matmul). `StackedStudent` stacks the K heads'
parameters along a new first axis and runs them with `torch.func.vmap`; it trains through the
ordinary `Trainer`, whose batch loss sums the K students' own losses, each on its own batches
(`StackedBatches`) with its own dropout draws. Every student therefore sees exactly the draws
it would see alone, so its record matches the one-at-a-time run to float tolerance (batched
matmuls round differently), whatever K is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mmdistill.models.student import Student
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet
from mmdistill.training.trainer import Batches, BatchLoss

STACKABLE_HEADS = (nn.Linear, nn.Identity)


def stackable(students: list[Student]) -> bool:
    """Head-only students whose heads are linear or identity (no dropout inside a head)."""
    return all(
        s.image_trunk is None
        and s.text_trunk is None
        and isinstance(s.image_head, STACKABLE_HEADS)
        and isinstance(s.text_head, STACKABLE_HEADS)
        for s in students
    )


class StackedHead(nn.Module):
    """One head type, K parameter sets: `forward(x [K, B, D]) -> [K, B, D_out]`."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.base = copy.deepcopy(heads[0]).to("meta")
        names = [n for n, _ in heads[0].named_parameters()]
        self.keys = names  # parameter names of one head, in `stacked` order
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([dict(h.named_parameters())[n].detach() for h in heads]))
            for n in names
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.keys:
            return x

        def one(params: tuple[Tensor, ...], xk: Tensor) -> Tensor:
            return functional_call(self.base, dict(zip(self.keys, params, strict=True)), (xk,))

        return vmap(one)(tuple(self.stacked), x)

    def unstack_into(self, heads: list[nn.Module]) -> None:
        with torch.no_grad():
            for k, head in enumerate(heads):
                params = dict(head.named_parameters())
                for name, stacked in zip(self.keys, self.stacked, strict=True):
                    params[name].copy_(stacked[k])


class StackedStudent(nn.Module):
    """K students' heads in one module; it quacks like a Student where the trainer looks
    (`image_head`, `text_head`, no trunks) so the recipe builds one optimizer over all K."""

    def __init__(self, students: list[Student]) -> None:
        super().__init__()
        self.image_trunk = None
        self.text_trunk = None
        self.image_head = StackedHead([s.image_head for s in students])
        self.text_head = StackedHead([s.text_head for s in students])
        self.logit_scale = students[0].logit_scale
        self.k = len(students)

    def logits(self, images: Tensor, texts: Tensor) -> Tensor:
        """`[K, B, D]` features in, `[K, B, B]` temperature-scaled cosine logits out."""
        zi = F.normalize(self.image_head(images), dim=-1)
        zt = F.normalize(self.text_head(texts), dim=-1)
        return self.logit_scale * zi @ zt.transpose(1, 2)

    def unstack_into(self, students: list[Student]) -> None:
        self.image_head.unstack_into([s.image_head for s in students])
        self.text_head.unstack_into([s.text_head for s in students])


class StackedBatches:
    """Each student's own batch stream, stacked: `next() -> [K, B]` pair indices."""

    def __init__(self, batches: list[Batches]) -> None:
        self.batches = batches

    def next(self) -> Tensor:
        return torch.stack([b.next() for b in self.batches])


def stacked_loss(
    pairs: PairSet, loss: str, dropout: float, gens: list[torch.Generator], device: str
) -> BatchLoss:
    """The sum of the K students' losses. Each student draws its feature-dropout masks from its
    own generator, image features first and then text features, as `Student.logits` does."""
    loss_fn = LOSSES.get(loss)

    def drop(x: Tensor, gen: torch.Generator) -> Tensor:
        if dropout == 0.0:
            return x
        keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) >= dropout
        return x * keep / (1.0 - dropout)

    def batch_loss(model: StackedStudent, idx: Tensor) -> Tensor:
        images, texts, targets = [], [], []
        for k, gen in enumerate(gens):
            im, tx, _, t = pairs.batch(idx[k], device)
            images.append(drop(im, gen))
            texts.append(drop(tx, gen))
            targets.append(t)
        logits = model.logits(torch.stack(images), torch.stack(texts))
        return sum(loss_fn(logits[k], targets[k]) for k in range(len(gens)))

    return batch_loss
