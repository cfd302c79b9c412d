"""Distillation methods, registered by name (`method=<name>`); every module here registers."""

import importlib
import pkgutil

from mmdistill.methods.base import METHODS, DistillContext, Method


def get_method(name: str) -> type[Method]:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    return METHODS.get(name)


__all__ = ["METHODS", "DistillContext", "Method", "get_method"]
