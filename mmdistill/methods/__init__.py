"""Distillation methods by family. A method preset (conf/method/<name>.yaml) names the family
of code it runs (`family: covmatch`) and its own label (`name:`, the `method` of results,
tables and run folders), so a new preset is one YAML file and no Python; `FAMILIES` maps the
families, in the papers' order (coresets first, then distillation methods), to their classes.

The names below load on first use (PEP 562), so the light `mmdistill.methods.settings`, which
the schema reads before every job, imports no torch.
"""

from __future__ import annotations

import functools
from typing import Any

from mmdistill import config
from mmdistill.registry import Registry


@functools.cache
def _families() -> Registry:
    from mmdistill.methods.coresets import Forgetting, Herding, KCenter, RandomPairs
    from mmdistill.methods.covmatch import CovMatch
    from mmdistill.methods.mdw import MDW
    from mmdistill.methods.trajectory import TrajectoryMatching

    return Registry(
        "method family",
        {
            "random": RandomPairs,
            "herding": Herding,
            "kcenter": KCenter,
            "forgetting": Forgetting,
            "trajectory": TrajectoryMatching,
            "lors": TrajectoryMatching,
            "covmatch": CovMatch,
            "mdw": MDW,
        },
    )


@functools.cache
def presets() -> list[str]:
    """Every preset label of the config tree, in the papers' order: by family (FAMILIES'
    order), then by name. Tables and shared sets accept these labels."""
    found = config.method_presets()
    order = _families().names()
    rank = {name: order.index(f) if f in order else len(order) for name, f in found.items()}
    return sorted(found, key=lambda name: (rank[name], name))


def get_method(family: str) -> Any:
    """The class of a method family (`cfg.method.family`)."""
    return _families().get(family)


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        return _families()
    if name in ("DistillContext", "Method"):
        from mmdistill.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "DistillContext", "Method", "get_method", "presets"]
