"""Noisy correspondence: corrupt a fraction of training pairs (filled in by the noise work)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mmdistill.data.base import ImageTextSet
from mmdistill.errors import UserError


def apply_noise(data: ImageTextSet, cfg: DictConfig, run_dir: Path) -> ImageTextSet:
    """Return the dataset with its training pairs corrupted as `cfg` (the noise group) says."""
    if cfg.name == "none":
        return data
    raise UserError(f"unknown noise {cfg.name!r}; choose one of: none")
