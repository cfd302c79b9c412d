"""How a tabled run's set stores its pairs (float32, float16, int8, low-rank), so a table can say
when a budget's bytes hold more or fewer pairs than its column names.

results.json written since the `cost` block names it (`cost.storage`); for older runs the
set's own files tell: the safetensors header of distilled.safetensors (in the run folder, or in
the distill run an `evaluate` run read, meta.json `source`) lists each tensor's key, dtype and
shape, and a modality stored other than as float32 rows has `images.coef` (+ `.scale` for int8
codes, `.basis` for low-rank), as training.storage.Factor writes it. Only the header is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from mmdistill.training.storage import modality_label, storage_label

# safetensors dtype names, as torch names them
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8"}
MAX_HEADER = 100_000_000  # a larger header is no safetensors file written here
PLAIN = "float32"  # what a budget counts in: the bytes of N plain float32 pairs


def storage_of(run_dir: Path, data: dict[str, Any]) -> str | None:
    """The run's storage label, None where neither its results nor its set's files say."""
    recorded = (data.get("cost") or {}).get("storage") if isinstance(data, dict) else None
    if isinstance(recorded, str) and recorded:
        return recorded
    for folder in (run_dir, _source(run_dir)):
        if folder is not None:
            header = _header(folder / "distilled.safetensors")
            if header is not None:
                return label(header)
    return None


def _source(run_dir: Path) -> Path | None:
    """The distill run folder an `evaluate` run read its set from (meta.json `source`)."""
    try:
        source = json.loads((run_dir / "meta.json").read_text()).get("source")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return Path(str(source)).expanduser() if source else None


def _header(path: Path) -> dict[str, Any] | None:
    """The tensor records of a safetensors file's header, None when unreadable."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def label(header: dict[str, Any]) -> str | None:
    """The storage a safetensors header describes: per modality, the dtype of its rows (bare
    key) or coefficients (`.coef`), with the rank of its basis when it has one."""
    parts = {}
    for name in ("images", "texts"):
        plain, coef = header.get(name), header.get(f"{name}.coef")
        basis = header.get(f"{name}.basis")
        record = coef if isinstance(coef, dict) else plain
        if not isinstance(record, dict) or record.get("dtype") not in DTYPES:
            continue  # missing, or token ids: no storage choice
        rank = None
        if isinstance(coef, dict) and isinstance(basis, dict) and basis.get("shape"):
            rank = int(basis["shape"][0])
        parts[name] = modality_label(DTYPES[record["dtype"]], rank)
    return storage_label(parts)


def differs(counts: list[int], storages: list[str], budget: tuple[str, float]) -> bool:
    """Whether a cell's sets hold other than its column's plain float32 pairs."""
    if any(s != PLAIN for s in storages):
        return True
    return budget[0] == "pairs" and any(n != int(budget[1]) for n in counts)


def note(counts: list[int], storages: list[str], budget: tuple[str, float], where: str) -> str:
    """What a cell's sets hold in its column's bytes: "394 pairs stored as int8 in 100 pairs'
    bytes"; `where` names the column's budget as the table labels it."""
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    kept = f"stored as {'/'.join(storages)}" if storages else "(storage not recorded)"
    bytes_of = f"{int(budget[1])} pairs'" if budget[0] == "pairs" else f"{where}'s"
    text = f"{n} pairs {kept} in {bytes_of} bytes"
    if budget[0] == "pairs" and counts[-1] < budget[1] and all(s == PLAIN for s in storages):
        text += " (the rest of the budget stores its learned similarity / correspondence matrix)"
    return text
