"""Numeric precision of a job: fp32, TF32 matmuls, or bf16 autocast.

`precision: auto` (the default) is TF32 on CUDA, where it costs nothing measurable in accuracy
and a lot in speed, and fp32 on CPU, where the published rows are bit-for-bit reproducible.
The choice is process-wide, like torch's TF32 switches themselves: the job sets it once
(`configure`) and every forward pass that should run in bf16 enters `autocast()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mmdistill.errors import UserError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
_state = {"precision": "fp32", "device": "cpu"}


def configure(precision: str, device: str) -> str:
    """Set the job's precision for `device`; returns the resolved name (recorded in results)."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cuda = str(device).startswith("cuda")
    if precision == "auto":
        precision = "tf32" if cuda else "fp32"
    if precision in ("tf32", "bf16") and not cuda:
        raise UserError(
            f"precision={precision} needs a CUDA GPU (this job runs on {device}); use "
            "precision=fp32 or precision=auto"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision=bf16 but {torch.cuda.get_device_name()} has no bf16 support; use "
            "precision=tf32 or precision=fp32"
        )
    if cuda:
        fast = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    _state.update(precision=precision, device=str(device))
    return precision


def current() -> str:
    return _state["precision"]


@contextlib.contextmanager
def autocast() -> Iterator[None]:
    """bf16 autocast around a forward pass when the job asked for it; a no-op otherwise."""
    if _state["precision"] != "bf16":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        yield
