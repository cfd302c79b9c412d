"""Distilled sets people can share: a Hugging Face `datasets` folder, and reading it back.

`mmdistill export <run> --format hf` writes `Dataset.save_to_disk` output with one row per
synthetic pair: the image a person can look at (`image`: the de-normalised pixels as a PNG, or
in feature space the nearest real training image, flagged by `image_is_nearest_neighbour`), the
caption it decodes to (the nearest real training caption), and the set's own tensors
(`syn_image`, `syn_text`, `syn_text_mask`, `image_index`, the learned similarity's parameters
row by row and the target similarity row `target_similarity`). Beside the data files,
`mmdistill.json` marks the folder as an export and holds what the rows cannot (the tensors'
dtypes and shapes, learned step sizes, loss, the set's meta, the job config, recalls and
cost), and `README.md` is the dataset card.

`read_set` gives evaluation the exact PairSet back (float32 goes through Arrow bit for bit,
step sizes through JSON), from such a folder or from a distill run folder. Either may have been
edited by hand, so what it claims is checked on load (`validated`): its method is one mmdistill
has (a set is never scored under a label no method made), its dataset label a plain name,
floating tensors of another width are cast to float32 (token ids and indices to int64) and any
other dtype, or a value that is not finite, is refused.
"""

from __future__ import annotations

import io as stdio
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from mmdistill import io
from mmdistill.config import register_resolvers, run_config
from mmdistill.data.base import ImageTextSplit
from mmdistill.errors import UserError
from mmdistill.methods import presets
from mmdistill.models.student import is_image_features
from mmdistill.report.tables import METRICS
from mmdistill.report.visuals import denormalise, nearest, nearest_captions, real_train
from mmdistill.runs import git_state
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet
from mmdistill.training.similarity import build_similarity
from mmdistill.version import __version__

MARKER = "mmdistill.json"
FORMAT = "mmdistill-hf-export"
VERSION = 1
# torch dtypes a set's tensors may have, by name, and how Arrow stores each (bfloat16 widens
# to float32, which holds it exactly; the name restores it).
DTYPES = {
    "float32": (torch.float32, "float32"),
    "float16": (torch.float16, "float16"),
    "bfloat16": (torch.bfloat16, "float32"),
    "int64": (torch.int64, "int64"),
    "int32": (torch.int32, "int32"),
    "uint8": (torch.uint8, "uint8"),
    "bool": (torch.bool, "bool"),
}
REEXPORT = "export the distill run again with `mmdistill export <run> --format hf`"


def _dtype_name(t: Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"cannot export a {name} tensor; the set's tensors must be {list(DTYPES)}")
    return name


def _feature(row_shape: tuple[int, ...], dtype: str) -> Any:
    """The `datasets` feature of one row of a tensor: a value, a fixed-length list, an array."""
    import datasets

    arrow = DTYPES[dtype][1]
    if not row_shape:
        return datasets.Value(arrow)
    if len(row_shape) == 1:
        return datasets.Sequence(datasets.Value(arrow), length=row_shape[0])
    arrays = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D}
    if len(row_shape) not in arrays:
        raise UserError(f"cannot export tensors with rows of shape {list(row_shape)}")
    return arrays[len(row_shape)](shape=tuple(row_shape), dtype=arrow)


def _png(image: Image.Image) -> dict[str, Any]:
    buffer = stdio.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _tensors(pairs: PairSet) -> dict[str, Tensor]:
    """The set's tensors as per-pair rows (images gathered through the image index)."""
    index = pairs.image_index if pairs.image_index is not None else torch.arange(len(pairs))
    rows = {"syn_image": pairs.images[index], "syn_text": pairs.texts, "image_index": index}
    if pairs.text_mask is not None:
        rows["syn_text_mask"] = pairs.text_mask
    if pairs.similarity is not None:
        for name, value in pairs.similarity.state_dict().items():
            if value.shape[:1] != (len(pairs),):
                raise UserError(
                    f"the similarity's {name} {list(value.shape)} has no row per pair; "
                    "this kind of similarity cannot be exported"
                )
            rows[f"similarity_{name}"] = value
        with torch.no_grad():
            rows["target_similarity"] = pairs.similarity(torch.arange(len(pairs))).float()
    return {k: v.detach().cpu() for k, v in rows.items()}


