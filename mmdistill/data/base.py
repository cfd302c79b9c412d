"""The one image-text set type every reader produces.

A split is a `datasets.Dataset` with one row per image: `image` (decoded lazily by the
`datasets.Image` feature from a path or bytes), `image_id` and `captions` (a list, usually 5).
A training *pair* is one (image, caption) row, as in the papers, so a split with 5 captions
per image has 5x as many pairs as images.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from mmdistill import io
from mmdistill.errors import UserError

SPLITS = ("train", "val", "test")
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.Sequence(datasets.Value("string")),
    }
)


@dataclass
class ImageTextSplit:
    """One split: images, their captions, and the caption -> image index."""

    rows: datasets.Dataset
    name: str
    fingerprint: str  # images + captions: keys expert buffers and anything fit on the pairs
    image_fingerprint: str = ""  # images only (default: fingerprint): keys the image cache
    captions: list[str] = field(init=False)
    caption_image: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.image_fingerprint = self.image_fingerprint or self.fingerprint
        per_image = self.rows["captions"]
        self.captions = [c for caps in per_image for c in caps]
        self.caption_image = np.repeat(
            np.arange(len(per_image)), [len(c) for c in per_image]
        ).astype(np.int64)

    @property
    def n_images(self) -> int:
        return len(self.rows)

    @property
    def n_pairs(self) -> int:
        return len(self.captions)

    @functools.cached_property
    def _undecoded(self) -> datasets.Dataset:
        """The rows with images as stored (path and/or bytes), decoded by `io.read_image`."""
        return self.rows.cast_column("image", datasets.Image(decode=False))

    def image(self, i: int) -> Image.Image:
        return self.images([i])[0]

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        """Decoded RGB images; a file that cannot be decoded is a one-line error naming it."""
        rows = self._undecoded.select([int(i) for i in indices])
        out = []
        for cell, image_id in zip(rows["image"], rows["image_id"], strict=True):
            path = cell.get("path")
            name = path if path and not cell.get("bytes") else f"{image_id!r} ({self.name} split)"
            fix = "fix or remove its rows" + (" in the caption file" if path else "")
            out.append(io.read_image(cell.get("bytes") or path, name, fix))
        return out


@dataclass
class ImageTextSet:
    """A dataset: named splits sharing one caption convention."""

    name: str
    train: ImageTextSplit
    val: ImageTextSplit
    test: ImageTextSplit

    def __post_init__(self) -> None:
        io.plain_name(self.name, "dataset.name")  # it names cache files and run folders

    def split(self, name: str) -> ImageTextSplit:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(
            "|".join(s.fingerprint for s in (self.train, self.val, self.test)).encode()
        ).hexdigest()[:16]


SIGNATURE_BYTES = 1 << 12


def file_signature(path: Path) -> str:
    """Identity of an image file for cache keys: name, size and a hash of its first and last
    4 KiB (headers and the end of the entropy-coded data). Content, not mtime, so a copied or
    re-synced dataset keeps its cache; 8 KiB per file keeps every run's start cheap on COCO's
    120k images (about 1 GB read instead of the 19 GB of whole files)."""
    size = path.stat().st_size
    digest = hashlib.sha1()
    with path.open("rb") as f:
        digest.update(f.read(SIGNATURE_BYTES))
        if size > 2 * SIGNATURE_BYTES:
            f.seek(-SIGNATURE_BYTES, 2)
            digest.update(f.read(SIGNATURE_BYTES))
        elif size > SIGNATURE_BYTES:
            digest.update(f.read())
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


def split_from_records(
    name: str,
    image_ids: Sequence[str],
    images: Sequence[str | Image.Image | dict],
    captions: Sequence[Sequence[str]],
    fingerprint_parts: Sequence[str] | None = None,
) -> ImageTextSplit:
    """Build a split from parallel lists (image paths, PIL images or `datasets.Image` records
    such as `{"path": None, "bytes": png}`; one caption list each).

    Raises a UserError naming the fix when a split is empty or an image has no caption.
    """
    if len(image_ids) == 0:
        raise UserError(
            f"split {name!r} is empty: check the dataset root and the split sizes in the "
            "dataset config"
        )
    for iid, caps in zip(image_ids, captions, strict=True):
        if not caps or any(not isinstance(c, str) or not c.strip() for c in caps):
            raise UserError(f"image {iid!r} in split {name!r} has an empty caption; fix the file")
    parts = fingerprint_parts or list(image_ids)
    digest = hashlib.sha1()
    for p in parts:
        digest.update(p.encode())
    image_fingerprint = digest.hexdigest()[:16]
    for caps in captions:
        digest.update("|".join(caps).encode())
    image_col = [str(im) if isinstance(im, Path) else im for im in images]
    rows = datasets.Dataset.from_dict(
        {"image": image_col, "image_id": list(image_ids), "captions": [list(c) for c in captions]},
        features=FEATURES,
    )
    return ImageTextSplit(
        rows=rows,
        name=name,
        fingerprint=digest.hexdigest()[:16],
        image_fingerprint=image_fingerprint,
    )


def check_images_exist(root: Path, files: Sequence[str]) -> list[Path]:
    """Resolve image files under root (none outside it: `io.confined`), failing on the first
    missing one with a fix."""
    paths = [io.confined(root, f, "image file") for f in files]
    for p in paths:
        if not p.is_file():
            raise UserError(
                f"image file {p} is missing: restore it, or point the dataset root elsewhere "
                "(dataset.root=... or the dataset's env var)"
            )
    return paths


def split_by_sorted_name(image_ids: Sequence[str], sizes: Sequence[int]) -> dict[str, list[int]]:
    """Indices of train/val/test by sorted image name: first sizes[0], next sizes[1], rest."""
    order = sorted(range(len(image_ids)), key=lambda i: image_ids[i])
    n_train, n_val = int(sizes[0]), int(sizes[1])
    n_test = (
        int(sizes[2]) if len(sizes) > 2 and sizes[2] is not None else len(order) - n_train - n_val
    )
    if n_train + n_val + n_test > len(order):
        raise UserError(
            f"split sizes {n_train}/{n_val}/{n_test} need {n_train + n_val + n_test} images but "
            f"the data has {len(order)}; lower dataset.split_sizes"
        )
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val : n_train + n_val + n_test],
    }
