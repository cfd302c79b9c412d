"""Encoders: pretrained or random trunks that build fresh students.

An `Encoder` owns the trunks (shared and frozen, or copied fresh into every student when they
train), the image preprocessing, the tokenizer and the head recipe. Every encoder is built from
an open_clip model config kept as data in `model_configs/`, so methods see one interface.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn

from mmdistill.data.images import PixelRule
from mmdistill.models.student import Student, TextTrunk, make_head

MODEL_CONFIGS = Path(__file__).parent / "model_configs"


@functools.cache
def open_clip() -> ModuleType:
    """open_clip, imported on first use with our model configs registered: importing it (and
    torchvision, timm, transformers behind it) costs seconds that a run on cached features
    never needs."""
    import open_clip as module

    module.add_model_config(MODEL_CONFIGS)
    return module


def model_config(name: str) -> dict | None:
    """An open_clip model config: ours are read as data, others from open_clip's registry."""
    ours = MODEL_CONFIGS / f"{name}.json"
    if ours.is_file():
        return json.loads(ours.read_text())
    return open_clip().get_model_config(name)


class OpenClipTextTrunk(TextTrunk):
    """open_clip's TextTransformer up to pooling; also reads token-embedding sequences."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text
        self.token_dim = text.token_embedding.embedding_dim
        self.out_dim = text.width

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.text.token_embedding(ids)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        t = self.text
        h = self.embed_tokens(x) if not x.is_floating_point() else x
        n = h.shape[1]
        h = h + t.positional_embedding[:n].to(h.dtype)
        causal = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        h = t.ln_final(t.transformer(h, attn_mask=causal))
        # The last real token is the end-of-text token that open_clip pools ("argmax" pooling).
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]


class OpenClipVisionTrunk(nn.Module):
    """open_clip's VisionTransformer without its projection."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        visual.proj = None
        self.visual = visual
        self.out_dim = visual.transformer.width

    def forward(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)


@dataclass
class Tokens:
    """Token ids and their attention mask, `[N, L]` each."""

    ids: Tensor
    mask: Tensor


