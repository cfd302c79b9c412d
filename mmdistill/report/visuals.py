"""`mmdistill export <run folder>`: what a distilled set looks like, as files a person can open.

* `grid.png`: the distilled images, de-normalised with the encoder's mean/std (pixel space).
  In feature space there are no pixels, so `grid_nearest.png` shows, row by row, the nearest
  real training images (cosine) of each synthetic image feature, and `grid_nearest.txt` names
  them with their similarity.
* `captions.txt`: the nearest real training caption of each synthetic text, by cosine between
  text features (feature space) or mean token embeddings (token space).
* `similarity.png`: the learned target similarity / correspondence matrix, when the set has one.

`set_entries` gives the same reading pair by pair (an image and its decoded caption), which the
report lays out as a captioned grid.

The distill job calls `export_run` at its end with what it already holds; the command rebuilds
the training split from the run's saved config (features come from the cache).
"""

from __future__ import annotations

import copy
import io as stdio
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from mmdistill import io
from mmdistill.config import run_config
from mmdistill.data import build_dataset
from mmdistill.data.base import ImageTextSplit
from mmdistill.data.noise import apply_noise
from mmdistill.errors import UserError
from mmdistill.models.encoders import CLIP_MEAN, CLIP_STD, Encoder
from mmdistill.models.factory import build_encoder
from mmdistill.models.student import is_image_features, is_text_features
from mmdistill.training.features import RealSplit, real_split
from mmdistill.training.pairs import PairSet

THUMB = 96  # pixels per nearest-image thumbnail
MIN_TILE = 64  # distilled images smaller than this are shown enlarged by an integer factor


