"""Real splits in the space the encoder's students read, with a feature cache.

Frozen trunks are run once per (images or captions, trunk, preprocessing) and their outputs
stored as safetensors; a second run loads them instead of re-encoding. Images are keyed by the
split's image fingerprint, captions by their content (the sorted set of distinct captions), so
a split whose captions were only reassigned (noise=shuffle) reuses the clean split's features.
Trainable trunks get token ids and a `PixelStore` instead: pixels read by rows from the
decoded-image cache (`mmdistill.data.images`), never held whole. Both the store and the frozen
image trunk stream through that cache, so images are decoded once per split and size.
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
from mmdistill.data.images import ImageCache, PixelStore
from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.training.pairs import PairSet

log = logging.getLogger(__name__)
# Bumped when the way features are computed changes, so stale caches are never read.
CACHE_VERSION = 2


@dataclass
class RealSplit:
    """A split's images (one row per image) and captions (one row per caption): features or
    token ids as tensors, pixels as a `PixelStore` that indexes like one."""

    name: str
    images: Tensor | PixelStore
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


# Encoder keys added after caches were first keyed: at these values they change nothing that
# was computed before they existed, so they are left out of keys and old caches still match.
NEUTRAL_DEFAULTS = {"augment": False, "tokenizer": None}
# Per-encoder defaults of the methods' own lengths and step sizes added since: they never reach
# a trunk, an expert or a student, so caches do not depend on them (covmatch_lr predates the
# pinned keys and stays in them, so existing caches still match).
METHOD_TUNING = ("covmatch_steps", "trajectory_lr")


def encoder_identity(encoder: Encoder) -> dict:
    """The encoder's config as cache keys hash it (keys at a neutral default left out)."""
    cfg = OmegaConf.to_container(encoder.cfg, resolve=True)
    for k, default in NEUTRAL_DEFAULTS.items():
        if k in cfg and cfg[k] == default:
            del cfg[k]
    for k in METHOD_TUNING:
        cfg.pop(k, None)
    return cfg


def trunk_key(encoder: Encoder, which: str) -> str:
    """Identity of a frozen trunk + its preprocessing, ignoring heads and training flags (and
    train-time augmentation, which never reaches a frozen trunk)."""
    cfg = encoder_identity(encoder)
    for k in ("head", "temperature", "train_image_trunk", "train_text_trunk", "lora", "augment"):
        cfg.pop(k, None)
    blob = f"v{CACHE_VERSION}:{which}:{sorted(cfg.items())}"
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], Tensor], rows: int) -> Tensor:
    """The cache entry at `path`, or `compute()` saved there. A damaged entry (unreadable,
    not `rows` finite feature rows) is rebuilt with one warning line, so it never blocks. The
    entry's lock is held while it is computed: a second run needing it waits and loads it."""
    found = _usable(path, rows, warn=False)
    if found is not None:
        return found
    with io.entry_lock(path):
        found = _usable(path, rows, warn=True)
        if found is not None:
            return found
        x = compute()
        io.save_tensors(path, {"x": x})
    return x


def _usable(path: Path, rows: int, warn: bool) -> Tensor | None:
    """The entry when it exists and holds `rows` finite feature rows; None otherwise (with a
    warning when `warn` and it was there but damaged)."""
    if not path.is_file():
        return None
    try:
        x = io.load_tensors(path, fix="rebuilding it", need=("x",))["x"]
        if x.dim() != 2 or x.shape[0] != rows or not bool(torch.isfinite(x).all()):
            why = f"{list(x.shape)} features, or not finite, for {rows} rows"
            raise io.damaged(path, why, "rebuilding it")
        return x
    except UserError as err:
        if warn:
            log.warning("feature cache: %s", err)
    return None


def _task(progress: Progress | None, label: str, total: int) -> Callable[[int], None] | None:
    """A progress bar row, as a callback that advances it by a batch."""
    if progress is None:
        return None
    task = progress.add_task(label, total=total)
    return lambda done: progress.advance(task, done)


def _encode_images(
    cache: ImageCache, encoder: Encoder, device: str, batch: int, progress
) -> Tensor:
    """Frozen-trunk features of every image, streamed in batches from the image cache (decoded
    into it on the way when it is missing); each batch is normalised on the CPU exactly as the
    per-image transform does, so the features do not depend on where the pixels came from."""
    # channels_last about halves a conv trunk's CPU time; the features agree to float rounding.
    trunk = encoder.image_trunk.to(device, memory_format=torch.channels_last)
    advance = _task(progress, f"encode {cache.split.name} images", cache.split.n_images)
    out = []
    for pixels in cache.batches(batch, advance):
        px = encoder.pixels.normalise(pixels).to(device)
        with torch.no_grad():
            out.append(trunk(px.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)


def _pixel_store(cache: ImageCache, progress: Progress | None) -> PixelStore:
    """The split's pixels, decoding the images into the cache first when needed."""
    cache.build(_task(progress, f"{cache.split.name} images", cache.split.n_images))
    return cache.store()


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
    workers: int | str = "auto",
) -> RealSplit:
    """One split: cached frozen-trunk features, or a pixel store; caption features or token
    ids. `workers` decode images into the image cache when it is built."""
    cache_dir = Path(cache_dir).expanduser()
    io.plain_name(dataset_name, "dataset.name")  # it names the cache's files
    for folder in (cache_dir, cache_dir / "images"):  # entries a killed run was writing
        io.remove_stale_partials(folder)
    images_cache = ImageCache(split, encoder.pixels, cache_dir, dataset_name, workers)
    images: Tensor | PixelStore
    if encoder.image_space == "feature":
        stem = f"{dataset_name}-{split.name}-{split.image_fingerprint}"
        path = cache_dir / f"{stem}-image-{trunk_key(encoder, 'image')}.safetensors"
        images = _cached(
            path,
            lambda: _encode_images(images_cache, encoder, device, batch, progress),
            split.n_images,
        )
    else:
        images = _pixel_store(images_cache, progress)
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
