"""How a synthetic set stores its rows: one object per way (float32, float16, int8, low-rank).

A budget is bytes: the bytes of N plain float32 pairs. A storage says how many bytes one pair
and the shared parts (bases, offsets) take, so `pairs_that_fit` turns a budget into a pair
count for any method; `encode` turns what a method optimised into the stored record (a
`Factor`), which names its file keys (`images.coef`, `images.scale`, `images.offset`, ...) and
decodes back to rows. Plain float32 rows keep the bare key (`images`), as every set has always
been written.

Low-rank storage is the one whose optimised tensor is not the rows: a method optimises the
coefficients on its basis (`params` projects rows there, `features` decodes them with their
gradient), and the coefficients are what is stored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

FACTOR_PARTS = ("coef", "basis", "offset", "scale")
FLOAT32_BYTES = 4
INT8_SCALE_BYTES = 4  # one float32 scale per int8 row


@dataclass(frozen=True)
class Factor:
    """One modality as stored: `coef @ basis + offset`, coefficients `[N, k]` on a shared basis
    `[k, D]` plus an offset `[D]`. Without a basis the coefficients are the rows minus the
    offset (no offset: the rows). With a `scale` `[N, 1]`, `coef` holds int8 codes and the
    coefficients are `coef * scale`. Float32 rows alone are plain: saved under the bare key."""

    coef: Tensor
    basis: Tensor | None = None
    offset: Tensor | None = None
    scale: Tensor | None = None

    @property
    def plain(self) -> bool:
        extras = (self.basis, self.offset, self.scale)
        return all(t is None for t in extras) and self.coef.dtype == torch.float32

    def decode(self) -> Tensor:
        coef = self.coef.float() if self.scale is None else self.coef.float() * self.scale
        if self.basis is not None:
            return torch.addmm(self.offset, coef, self.basis)
        return coef if self.offset is None else coef + self.offset

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The file keys and tensors this modality is saved as."""
        if self.plain:
            return {name: self.coef}
        return {
            f"{name}.{k}": getattr(self, k) for k in FACTOR_PARTS if getattr(self, k) is not None
        }

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * t.element_size() for t in self.tensors("x").values())

    @classmethod
    def read(cls, tensors: dict[str, Tensor], name: str) -> Factor | None:
        """The stored record under `name`'s keys, or None for plain rows."""
        if f"{name}.coef" not in tensors:
            return None
        return cls(*(tensors.get(f"{name}.{k}") for k in FACTOR_PARTS))