def image_grid(images: Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """`[N,3,H,W]` values in [0,1] tiled row-major on a white canvas."""
    from torchvision.utils import make_grid

    canvas = make_grid(images.float(), nrow=nrow, padding=pad, pad_value=1.0)
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def denormalise(pixels: Tensor, encoder_cfg: DictConfig) -> Tensor:
    """Undo the encoder's Normalize(mean, std): back to [0,1] RGB."""
    mean = torch.tensor(list(encoder_cfg.get("image_mean") or CLIP_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(list(encoder_cfg.get("image_std") or CLIP_STD)).view(1, 3, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1)


def _thumb(image: Image.Image) -> Tensor:
    im = image.convert("RGB").resize((THUMB, THUMB), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) / 255.0


def nearest(queries: Tensor, keys: Tensor, k: int, block: int = 4096) -> tuple[Tensor, Tensor]:
    """Top-k cosine similarities and indices of each query among the keys (keys in blocks)."""
    q = F.normalize(queries.float().cpu(), dim=-1)
    best_s = torch.full((len(q), 0), -2.0)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for s in range(0, len(keys), block):
        sims = q @ F.normalize(keys[s : s + block].float().cpu(), dim=-1).T
        all_s = torch.cat([best_s, sims], dim=1)
        all_i = torch.cat([best_i, torch.arange(s, s + sims.shape[1]).expand(len(q), -1)], dim=1)
        top = all_s.topk(min(k, all_s.shape[1]), dim=1)
        best_s, best_i = top.values, all_i.gather(1, top.indices)
    return best_s, best_i


@torch.no_grad()
def text_vectors(texts: Tensor, mask: Tensor | None, encoder: Encoder | None) -> Tensor:
    """One vector per text: features as they are, token ids/embeddings as masked mean embedding."""
    if is_text_features(texts):
        return texts.float().cpu()
    if encoder is None:
        raise UserError("token-space texts need the encoder to embed them")
    trunk_device = next(encoder.text_trunk.parameters()).device
    out = []
    for s in range(0, len(texts), 1024):
        t = texts[s : s + 1024]
        if t.is_floating_point():
            emb = t.float().cpu()
        else:  # the trunk may sit on the GPU after encoding features
            emb = encoder.text_trunk.embed_tokens(t.to(trunk_device)).float().cpu()
        m = torch.ones(emb.shape[:2]) if mask is None else mask[s : s + 1024].float().cpu()
        out.append((emb * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out)


def real_train(
    cfg: DictConfig, run_dir: Path, device: str
) -> tuple[Encoder, RealSplit, ImageTextSplit]:
    """Rebuild the run's training split (noise included) the way the distill job read it."""
    data, _ = apply_noise(build_dataset(cfg.dataset), cfg.noise)
    encoder = build_encoder(cfg.encoder)
    train = real_split(encoder, data.split("train"), data.name, Path(cfg.paths.cache_dir), device)
    return encoder, train, data.split("train")


def export_run(
    run_dir: Path,
    cfg: DictConfig | None = None,
    pairs: PairSet | None = None,
    encoder: Encoder | None = None,
    train: RealSplit | None = None,
    train_images: ImageTextSplit | None = None,
    out: Path | None = None,
    max_images: int = 64,
    neighbours: int = 3,
    device: str = "cpu",
) -> list[Path]:
    """Write the image grid, nearest captions and similarity heat-map of a distill run folder."""
    run_dir = Path(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg if cfg is not None else run_config(run_dir)
    if pairs is None:
        if not (run_dir / "distilled.safetensors").is_file():
            raise UserError(
                f"{run_dir} holds no distilled.safetensors; export reads a distill run folder"
            )
        pairs = PairSet.load(
            run_dir / "distilled",
            fix="restore it from a copy, or distil again into a new run folder",
        )
    if max_images < 1:
        raise UserError(f"--max {max_images}: show at least one image")
    if train is None:
        encoder, train, train_images = real_train(cfg, run_dir, device)
    elif encoder is None and not is_text_features(pairs.texts):
        encoder = build_encoder(cfg.encoder)  # token-space texts are compared as embeddings
    written = []
    images = pairs.images[:max_images].detach().cpu()
    if not is_image_features(images):
        pixels = denormalise(images, cfg.encoder)
        scale = max(1, MIN_TILE // pixels.shape[-1])  # small images are enlarged, pixel for pixel
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        grid = image_grid(pixels, math.ceil(math.sqrt(len(pixels))))
        grid.save(out / "grid.png")
        written.append(out / "grid.png")
    else:
        written += _nearest_images(cfg, images, train, train_images, out, neighbours)
    written.append(_captions(pairs, train, encoder, out))
    if pairs.similarity is not None:
        written.append(_heatmap(pairs, out, max_images * 4))
    return written


def _nearest_images(
    cfg: DictConfig,
    features: Tensor,
    train: RealSplit,
    train_images: ImageTextSplit | None,
    out: Path,
    k: int,
) -> list[Path]:
    if train_images is None:
        train_images = build_dataset(cfg.dataset).split("train")
    sims, idx = nearest(features, train.images, k)
    tiles, lines = [], []
    ids = train_images.rows["image_id"]
    for i in range(len(features)):
        row = [int(j) for j in idx[i]]
        tiles += [_thumb(train_images.image(j)) for j in row]
        named = " ".join(f"{ids[j]}({s:.3f})" for j, s in zip(row, sims[i].tolist(), strict=True))
        lines.append(f"{i}\t{named}")
    grid = image_grid(torch.stack(tiles), idx.shape[1])
    grid.save(out / "grid_nearest.png")
    io.write_text(out / "grid_nearest.txt", "\n".join(lines) + "\n")
    return [out / "grid_nearest.png", out / "grid_nearest.txt"]


def nearest_captions(
    pairs: PairSet, train: RealSplit, encoder: Encoder | None, limit: int | None = None
) -> list[tuple[str, float]]:
    """Each synthetic text (the first `limit`) as its nearest real training caption, with the
    cosine similarity it was read at."""
    end = len(pairs) if limit is None else min(limit, len(pairs))
    mask = None if pairs.text_mask is None else pairs.text_mask[:end]
    syn = text_vectors(pairs.texts[:end], mask, encoder)
    real = text_vectors(train.texts, train.text_mask, encoder)
    sims, idx = nearest(syn, real, 1)
    return [(train.captions[int(idx[i, 0])], sims[i, 0].item()) for i in range(len(syn))]


def _captions(pairs: PairSet, train: RealSplit, encoder: Encoder | None, out: Path) -> Path:
    lines = [
        f"{i}\t{cos:.3f}\t{caption}"
        for i, (caption, cos) in enumerate(nearest_captions(pairs, train, encoder))
    ]
    io.write_text(out / "captions.txt", "\n".join(lines) + "\n")
    return out / "captions.txt"


@dataclass
class Entry:
    """One distilled pair as a person reads it: an image and the caption it decodes to."""

    image: Image.Image
    caption: str
    image_note: str  # how the image was read ("" for real pixels)
    caption_cos: float  # cosine to the nearest real caption (1.0: a real caption itself)


def set_entries(
    cfg: DictConfig,
    pairs: PairSet,
    encoder: Encoder | None,
    train: RealSplit,
    train_images: ImageTextSplit | None,
    limit: int,
) -> list[Entry]:
    """The first `limit` pairs: distilled pixels de-normalised (small images enlarged), or in
    feature space each feature's nearest real training image; captions decoded by nearest
    real caption."""
    if encoder is None and not is_text_features(pairs.texts):
        encoder = build_encoder(cfg.encoder)
    captions = nearest_captions(pairs, train, encoder, limit)
    images = pairs.images[: len(captions)].detach().cpu()
    if is_image_features(images):
        if train_images is None:
            train_images = build_dataset(cfg.dataset).split("train")
        sims, idx = nearest(images, train.images, 1)
        ids = train_images.rows["image_id"]
        tiles, notes = [], []
        for i in range(len(images)):
            j = int(idx[i, 0])
            tiles.append(train_images.image(j).convert("RGB"))
            notes.append(f"nearest real image {ids[j]} (cos {sims[i, 0].item():.2f})")
    else:
        pixels = denormalise(images, cfg.encoder)
        scale = max(1, MIN_TILE // pixels.shape[-1])
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        array = (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        tiles, notes = [Image.fromarray(a) for a in array], [""] * len(images)
    return [
        Entry(tile, caption, note, cos)
        for tile, note, (caption, cos) in zip(tiles, notes, captions, strict=True)
    ]


@torch.no_grad()
def _heatmap(pairs: PairSet, out: Path, limit: int) -> Path:
    (out / "similarity.png").write_bytes(heatmap_png(pairs, limit))
    return out / "similarity.png"


@torch.no_grad()
def heatmap_png(pairs: PairSet, limit: int) -> bytes:
    """The learned target similarity / correspondence matrix (first `limit` pairs) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(pairs), limit)
    sim = copy.deepcopy(pairs.similarity).cpu()  # leave the caller's module where it is
    matrix = sim(torch.arange(n)).float().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    bound = float(abs(matrix).max()) or 1.0
    shown = ax.imshow(matrix, cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    kind = pairs.similarity_args.get("kind", "learned")
    ax.set_title(f"{kind} target similarity, pairs 0-{n - 1} of {len(pairs)}")
    ax.set_xlabel("text")
    ax.set_ylabel("image")
    fig.tight_layout()
    buffer = stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
