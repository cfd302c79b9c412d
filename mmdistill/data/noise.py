"""Noisy correspondence: corrupt a fraction of the training pairs, once, from a fixed seed.

`noise=shuffle noise.ratio=eta` follows the noisy-correspondence retrieval protocol (NCR and
its successors on Flickr30K / COCO): a fraction eta of the *training images* is drawn with
`noise.seed`, and their caption lists are permuted among themselves so that every drawn image
ends up with another drawn image's captions (a single random cycle, so no drawn image keeps its
own captions and the corrupted fraction is exact). Whole caption lists move, so all captions of
a corrupted image are mismatched and the other images keep all of theirs; val and test stay
clean.

The corrupted-pair mask is returned with the data; the job writes it into the run folder
(`noise.safetensors`: `pair_clean` per training caption of the noisy split, `image_clean` per
training image, `caption_source` = whose captions each image now holds; `noise.json`: the
settings and counts) and hands it to the method, so methods that detect noisy pairs (MDW's
dual-track experts) are scored against it. The noisy training split gets a
new pair fingerprint, so expert buffers keyed by it never mix clean and noisy data; its images
and captions are the clean ones, so their cached features are shared with the clean split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from mmdistill import io
from mmdistill.data.base import ImageTextSet, ImageTextSplit
from mmdistill.data.settings import NOISES, Noise, ShuffleNoise
from mmdistill.errors import UserError
from mmdistill.settings import from_cfg

MASK_FILE = "noise.safetensors"
INFO_FILE = "noise.json"


@dataclass
class NoiseMask:
    """Which training pairs are corrupted (True = clean), in the noisy split's caption order."""

    pair_clean: Tensor  # [n_pairs] bool
    image_clean: Tensor  # [n_images] bool
    caption_source: Tensor  # [n_images] long: the image whose captions this image now holds
    info: dict


def apply_noise(data: ImageTextSet, cfg: DictConfig) -> tuple[ImageTextSet, NoiseMask | None]:
    """The dataset with its training pairs corrupted as `cfg` (the noise group) says, and the
    mask of what was corrupted (None for clean data); the job saves the mask in its run folder."""
    name = str(cfg.name)
    if name == "none":
        return data, None
    if name != "shuffle":
        raise UserError(f"unknown noise {name!r}; choose one of: {', '.join(NOISES)}")
    noise = from_cfg(Noise, cfg, "noise.")  # checked with the schema's messages
    seed = from_cfg(ShuffleNoise, cfg, "noise.").seed
    _check(data)
    train, mask = shuffle_captions(data.train, noise.ratio, seed)
    return ImageTextSet(name=data.name, train=train, val=data.val, test=data.test), mask


def _check(data: ImageTextSet) -> None:
    per_image = np.bincount(data.train.caption_image, minlength=data.train.n_images)
    if per_image.max() <= 1:
        raise UserError(
            f"noise=shuffle needs several captions per image (the noisy-correspondence protocol "
            f"shuffles caption lists of Flickr30K / COCO images), but {data.name}'s training split "
            "has one caption per image; use a dataset with several (or raise dataset.max_captions)"
        )


def shuffle_captions(
    split: ImageTextSplit, ratio: float, seed: int
) -> tuple[ImageTextSplit, NoiseMask]:
    """Give round(ratio * n_images) drawn images each other's captions (one random cycle)."""
    n = split.n_images
    k = int(round(ratio * n))
    if k == 1:
        raise UserError(
            f"noise.ratio={ratio} corrupts a single image of {n}, which has no other image to "
            "swap captions with; use noise.ratio=0 or at least 2 / n_images"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k]
    source = torch.arange(n)
    if k:
        # chosen[i] takes the captions of chosen[i+1]: a k-cycle, so no fixed point.
        source[chosen] = chosen.roll(-1)
    captions = split.rows["captions"]
    new_captions = [captions[int(s)] for s in source]
    image_clean = source == torch.arange(n)
    if k:
        rows = split.rows.remove_columns("captions").add_column("captions", new_captions)
        fingerprint = hashlib.sha1(
            f"{split.fingerprint}|shuffle|{ratio!r}|{seed}|".encode() + source.numpy().tobytes()
        ).hexdigest()[:16]
    else:  # nothing corrupted: the same data keeps sharing its caches
        rows, fingerprint = split.rows, split.fingerprint
    noisy = ImageTextSplit(rows, split.name, fingerprint, image_fingerprint=split.image_fingerprint)
    pair_clean = image_clean[torch.as_tensor(noisy.caption_image)]
    info = {
        "name": "shuffle",
        "ratio": ratio,
        "seed": seed,
        "images": n,
        "corrupted_images": k,
        "pairs": int(len(pair_clean)),
        "corrupted_pairs": int((~pair_clean).sum()),
        "clean_fingerprint": split.fingerprint,
        "noisy_fingerprint": fingerprint,
    }
    return noisy, NoiseMask(pair_clean, image_clean, source, info)


def save_mask(run_dir: Path, mask: NoiseMask) -> None:
    io.save_tensors(
        run_dir / MASK_FILE,
        {
            "pair_clean": mask.pair_clean.to(torch.uint8),
            "image_clean": mask.image_clean.to(torch.uint8),
            "caption_source": mask.caption_source.long(),
        },
    )
    io.write_json(run_dir / INFO_FILE, mask.info)


def load_mask(run_dir: Path) -> NoiseMask | None:
    """The run's corrupted-pair mask, or None when the run used clean data."""
    path = Path(run_dir) / MASK_FILE
    if not path.is_file():
        return None
    fix = "the run's noise mask is lost; run the job again in a new folder"
    t = io.load_tensors(path, fix=fix, need=("pair_clean", "image_clean", "caption_source"))
    return NoiseMask(
        pair_clean=t["pair_clean"].bool(),
        image_clean=t["image_clean"].bool(),
        caption_source=t["caption_source"],
        info=io.read_json(Path(run_dir) / INFO_FILE, fix=fix, kind=dict),
    )
