"""Readers for real image-text data: each turns one on-disk or hub format into an ImageTextSet.

Every reader validates its input up front and raises a one-line `UserError` naming the fix,
so a wrong path fails before any model is built. Image names read from data files are
confined to their image folder (`io.confined`): an absolute name or one that climbs out with
`..` is refused, naming the row. The set's name comes from `cfg.name`, as in
every `conf/dataset/*.yaml` (default: the data's usual name); the `hf` reader therefore takes the
hub's dataset config from `cfg.config_name`. Captions are stripped; an empty caption is a
malformed row, not something to skip silently, because it would shift the caption -> image
index that retrieval metrics rely on.
"""

from __future__ import annotations

import csv
import hashlib
import io as stdio
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig, OmegaConf

from mmdistill import io
from mmdistill.data.base import (
    FEATURES,
    SPLITS,
    ImageTextSet,
    ImageTextSplit,
    check_images_exist,
    file_signature,
    split_by_sorted_name,
    split_from_records,
)
from mmdistill.data.shapes import read_shapes
from mmdistill.errors import UserError
from mmdistill.registry import Registry

FLICKR8K_ENV = "MMDISTILL_FLICKR8K"
DEFAULT_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


# --------------------------------------------------------------------------- config helpers


def _opt(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """A config value, or `default` when the key is absent, `???` or null."""
    value = cfg.get(key, default)
    return default if value is None else value


def _required(cfg: DictConfig, key: str, reader: str, hint: str) -> Any:
    """A mandatory config value; the error says which override sets it."""
    value = cfg.get(key, None)
    if value is None or value == "":
        raise UserError(f"the {reader} reader needs dataset.{key}: set dataset.{key}={hint}")
    return value


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def _max_images(cfg: DictConfig) -> int | None:
    """Per-split image cap for quick runs; None keeps everything."""
    value = cfg.get("max_images", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"dataset.max_images must be a positive integer or null, got {value!r}")
    return value


def _max_captions(cfg: DictConfig) -> int | None:
    """Captions kept per image (papers use 5); null keeps all."""
    value = cfg.get("max_captions", 5)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"dataset.max_captions must be a positive integer or null, got {value!r}")
    return value


def _clean_caption(raw: Any, where: str) -> str:
    """Strip a caption; empty or non-text captions are malformed rows."""
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{where} has an empty or non-text caption ({raw!r}); fix or drop that row")
    return raw.strip()


def _image_name(name: str, where: str) -> str:
    """An image file name from a data row, refused when it would leave the image folder."""
    io.confined(Path("the image folder"), name, f"{where} image")
    return name


def _cap(captions: list[str], limit: int | None) -> list[str]:
    return captions if limit is None else captions[:limit]


def _load_json(path: Path, what: str, key: str) -> Any:
    """Parse a JSON annotation file; a missing or broken file names the config key to fix."""
    if not path.is_file():
        raise UserError(f"{what} file {path} not found: set dataset.{key}=/path/to/{path.name}")
    return io.read_json(path, fix=f"re-download the {what} file or fix dataset.{key}")


def _field(entry: Any, key: str, where: str) -> Any:
    """One field of a JSON record, with a precise error instead of a KeyError."""
    if not isinstance(entry, Mapping) or key not in entry:
        raise UserError(f"{where} has no {key!r} field; is this the right annotation file?")
    return entry[key]


