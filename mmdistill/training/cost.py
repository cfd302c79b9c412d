"""The `cost` block of every results.json: what a set stores and what its run spent.

Methods store different things besides their pairs (LoRS's learned similarity S, MDW's
correspondence P, learned step sizes), so a budget in pairs alone does not compare them. Each
part of a set is counted in bytes as the set holds it, and `pairs_equiv` divides the total by
the bytes of one real pair stored the same way (one image row and one text row in the set's own
space: pixels or features, token ids or embeddings, with the mask when the set has one). A plain
set of N pairs is then exactly N; LoRS's N-1 pairs + S come out above N-1 by what S weighs, and a
factorised set counts its coefficients, bases and offsets, not the pairs they decode to.
`storage` names how the rows are kept (float32, int8, rank-16, ...), so a table can say why a
budget's bytes hold 394 pairs, not 100.

The run's side comes from its run folder: wall seconds per timed stage, device-hours, and the
resource peaks. Evaluation students on a CPU train in forked processes, so the largest child's
peak RSS is given beside the job's own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from mmdistill.data.images import PixelStore
from mmdistill.runs import resource_peaks
from mmdistill.training.experts import Buffer
from mmdistill.training.pairs import PairSet
from mmdistill.training.storage import modality_label, storage_label

PARTS = ("images", "texts", "similarity", "step_sizes", "other")
# A learned step size is one float32 parameter while the method learns it.
STEP_SIZE_BYTES = 4
# The number-valued fields of the block (a table column each: `cost.<field>`), and the fields
# that hold one number per part or stage (`cost.<field>.<name>`).
FIELDS = (
    "bytes",
    "pair_bytes",
    "pairs_equiv",
    "buffer_bytes",
    "wall_s",
    "devices",
    "device_hours",
    "peak_rss_mib",
    "peak_rss_children_mib",
    "peak_gpu_mib",
)
GROUPS = ("bytes_parts", "stages_s")


def _nbytes(x: Tensor | PixelStore | None) -> int:
    """Bytes of a stored tensor; a PixelStore keeps its rows as uint8 in the image cache."""
    if x is None:
        return 0
    return math.prod(x.shape) * _element_bytes(x)


def _row_bytes(x: Tensor | PixelStore | None) -> int:
    if x is None:
        return 0
    return math.prod(x.shape[1:]) * _element_bytes(x)


def _element_bytes(x: Tensor | PixelStore) -> int:
    return 1 if isinstance(x, PixelStore) else x.element_size()


def set_bytes(pairs: PairSet) -> dict[str, int]:
    """Bytes of each part of the set: images, texts (with their mask), the learned similarity,
    the learned step sizes, and the rest (the image index of pairs that share images)."""
    similarity = 0
    if pairs.similarity is not None:
        similarity = sum(_nbytes(v) for v in pairs.similarity.state_dict().values())
    stored = pairs.stored_factors()

    def modality(name: str) -> int:
        if name in stored:
            return stored[name].nbytes
        return _nbytes(getattr(pairs, name))

    return {
        "images": modality("images"),
        "texts": modality("texts") + _nbytes(pairs.text_mask),
        "similarity": similarity,
        "step_sizes": STEP_SIZE_BYTES * len(pairs.step_sizes),
        "other": _nbytes(pairs.image_index),
    }


def pair_bytes(pairs: PairSet) -> int:
    """Bytes of one real pair stored the way this set stores its pairs."""
    return _row_bytes(pairs.images) + _row_bytes(pairs.texts) + _row_bytes(pairs.text_mask)


def buffer_bytes(meta: dict[str, Any]) -> int | None:
    """Bytes of the expert trajectories a set was matched against: the number its distill job
    recorded, else the files of its buffer when they are still here; None for sets that used
    no buffer or whose buffer is gone."""
    if meta.get("buffer_bytes") is not None:
        return int(meta["buffer_bytes"])
    folder = Path(str(meta.get("buffer") or ""))
    if not meta.get("buffer") or not (folder / "buffer.json").is_file():
        return None
    buf = Buffer(folder)
    used = range(int(meta["experts"])) if meta.get("experts") is not None else buf.indices()
    return sum(p.stat().st_size for p in map(buf.expert_path, used) if p.is_file())


def buffer_record(meta: dict[str, Any]) -> dict[str, int]:
    """`buffer_bytes` for a set's meta, so the number travels with the set (an evaluation on
    another machine has no buffer to measure); empty when the set used none."""
    found = buffer_bytes(meta)
    return {} if found is None else {"buffer_bytes": found}


def storage(pairs: PairSet) -> str | None:
    """How the set keeps its rows (`float32`, `int8`, `rank-16`, ...), for tables to say
    when a budget's bytes hold more or fewer pairs than plain float32 would; token ids and
    pixels read from the cache are no storage choice and are left out."""
    stored = pairs.stored_factors()
    parts = {}
    for name in ("images", "texts"):
        if name in stored:
            f = stored[name]
            rank = None if f.basis is None else int(f.basis.shape[0])
            parts[name] = modality_label(str(f.coef.dtype).removeprefix("torch."), rank)
        elif isinstance(x := getattr(pairs, name), Tensor) and x.is_floating_point():
            parts[name] = modality_label(str(x.dtype).removeprefix("torch."))
    return storage_label(parts)


def set_cost(pairs: PairSet) -> dict[str, Any]:
    parts = set_bytes(pairs)
    total = sum(parts.values())
    unit = pair_bytes(pairs)
    return {
        "storage": storage(pairs),
        "bytes": total,
        "bytes_parts": parts,
        "pair_bytes": unit,
        "pairs_equiv": round(total / unit, 4) if unit else None,
        "buffer_bytes": buffer_bytes(pairs.meta),
    }


def run_cost(run_meta: dict[str, Any], threads: int) -> dict[str, Any]:
    """Wall seconds per stage so far, device-hours on the run's one device, resource peaks."""
    stages = {str(k): round(float(v), 3) for k, v in (run_meta.get("timings") or {}).items()}
    wall = round(sum(stages.values()), 3)
    peaks = resource_peaks()
    return {
        "wall_s": wall,
        "stages_s": stages,
        "device": str(run_meta.get("device", "?")),
        "device_name": str(run_meta.get("device_name", "?")),
        "devices": 1,  # a job runs on one device (CPU: this host, `threads` torch threads)
        "threads": threads,
        "device_hours": float(f"{wall / 3600:.4g}"),
        "peak_rss_mib": peaks["host_rss_mib"],
        "peak_rss_children_mib": peaks["children_rss_mib"],
        "peak_gpu_mib": peaks["gpu_mib"],
    }


def block(pairs: PairSet, run_meta: dict[str, Any], threads: int) -> dict[str, Any]:
    """The whole `cost` block of a results.json."""
    return {**set_cost(pairs), **run_cost(run_meta, threads)}
