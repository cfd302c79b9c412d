"""The settings of the data floor's units: the label noise and each dataset reader.

Light on purpose (no torch, no image or hub libraries): the schema reads these rules before
every job, and `mmdistill/data/__init__.py` imports the readers only when they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mmdistill.errors import UserError
from mmdistill.settings import (
    BOOL,
    COUNT,
    FRACTION,
    MAX_CAPTIONS,
    MAYBE_TEXT,
    TEXT,
    Choice,
    Int,
    NoKeys,
    Rule,
    check_value,
    register,
    setting,
    settings,
    shown,
)

# The label noises (data/noise.py applies them).
NOISES = ("none", "shuffle")


@register("noise.")
@settings
class Noise:
    """Which label noise corrupts the training pairs, and how many of them."""

    name: str = setting(Choice(*NOISES))
    ratio: float = setting(FRACTION)


register("noise.", "noise.name", "none")(NoKeys)


@register("noise.", "noise.name", "shuffle")
@settings
class ShuffleNoise:
    """Shuffled captions: the seed of the shuffle."""

    seed: int = setting(Int(0))


def _split_sizes(last_may_be_null: bool) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, list) or len(value) not in ((2, 3) if last_may_be_null else (3,)):
            raise UserError(
                f"{key}={shown(value)} must be [train, val, test] image counts, e.g. "
                f"{key}=[700,100,200]"
            )
        for i, size in enumerate(value):
            if size is None and last_may_be_null and i == 2:
                continue
            check_value(f"{key}[{i}]", Int(0), size)

    return check


def _hf_splits(key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or set(value) - {"train", "val", "test"}:
        raise UserError(
            f"{key} must map train/val/test to hub split names, e.g. {key}.val=validation"
        )
    for name, split in value.items():
        check_value(f"{key}.{name}", TEXT, split)


OPTIONAL_TEXT = Rule("str", null=True, optional=True)


@register("dataset.")
@settings
class Dataset:
    """What every dataset config names: its label and the reader that reads it."""

    name: str = setting(TEXT)


@register("dataset.", "dataset.reader", "shapes")
@settings
class Shapes:
    """The built-in synthetic shapes set."""

    seed: int = setting(Int(0))
    image_size: int = setting(Int(8))
    captions_per_image: int = setting(COUNT)
    split_sizes: list = setting(Rule("custom", custom=_split_sizes(False)))


@register("dataset.", "dataset.reader", "flickr8k")
@settings
class Flickr8k:
    """Flickr8k's captions file and image folder."""

    root: str | None = setting(MAYBE_TEXT)
    captions_file: str = setting(TEXT)
    image_dir: str = setting(TEXT)
    split_sizes: list = setting(Rule("custom", custom=_split_sizes(True)))
    max_captions: int | None = setting(MAX_CAPTIONS)
    max_images: int | None = setting(MAX_CAPTIONS)


@register("dataset.", "dataset.reader", "karpathy")
@settings
class Karpathy:
    """A Karpathy-split annotation file (Flickr30K, COCO)."""

    annotations: str = setting(TEXT)
    image_root: str = setting(TEXT)
    restval_to_train: bool = setting(BOOL)
    max_captions: int | None = setting(MAX_CAPTIONS)
    max_images: int | None = setting(MAX_CAPTIONS)


@register("dataset.", "dataset.reader", "coco")
@settings
class Coco:
    """COCO's official annotation files and image folders."""

    train_annotations: str = setting(TEXT)
    val_annotations: str = setting(TEXT)
    train_images: str = setting(TEXT)
    val_images: str = setting(TEXT)
    test_annotations: str | None = setting(OPTIONAL_TEXT)
    test_images: str | None = setting(OPTIONAL_TEXT)
    test_size: int = setting(COUNT)
    max_captions: int | None = setting(MAX_CAPTIONS)
    max_images: int | None = setting(MAX_CAPTIONS)


@register("dataset.", "dataset.reader", "hf")
@settings
class HubDataset:
    """A Hugging Face hub (or saved) dataset and the columns that hold pairs."""

    path: str = setting(TEXT)
    config_name: str | None = setting(MAYBE_TEXT)
    from_disk: bool = setting(BOOL)
    image_column: str = setting(TEXT)
    caption_column: str = setting(TEXT)
    image_id_column: str | None = setting(MAYBE_TEXT)
    splits: dict = setting(Rule("custom", custom=_hf_splits))
    revision: str | None = setting(OPTIONAL_TEXT)
    data_dir: str | None = setting(OPTIONAL_TEXT)
    data_files: Any = setting(Rule("any", optional=True))
    max_captions: int | None = setting(MAX_CAPTIONS)
    max_images: int | None = setting(MAX_CAPTIONS)