def _pictures(
    cfg: DictConfig,
    pairs: PairSet,
    train: RealSplit,
    train_images: ImageTextSplit,
    index: Tensor,
) -> dict[str, list]:
    """Each pair's image as a PNG: its de-normalised pixels, or its feature's nearest real
    training image (with the image's id and the cosine it was found at)."""
    images = pairs.images[index].detach().cpu()
    if is_image_features(images):
        sims, idx = nearest(images, train.images, 1)
        ids = train_images.rows["image_id"]
        rows = [int(j) for j in idx[:, 0]]
        return {
            "image": [_png(train_images.image(j).convert("RGB")) for j in rows],
            "image_is_nearest_neighbour": [True] * len(rows),
            "image_nearest_id": [str(ids[j]) for j in rows],
            "image_nearest_cos": [float(s) for s in sims[:, 0]],
        }
    pixels = denormalise(images, cfg.encoder)
    array = (pixels * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return {
        "image": [_png(Image.fromarray(a)) for a in array],
        "image_is_nearest_neighbour": [False] * len(array),
        "image_nearest_id": [""] * len(array),
        "image_nearest_cos": [None] * len(array),
    }


def export_hf(run_dir: Path, out: Path | None = None, device: str = "cpu") -> Path:
    """Write the run's distilled set as a `datasets` folder (default `<run>/hf`) with its
    marker and dataset card; an earlier export there is replaced, anything else is refused."""
    import datasets

    run_dir = Path(run_dir)
    out = Path(out or run_dir / "hf")
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / MARKER).is_file())
    if out.exists() and not replaceable:
        raise UserError(f"{out} exists and is not an mmdistill export; give an empty --out")
    if not (run_dir / "distilled.safetensors").is_file():
        raise UserError(
            f"{run_dir} holds no distilled.safetensors; export reads a distill run folder"
        )
    cfg = run_config(run_dir)
    fix = "restore it from a copy, or distil again"
    pairs = PairSet.load(run_dir / "distilled", fix=fix)
    check_labels(pairs, run_dir / "distilled.json", fix)  # exported under no label it lacks
    encoder, train, train_images = real_train(cfg, run_dir, device)
    tensors = _tensors(pairs)
    captions = nearest_captions(pairs, train, encoder)
    columns: dict[str, Any] = {
        "pair": list(range(len(pairs))),
        **_pictures(cfg, pairs, train, train_images, tensors["image_index"]),
        "caption": [c for c, _ in captions],
        "caption_cos": [float(s) for _, s in captions],
    }
    features = {
        "pair": datasets.Value("int64"),
        "image": datasets.Image(),
        "image_is_nearest_neighbour": datasets.Value("bool"),
        "image_nearest_id": datasets.Value("string"),
        "image_nearest_cos": datasets.Value("float32"),
        "caption": datasets.Value("string"),
        "caption_cos": datasets.Value("float32"),
    }
    shapes = {}
    for name, t in tensors.items():
        dtype = _dtype_name(t)
        arrow = DTYPES[dtype][1]
        columns[name] = t.to(DTYPES[arrow][0]).numpy()
        features[name] = _feature(tuple(t.shape[1:]), dtype)
        shapes[name] = {"dtype": dtype, "shape": list(t.shape)}
    results = _optional_json(run_dir / "results.json")
    made = _optional_json(run_dir / "meta.json")
    info = _marker(cfg, pairs, shapes, results, made, run_dir)
    card = dataset_card(info)
    features = datasets.Features(features)
    ds = datasets.Dataset.from_dict(
        columns,
        features=features,
        info=datasets.DatasetInfo(description=card.split("\n---\n", 1)[-1], features=features),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    staging.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the command prints the folder; no bar for a few rows
    try:
        ds.save_to_disk(str(staging))
        io.write_text(staging / "README.md", card)
        io.write_json(staging / MARKER, info)  # written last: a folder with it is complete
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if bars:
            datasets.enable_progress_bars()
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _optional_json(path: Path) -> dict[str, Any]:
    """A run's results.json or meta.json for the card; a missing or unreadable one leaves
    its part out."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _marker(
    cfg: DictConfig,
    pairs: PairSet,
    shapes: dict[str, dict],
    results: dict[str, Any],
    made: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """What `mmdistill.json` holds: all a rebuild needs that rows cannot, and the provenance
    (the distill run's commit from its meta.json, not the exporting checkout's)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "pairs": len(pairs),
        "images_stored": int(pairs.images.shape[0]),
        "has_image_index": pairs.image_index is not None,
        "tensors": shapes,
        "similarity": pairs.similarity_args or None,
        "step_sizes": pairs.step_sizes,
        "loss": pairs.loss,
        "meta": pairs.meta,
        "config": OmegaConf.to_container(cfg, resolve=False),
        "results": {k: results.get(k) for k in ("summary", "protocol", "pairs", "train_pairs")},
        "cost": results.get("cost"),
        "source_run": str(run_dir.resolve()),
        "made_with": {k: made.get(k) for k in ("git", "versions", "device", "device_name")},
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "exported_with": {"mmdistill": __version__, "git": git_state()},
    }


