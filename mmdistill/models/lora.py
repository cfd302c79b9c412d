"""LoRA students for LoRA trajectory matching (MTT-VL's variant for large pretrained trunks).

With a big trunk, matching full-weight trajectories is too costly; experts and the matching
student instead train low-rank peft adapters on the trunks (plus the heads), and those adapter
parameters are the trajectory. The trunks' base weights are the encoder's shared frozen copies,
so every expert and every matching student adapts the same base.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.models.student import Student


@dataclass(frozen=True)
class LoraSettings:
    """Adapter shape; part of the expert-buffer key, since it defines the trajectory."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LoraSettings | None:
        """`cfg.lora` false -> None; true -> the adapter settings next to it."""
        if not bool(cfg.get("lora", False)):
            return None
        targets = tuple(str(t) for t in cfg.get("lora_targets") or ())
        if not targets:
            raise UserError("lora is on but lora_targets is empty; name the trunk modules to adapt")
        return cls(int(cfg.lora_rank), float(cfg.lora_alpha), targets)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _adapt(trunk: nn.Module, settings: LoraSettings, which: str) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.targets),
        lora_dropout=0.0,
        bias="none",
    )
    try:
        trunk = inject_adapter_in_model(config, trunk)
    except ValueError as err:
        raise UserError(
            f"LoRA found no {list(settings.targets)} modules in the {which} trunk; "
            f"set method.expert.lora_targets to module names of this encoder ({err})"
        ) from err
    for name, p in trunk.named_parameters():
        p.requires_grad_("lora_" in name)
    return trunk.train()


def lora_student(encoder: Encoder, seed: int, settings: LoraSettings) -> Student:
    """A student whose trainable trunks are the shared base + fresh LoRA adapters (+ heads)."""
    if not (encoder.train_image_trunk or encoder.train_text_trunk):
        raise UserError(
            f"lora=true adapts trunks that read raw inputs, but encoder {encoder.name} keeps both "
            "trunks frozen on cached features; set encoder.train_image_trunk=true and/or "
            "encoder.train_text_trunk=true, or use lora=false"
        )
    student = encoder.new_student(seed)
    torch.manual_seed(seed)
    if encoder.train_image_trunk:
        base = copy.deepcopy(encoder.image_trunk)
        student.image_trunk = _adapt(base, settings, "image")
    if encoder.train_text_trunk:
        base = copy.deepcopy(encoder.text_trunk)
        student.text_trunk = _adapt(base, settings, "text")
    return student