def _image_dir(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist: fix dataset.{key}=...")
    return path


def _file_split(
    name: str,
    root: Path,
    files: Sequence[str],
    captions: Sequence[list[str]],
) -> ImageTextSplit:
    """A split of image files under root; file signatures key the feature cache."""
    paths = check_images_exist(root, files)
    return split_from_records(
        name,
        image_ids=list(files),
        images=[str(p) for p in paths],
        captions=captions,
        fingerprint_parts=[f"{f}:{file_signature(p)}" for f, p in zip(files, paths, strict=True)],
    )


def _truncate(indices: Sequence[int], limit: int | None) -> list[int]:
    return list(indices) if limit is None else list(indices[:limit])


# --------------------------------------------------------------------------- flickr8k


def _flickr8k_root(cfg: DictConfig) -> Path:
    """cfg.root, falling back to the env var, so one machine-wide setting serves every run."""
    value = cfg.get("root", None) or os.environ.get(FLICKR8K_ENV)
    if not value:
        raise UserError(
            f"no flickr8k root folder given: set {FLICKR8K_ENV}=/path/to/flickr8k or "
            "dataset.root=/path/to/flickr8k"
        )
    root = _path(value)
    if not root.is_dir():
        raise UserError(
            f"flickr8k root folder {root} does not exist: set {FLICKR8K_ENV}=/path/to/flickr8k "
            "or dataset.root=/path/to/flickr8k"
        )
    return root


def read_caption_csv(path: Path, max_captions: int | None = None) -> dict[str, list[str]]:
    """Captions per image from an `image,caption` CSV, in file order.

    Uses the csv module because captions contain commas and quoted fields.
    """
    if not path.is_file():
        raise UserError(
            f"captions file {path} not found: put the `image,caption` CSV there or set "
            "dataset.captions_file=..."
        )
    text = io.read_text(path, fix="re-save it as UTF-8 or fix that line", encoding="utf-8-sig")
    if "\0" in text:  # binary junk; some Python versions' csv would pass it on as caption text
        line = text[: text.index("\0")].count("\n") + 1
        raise UserError(f"captions file {path} line {line} holds a NUL byte; fix that line")
    groups: dict[str, list[str]] = {}
    reader = csv.reader(stdio.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"captions file {path} is empty; it needs an `image,caption` header")
        names = [h.strip() for h in header]
        if "image" not in names or "caption" not in names:
            raise UserError(
                f"captions file {path} needs columns `image` and `caption`, found "
                f"{', '.join(repr(n) for n in names)}; fix its header row"
            )
        i_img, i_cap = names.index("image"), names.index("caption")
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            where = f"{path.name} line {reader.line_num}"
            if len(row) <= max(i_img, i_cap):
                raise UserError(f"{where} has {len(row)} fields, expected {len(names)}; fix it")
            image = row[i_img].strip()
            if not image:
                raise UserError(f"{where} has no image file name; fix or drop that row")
            _image_name(image, where)
            groups.setdefault(image, []).append(_clean_caption(row[i_cap], where))
    except csv.Error as err:  # a field past the size limit, a stray quote
        raise UserError(
            f"captions file {path} line {reader.line_num} is not a CSV row ({err}); fix it"
        ) from None
    if not groups:
        raise UserError(f"captions file {path} has a header but no caption rows")
    return {k: _cap(v, max_captions) for k, v in groups.items()}


def _split_sizes(cfg: DictConfig, default: Sequence[int]) -> list[int | None]:
    raw = cfg.get("split_sizes", None)
    sizes = (
        list(default)
        if raw is None
        else list(OmegaConf.to_object(raw) if OmegaConf.is_config(raw) else raw)
    )
    ok = len(sizes) in (2, 3) and all(
        (isinstance(s, int) and not isinstance(s, bool) and s >= 0) or (i == 2 and s is None)
        for i, s in enumerate(sizes)
    )
    if not ok:
        raise UserError(
            f"dataset.split_sizes must be [train, val, test] non-negative integers (test may be "
            f"null for the rest), got {sizes!r}"
        )
    return sizes


def read_flickr8k(cfg: DictConfig) -> ImageTextSet:
    """Flickr8k-style folder: `captions.txt` (`image,caption` CSV) + `images/`."""
    root = _flickr8k_root(cfg)
    captions = io.confined(
        root, str(_opt(cfg, "captions_file", "captions.txt")), "dataset.captions_file"
    )
    groups = read_caption_csv(captions, _max_captions(cfg))
    image_dir = _image_dir(
        io.confined(root, str(_opt(cfg, "image_dir", "images")), "dataset.image_dir"), "image_dir"
    )
    ids = list(groups)
    parts = split_by_sorted_name(ids, _split_sizes(cfg, (700, 100, 200)))
    limit = _max_images(cfg)
    splits = {}
    for name in SPLITS:
        files = [ids[i] for i in _truncate(parts[name], limit)]
        splits[name] = _file_split(name, image_dir, files, [groups[f] for f in files])
    return ImageTextSet(name=str(_opt(cfg, "name", "flickr8k")), **splits)


# --------------------------------------------------------------------------- karpathy


def read_karpathy(cfg: DictConfig) -> ImageTextSet:
    """Karpathy split files (dataset_flickr30k.json / dataset_coco.json): the papers' splits."""
    ann_path = _path(_required(cfg, "annotations", "karpathy", "/path/to/dataset_flickr30k.json"))
    image_root = _image_dir(
        _path(_required(cfg, "image_root", "karpathy", "/path/to/images")), "image_root"
    )
    data = _load_json(ann_path, "Karpathy annotation", "annotations")
    images = _field(data, "images", f"{ann_path.name}")
    if not isinstance(images, list):
        raise UserError(f"{ann_path.name}: 'images' must be a list; is this a Karpathy split file?")
    restval_to_train = bool(_opt(cfg, "restval_to_train", True))
    limit_caps = _max_captions(cfg)
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    caps: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    for n, entry in enumerate(images):
        where = f"{ann_path.name} image #{n}"
        split = _field(entry, "split", where)
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        if split not in SPLITS:
            raise UserError(f"{where} has split {split!r}; expected train, val, test or restval")
        rel = str(_field(entry, "filename", where))
        if entry.get("filepath"):
            rel = f"{entry['filepath']}/{rel}"
        _image_name(rel, where)
        sentences = _field(entry, "sentences", where)
        if not isinstance(sentences, list):
            raise UserError(f"{where}: 'sentences' must be a list of {{'raw': ...}} records")
        texts = [
            _clean_caption(_field(s, "raw", f"{where} sentence #{k}"), f"{where} sentence #{k}")
            for k, s in enumerate(sentences)
        ]
        files[split].append(rel)
        caps[split].append(_cap(texts, limit_caps))
    limit = _max_images(cfg)
    splits = {s: _file_split(s, image_root, files[s][:limit], caps[s][:limit]) for s in SPLITS}
    default_label = ann_path.stem.removeprefix("dataset_")  # dataset_flickr30k -> flickr30k
    return ImageTextSet(name=str(_opt(cfg, "name", default_label)), **splits)


# --------------------------------------------------------------------------- coco


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise UserError(
            f"{what} must be a list, not {type(value).__name__}; is this the right file?"
        )
    return value


def _coco_id(value: Any, where: str) -> int | str:
    """An image id: a number or a string, as COCO files hold them."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UserError(f"{where} has image id {value!r}; ids are numbers or strings, fix that row")
    return value


def _read_coco_file(path: Path, key: str, max_captions: int | None) -> dict[str, list[str]]:
    """Captions per image file name from an official captions_*.json, sorted by file name.

    Images without any caption (e.g. image_info_test files) are left out.
    """
    data = _load_json(path, "COCO captions", key)
    images = _list(_field(data, "images", path.name), f"{path.name} 'images'")
    annotations = _list(_field(data, "annotations", path.name), f"{path.name} 'annotations'")
    names: dict[Any, str] = {}
    for n, im in enumerate(images):
        where = f"{path.name} images[{n}]"
        image_id = _coco_id(_field(im, "id", where), where)
        names[image_id] = _image_name(str(_field(im, "file_name", where)), where)
    groups: dict[str, list[str]] = {}
    for n, ann in enumerate(annotations):
        where = f"{path.name} annotations[{n}]"
        image_id = _coco_id(_field(ann, "image_id", where), where)
        if image_id not in names:
            raise UserError(f"{where} refers to image_id {image_id!r}, absent from 'images'")
        groups.setdefault(names[image_id], []).append(
            _clean_caption(_field(ann, "caption", where), where)
        )
    return {f: _cap(groups[f], max_captions) for f in sorted(groups)}


def read_coco(cfg: DictConfig) -> ImageTextSet:
    """Official COCO captions files; without a test file, carve test from val by file name."""
    max_caps = _max_captions(cfg)
    hint = "/path/to/captions_{}.json"
    train = _read_coco_file(
        _path(_required(cfg, "train_annotations", "coco", hint.format("train2017"))),
        "train_annotations",
        max_caps,
    )
    val = _read_coco_file(
        _path(_required(cfg, "val_annotations", "coco", hint.format("val2017"))),
        "val_annotations",
        max_caps,
    )
    train_dir = _image_dir(
        _path(_required(cfg, "train_images", "coco", "/path/to/train2017")), "train_images"
    )
    val_dir = _image_dir(
        _path(_required(cfg, "val_images", "coco", "/path/to/val2017")), "val_images"
    )
    if cfg.get("test_annotations", None):
        test = _read_coco_file(_path(cfg.test_annotations), "test_annotations", max_caps)
        test_dir = val_dir
        if cfg.get("test_images", None):
            test_dir = _image_dir(_path(cfg.test_images), "test_images")
    else:
        test_size = _opt(cfg, "test_size", 5000)
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
            raise UserError(f"dataset.test_size must be a positive integer, got {test_size!r}")
        if test_size >= len(val):
            raise UserError(
                f"dataset.test_size={test_size} leaves no val images (the val annotations have "
                f"{len(val)}); lower dataset.test_size or set dataset.test_annotations"
            )
        names = list(val)  # already sorted by file name
        keep, carved = names[: len(names) - test_size], names[len(names) - test_size :]
        test = {f: val[f] for f in carved}
        val = {f: val[f] for f in keep}
        test_dir = val_dir
    limit = _max_images(cfg)
    splits = {}
    for name, groups, folder in (
        ("train", train, train_dir),
        ("val", val, val_dir),
        ("test", test, test_dir),
    ):
        files = list(groups)[:limit]
        splits[name] = _file_split(name, folder, files, [groups[f] for f in files])
    return ImageTextSet(name=str(_opt(cfg, "name", "coco")), **splits)


# --------------------------------------------------------------------------- hf


def _hf_split_names(cfg: DictConfig) -> dict[str, str]:
    raw = cfg.get("splits", None)
    mapping = dict(DEFAULT_HF_SPLITS)
    if raw is not None:
        given = OmegaConf.to_object(raw) if OmegaConf.is_config(raw) else raw
        if not isinstance(given, Mapping) or set(given) - set(SPLITS):
            raise UserError(
                f"dataset.splits must map train/val/test to hub split names, got {given!r}"
            )
        mapping.update({k: str(v) for k, v in given.items()})
    return mapping


def _hf_load(cfg: DictConfig, hub_split: str) -> datasets.Dataset:
    """One split from the hub (`load_dataset`) or from a `save_to_disk` folder (offline)."""
    path = str(_required(cfg, "path", "hf", "<hub id or folder>"))
    if _opt(cfg, "from_disk", False):
        folder = _path(path)
        if not folder.is_dir():
            raise UserError(
                f"dataset folder {folder} does not exist: set dataset.path to a folder written "
                "by DatasetDict.save_to_disk"
            )
        saved = datasets.load_from_disk(str(folder))
        if not isinstance(saved, datasets.DatasetDict):
            raise UserError(
                f"{folder} holds a single Dataset; save a DatasetDict with the splits named in "
                "dataset.splits"
            )
        if hub_split not in saved:
            raise UserError(
                f"{folder} has no split {hub_split!r} (it has {', '.join(saved)}); fix "
                "dataset.splits"
            )
        return saved[hub_split]
    kwargs: dict[str, Any] = {}
    for key in ("revision", "data_files", "data_dir"):
        value = cfg.get(key, None)
        if value is not None:
            kwargs[key] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    try:
        loaded = datasets.load_dataset(
            path, cfg.get("config_name", None), split=hub_split, **kwargs
        )
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(
            f"hub dataset {path!r} not found or not accessible: fix dataset.path (or use "
            "dataset.from_disk=true with a local folder)"
        ) from e
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(f"dataset.splits value {hub_split!r} must name one split, not several")
    return loaded


def _row_captions(value: Any, where: str) -> list[str]:
    """A caption cell holds one string or a list of strings."""
    items: Iterable[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise UserError(f"{where}: caption cell must be a string or a list of strings")
    return [_clean_caption(c, where) for c in items]


def _hf_split(cfg: DictConfig, name: str, hub_split: str) -> ImageTextSplit:
    """Rows of one hub split grouped per image, built in Arrow so images stay on disk."""
    src = _hf_load(cfg, hub_split)
    image_col = str(_opt(cfg, "image_column", "image"))
    caption_col = str(_opt(cfg, "caption_column", "caption"))
    id_col = cfg.get("image_id_column", None)
    wanted = [image_col, caption_col] + ([str(id_col)] if id_col else [])
    missing = [c for c in wanted if c not in src.column_names]
    if missing:
        raise UserError(
            f"hub split {hub_split!r} has no column {', '.join(map(repr, missing))} (it has "
            f"{', '.join(src.column_names)}); set dataset.image_column / caption_column / "
            "image_id_column"
        )
    max_caps = _max_captions(cfg)
    cells = list(src[caption_col])
    keys = (
        [str(k) for k in src[str(id_col)]]
        if id_col
        else [f"{hub_split}/{i}" for i in range(len(cells))]
    )
    first_row: dict[str, int] = {}
    groups: dict[str, list[str]] = {}
    for i, (key, cell) in enumerate(zip(keys, cells, strict=True)):
        first_row.setdefault(key, i)
        groups.setdefault(key, []).extend(_row_captions(cell, f"hub split {hub_split!r} row {i}"))
    ids = list(groups)[: _max_images(cfg)]
    if not ids:
        raise UserError(
            f"split {name!r} (hub split {hub_split!r}) is empty: check dataset.path and "
            "dataset.splits"
        )
    captions = [_cap(groups[k], max_caps) for k in ids]
    rows = src.select([first_row[k] for k in ids]).select_columns([image_col])
    if image_col != "image":
        rows = rows.rename_column(image_col, "image")
    if not isinstance(rows.features["image"], datasets.Image):
        for k, cell in zip(ids, rows["image"], strict=True):  # a column of file paths
            if isinstance(cell, str):
                _image_name(cell, f"hub split {hub_split!r} row {first_row[k]}")
        rows = rows.cast_column("image", datasets.Image())
    rows = rows.add_column("image_id", ids, feature=FEATURES["image_id"])
    rows = rows.add_column("captions", captions, feature=FEATURES["captions"])
    # Source identity + its Arrow files' signatures stand in for per-image file signatures.
    source = [str(cfg.path), str(cfg.get("config_name", None)), str(cfg.get("revision", None))]
    source += [hub_split] + [file_signature(Path(c["filename"])) for c in src.cache_files]
    digest = hashlib.sha1("|".join(source).encode())
    digest.update("|".join(ids).encode())
    image_fingerprint = digest.hexdigest()[:16]
    for key, caps in zip(ids, captions, strict=True):
        digest.update(f"{key}:{'|'.join(caps)}".encode())
    return ImageTextSplit(
        rows=rows,
        name=name,
        fingerprint=digest.hexdigest()[:16],
        image_fingerprint=image_fingerprint,
    )


def read_hf(cfg: DictConfig) -> ImageTextSet:
    """Any dataset with an image column and a caption column, from the hub or a local save."""
    names = _hf_split_names(cfg)
    splits = {s: _hf_split(cfg, s, names[s]) for s in SPLITS}
    default_label = str(cfg.path).rstrip("/").split("/")[-1]
    return ImageTextSet(name=str(_opt(cfg, "name", default_label)), **splits)


READERS: Registry = Registry(
    "dataset reader",
    {
        "shapes": read_shapes,
        "flickr8k": read_flickr8k,
        "karpathy": read_karpathy,
        "coco": read_coco,
        "hf": read_hf,
    },
)


def build_dataset(cfg: DictConfig) -> ImageTextSet:
    """Read the dataset a `dataset/*.yaml` config describes (its `reader` picks the reader)."""
    return READERS.get(cfg.reader)(cfg)
