"""Damaged inputs by class, generated: caption files, annotation JSON, results.json and
distilled sets that hypothesis writes at random (and shrinks when one breaks a rule).

The rule is the same for each: the reader returns something valid (image names inside their
folder, recalls in [0, 100], float32 finite tensors under a known method), or it raises a
one-line `UserError` (`ValueError` for a results.json the table skips). Nothing else escapes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from mmdistill.data.readers import read_caption_csv, read_coco, read_karpathy
from mmdistill.errors import UserError
from mmdistill.methods import presets
from mmdistill.report import share, tables
from mmdistill.training.pairs import PairSet

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
IMAGES = ("0.png", "1.png", "2.png")
# Names that are fine, and names of every kind that must not leave the image folder.
NAMES = st.sampled_from(
    [*IMAGES, "../outside.png", "/etc/hostname", "a/../../x.png", "./0.png", "", " ", "..", "\\x"]
) | st.text(max_size=12)
CAPTIONS = st.sampled_from(["a red circle", "", "  ", '"quoted, comma"', "\0"]) | st.text(
    max_size=20
)


def image_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for name in IMAGES:
        Image.new("RGB", (4, 4)).save(root / "images" / name)
    return root / "images"


def inside(name: str) -> bool:
    norm = os.path.normpath(name)
    return not os.path.isabs(name) and norm != ".." and not norm.startswith("../")


@FUZZ
@given(
    header=st.sampled_from(["image,caption", "caption,image", "img,text", "", "image"]),
    rows=st.lists(st.tuples(NAMES, CAPTIONS), max_size=6),
    junk=st.binary(max_size=8),
)
def test_caption_files(header: str, rows: list[tuple[str, str]], junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.txt"
        body = "\n".join([header, *(f'"{i}","{c}"' for i, c in rows)]).encode()
        path.write_bytes(body + junk)
        try:
            groups = read_caption_csv(path)
        except UserError as err:
            assert "\n" not in str(err)
            return
        for name, captions in groups.items():
            assert inside(name), name
            assert captions and all(c == c.strip() and c for c in captions)


def json_values() -> st.SearchStrategy:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=8,
    )


def karpathy(names: list[str], split: str) -> dict[str, Any]:
    sentences = [{"raw": "a caption"}]
    return {"images": [{"filename": n, "split": split, "sentences": sentences} for n in names]}


@FUZZ
@given(
    names=st.lists(NAMES, min_size=1, max_size=4),
    split=st.sampled_from(["train", "val", "test", "restval", "dev", ""]),
    key=st.sampled_from(["images", "filename", "split", "sentences", "raw", None]),
    value=json_values(),
)
def test_karpathy_annotations(names: list[str], split: str, key: str | None, value: Any) -> None:
    data = karpathy(names, split)
    if key == "images":
        data["images"] = value
    elif key is not None:
        target = data["images"][0] if key != "raw" else data["images"][0]["sentences"][0]
        target[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(Path(tmp))
        ann = Path(tmp) / "dataset_x.json"
        ann.write_text(json.dumps(data))
        cfg = OmegaConf.create({"annotations": str(ann), "image_root": str(folder)})
        try:
            out = read_karpathy(cfg)
        except UserError as err:
            assert "\n" not in str(err)
            return
        for split_name in ("train", "val", "test"):
            for image_id in out.split(split_name).rows["image_id"]:
                assert inside(image_id), image_id


@FUZZ
@given(name=NAMES, image_id=json_values(), caption=CAPTIONS | json_values())
def test_coco_annotations(name: str, image_id: Any, caption: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(Path(tmp))
        files = {}
        for which in ("train", "val"):
            images = [{"id": 1, "file_name": name}, {"id": 2, "file_name": "1.png"}]
            anns = [{"image_id": image_id, "caption": caption}, {"image_id": 2, "caption": "x"}]
            files[which] = Path(tmp) / f"captions_{which}.json"
            files[which].write_text(json.dumps({"images": images, "annotations": anns}))
        cfg = OmegaConf.create(
            {
                "train_annotations": str(files["train"]),
                "val_annotations": str(files["val"]),
                "train_images": str(folder),
                "val_images": str(folder),
                "test_size": 1,
            }
        )
        try:
            read_coco(cfg)
        except UserError as err:
            assert "\n" not in str(err)


METRICS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "r_mean")
RECALLS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**3), 10**3)


@FUZZ
@given(
    recall=RECALLS,
    metric=st.sampled_from(METRICS),
    key=st.sampled_from(["verb", "method", "pairs", "seed", "students", "budget", "noise", None]),
    value=json_values(),
)
def test_results_files(recall: float, metric: str, key: str | None, value: Any) -> None:
    student = dict.fromkeys(METRICS, 50.0)
    student[metric] = recall
    data: dict[str, Any] = {"verb": "distill", "method": "random", "pairs": 10, "seed": 0}
    data.update(dataset="shapes", encoder="tiny", budget={"pairs": 10}, students=[student])
    if key is not None:
        data[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        path.write_text(json.dumps(data))
        try:
            result = tables.read_result(path)
        except ValueError as err:
            assert "\n" not in str(err)
            return
        for s in result.students:
            assert all(math.isfinite(s[m]) and 0 <= s[m] <= 100 for m in METRICS)


DTYPES = st.sampled_from(
    [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.uint8]
    + [torch.bool, torch.int64]
)


@FUZZ
@given(
    image_dtype=DTYPES,
    text_dtype=DTYPES,
    method=st.sampled_from(["random", "covmatch", "mtt", "made_up", ""]) | st.text(max_size=6),
    dataset=st.sampled_from(["shapes", "../x", "a/b", ""]),
    poison=st.sampled_from([None, math.nan, math.inf, 1e300]),
)
def test_distilled_sets(
    image_dtype: torch.dtype, text_dtype: torch.dtype, method: str, dataset: str, poison: Any
) -> None:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        PairSet(
            images=torch.rand(3, 3, 4, 4),
            texts=torch.rand(3, 8),
            meta={"method": method, "dataset": dataset},
        ).save(Path(tmp) / "distilled")
        path = Path(tmp) / "distilled.safetensors"
        t = load_file(str(path))
        images = t["images"].double()
        if poison is not None:
            images[0, 0, 0, 0] = poison
        t["images"] = images.to(image_dtype)
        t["texts"] = (t["texts"] * 10).to(text_dtype)
        save_file(t, str(path))
        try:
            pairs = share.read_set(Path(tmp))
        except UserError as err:
            assert "\n" not in str(err)
            return
        assert pairs.meta["method"] in presets()
        assert pairs.images.dtype == torch.float32 and bool(torch.isfinite(pairs.images).all())
        assert pairs.texts.dtype in (torch.float32, torch.int64)