def _commit(made: dict[str, Any]) -> str:
    """The distill run's commit as its meta.json records it ("?" when it does not)."""
    git = made.get("git") or {}
    sha = str(git.get("sha") or "?")[:10]
    return sha + (", with uncommitted changes" if git.get("dirty") else "")


def _size(n: Any) -> str:
    return "-" if not isinstance(n, int | float) else f"{n:,.0f} B"


def _mib(n: Any) -> str:
    return "-" if not isinstance(n, int | float) else f"{n:,.0f} MiB"


def dataset_card(info: dict[str, Any]) -> str:
    """The README.md of an export: what the set is, how well it trains students, what it cost.
    The YAML header is huggingface_hub's, so the Hub reads its fields as it reads any card's."""
    from huggingface_hub import DatasetCard, DatasetCardData

    meta = info["meta"]
    method, dataset = meta.get("method", "?"), meta.get("dataset", "?")
    encoder, n = meta.get("encoder", "?"), info["pairs"]
    header = DatasetCardData(
        pretty_name=f"mmdistill {method} {dataset} {n} pairs",
        tags=["dataset-distillation", "image-text-retrieval", "mmdistill"],
    )
    extras = ""
    if info["similarity"]:
        extras += f", plus a learned {info['similarity']['kind']} similarity"
    if info["step_sizes"]:
        extras += f", learned step sizes {info['step_sizes']}"
    lines = [
        f"# {method} · {n} pairs · {dataset} ({encoder})",
        "",
        f"A distilled image-text set made by mmdistill (commit {_commit(info['made_with'])}): "
        f"`method={method}` on "
        f"`dataset={dataset}` with `encoder={encoder}`, budget {meta.get('budget', n)} pairs "
        f"({n} stored pairs{extras}).",
        "",
        *_card_recall(info.get("results") or {}),
        *_card_cost(info.get("cost") or {}),
        *CARD_COLUMNS,
        *_card_use(info["config"].get("dataset", {}).get("name", "?"), encoder),
    ]
    return str(DatasetCard(f"---\n{header.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _card_recall(results: dict[str, Any]) -> list[str]:
    summary = results.get("summary") or {}
    if not summary:
        return ["## Recall", "", "The run recorded no recalls.", ""]
    protocol = results.get("protocol") or {}
    cells = (
        f"{summary[m]['mean']:.1f}±{summary[m]['std']:.1f}" if m in summary else "-"
        for m in METRICS
    )
    return [
        "## Recall",
        "",
        f"Students trained on this set, scored on the {protocol.get('split', 'test')} split "
        f"(`eval={protocol.get('name', '?')}`, {protocol.get('students', '?')} students, "
        "mean±std):",
        "",
        "| " + " | ".join(METRICS) + " |",
        "|" + "---|" * len(METRICS),
        "| " + " | ".join(cells) + " |",
        "",
    ]


def _card_cost(cost: dict[str, Any]) -> list[str]:
    if not cost:
        return ["## Cost", "", "The run recorded no cost.", ""]
    parts = cost.get("bytes_parts") or {}
    stages = cost.get("stages_s") or {}
    return [
        "## Cost",
        "",
        f"- stored: {_size(cost.get('bytes'))} = "
        + ", ".join(f"{k} {_size(v)}" for k, v in parts.items()),
        f"- equivalent budget: {cost.get('pairs_equiv')} pairs of "
        f"{_size(cost.get('pair_bytes'))} each",
        f"- expert buffers used: {_size(cost.get('buffer_bytes'))}",
        "- wall seconds: " + ", ".join(f"{k} {v}" for k, v in stages.items()),
        f"- device-hours: {cost.get('device_hours')} on {cost.get('device')} "
        f"({cost.get('device_name')})",
        f"- peak host RSS {_mib(cost.get('peak_rss_mib'))} (largest child process "
        f"{_mib(cost.get('peak_rss_children_mib'))}), peak GPU memory "
        f"{_mib(cost.get('peak_gpu_mib'))}",
        "",
    ]


CARD_COLUMNS = [
    "## Columns",
    "",
    "- `image`: the synthetic image de-normalised to 8-bit RGB; for feature-space sets "
    "(`image_is_nearest_neighbour` true) the nearest real training image to the synthetic "
    "feature, named by `image_nearest_id` with its cosine `image_nearest_cos`",
    "- `caption`: the nearest real training caption to the synthetic text "
    "(`caption_cos`: the cosine; 1 for a real caption)",
    "- `syn_image`, `syn_text`, `syn_text_mask`: the synthetic tensors students train on; "
    "`image_index`: the stored image each pair uses",
    "- `similarity_*`: the learned similarity's parameters, one row per pair; "
    "`target_similarity`: its row of the target matrix",
    "- `mmdistill.json`: dtypes and shapes, step sizes, loss, the set's metadata, the job "
    "config, recalls and cost",
    "",
]


def _card_use(dataset: str, encoder: str) -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_from_disk("<this folder>")',
        "```",
        "",
        "Re-score it with the encoder it was distilled for:",
        "",
        "```bash",
        f"mmdistill evaluate source=<this folder> dataset={dataset} encoder={encoder}",
        "```",
        "",
    ]


# ----------------------------------------------------------------------------------- reading


def is_hf_folder(path: Path) -> bool:
    """A `datasets` save_to_disk folder, an mmdistill export or not."""
    return any((path / f).is_file() for f in (MARKER, "dataset_info.json", "state.json"))


def read_set(source: Path) -> PairSet:
    """The distilled set of a distill run folder or of an `--format hf` export, validated."""
    if (source / "distilled.safetensors").is_file():
        fix = "restore it from a copy, or distil again into a new run folder"
        pairs = PairSet.load(source / "distilled", fix=fix)
        return validated(pairs, source / "distilled.json", fix)
    if is_hf_folder(source):
        return validated(load_hf(source), source / MARKER, REEXPORT)
    raise UserError(
        f"source={source} holds no distilled.safetensors and no Hugging Face export; point it "
        "at a distill run folder or a `mmdistill export --format hf` folder"
    )


FLOATS = (torch.float16, torch.bfloat16, torch.float64)  # cast to float32: no range lost
INTEGERS = (torch.int8, torch.uint8, torch.int16, torch.int32)  # cast to int64
IDS, MASKS = (torch.int64,), (torch.int64, torch.bool)


def _tensor(name: str, x: Tensor, wanted: tuple, where: Path, fix: str) -> Tensor:
    """`x` in a dtype evaluation reads (`wanted`): other float widths become float32, smaller
    integers int64; anything else, or a value that is not finite, is refused."""
    if x.dtype in FLOATS and torch.float32 in wanted:
        x = x.float()
    elif x.dtype in INTEGERS and torch.int64 in wanted:
        x = x.long()
    if x.dtype not in wanted:
        raise io.damaged(where, f"{name} are {str(x.dtype).removeprefix('torch.')}", fix)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise io.damaged(where, f"{name} hold values that are not finite", fix)
    return x


def validated(pairs: PairSet, where: Path, fix: str) -> PairSet:
    """A loaded set whose labels and tensors can be trusted: known method, plain dataset name,
    tensors cast where that is exact (or range-safe) and refused otherwise."""
    check_labels(pairs, where, fix)
    if not isinstance(pairs.images, Tensor):
        return pairs
    mask, index = pairs.text_mask, pairs.image_index
    return replace(
        pairs,
        images=_tensor("images", pairs.images, (torch.float32,), where, fix),
        texts=_tensor("texts", pairs.texts, (torch.float32, torch.int64), where, fix),
        text_mask=None if mask is None else _tensor("text_mask", mask, MASKS, where, fix),
        image_index=None if index is None else _tensor("image_index", index, IDS, where, fix),
    )


def check_labels(pairs: PairSet, where: Path, fix: str) -> None:
    """The set's method is one of mmdistill's, its dataset label a plain name."""
    method = pairs.meta.get("method")
    known = presets()
    if not isinstance(method, str) or method not in known:
        raise io.damaged(
            where,
            f"it names method {method!r}, which is none of mmdistill's ({', '.join(known)})",
            fix,
        )
    dataset = pairs.meta.get("dataset")
    if dataset is not None:
        try:
            io.plain_name(dataset, "dataset")
        except UserError:
            raise io.damaged(where, f"its dataset label {dataset!r} is not a name", fix) from None


def source_config(source: Path) -> DictConfig:
    """The config a set was distilled with: its run folder's, or the one its export keeps."""
    if (source / "distilled.safetensors").is_file():
        return run_config(source)
    marker = source / MARKER
    info = io.read_json(marker, fix=REEXPORT, kind=dict)
    if not isinstance(info.get("config"), dict):
        raise io.damaged(marker, "it keeps no distill config", REEXPORT)
    register_resolvers()
    return OmegaConf.create(info["config"])


def load_hf(folder: Path) -> PairSet:
    """Rebuild the exact PairSet of an export; a folder that is not one, or is damaged, is one
    line."""
    import datasets

    marker = folder / MARKER
    if not marker.is_file():
        raise UserError(
            f"{folder} is a Hugging Face datasets folder but not an mmdistill export (no "
            f"{MARKER}); {REEXPORT}"
        )
    info = io.read_json(marker, fix=REEXPORT, kind=dict)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(
            f"{marker} is not an mmdistill export of version {VERSION} (format "
            f"{info.get('format')!r}, version {info.get('version')!r}); {REEXPORT}"
        )
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # datasets raises many kinds for a broken folder
        why = f"datasets cannot load it: {type(err).__name__}: {err}"
        raise io.damaged(folder, why, REEXPORT) from None
    if not isinstance(ds, datasets.Dataset):
        raise io.damaged(folder, "it holds several splits, not one exported set", REEXPORT)
    with io.reading(marker, REEXPORT):
        return _rebuild(ds, info, folder)


def _rebuild(ds: Any, info: dict[str, Any], folder: Path) -> PairSet:
    n = int(info["pairs"])
    shapes: dict[str, dict] = info["tensors"]
    missing = [c for c in shapes if c not in ds.column_names]
    if missing or ds.num_rows != n:
        why = f"columns {missing} missing" if missing else f"{ds.num_rows} rows for {n} pairs"
        raise io.damaged(folder, why, REEXPORT)
    try:
        table = ds.select_columns(list(shapes)).with_format("numpy")
        arrays = {name: np.asarray(table[name]) for name in shapes}
    except Exception as err:  # a data file cut short or overwritten
        why = f"its tensors cannot be read: {type(err).__name__}: {err}"
        raise io.damaged(folder, why, REEXPORT) from None
    t: dict[str, Tensor] = {}
    for name, spec in shapes.items():
        value = torch.from_numpy(arrays[name].copy()).to(DTYPES[spec["dtype"]][0])
        if list(value.shape) != list(spec["shape"]):
            why = f"{name} has shape {list(value.shape)}, {MARKER} says {spec['shape']}"
            raise io.damaged(folder, why, REEXPORT)
        t[name] = value
    index = t["image_index"]
    stored = int(info["images_stored"])
    images = t["syn_image"]
    if info["has_image_index"]:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= stored):
            raise io.damaged(folder, "image_index points outside the stored images", REEXPORT)
        first = torch.full((stored,), -1, dtype=torch.long)
        first[index] = torch.arange(n)  # a pair of each image (its pairs hold the same rows)
        if bool((first < 0).any()):
            raise io.damaged(folder, "a stored image is used by no pair", REEXPORT)
        images = images[first]
    similarity = None
    if info["similarity"]:
        similarity = build_similarity(**info["similarity"])
        similarity.load_state_dict(
            {k.removeprefix("similarity_"): v for k, v in t.items() if k.startswith("similarity_")}
        )
        similarity.requires_grad_(False)
    pairs = PairSet(
        images=images,
        texts=t["syn_text"],
        text_mask=t.get("syn_text_mask"),
        image_index=index if info["has_image_index"] else None,
        similarity=similarity,
        similarity_args=info["similarity"] or {},
        step_sizes={str(k): float(v) for k, v in info["step_sizes"].items()},
        loss=str(info["loss"]),
        meta=dict(info["meta"]),
    )
    problem = pairs.inconsistency()
    if problem:
        raise io.damaged(folder, problem, REEXPORT)
    return pairs
