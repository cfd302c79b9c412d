"""Noise injection (`noise=shuffle`): exact fraction, determinism, clean val/test, mask, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmdistill.data import build_dataset
from mmdistill.data.base import ImageTextSet, split_from_records
from mmdistill.data.noise import apply_noise, load_mask, save_mask
from mmdistill.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes() -> ImageTextSet:
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "shapes.yaml")
    cfg.split_sizes = [40, 10, 10]
    return build_dataset(cfg)


def shuffle(ratio: float, seed: int = 0) -> OmegaConf:
    return OmegaConf.create({"name": "shuffle", "ratio": ratio, "seed": seed})


def test_exact_fraction_of_images_get_other_captions(shapes: ImageTextSet, tmp_path: Path) -> None:
    noisy, returned = apply_noise(shapes, shuffle(0.5))
    before, after = shapes.train.rows["captions"], noisy.train.rows["captions"]
    changed = torch.tensor([a != b for a, b in zip(before, after, strict=True)])
    assert int(changed.sum()) == 20  # exactly round(0.5 * 40) images, none kept its own
    save_mask(tmp_path, returned)  # what the job does with it; the files round-trip
    mask = load_mask(tmp_path)
    assert mask is not None and torch.equal(mask.pair_clean, returned.pair_clean)
    assert torch.equal(mask.image_clean, ~changed)
    # Pairs follow their image: a caption is corrupted exactly when its image is.
    caption_image = torch.as_tensor(noisy.train.caption_image)
    assert torch.equal(mask.pair_clean, mask.image_clean[caption_image])
    assert int((~mask.pair_clean).sum()) == mask.info["corrupted_pairs"] == 100
    # The corrupted images hold a permutation of the corrupted images' caption lists.
    src = mask.caption_source
    assert sorted(src[changed].tolist()) == sorted(torch.nonzero(changed).flatten().tolist())
    for i in torch.nonzero(changed).flatten().tolist():
        assert after[i] == before[int(src[i])]
    assert (tmp_path / "noise.json").is_file()


def test_deterministic_from_seed(shapes: ImageTextSet, tmp_path: Path) -> None:
    a, _ = apply_noise(shapes, shuffle(0.3, seed=5))
    b, _ = apply_noise(shapes, shuffle(0.3, seed=5))
    c, _ = apply_noise(shapes, shuffle(0.3, seed=6))
    assert a.train.rows["captions"] == b.train.rows["captions"]
    assert a.train.fingerprint == b.train.fingerprint
    assert a.train.rows["captions"] != c.train.rows["captions"]
    assert a.train.fingerprint != c.train.fingerprint


def test_val_test_untouched_and_fingerprints(shapes: ImageTextSet, tmp_path: Path) -> None:
    noisy, _ = apply_noise(shapes, shuffle(0.5))
    for name in ("val", "test"):
        assert noisy.split(name).fingerprint == shapes.split(name).fingerprint
        assert noisy.split(name).rows["captions"] == shapes.split(name).rows["captions"]
    # The train split (and so every cache keyed by it) changes; images stay where they were.
    assert noisy.train.fingerprint != shapes.train.fingerprint
    assert noisy.fingerprint != shapes.fingerprint
    assert noisy.train.rows["image_id"] == shapes.train.rows["image_id"]
    # A different ratio is different data, so a different fingerprint.
    other, _ = apply_noise(shapes, shuffle(0.2))
    assert other.train.fingerprint not in (noisy.train.fingerprint, shapes.train.fingerprint)


def test_ratio_zero_is_clean_data_with_an_all_clean_mask(
    shapes: ImageTextSet, tmp_path: Path
) -> None:
    same, mask = apply_noise(shapes, shuffle(0.0))
    assert same.train.fingerprint == shapes.train.fingerprint
    assert mask is not None and bool(mask.pair_clean.all())
    assert load_mask(tmp_path / "nowhere") is None
    assert apply_noise(shapes, OmegaConf.create({"name": "none"})) == (shapes, None)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "half"])
def test_bad_ratio_is_one_line(shapes: ImageTextSet, tmp_path: Path, ratio) -> None:
    with pytest.raises(UserError, match="noise.ratio") as err:
        apply_noise(shapes, shuffle(ratio))
    assert "\n" not in str(err.value)


def test_single_corrupted_image_and_unknown_noise(shapes: ImageTextSet, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="single image"):
        apply_noise(shapes, shuffle(0.02))  # round(0.02 * 40) = 1
    with pytest.raises(UserError, match="unknown noise 'blur'"):
        apply_noise(shapes, OmegaConf.create({"name": "blur", "ratio": 0.1}))


def test_one_caption_per_image_is_refused(shapes: ImageTextSet, tmp_path: Path) -> None:
    ims = shapes.train.images(range(4))
    split = split_from_records("train", ["a", "b", "c", "d"], ims, [["x"], ["y"], ["z"], ["w"]])
    data = ImageTextSet("one", split, shapes.val, shapes.test)
    with pytest.raises(UserError, match="one caption per image") as err:
        apply_noise(data, shuffle(0.5))
    assert "\n" not in str(err.value)


def test_noisy_split_reuses_the_clean_feature_cache(
    shapes: ImageTextSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen-trunk features are computed once; a second read and the shuffled split (same
    images, same captions, reassigned) load them, permuted, instead of re-encoding."""
    from mmdistill.models.factory import build_encoder
    from mmdistill.training import features

    cfg = OmegaConf.load(REPO / "conf" / "encoder" / "tiny.yaml")
    cfg.train_image_trunk = cfg.train_text_trunk = False
    encoder = build_encoder(cfg)
    calls = []
    for name in ("_encode_images", "_encode_texts"):
        real = getattr(features, name)
        monkeypatch.setattr(
            features, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    clean = features.real_split(encoder, shapes.train, "shapes", tmp_path)
    assert sorted(calls) == ["_encode_images", "_encode_texts"]
    again = features.real_split(encoder, shapes.train, "shapes", tmp_path)
    noisy_set, mask = apply_noise(shapes, shuffle(0.5))
    noisy = features.real_split(encoder, noisy_set.train, "shapes", tmp_path)
    assert len(calls) == 2  # neither the rerun nor the noisy split encoded anything
    assert torch.equal(again.images, clean.images) and torch.equal(again.texts, clean.texts)
    assert torch.equal(noisy.images, clean.images)
    source = mask.caption_source
    for i in range(shapes.train.n_images):  # image i now holds image source[i]'s captions
        got = noisy.texts[noisy.caption_image == i]
        assert torch.equal(got, clean.texts[clean.caption_image == int(source[i])])


def test_cached_features_never_build_the_trunks(shapes: ImageTextSet, tmp_path: Path) -> None:
    """A run whose features are all cached sizes its heads from them and loads no trunk; a
    trunk built later does not shift the caller's random draws."""
    from mmdistill.models.factory import build_encoder
    from mmdistill.training import features

    cfg = OmegaConf.load(REPO / "conf" / "encoder" / "tiny.yaml")
    cfg.train_image_trunk = cfg.train_text_trunk = False
    first = build_encoder(cfg)
    features.real_split(first, shapes.train, "shapes", tmp_path)
    fresh = build_encoder(cfg)
    split = features.real_split(fresh, shapes.train, "shapes", tmp_path)
    student = fresh.new_student(0)
    assert "_trunks" not in vars(fresh)  # sized from the cache alone
    assert student.image_head.in_features == split.images.shape[1] == first.image_dim
    assert student.text_head.in_features == split.texts.shape[1] == first.text_dim
    torch.manual_seed(3)
    fresh.encode_images(torch.zeros(1, 3, cfg.image_size, cfg.image_size))  # builds them now
    after_build = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after_build, torch.rand(4))
