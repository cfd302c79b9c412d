"""Cross-architecture evaluation: a pair set distilled for one encoder, put into another's spaces.

A saved set lives in its source encoder's spaces: pixels normalised for its image trunk, or
its frozen trunks' features; texts as its trunk's features, token ids or token embeddings.
Another encoder's students can read it only after conversion, one modality at a time:

* pixels are re-read: de-normalised with the source's rule, resized when the sizes differ
  and `transfer.resize` allows it, normalised with the target's rule (and run through the
  target's frozen image trunk when its students train on features);
* image features are decoded: each synthetic row becomes its nearest real training image
  (cosine, in the source trunk's feature space), encoded by the target;
* texts are kept when both text trunks give the same features for every real training
  caption (the same frozen trunk), and otherwise (or with `transfer.texts=decode`) decoded to
  their nearest real training captions (cosine, in the source text trunk's space) and
  re-encoded by the target.

A set whose images were decoded is a "decoded coreset" (real images, not the synthetic ones);
the `transfer` record saved with the results says what was done to each modality. A learned
target similarity (LoRS's S, MDW's P) travels with the pairs, whose order is kept; learned
step sizes were learned for the source's students and are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor

from mmdistill.data.base import ImageTextSplit
from mmdistill.data.images import PixelRule
from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.models.factory import build_encoder
from mmdistill.models.student import is_image_features, is_text_features
from mmdistill.training.features import RealSplit, real_split
from mmdistill.training.pairs import PairSet
from mmdistill.training.settings import TRANSFER_RESIZE, TRANSFER_TEXTS

BATCH = 256


def crosses(pairs: PairSet, target: Encoder) -> bool:
    """Whether the set was made for another encoder than `target` (sets that do not record
    one are read as they are)."""
    made_for = pairs.meta.get("encoder")
    return made_for is not None and made_for != target.name


def title(pairs: PairSet) -> str:
    """What a converted set's recall table should say about it ("" for an unconverted one)."""
    record = pairs.meta.get("transfer")
    if not record:
        return ""
    what = (
        f"decoded coreset ({record['distinct_images']} distinct real images)"
        if record["decoded_coreset"]
        else "images re-read"
    )
    texts = "texts kept" if record["texts"].startswith("kept") else "texts decoded"
    return f" · {record['source_encoder']} → {record['target_encoder']}: {what}, {texts}"


def nearest_rows(queries: Tensor, real: Tensor) -> Tensor:
    """The index of each query's nearest real row by cosine similarity (ties: the lowest)."""
    q = F.normalize(queries.float(), dim=-1)
    r = F.normalize(real.float(), dim=-1)
    return torch.cat([(q[s : s + BATCH] @ r.T).argmax(dim=1) for s in range(0, len(q), BATCH)])


def same_space(a: Tensor, b: Tensor) -> bool:
    """Whether two encoders' features of the same real rows agree: the same frozen trunk."""
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=1e-5))


@torch.no_grad()
def text_features(encoder: Encoder, texts: Tensor, mask: Tensor | None) -> Tensor:
    """Texts in the encoder's frozen text-trunk feature space: features as they are, token
    ids or token embeddings read by its text trunk."""
    if is_text_features(texts):
        return texts
    mask = torch.ones(texts.shape[:2], dtype=torch.long) if mask is None else mask
    trunk = encoder.text_trunk
    return torch.cat(
        [trunk(texts[s : s + BATCH], mask[s : s + BATCH]) for s in range(0, len(texts), BATCH)]
    )


def repixel(images: Tensor, source: PixelRule, target: PixelRule, resize: str | None) -> Tensor:
    """Normalised pixels of one image rule as another's: de-normalise, resize (only when
    `resize` names a mode), normalise. Values outside [0, 1] (synthetic pixels) are kept."""

    def channels(values: tuple[float, ...]) -> Tensor:
        return torch.tensor(values, dtype=images.dtype).view(1, -1, 1, 1)

    raw = images * channels(source.std) + channels(source.mean)
    size = images.shape[-1]
    if size != target.size or images.shape[-2] != target.size:
        if resize is None:
            raise UserError(
                f"the distilled images are {images.shape[-2]}x{size} px but the target encoder "
                f"reads {target.size} px; add transfer.resize=bicubic (or bilinear) to resize "
                "them, or evaluate with the encoder the set was distilled for"
            )
        if resize not in TRANSFER_RESIZE:
            raise UserError(f"transfer.resize={resize!r}: choose {' or '.join(TRANSFER_RESIZE)}")
        raw = F.interpolate(
            raw, size=(target.size, target.size), mode=resize, align_corners=False, antialias=True
        )
    return (raw - channels(target.mean)) / channels(target.std)


