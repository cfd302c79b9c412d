"""The verbs that run jobs: distill, train (full-data upper bound) and evaluate.

Each job writes into one run folder (Hydra's output dir): meta.json, the pair set, results.json,
recall.md and a `done` marker. A folder that is `done` is skipped; one that is not is resumed
from what it holds (distilled set, finished students, method checkpoints).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mmdistill import io, report
from mmdistill.data import ImageTextSet, build_dataset
from mmdistill.data.features import RealSplit, real_split
from mmdistill.errors import UserError
from mmdistill.export import export_run
from mmdistill.methods import DistillContext, get_method
from mmdistill.models.encoders import Encoder, build_encoder
from mmdistill.pairs import PairSet
from mmdistill.protocol import run_protocol
from mmdistill.runs import Run
from mmdistill.sweeps import resolve_budget

log = logging.getLogger(__name__)
# soft_wrap: paths and one-line errors stay one line, whatever the terminal width.
console = Console(stderr=True, soft_wrap=True)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return name


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@dataclass
class Prepared:
    encoder: Encoder
    train: RealSplit
    val: RealSplit
    test: RealSplit
    data: ImageTextSet


def prepare(cfg: DictConfig, device: str, run: Run, progress: Progress) -> Prepared:
    """Read the dataset, apply noise, build the encoder and the real splits (cached)."""
    with run.timed("data"):
        data = build_dataset(cfg.dataset)
        from mmdistill.data.noise import apply_noise

        data = apply_noise(data, cfg.noise, run.path)
        encoder = build_encoder(cfg.encoder)
        splits = {
            s: real_split(
                encoder,
                data.split(s),
                data.name,
                Path(cfg.paths.cache_dir),
                device,
                progress=progress,
            )
            for s in ("train", "val", "test")
        }
    return Prepared(encoder, splits["train"], splits["val"], splits["test"], data)


def _evaluate_pairs(
    cfg: DictConfig, run: Run, prep: Prepared, pairs: PairSet, device: str, title: str
) -> dict:
    """Train the protocol's students (resuming finished ones), write results and recall.md."""
    partial = run.path / "students.json"
    done = io.read_json(partial) if partial.is_file() else []
    with run.timed("evaluate"):
        res = run_protocol(
            prep.encoder,
            pairs,
            cfg.eval,
            prep.test,
            prep.val,
            device,
            int(cfg.seed),
            done=done,
            on_student=lambda s: io.write_json(partial, s),
        )
    results = {
        "verb": cfg.verb,
        "dataset": cfg.dataset.name,
        "encoder": cfg.encoder.name,
        "method": cfg.method.name if "method" in cfg else pairs.meta.get("method", "full"),
        "pairs": len(pairs),
        "train_pairs": prep.train.n_pairs,
        "budget": OmegaConf.to_container(cfg.get("budget", {}), resolve=True)
        if "budget" in cfg
        else None,
        "noise": OmegaConf.to_container(cfg.noise, resolve=True),
        "seed": int(cfg.seed),
        "protocol": OmegaConf.to_container(cfg.eval, resolve=True),
        "students": res.students,
        "summary": res.summary,
    }
    io.write_json(run.path / "results.json", results)
    io.write_text(run.path / "recall.md", report.markdown(title, res.summary, len(res.students)))
    report.print_table(console, title, res.summary, len(res.students))
    return results


def distill(cfg: DictConfig, run_dir: Path, device: str) -> None:
    run = Run(run_dir, "distill", device, int(cfg.seed))
    with progress_bar() as progress:
        prep = prepare(cfg, device, run, progress)
        n = resolve_budget(cfg.budget, prep.train.n_pairs)
        method = get_method(cfg.method.name)(cfg.method)
        distilled = run.path / "distilled"
        if distilled.with_suffix(".safetensors").is_file():
            console.print(f"resuming: using the distilled set already in {run.path}")
            pairs = PairSet.load(distilled)
        else:
            ctx = DistillContext(
                cfg, prep.encoder, prep.train, prep.val, n, device, int(cfg.seed), run, progress
            )
            with run.timed("distill"):
                pairs = method.distill(ctx)
            pairs = pairs.detached()
            pairs.meta.update(
                method=cfg.method.name, budget=n, dataset=cfg.dataset.name, encoder=cfg.encoder.name
            )
            pairs.save(distilled)
    _evaluate_pairs(
        cfg,
        run,
        prep,
        pairs,
        device,
        f"{cfg.method.name} · {len(pairs)} pairs · {cfg.dataset.name}",
    )
    with run.timed("export"):
        export_run(run.path, cfg, pairs, prep.encoder, prep.train, prep.data.train, device=device)
    run.mark_done()


def train(cfg: DictConfig, run_dir: Path, device: str) -> None:
    """Full-data students: the upper-bound row every method is measured against."""
    run = Run(run_dir, "train", device, int(cfg.seed))
    with progress_bar() as progress:
        prep = prepare(cfg, device, run, progress)
    pairs = prep.train.pairset()
    _evaluate_pairs(
        cfg, run, prep, pairs, device, f"full data · {len(pairs)} pairs · {cfg.dataset.name}"
    )
    run.mark_done()


def evaluate(cfg: DictConfig, run_dir: Path, device: str) -> None:
    """Re-score a saved distilled set, on its own test split or another dataset's."""
    source = Path(str(cfg.source)).expanduser()
    if not (source / "distilled.safetensors").is_file():
        raise UserError(
            f"source={source} holds no distilled.safetensors; point it at a distill run folder"
        )
    pairs = PairSet.load(source / "distilled")
    run = Run(run_dir, "evaluate", device, int(cfg.seed))
    run.set(source=str(source))
    with progress_bar() as progress:
        prep = prepare(cfg, device, run, progress)
    _check_compatible(pairs, prep)
    _evaluate_pairs(
        cfg,
        run,
        prep,
        pairs,
        device,
        f"{pairs.meta.get('method', '?')} from {source.name} · {cfg.dataset.name}",
    )
    run.mark_done()


def _check_compatible(pairs: PairSet, prep: Prepared) -> None:
    """A set distilled for one encoder's spaces cannot be read by another's students."""
    want_img = prep.train.images.shape[1:]
    want_txt = (
        prep.train.texts.shape[1:]
        if prep.train.texts.dim() == 2 and prep.train.texts.is_floating_point()
        else None
    )
    got_img = pairs.images.shape[1:]
    if tuple(got_img) != tuple(want_img):
        raise UserError(
            f"the distilled images have shape {list(got_img)} but encoder "
            f"{prep.encoder.name} reads {list(want_img)}; "
            "evaluate with the encoder it was distilled for (encoder=...)"
        )
    if want_txt is not None and tuple(pairs.texts.shape[1:]) != tuple(want_txt):
        raise UserError(
            f"the distilled texts have shape {list(pairs.texts.shape[1:])} but encoder "
            f"{prep.encoder.name} reads {list(want_txt)}; use the encoder it was distilled for"
        )


def buffer(cfg: DictConfig, run_dir: Path, device: str) -> None:
    """Expert trajectories for trajectory-matching methods (see mmdistill.experts)."""
    from mmdistill.experts import buffer_job

    buffer_job(cfg, run_dir, device)


JOBS = {"distill": distill, "train": train, "evaluate": evaluate, "buffer": buffer}