def int8_rows(coef: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes and per-row scales of `coef` (zero-centred coefficients): every
    entry within half a step (max |row| / 254) of its value."""
    scale = coef.abs().amax(1, keepdim=True).clamp_min(torch.finfo(coef.dtype).tiny) / 127
    codes = torch.round(coef / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale


class Storage(ABC):
    """How one modality's rows of dimension `dim` are kept."""

    bits = 32

    @abstractmethod
    def encode(self, params: Tensor) -> Factor:
        """The stored record of the optimised tensor (rows, or low-rank coefficients)."""

    @abstractmethod
    def row_bytes(self, dim: int) -> int:
        """Bytes of one stored row."""

    def shared_bytes(self, dim: int) -> int:
        """Bytes stored once for the whole set (bases, offsets)."""
        return 0

    def params(self, rows: Tensor) -> Tensor:
        """What a method optimises for these starting rows: the rows themselves here."""
        return rows

    def features(self, params: Tensor) -> Tensor:
        """The rows the optimised tensor stands for, differentiably (on its device)."""
        return params

    def covariance(self, cov: Tensor) -> Tensor:
        """A covariance of rows, in the space of the optimised tensor."""
        return cov

    def to(self, device: torch.device | str) -> Storage:
        return self


class Float32(Storage):
    def encode(self, params: Tensor) -> Factor:
        return Factor(params)

    def row_bytes(self, dim: int) -> int:
        return FLOAT32_BYTES * dim


class Float16(Storage):
    bits = 16

    def encode(self, params: Tensor) -> Factor:
        return Factor(params.half())

    def row_bytes(self, dim: int) -> int:
        return 2 * dim


@dataclass(frozen=True)
class Int8(Storage):
    """int8 codes of the rows less `offset` (zeros when not given), a float32 scale per row."""

    offset: Tensor | None = None
    bits = 8

    def encode(self, params: Tensor) -> Factor:
        offset = params.new_zeros(params.shape[1]) if self.offset is None else self.offset
        codes, scale = int8_rows(params - offset)
        return Factor(codes, None, offset, scale)

    def row_bytes(self, dim: int) -> int:
        return dim + INT8_SCALE_BYTES

    def shared_bytes(self, dim: int) -> int:
        return FLOAT32_BYTES * dim  # the offset

    def to(self, device: torch.device | str) -> Int8:
        return self if self.offset is None else Int8(self.offset.to(device))


@dataclass(frozen=True)
class LowRank(Storage):
    """Coefficients on a basis `[rank, D]` plus an offset `[D]`, float32 or int8 (`bits`)."""

    rank: int
    bits: int = 32
    basis: Tensor | None = None
    offset: Tensor | None = None

    def encode(self, params: Tensor) -> Factor:
        if self.bits == 8:
            codes, scale = int8_rows(params)
            return Factor(codes, self.basis, self.offset, scale)
        return Factor(params, self.basis, self.offset)

    def row_bytes(self, dim: int) -> int:
        return self.rank * self.bits // 8 + (INT8_SCALE_BYTES if self.bits == 8 else 0)

    def shared_bytes(self, dim: int) -> int:
        return (self.rank + 1) * FLOAT32_BYTES * dim  # the basis rows and the offset

    def params(self, rows: Tensor) -> Tensor:
        assert self.basis is not None and self.offset is not None, "fit the subspace first"
        return (rows - self.offset) @ self.basis.T

    def features(self, params: Tensor) -> Tensor:
        return torch.addmm(self.offset, params, self.basis)

    def covariance(self, cov: Tensor) -> Tensor:
        return self.basis @ cov @ self.basis.T

    def to(self, device: torch.device | str) -> LowRank:
        if self.basis is None or self.offset is None:
            return self
        return LowRank(self.rank, self.bits, self.basis.to(device), self.offset.to(device))


@dataclass(frozen=True)
class PairStorage:
    """The storage of a set's images and texts."""

    images: Storage
    texts: Storage

    @property
    def plain(self) -> bool:
        return isinstance(self.images, Float32) and isinstance(self.texts, Float32)

    def pair_bytes(self, dims: tuple[int, int]) -> int:
        return self.images.row_bytes(dims[0]) + self.texts.row_bytes(dims[1])

    def shared_bytes(self, dims: tuple[int, int]) -> int:
        return self.images.shared_bytes(dims[0]) + self.texts.shared_bytes(dims[1])

    def pairs_that_fit(self, budget_bytes: int, dims: tuple[int, int]) -> int:
        """How many pairs of these dimensions fit in `budget_bytes`, shared parts included."""
        return (budget_bytes - self.shared_bytes(dims)) // self.pair_bytes(dims)

    def encode(self, images: Tensor, texts: Tensor) -> dict[str, Factor]:
        """The stored records of both modalities."""
        return {"images": self.images.encode(images), "texts": self.texts.encode(texts)}

    def to(self, device: torch.device | str) -> PairStorage:
        return PairStorage(self.images.to(device), self.texts.to(device))


# `method.bits`: how plain rows are stored, for any method of frozen-trunk features. A new
# precision is one more Storage class here.
ROWS: dict[int, type[Storage]] = {32: Float32, 16: Float16, 8: Int8}


def rows_storage(bits: int, offsets: tuple[Tensor, Tensor] | None = None) -> PairStorage:
    """Row storage of `bits` for images and texts; int8 codes are taken about `offsets`."""
    if bits == 8 and offsets is not None:
        return PairStorage(Int8(offsets[0]), Int8(offsets[1]))
    return PairStorage(ROWS[bits](), ROWS[bits]())


def float32_bytes(pairs: int, dims: tuple[int, int]) -> int:
    """The bytes of `pairs` plain float32 pairs: what a budget of `pairs` pairs holds."""
    return pairs * FLOAT32_BYTES * sum(dims)


def modality_label(dtype: str, rank: int | None = None) -> str:
    """How one modality's rows are kept, as tables name it: `float32`, `int8`, `rank-16`
    (float32 coefficients on a 16-row basis), `rank-16 int8`."""
    if rank is None:
        return dtype
    return f"rank-{rank}" + ("" if dtype == "float32" else f" {dtype}")


def storage_label(parts: dict[str, str]) -> str | None:
    """One name for a set's storage from each modality's label: `int8` when both agree, else
    `int8 images, float32 texts`; None when no modality was labelled (token ids only)."""
    labels = set(parts.values())
    if len(labels) <= 1:
        return labels.pop() if labels else None
    return ", ".join(f"{label} {name}" for name, label in parts.items())