@torch.no_grad()
def _encode_pixels(encoder: Encoder, pixels: Tensor, device: str) -> Tensor:
    trunk = encoder.image_trunk.to(device)
    return torch.cat(
        [
            trunk(pixels[s : s + BATCH // 4].to(device)).float().cpu()
            for s in range(0, len(pixels), BATCH // 4)
        ]
    )


def _images(
    pairs: PairSet,
    source: Encoder,
    target: Encoder,
    source_train: RealSplit,
    target_train: RealSplit,
    resize: str | None,
    device: str,
) -> tuple[Tensor, dict[str, Any]]:
    """The set's images in the target's image space, and how they got there."""
    if not is_image_features(pairs.images):
        pixels = repixel(pairs.images.float(), source.pixels, target.pixels, resize)
        size = f"{pairs.images.shape[-1]} px"
        if pixels.shape[-1] != pairs.images.shape[-1]:
            size += f" resized to {pixels.shape[-1]} px ({resize})"
        how = f"re-read: the set's pixels ({size}) normalised for the target"
        if target.image_space == "feature":
            how += ", encoded by its image trunk"
            return _encode_pixels(target, pixels, device), {"images": how}
        return pixels, {"images": how}
    if isinstance(target_train.images, Tensor) and same_space(
        source_train.images, target_train.images
    ):
        return pairs.images, {"images": "kept: both image trunks give the same real features"}
    rows = nearest_rows(pairs.images, source_train.images)
    record = {
        "images": "decoded: nearest real training image (cosine, source image features), "
        "encoded by the target",
        "distinct_images": int(rows.unique().numel()),
    }
    return target_train.images[rows], record


def _texts(
    pairs: PairSet, source: Encoder, source_train: RealSplit, target_train: RealSplit, mode: str
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """The set's texts in the target's text space (with their mask), and how. `mode` "decode"
    decodes them even where they could be kept (a set of real pairs throughout)."""
    real = text_features(source, source_train.texts, source_train.text_mask)
    shared = is_text_features(target_train.texts) and same_space(real, target_train.texts)
    if is_text_features(pairs.texts) and shared and mode == "auto":
        how = "kept: both text trunks give the same features for every real training caption"
        return pairs.texts, pairs.text_mask, {"texts": how}
    rows = nearest_rows(text_features(source, pairs.texts, pairs.text_mask), real)
    mask = None if target_train.text_mask is None else target_train.text_mask[rows]
    record = {
        "texts": "decoded: nearest real training caption (cosine, source text features), "
        "re-encoded by the target",
        "distinct_captions": int(rows.unique().numel()),
    }
    return target_train.texts[rows], mask, record


def convert(
    pairs: PairSet,
    source: Encoder,
    target: Encoder,
    source_train: RealSplit,
    target_train: RealSplit,
    resize: str | None = None,
    texts: str = "auto",
    device: str = "cpu",
) -> PairSet:
    """The set in the target encoder's spaces; `source_train` and `target_train` are the same
    real training split as each encoder reads it. `texts` is `transfer.texts` (auto: keep
    them where both text trunks agree; decode). `meta["transfer"]` records what was done."""
    if texts not in TRANSFER_TEXTS:
        raise UserError(f"transfer.texts={texts!r}: choose {' or '.join(TRANSFER_TEXTS)}")
    images, image_record = _images(
        pairs, source, target, source_train, target_train, resize, device
    )
    converted, mask, text_record = _texts(pairs, source, source_train, target_train, texts)
    record: dict[str, Any] = {
        "source_encoder": source.name,
        "target_encoder": target.name,
        "budget": pairs.meta.get("budget"),  # the source's budget: its table column
        **image_record,
        **text_record,
        "decoded_coreset": image_record["images"].startswith("decoded"),
        "texts_mode": texts,
        "similarity": "kept (the learned target similarity travels with the pairs)"
        if pairs.similarity is not None
        else None,
        "step_sizes": "dropped (learned for the source's students; the target's protocol)"
        if pairs.step_sizes
        else None,
    }
    return PairSet(
        images=images,
        texts=converted,
        text_mask=mask,
        image_index=pairs.image_index,
        similarity=pairs.similarity,
        similarity_args=dict(pairs.similarity_args),
        loss=pairs.loss,
        meta={**pairs.meta, "encoder": target.name, "transfer": record},
    )


def from_run(
    pairs: PairSet,
    made: DictConfig,
    source_run: Path,
    target: Encoder,
    target_train: RealSplit,
    train: ImageTextSplit,
    dataset: str,
    eval_cfg: DictConfig,
    resize: str | None,
    texts: str,
    cache_dir: Path,
    device: str,
    progress: Progress | None = None,
    workers: int | str = "auto",
) -> PairSet:
    """`evaluate source=<run> encoder=<other>`: rebuild the encoder of `made` (the config the
    set was distilled with, from its run folder or its export), read the training split with it
    (cached features), and convert the set for `target`."""
    made_on = str(made.dataset.name)
    if made_on != dataset:
        raise UserError(
            f"the set in {source_run} was distilled on {made_on}; evaluating it with another "
            f"encoder decodes it against {made_on}'s training pairs, so use dataset={made_on}"
        )
    if str(eval_cfg.lr).startswith("learned"):
        raise UserError(
            f"eval.lr={eval_cfg.lr} uses step sizes learned for {made.encoder.name}'s students; "
            f"give {target.name} a number (the default is its own recipe's)"
        )
    source = build_encoder(made.encoder)
    source_train = real_split(
        source, train, dataset, cache_dir, device, progress=progress, workers=workers
    )
    return convert(pairs, source, target, source_train, target_train, resize, texts, device)
