"""Real splits as tensors, in the space the encoder's students read, with a feature cache.

Frozen trunks are run once per (images or captions, trunk, preprocessing) and their outputs
stored as safetensors; a second run loads them instead of re-encoding. Images are keyed by the
split's image fingerprint, captions by their content (the sorted set of distinct captions), so
a split whose captions were only reassigned (noise=shuffle) reuses the clean split's features.
Trainable trunks get pixels and token ids instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.progress import Progress
from torch import Tensor

from mmdistill import io
from mmdistill.data.base import ImageTextSplit
from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.training.pairs import PairSet

log = logging.getLogger(__name__)
# Bumped when the way features are computed changes, so stale caches are never read.
CACHE_VERSION = 2


@dataclass
class RealSplit:
    """A split's images (one row per image) and captions (one row per caption) as tensors."""

    name: str
    images: Tensor
    texts: Tensor
    text_mask: Tensor | None
    caption_image: Tensor
    captions: list[str]

    @property
    def n_pairs(self) -> int:
        return self.texts.shape[0]

    def pairset(self, idx: Tensor | None = None) -> PairSet:
        """All pairs (sharing image rows), or the selected pairs as a standalone set."""
        if idx is None:
            return PairSet(
                images=self.images,
                texts=self.texts,
                text_mask=self.text_mask,
                image_index=self.caption_image,
                meta={"source": "real", "pairs": self.n_pairs},
            )
        idx = idx.long()
        return PairSet(
            images=self.images[self.caption_image[idx]].clone(),
            texts=self.texts[idx].clone(),
            text_mask=None if self.text_mask is None else self.text_mask[idx].clone(),
            meta={"source_pairs": idx.tolist()},
        )


def trunk_key(encoder: Encoder, which: str) -> str:
    """Identity of a frozen trunk + its preprocessing, ignoring heads and training flags."""
    cfg = OmegaConf.to_container(encoder.cfg, resolve=True)
    for k in ("head", "temperature", "train_image_trunk", "train_text_trunk", "lora"):
        cfg.pop(k, None)
    blob = f"v{CACHE_VERSION}:{which}:{sorted(cfg.items())}"
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], Tensor], rows: int) -> Tensor:
    """The cache entry at `path`, or `compute()` saved there. A damaged entry (unreadable,
    not `rows` finite feature rows) is rebuilt with one warning line, so it never blocks."""
    if path.is_file():
        try:
            x = io.load_tensors(path, fix="rebuilding it", need=("x",))["x"]
            if x.dim() != 2 or x.shape[0] != rows or not bool(torch.isfinite(x).all()):
                why = f"{list(x.shape)} features, or not finite, for {rows} rows"
                raise io.damaged(path, why, "rebuilding it")
            return x
        except UserError as err:
            log.warning("feature cache: %s", err)
    x = compute()
    io.save_tensors(path, {"x": x})
    return x


def _pixels(
    encoder: Encoder, split: ImageTextSplit, batch: int, progress: Progress | None
) -> Tensor:
    out = []
    task = progress.add_task(f"{split.name} images", total=split.n_images) if progress else None
    for s in range(0, split.n_images, batch):
        idx = range(s, min(s + batch, split.n_images))
        out.append(torch.stack([encoder.preprocess(im) for im in split.images(idx)]))
        if progress:
            progress.advance(task, len(idx))
    return torch.cat(out)


def _encode_images(
    encoder: Encoder, split: ImageTextSplit, device: str, batch: int, progress
) -> Tensor:
    # channels_last about halves a conv trunk's CPU time; the features agree to float rounding.
    trunk = encoder.image_trunk.to(device, memory_format=torch.channels_last)
    out = []
    task = (
        progress.add_task(f"encode {split.name} images", total=split.n_images) if progress else None
    )
    for s in range(0, split.n_images, batch):
        idx = range(s, min(s + batch, split.n_images))
        px = torch.stack([encoder.preprocess(im) for im in split.images(idx)]).to(device)
        with torch.no_grad():
            out.append(trunk(px.contiguous(memory_format=torch.channels_last)).float().cpu())
        if progress:
            progress.advance(task, len(idx))
    return torch.cat(out)


def _encode_texts(
    encoder: Encoder, name: str, captions: list[str], device: str, batch: int, progress
) -> Tensor:
    """Captions in batches of similar length, each cut to its longest caption: the padding a
    fixed context length adds is masked out anyway, and skipping it is about 2x faster."""
    trunk = encoder.text_trunk.to(device)
    tokens = encoder.tokenize(captions)
    lengths = tokens.mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.empty(len(captions), trunk.out_dim)
    task = progress.add_task(f"encode {name} captions", total=len(captions)) if progress else None
    for s in range(0, len(captions), batch):
        rows = order[s : s + batch]
        width = max(int(lengths[rows].max()), 1)
        ids, mask = tokens.ids[rows, :width].to(device), tokens.mask[rows, :width].to(device)
        with torch.no_grad():
            out[rows] = trunk(ids, mask).float().cpu()
        if progress:
            progress.advance(task, len(rows))
    return out


def real_split(
    encoder: Encoder,
    split: ImageTextSplit,
    dataset_name: str,
    cache_dir: Path,
    device: str = "cpu",
    batch: int = 64,
    progress: Progress | None = None,
) -> RealSplit:
    """Tensors for one split: cached frozen-trunk features, or pixels / token ids."""
    cache_dir = Path(cache_dir).expanduser()
    if encoder.image_space == "feature":
        stem = f"{dataset_name}-{split.name}-{split.image_fingerprint}"
        path = cache_dir / f"{stem}-image-{trunk_key(encoder, 'image')}.safetensors"
        images = _cached(
            path, lambda: _encode_images(encoder, split, device, batch, progress), split.n_images
        )
    else:
        images = _pixels(encoder, split, 256, progress)
    mask = None
    if encoder.text_space == "feature":
        distinct = sorted(set(split.captions))
        row = {c: i for i, c in enumerate(distinct)}
        key = hashlib.sha1("\n".join(distinct).encode()).hexdigest()[:16]
        name = f"{dataset_name}-captions-{key}-text-{trunk_key(encoder, 'text')}.safetensors"
        encoded = _cached(
            cache_dir / name,
            lambda: _encode_texts(encoder, split.name, distinct, device, 4 * batch, progress),
            len(distinct),
        )
        texts = encoded[torch.as_tensor([row[c] for c in split.captions], dtype=torch.long)]
    else:
        tok = encoder.tokenize(split.captions)
        texts, mask = tok.ids, tok.mask
    encoder.note_feature_dims(
        image=images.shape[1] if encoder.image_space == "feature" else None,
        text=texts.shape[1] if encoder.text_space == "feature" else None,
    )
    return RealSplit(
        name=split.name,
        images=images,
        texts=texts,
        text_mask=mask,
        caption_image=torch.as_tensor(split.caption_image),
        captions=list(split.captions),
    )
