"""Encoders by builder name: the explicit table an `encoder/*.yaml` config's `builder` key picks
from."""

from __future__ import annotations

from omegaconf import DictConfig

from mmdistill.models.encoders import Encoder, build_open_clip_scratch
from mmdistill.models.pretrained import build_open_clip_pretrained, build_timm_hf
from mmdistill.registry import Registry

BUILDERS: Registry = Registry(
    "encoder builder",
    {
        "open_clip_scratch": build_open_clip_scratch,
        "timm_hf": build_timm_hf,
        "open_clip_pretrained": build_open_clip_pretrained,
    },
)


def build_encoder(cfg: DictConfig) -> Encoder:
    """Build the encoder an `encoder/*.yaml` config names (its `builder` key)."""
    return BUILDERS.get(cfg.builder)(cfg)
