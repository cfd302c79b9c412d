"""Dataset readers by name: `build_dataset(cfg.dataset)` is the one entry point; the config's
`reader` key picks from the explicit table in `mmdistill/data/readers.py`.

The names below load on first use (PEP 562), so importing a light module of this package
(`mmdistill.data.settings`, which the schema reads before every job) does not import the
readers' image and hub libraries.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("READERS", "build_dataset"):
        from mmdistill.data import readers

        return getattr(readers, name)
    if name in ("ImageTextSet", "ImageTextSplit"):
        from mmdistill.data import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["READERS", "ImageTextSet", "ImageTextSplit", "build_dataset"]
