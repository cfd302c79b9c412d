"""Dataset readers, registered by name; `build_dataset(cfg.dataset)` is the one entry point."""

from omegaconf import DictConfig

from mmdistill.data.base import ImageTextSet, ImageTextSplit
from mmdistill.registry import Registry

READERS: Registry = Registry("dataset reader")


def build_dataset(cfg: DictConfig) -> ImageTextSet:
    """Read the dataset a `dataset/*.yaml` config describes (its `reader` key picks the reader)."""
    _import_readers()
    return READERS.get(cfg.reader)(cfg)


def _import_readers() -> None:
    # Imported for their registration side effect.
    from mmdistill.data import readers, shapes  # noqa: F401


__all__ = ["ImageTextSet", "ImageTextSplit", "READERS", "build_dataset"]
