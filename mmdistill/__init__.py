"""mmdistill: an experiment runner for multimodal (image-text) dataset distillation.

    import mmdistill
    folder = mmdistill.run("distill", {"method": "covmatch", "budget.pairs": 100})
    ds = mmdistill.load(folder)  # a torch Dataset of (image or feature, text) pairs

`load` and `run` are imported on first use, so `import mmdistill` stays light.
"""

from __future__ import annotations

from typing import Any

from mmdistill.version import __version__

__all__ = ["__version__", "load", "run"]


def __getattr__(name: str) -> Any:
    if name in ("load", "run", "DistilledSet"):
        from mmdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmdistill' has no attribute {name!r}")
