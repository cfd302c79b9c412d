"""Dataset readers by name: `build_dataset(cfg.dataset)` is the one entry point; the config's
`reader` key picks from the explicit table below."""

from omegaconf import DictConfig

from mmdistill.data.base import ImageTextSet, ImageTextSplit
from mmdistill.data.readers import read_coco, read_flickr8k, read_hf, read_karpathy
from mmdistill.data.shapes import read_shapes
from mmdistill.registry import Registry

READERS: Registry = Registry(
    "dataset reader",
    {
        "shapes": read_shapes,
        "flickr8k": read_flickr8k,
        "karpathy": read_karpathy,
        "coco": read_coco,
        "hf": read_hf,
    },
)


def build_dataset(cfg: DictConfig) -> ImageTextSet:
    """Read the dataset a `dataset/*.yaml` config describes."""
    return READERS.get(cfg.reader)(cfg)


__all__ = ["READERS", "ImageTextSet", "ImageTextSplit", "build_dataset"]
