"""Readers: each format on a tiny generated fixture, its errors, and the real flickr8k-1k."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from mmdistill.data import READERS
from mmdistill.data.base import ImageTextSet
from mmdistill.errors import UserError

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _cfg(**kw: object) -> DictConfig:
    """A struct-mode config like Hydra gives readers, so absent keys exercise the defaults."""
    cfg = OmegaConf.create(kw)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _read(reader: str, **kw: object) -> ImageTextSet:
    return READERS.get(reader)(_cfg(**kw))


def _image(path: Path, i: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8 + i, 6), COLORS[i % len(COLORS)]).convert(mode).save(path)


# --------------------------------------------------------------------------- flickr8k


def _flickr(root: Path, n: int = 6, per_image: int = 5) -> list[str]:
    """n images (one grayscale PNG, the rest JPEG) with per_image captions; file order unsorted."""
    names = [f"img{i}.png" if i == 0 else f"img{i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        _image(root / "images" / name, i, mode="L" if i == 0 else "RGB")
    with (root / "captions.txt").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in reversed(names):  # file order differs from sorted order on purpose
            for k in range(per_image):
                w.writerow([name, f'  {name}, caption {k} with "quotes", commas  '])
    return names


def test_flickr8k_splits_captions_and_images(tmp_path: Path) -> None:
    _flickr(tmp_path, per_image=6)
    ds = _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2])
    assert ds.name == "flickr8k"
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [3, 1, 2]
    train = ds.train
    assert list(train.rows["image_id"]) == ["img0.png", "img1.jpg", "img2.jpg"]
    assert train.n_pairs == 15  # max_captions defaults to 5 (the 6th is dropped)
    assert train.captions[0] == 'img0.png, caption 0 with "quotes", commas'  # stripped, CSV-parsed
    assert train.captions[4].startswith("img0.png, caption 4")  # file order kept
    np.testing.assert_array_equal(train.caption_image, np.repeat(np.arange(3), 5))
    for i in range(3):
        im = train.image(i)
        assert isinstance(im, Image.Image) and im.mode == "RGB"
    assert ds.train.image(0).size == (8, 6)  # the grayscale PNG, converted
    assert [im.mode for im in ds.test.images([0, 1])] == ["RGB", "RGB"]


def test_flickr8k_options(tmp_path: Path) -> None:
    _flickr(tmp_path)
    ds = _read(
        "flickr8k", root=str(tmp_path), split_sizes=[3, 1, None], max_captions=2, max_images=1
    )
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [1, 1, 1]
    assert ds.train.n_pairs == 2
    full = _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, None], max_captions=None)
    assert full.test.n_images == 2 and full.train.n_pairs == 15


def test_flickr8k_root_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _flickr(tmp_path)
    monkeypatch.setenv("MMDISTILL_FLICKR8K", str(tmp_path))
    assert _read("flickr8k", root=None, split_sizes=[3, 1, 2]).val.n_images == 1


def test_flickr8k_fingerprint_tracks_captions_and_files(tmp_path: Path) -> None:
    _flickr(tmp_path)
    first = _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2]).fingerprint
    assert _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2]).fingerprint == first
    text = (tmp_path / "captions.txt").read_text()
    (tmp_path / "captions.txt").write_text(text.replace("caption 3", "caption three", 1))
    second = _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2]).fingerprint
    assert second != first
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "images" / "img1.jpg")  # new size
    third = _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2]).fingerprint
    assert third != second
    # A copy (new mtimes, as a fresh checkout or rsync gives) keeps the cache key ...
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("copy"))
    os.utime(copy / "images" / "img1.jpg", (1, 1))
    assert _read("flickr8k", root=str(copy), split_sizes=[3, 1, 2]).fingerprint == third
    # ... and a same-size edit of the pixels does not.
    data = bytearray((copy / "images" / "img1.jpg").read_bytes())
    data[-3] ^= 0xFF
    (copy / "images" / "img1.jpg").write_bytes(bytes(data))
    assert _read("flickr8k", root=str(copy), split_sizes=[3, 1, 2]).fingerprint != third


def test_flickr8k_missing_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMDISTILL_FLICKR8K", raising=False)
    with pytest.raises(UserError, match=r"does not exist.*MMDISTILL_FLICKR8K.*dataset\.root="):
        _read("flickr8k", root=str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"MMDISTILL_FLICKR8K.*dataset\.root="):
        _read("flickr8k", root=None)


def test_flickr8k_missing_captions_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"captions file .*captions\.txt not found"):
        _read("flickr8k", root=str(tmp_path))


def test_flickr8k_bad_header_names_columns(tmp_path: Path) -> None:
    _flickr(tmp_path)
    (tmp_path / "captions.txt").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(UserError, match=r"`image` and `caption`, found 'file', 'text'"):
        _read("flickr8k", root=str(tmp_path))


def test_flickr8k_missing_image(tmp_path: Path) -> None:
    _flickr(tmp_path)
    (tmp_path / "images" / "img4.jpg").unlink()
    with pytest.raises(UserError, match=r"image file .*img4\.jpg is missing"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2])


def test_flickr8k_empty_caption_is_malformed(tmp_path: Path) -> None:
    _flickr(tmp_path)
    with (tmp_path / "captions.txt").open("a", newline="") as f:
        csv.writer(f).writerow(["img1.jpg", "   "])
    with pytest.raises(UserError, match=r"captions\.txt line 32 has an empty"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2])


def test_flickr8k_empty_split_and_oversized_split(tmp_path: Path) -> None:
    _flickr(tmp_path)
    with pytest.raises(UserError, match=r"split 'val' is empty"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[3, 0, 3])
    with pytest.raises(UserError, match=r"need 12 images but the data has 6; lower"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[10, 1, 1])
    with pytest.raises(UserError, match=r"dataset\.split_sizes must be"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[3, -1, 1])
    with pytest.raises(UserError, match=r"dataset\.max_images must be"):
        _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2], max_images=0)


# --------------------------------------------------------------------------- karpathy


def _karpathy(tmp_path: Path) -> Path:
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
        folder = "val2014" if i % 2 else "train2014"
        _image(tmp_path / "imgs" / folder / f"k{i}.jpg", i)
        sentences = [{"raw": f" photo {i} sentence {k} ", "tokens": []} for k in range(6)]
        entries.append(
            {"filepath": folder, "filename": f"k{i}.jpg", "split": split, "sentences": sentences}
        )
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return ann


def test_karpathy_splits_restval_and_filepath(tmp_path: Path) -> None:
    ann = _karpathy(tmp_path)
    ds = _read("karpathy", annotations=str(ann), image_root=str(tmp_path / "imgs"))
    assert ds.name == "coco"
    assert list(ds.train.rows["image_id"]) == [
        "train2014/k0.jpg",
        "val2014/k1.jpg",
        "val2014/k5.jpg",
    ]
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [3, 1, 2]
    assert ds.val.captions[:2] == ["photo 2 sentence 0", "photo 2 sentence 1"]
    assert ds.test.n_pairs == 10
    np.testing.assert_array_equal(ds.test.caption_image, np.repeat([0, 1], 5))
    assert ds.test.image(1).mode == "RGB"
    no_restval = _read(
        "karpathy", annotations=str(ann), image_root=str(tmp_path / "imgs"), restval_to_train=False
    )
    assert no_restval.train.n_images == 2


def test_karpathy_errors(tmp_path: Path) -> None:
    ann = _karpathy(tmp_path)
    root = str(tmp_path / "imgs")
    with pytest.raises(
        UserError, match=r"file .*missing\.json not found: set dataset\.annotations"
    ):
        _read("karpathy", annotations=str(tmp_path / "missing.json"), image_root=root)
    with pytest.raises(UserError, match=r"needs dataset\.image_root"):
        _read("karpathy", annotations=str(ann))
    data = json.loads(ann.read_text())
    data["images"][2]["split"] = "holdout"
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image #2 has split 'holdout'"):
        _read("karpathy", annotations=str(ann), image_root=root)
    data["images"][2]["split"] = "val"
    del data["images"][3]["sentences"][1]["raw"]
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image #3 sentence #1 has no 'raw' field"):
        _read("karpathy", annotations=str(ann), image_root=root)
    ann.write_text("{not json")
    with pytest.raises(UserError, match=r"not valid JSON"):
        _read("karpathy", annotations=str(ann), image_root=root)


# --------------------------------------------------------------------------- coco


def _coco_file(path: Path, folder: Path, names: list[str], start: int) -> Path:
    images, anns = [], []
    for j, name in enumerate(names):
        _image(folder / name, start + j)
        images.append({"id": start + j, "file_name": name})
        anns += [
            {"image_id": start + j, "id": 10 * j + k, "caption": f"{name} c{k}\n"} for k in range(5)
        ]
    images.append({"id": 999 + start, "file_name": "uncaptioned.jpg"})  # left out: no captions
    path.write_text(json.dumps({"images": images, "annotations": list(reversed(anns))}))
    return path


def _coco(tmp_path: Path) -> dict[str, str]:
    train = _coco_file(tmp_path / "tr.json", tmp_path / "train", ["t2.jpg", "t1.jpg"], 0)
    val = _coco_file(tmp_path / "va.json", tmp_path / "val", [f"v{i}.jpg" for i in range(5)], 100)
    return {
        "train_annotations": str(train),
        "val_annotations": str(val),
        "train_images": str(tmp_path / "train"),
        "val_images": str(tmp_path / "val"),
    }


def test_coco_carves_test_from_val(tmp_path: Path) -> None:
    ds = _read("coco", test_size=2, **_coco(tmp_path))
    assert list(ds.train.rows["image_id"]) == ["t1.jpg", "t2.jpg"]
    assert list(ds.val.rows["image_id"]) == ["v0.jpg", "v1.jpg", "v2.jpg"]
    assert list(ds.test.rows["image_id"]) == ["v3.jpg", "v4.jpg"]
    assert ds.train.captions[0] == "t1.jpg c4"  # file order of annotations, newline stripped
    np.testing.assert_array_equal(ds.val.caption_image, np.repeat(np.arange(3), 5))
    assert ds.test.image(0).mode == "RGB"


def test_coco_with_test_file(tmp_path: Path) -> None:
    paths = _coco(tmp_path)
    test = _coco_file(tmp_path / "te.json", tmp_path / "test", ["x.jpg"], 500)
    ds = _read(
        "coco",
        test_annotations=str(test),
        test_images=str(tmp_path / "test"),
        max_images=2,
        **paths,
    )
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [2, 2, 1]


def test_coco_errors(tmp_path: Path) -> None:
    paths = _coco(tmp_path)
    with pytest.raises(UserError, match=r"test_size=5 leaves no val images .* have 5\)"):
        _read("coco", test_size=5, **paths)
    with pytest.raises(UserError, match=r"needs dataset\.val_annotations"):
        _read("coco", **{k: v for k, v in paths.items() if k != "val_annotations"})
    data = json.loads(Path(paths["train_annotations"]).read_text())
    data["annotations"][0]["image_id"] = 12345
    Path(paths["train_annotations"]).write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"annotations\[0\] refers to image_id 12345"):
        _read("coco", test_size=2, **paths)


# --------------------------------------------------------------------------- hf


def _hf_saved(tmp_path: Path) -> Path:
    """A DatasetDict on disk: train repeats each image per caption; others hold caption lists."""
    ims = [Image.new("RGB", (6, 6), c) for c in COLORS]
    train = datasets.Dataset.from_dict(
        {
            "img": [ims[i // 2] for i in range(6)],
            "text": [f" train {i // 2} cap {i % 2} " for i in range(6)],
            "iid": [f"id{i // 2}" for i in range(6)],
            "extra": list(range(6)),
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "text": datasets.Value("string"),
                "iid": datasets.Value("string"),
                "extra": datasets.Value("int64"),
            }
        ),
    )

    def listed(n: int, tag: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "img": ims[:n],
                "text": [[f"{tag} {i} a", f"{tag} {i} b"] for i in range(n)],
                "iid": [f"{tag}{i}" for i in range(n)],
                "extra": list(range(n)),
            }
        ).cast_column("img", datasets.Image())

    folder = tmp_path / "hfsaved"
    datasets.DatasetDict(
        {"train": train, "validation": listed(2, "val"), "test": listed(3, "test")}
    ).save_to_disk(str(folder))
    return folder


def test_hf_from_disk_groups_rows(tmp_path: Path) -> None:
    folder = _hf_saved(tmp_path)
    common = {
        "path": str(folder),
        "from_disk": True,
        "image_column": "img",
        "caption_column": "text",
    }
    ds = _read("hf", image_id_column="iid", **common)
    assert ds.name == "hfsaved"
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [3, 2, 3]
    assert ds.train.captions[:2] == ["train 0 cap 0", "train 0 cap 1"]
    assert list(ds.train.rows["image_id"]) == ["id0", "id1", "id2"]
    np.testing.assert_array_equal(ds.train.caption_image, np.repeat(np.arange(3), 2))
    assert ds.val.captions == ["val 0 a", "val 0 b", "val 1 a", "val 1 b"]
    im = ds.train.image(1)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == COLORS[1]
    # Without an id column each row is its own image.
    flat = _read("hf", max_images=4, **common)
    assert flat.train.n_images == 4 and flat.train.n_pairs == 4
    # Swapped split names via dataset.splits.
    swapped = _read("hf", splits={"val": "test", "test": "validation"}, **common)
    assert swapped.val.n_images == 3 and swapped.test.n_images == 2


def test_hf_fingerprint_tracks_captions(tmp_path: Path) -> None:
    folder = _hf_saved(tmp_path)
    common = {
        "path": str(folder),
        "from_disk": True,
        "image_column": "img",
        "caption_column": "text",
    }
    first = _read("hf", **common).fingerprint
    assert _read("hf", **common).fingerprint == first
    saved = datasets.load_from_disk(str(folder))
    changed = saved["train"].map(lambda r: {"text": r["text"].replace("cap 1", "cap one")})
    datasets.DatasetDict(
        {"train": changed, "validation": saved["validation"], "test": saved["test"]}
    ).save_to_disk(str(tmp_path / "hf2"))
    assert _read("hf", **{**common, "path": str(tmp_path / "hf2")}).fingerprint != first


def test_hf_errors(tmp_path: Path) -> None:
    folder = _hf_saved(tmp_path)
    with pytest.raises(UserError, match=r"no column 'caption' \(it has img, text, iid, extra\)"):
        _read("hf", path=str(folder), from_disk=True, image_column="img")
    with pytest.raises(UserError, match=r"has no split 'dev' \(it has train, validation, test\)"):
        _read(
            "hf",
            path=str(folder),
            from_disk=True,
            image_column="img",
            caption_column="text",
            splits={"val": "dev"},
        )
    with pytest.raises(UserError, match=r"folder .*nothere does not exist"):
        _read("hf", path=str(tmp_path / "nothere"), from_disk=True)


def test_hf_hub_branch_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path passes config_name/revision through; load_dataset is stubbed (no network)."""
    saved = datasets.load_from_disk(str(_hf_saved(tmp_path)))
    calls: list[tuple] = []

    def fake_load(path: str, name: str | None = None, split: str = "", **kw: object):
        calls.append((path, name, split, kw))
        if path == "missing/ds":
            raise datasets.exceptions.DatasetNotFoundError("no such dataset")
        return saved[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = _read(
        "hf",
        path="someone/caps",
        config_name="2k",
        revision="abc",
        name="caps2k",
        image_column="img",
        caption_column="text",
        image_id_column="iid",
    )
    assert ds.name == "caps2k" and ds.train.n_images == 3
    assert calls[0] == ("someone/caps", "2k", "train", {"revision": "abc"})
    assert [c[2] for c in calls] == ["train", "validation", "test"]
    with pytest.raises(UserError, match=r"hub dataset 'missing/ds' not found.*dataset\.path"):
        _read("hf", path="missing/ds")


def test_set_name_from_cfg(tmp_path: Path) -> None:
    _flickr(tmp_path)
    assert _read("flickr8k", root=str(tmp_path), split_sizes=[3, 1, 2], name="f8").name == "f8"


# --------------------------------------------------------------------------- real data


def _real_flickr8k() -> Path:
    env = os.environ.get("MMDISTILL_FLICKR8K")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/flickr8k-1k"
    if not (root / "captions.txt").is_file():
        pytest.skip(f"flickr8k-1k not found at {root} (set MMDISTILL_FLICKR8K to run this test)")
    return root


def test_real_flickr8k_1k() -> None:
    ds = _read("flickr8k", root=str(_real_flickr8k()))
    assert [ds.split(s).n_images for s in ("train", "val", "test")] == [700, 100, 200]
    assert ds.train.n_pairs == 3500 and ds.test.n_pairs == 1000
    ids = list(ds.train.rows["image_id"]) + list(ds.val.rows["image_id"])
    ids += list(ds.test.rows["image_id"])
    assert ids == sorted(ids)
    assert ds.test.image(0).mode == "RGB"
