"""Distillation methods by name (`method=<name>`), in the papers' order: coresets first, then
distillation methods. Tables and scripts list methods from here."""

from mmdistill.methods.base import DistillContext, Method
from mmdistill.methods.coresets import Forgetting, Herding, KCenter, RandomPairs
from mmdistill.methods.covmatch import CovMatch
from mmdistill.methods.mdw import MDW
from mmdistill.methods.trajectory import TrajectoryMatching
from mmdistill.registry import Registry

METHODS: Registry = Registry(
    "method",
    {
        "random": RandomPairs,
        "herding": Herding,
        "kcenter": KCenter,
        "forgetting": Forgetting,
        "mtt": TrajectoryMatching,
        "mtt_lora": TrajectoryMatching,
        "tesla": TrajectoryMatching,
        "lors": TrajectoryMatching,
        "repblend": TrajectoryMatching,
        "covmatch": CovMatch,
        "covmatch_robust": CovMatch,
        "covmatch_lowrank": CovMatch,
        "covmatch_int8": CovMatch,
        "mdw": MDW,
    },
)


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "DistillContext", "Method", "get_method"]