class Encoder:
    """Trunks + preprocessing + tokenizer + head recipe; builds students on demand.

    The trunks are built on first use: a run whose features are all cached never loads them,
    since the cached features tell the heads their input sizes (`note_feature_dims`). `pixels`
    is the image preprocessing as data (the image cache and the streaming readers apply it to
    whole batches); `preprocess` is the same rule as torchvision's per-image transform.
    """

    def __init__(
        self,
        cfg: DictConfig,
        make_trunks: Callable[[int], tuple[nn.Module, TextTrunk]],
        pixels: PixelRule,
        tokenize: Callable[[list[str]], Tokens],
    ) -> None:
        self.cfg = cfg
        self.name: str = cfg.name
        self._make_trunks = make_trunks
        self.pixels = pixels
        self.preprocess = clip_preprocess(pixels.size, pixels.mean, pixels.std)
        self.tokenize = tokenize
        self.train_image_trunk: bool = bool(cfg.train_image_trunk)
        self.train_text_trunk: bool = bool(cfg.train_text_trunk)
        self._dims: dict[str, int] = {}

    @functools.cached_property
    def _trunks(self) -> tuple[nn.Module, TextTrunk]:
        with torch.random.fork_rng(devices=[]):  # building them never shifts a caller's draws
            image, text = self._make_trunks(self.cfg.get("seed", 0))
        for trunk in (image, text):
            trunk.eval().requires_grad_(False)
        return image, text

    @property
    def image_trunk(self) -> nn.Module:
        return self._trunks[0]

    @property
    def text_trunk(self) -> TextTrunk:
        return self._trunks[1]

    def note_feature_dims(self, image: int | None = None, text: int | None = None) -> None:
        """Record the trunks' output sizes, read off cached features, so heads can be built
        without loading the trunks."""
        self._dims.update({k: v for k, v in (("image", image), ("text", text)) if v is not None})

    @property
    def image_dim(self) -> int:
        return self._dims.get("image") or self.image_trunk.out_dim

    @property
    def text_dim(self) -> int:
        return self._dims.get("text") or self.text_trunk.out_dim

    @property
    def image_space(self) -> str:
        """'feature' when the image trunk is frozen (cached features), else 'pixel'."""
        return "pixel" if self.train_image_trunk else "feature"

    @property
    def text_space(self) -> str:
        """'feature' (frozen trunk outputs) or 'token' (ids / token embeddings into the trunk)."""
        return "token" if self.train_text_trunk else "feature"

    def trunks_for_student(self, seed: int) -> tuple[nn.Module | None, TextTrunk | None]:
        """Fresh trainable trunks (random init or pristine pretrained copies), None if frozen."""
        if not (self.train_image_trunk or self.train_text_trunk):
            return None, None
        if self.cfg.pretrained:  # copy only what trains: frozen trunks stay shared
            image = copy.deepcopy(self.image_trunk) if self.train_image_trunk else None
            text = copy.deepcopy(self.text_trunk) if self.train_text_trunk else None
        else:
            image, text = self._make_trunks(seed)
            image = image if self.train_image_trunk else None
            text = text if self.train_text_trunk else None
            share = getattr(text, "share_token_embedding", None)
            if share is not None:
                # One vocabulary space for all random-init students, so synthetic token
                # embeddings (CovMatch) mean the same to each of them as to the encoder.
                share(self.text_trunk)
        if image is not None:
            image.requires_grad_(True).train()
        if text is not None:
            text.requires_grad_(True).train()
            freeze_embedding = getattr(text, "freeze_token_embedding", None)
            if freeze_embedding is not None:
                freeze_embedding()
        return image, text

    def new_student(self, seed: int, feature_dropout: float = 0.0) -> Student:
        """A fresh student: new heads from `seed`, trunks per the encoder's training flags."""
        torch.manual_seed(seed)
        image_trunk, text_trunk = self.trunks_for_student(seed)
        head = self.cfg.head
        return Student(
            image_head=make_head(head.image, self.image_dim, head.dim),
            text_head=make_head(head.text, self.text_dim, head.dim),
            image_trunk=image_trunk,
            text_trunk=text_trunk,
            temperature=float(self.cfg.temperature),
            feature_dropout=feature_dropout,
        )

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Frozen-trunk image features (for the feature cache)."""
        return self.image_trunk(pixels)

    @torch.no_grad()
    def encode_texts(self, tokens: Tokens) -> Tensor:
        """Frozen-trunk text features (for the feature cache)."""
        return self.text_trunk(tokens.ids, tokens.mask)


def clip_preprocess(
    size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Image.Image], Tensor]:
    """Resize (bicubic) to a square, to tensor, normalise: the papers' test transform.
    torchvision is imported on the first image, not when the encoder is built."""

    @functools.cache
    def transform() -> Callable[[Image.Image], Tensor]:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                T.Lambda(lambda im: im.convert("RGB")),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    return lambda image: transform()(image)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _TinyText(OpenClipTextTrunk):
    def freeze_token_embedding(self) -> None:
        # The token table stays fixed so synthetic token embeddings live in a stable space.
        self.text.token_embedding.requires_grad_(False)

    @torch.no_grad()
    def share_token_embedding(self, source: OpenClipTextTrunk) -> None:
        self.text.token_embedding.weight.copy_(source.text.token_embedding.weight)


@contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's load warnings that only restate the config ("No pretrained weights
    loaded" for a random-init model, "initialized partially" when we load the image weights
    ourselves right after)."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "initialized partially" not in text and "No pretrained weights loaded" not in text

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_open_clip_scratch(cfg: DictConfig) -> Encoder:
    """A small open_clip model from a config file, random init: the pixel-space path. The
    vision tower takes `image_size` (the config's own size by default)."""

    def make_trunks(seed: int) -> tuple[nn.Module, TextTrunk]:
        torch.manual_seed(seed)
        with quiet_open_clip():
            model = open_clip().create_model(
                cfg.model_config, force_custom_text=True, force_image_size=int(cfg.image_size)
            )
        return OpenClipVisionTrunk(model.visual), _TinyText(model.text)

    tokenizer = open_clip().get_tokenizer(cfg.model_config)

    def tokenize(captions: list[str]) -> Tokens:
        ids = tokenizer(captions)
        return Tokens(ids=ids, mask=(ids != 0).long())

    return Encoder(cfg, make_trunks, PixelRule(int(cfg.image_size), CLIP_MEAN, CLIP_STD), tokenize)
