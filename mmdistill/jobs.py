"""Every verb: the Hydra jobs (distill, train, evaluate, buffer) and the folder verbs (table,
export, report).

Each job writes into one run folder (Hydra's output dir): meta.json, the pair set, results.json,
recall.md and a `done` marker. A folder that is `done` is skipped; one that is not is resumed
from what it holds (distilled set, finished students, method checkpoints).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from mmdistill import io, loggers
from mmdistill.config import register_resolvers
from mmdistill.console import console, progress_bar
from mmdistill.data import ImageTextSet, build_dataset
from mmdistill.data.noise import NoiseMask, apply_noise, save_mask
from mmdistill.errors import UserError
from mmdistill.methods import DistillContext, get_method
from mmdistill.models.encoders import Encoder
from mmdistill.models.factory import build_encoder
from mmdistill.models.student import is_text_features
from mmdistill.report import cross_arch, pages, recall, share, table_files, tables
from mmdistill.report.visuals import export_run
from mmdistill.runs import Run, check_folders
from mmdistill.sweeps import resolve_budget
from mmdistill.training import cost, precision, transfer
from mmdistill.training.experts import ExpertSource
from mmdistill.training.features import RealSplit, real_split
from mmdistill.training.pairs import PairSet
from mmdistill.training.protocol import run_protocol

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return name


@dataclass
class Prepared:
    encoder: Encoder
    train: RealSplit
    val: RealSplit
    test: RealSplit
    data: ImageTextSet
    noise_mask: NoiseMask | None  # which training pairs the noise corrupted (None: clean data)


def prepare(
    cfg: DictConfig,
    device: str,
    run: Run,
    progress: Progress | None,
    check: Callable[[ImageTextSet], None] | None = None,
) -> Prepared:
    """Read the dataset, apply noise, build the encoder and the real splits (cached).
    `check` sees the data before anything is encoded (a budget larger than the data fails
    there, not after minutes of feature encoding)."""
    with run.timed("data"):
        data, mask = apply_noise(build_dataset(cfg.dataset), cfg.noise)
        if check is not None:
            check(data)
        if mask is not None:
            save_mask(run.path, mask)
        encoder = build_encoder(cfg.encoder)
        splits = {
            s: real_split(
                encoder,
                data.split(s),
                data.name,
                Path(cfg.paths.cache_dir),
                device,
                progress=progress,
                workers=cfg.get("data_workers", "auto"),
            )
            for s in ("train", "val", "test")
        }
    return Prepared(encoder, splits["train"], splits["val"], splits["test"], data, mask)


def scored_split(cfg: DictConfig, prep: Prepared) -> RealSplit:
    """The split the students are scored on: test for reported rows, val while tuning."""
    split = str(cfg.eval.get("split", "test"))
    if split not in ("test", "val"):
        raise UserError(f"eval.split={split!r}: choose test (reported rows) or val (tuning)")
    return prep.test if split == "test" else prep.val


def _evaluate_pairs(
    cfg: DictConfig, run: Run, prep: Prepared, pairs: PairSet, device: str, title: str
) -> dict:
    """Train the protocol's students (resuming finished ones), write results and recall.md."""
    partial = run.path / "students.json"
    fix = "delete it; its students are trained again"
    done = io.read_json(partial, fix=fix, kind=list) if partial.is_file() else []
    if not all(isinstance(s, dict) and "r_mean" in s for s in done):
        raise io.damaged(partial, "a student record without its recalls", fix)
    with run.timed("evaluate"), progress_bar() as progress:
        task = progress.add_task("students", total=int(cfg.eval.students), completed=len(done))

        def finished(students: list[dict]) -> None:
            io.write_json(partial, students)
            last = students[-1]
            info = f"student {last['student']}: r_mean {last['r_mean']:.2f}"
            progress.update(task, completed=len(students), info=info)

        res = run_protocol(
            prep.encoder,
            pairs,
            cfg.eval,
            scored_split(cfg, prep),
            prep.val,
            device,
            int(cfg.seed),
            done=done,
            on_student=finished,
            on_curve=lambda stream, curve: _write_curve(run, stream, curve),
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
        "precision": precision.current(),
        "protocol": OmegaConf.to_container(cfg.eval, resolve=True),
        "students": res.students,
        "summary": res.summary,
    }
    if pairs.partial:  # a set kept when its distillation stopped early
        results["partial"] = pairs.meta["partial"]
    results["cost"] = cost.block(pairs, run.meta, torch.get_num_threads())
    if "transfer" in pairs.meta:  # evaluated with another encoder than it was made for
        results["transfer"] = pairs.meta["transfer"]
    io.write_json(run.path / "results.json", results)
    io.write_text(run.path / "recall.md", recall.markdown(title, res.summary, len(res.students)))
    recall.print_table(console, title, res.summary, len(res.students))
    return results


def _write_curve(run: Run, stream: str, curve: list[dict]) -> None:
    """A student's curve, recorded in its worker, into the run's metrics."""
    for record in curve:
        run.metrics.write(stream, **record)


def distill(cfg: DictConfig, run_dir: Path, device: str) -> None:
    run = Run(run_dir, "distill", device, int(cfg.seed))
    method = get_method(cfg.method.family)(cfg.method)  # checks its settings before any data
    with progress_bar() as progress:
        prep = prepare(
            cfg, device, run, progress, check=lambda d: resolve_budget(cfg.budget, d.train.n_pairs)
        )
        n = resolve_budget(cfg.budget, prep.train.n_pairs)
        distilled = run.path / "distilled"
        pairs = _finished_set(cfg, run, n)
        if pairs is None:
            ctx = distill_context(cfg, prep, n, device, run, progress)
            with run.timed("distill"):
                pairs = method.distill(ctx)
            pairs = pairs.detached()
            pairs.meta.update(
                method=cfg.method.name,
                budget=n,
                dataset=cfg.dataset.name,
                encoder=cfg.encoder.name,
                **cost.buffer_record(pairs.meta),
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
    with run.timed("report"):
        page = pages.run_report(
            run.path, cfg, pairs, prep.encoder, prep.train, prep.data.train, device=device
        )
    for problem in page.problems:
        console.print(problem)
    console.print(f"report: {page.path}")
    run.mark_done()


def _finished_set(cfg: DictConfig, run: Run, n: int) -> PairSet | None:
    """The distilled set a resumed run already holds, checked against this command; None when
    there is none, or only a partial one (distillation continues from its checkpoint)."""
    path = run.path / "distilled"
    if not path.with_suffix(".safetensors").is_file():
        return None
    fix = f"delete {path}.safetensors and {path}.json to distil again"
    pairs = PairSet.load(path, fix=fix)
    if pairs.partial:
        log.info("resuming: distillation continues; the partial set in %s is kept", run.path)
        return None
    wanted = {
        "method": cfg.method.name,
        "budget": n,
        "dataset": cfg.dataset.name,
        "encoder": cfg.encoder.name,
    }
    saved = {k: pairs.meta.get(k) for k in wanted}
    if saved != wanted:
        raise UserError(
            f"the distilled set in {run.path} was made with {saved}, not {wanted}; "
            "give a new hydra.run.dir for these settings"
        )
    log.info("resuming: using the distilled set already in %s", run.path)
    return pairs


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
    """Re-score a saved distilled set, on its own test split or another dataset's, or with
    another encoder's students (the set converted into its spaces: `training/transfer.py`)."""
    source = Path(str(cfg.source)).expanduser()
    pairs = share.read_set(source)  # a distill run folder or a Hugging Face export
    run = Run(run_dir, "evaluate", device, int(cfg.seed))
    run.set(source=str(source))
    with progress_bar() as progress:
        prep = prepare(cfg, device, run, progress)
        if transfer.crosses(pairs, prep.encoder):
            with run.timed("transfer"):
                pairs = transfer.from_run(
                    pairs,
                    share.source_config(source),
                    source,
                    prep.encoder,
                    prep.train,
                    prep.data.train,
                    str(cfg.dataset.name),
                    cfg.eval,
                    cfg.get("transfer", {}).get("resize"),
                    str(cfg.get("transfer", {}).get("texts", "auto")),
                    Path(cfg.paths.cache_dir),
                    device,
                    progress,
                    cfg.get("data_workers", "auto"),
                )
                pairs.save(run.path / "transferred")  # the set the students train on, to inspect
    _check_compatible(pairs, prep)
    _evaluate_pairs(
        cfg,
        run,
        prep,
        pairs,
        device,
        f"{pairs.meta.get('method', '?')} from {source.name} · {cfg.dataset.name}"
        + transfer.title(pairs),
    )
    run.mark_done()


def _check_compatible(pairs: PairSet, prep: Prepared) -> None:
    """A set distilled for one encoder's spaces cannot be read by another's students."""
    want_img = prep.train.images.shape[1:]
    want_txt = prep.train.texts.shape[1:] if is_text_features(prep.train.texts) else None
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
    if want_txt is None:
        _check_tokens(pairs.texts, prep.encoder)


def _check_tokens(texts: torch.Tensor, encoder: Encoder) -> None:
    """Token ids inside the encoder's vocabulary, token embeddings of its width."""
    tables = [m for m in encoder.text_trunk.modules() if isinstance(m, torch.nn.Embedding)]
    if not tables or texts.numel() == 0:
        return
    vocab = max(tables, key=lambda m: m.num_embeddings)
    if not texts.is_floating_point():
        low, high = int(texts.min()), int(texts.max())
        if low < 0 or high >= vocab.num_embeddings:
            raise UserError(
                f"the distilled token ids span {low}..{high} but encoder {encoder.name}'s "
                f"vocabulary has {vocab.num_embeddings} tokens; the set is damaged or made for "
                "another encoder (encoder=...)"
            )
        return
    embed = getattr(encoder.text_trunk, "embed_tokens", None)
    if embed is None:
        return
    device = next(encoder.text_trunk.parameters()).device
    with torch.no_grad():
        width = int(embed(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1])
    if texts.dim() != 3 or texts.shape[-1] != width:
        raise UserError(
            f"the distilled texts have shape {list(texts.shape[1:])} but encoder "
            f"{encoder.name} reads token ids or [length, {width}] token embeddings; use the "
            "encoder it was distilled for"
        )


def distill_context(
    cfg: DictConfig, prep: Prepared, pairs: int, device: str, run: Run, progress: Progress | None
) -> DistillContext:
    """What a method sees of the job: the prepared data and the settings it may read."""
    return DistillContext(
        encoder=prep.encoder,
        train=prep.train,
        val=prep.val,
        pairs=pairs,
        device=device,
        seed=int(cfg.seed),
        run=run,
        progress=progress,
        dataset=str(cfg.dataset.name),
        noise=cfg.noise,
        noise_mask=prep.noise_mask,
        eval=cfg.eval,
        expert=cfg.get("expert"),
        cache_dir=Path(str(cfg.paths.cache_dir)).expanduser(),
        monitor=cfg.get("monitor"),
        max_steps=cfg.limits.method_steps,
    )


def buffer(cfg: DictConfig, run_dir: Path, device: str) -> None:
    """`mmdistill buffer`: train the experts (all, or `expert.index`) into the shared cache."""
    run = Run(run_dir, "buffer", device, int(cfg.seed))
    index = cfg.expert.get("index")
    indices = None if index is None else [int(index)]
    with progress_bar() as progress:
        prep = prepare(cfg, device, run, progress)
        with run.timed("experts"):
            source = ExpertSource(
                cfg.expert,
                prep.encoder,
                prep.train,
                prep.val,
                cfg.dataset.name,
                cfg.noise,
                Path(cfg.paths.cache_dir),
                device,
                say=log.info,
                progress=progress,
                metrics=run.metrics,
            )
            buf = source.buffer(indices=indices)
    wanted = indices if indices is not None else list(range(int(cfg.expert.num_experts)))
    experts = []
    for i in wanted:
        with io.reading(buf.expert_path(i), f"delete it; expert {i} is trained again"):
            experts.append(json.loads(buf.metadata(i).get("stats", "{}")))
    io.write_json(
        run.path / "buffer.json", {"path": str(buf.path), "key": buf.key, "experts": experts}
    )
    run.set(buffer=str(buf.path), buffer_key=buf.key)
    run.mark_done()


Job = Callable[[DictConfig, Path, str], None]


def _logged(job: Job) -> Job:
    """The job with the chosen experiment logger (`logger=...`) fed from its metrics."""

    def logged_job(cfg: DictConfig, run_dir: Path, device: str) -> None:
        config = functools.partial(OmegaConf.to_container, cfg, resolve=True)
        with loggers.attached(cfg.get("logger"), run_dir, config):
            job(cfg, run_dir, device)

    return logged_job


JOBS: dict[str, Job] = {
    "distill": _logged(distill),
    "train": _logged(train),
    "evaluate": _logged(evaluate),
    "buffer": _logged(buffer),
}


# ------------------------------------------------------------------------------ folder verbs


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (a UserError), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def table(args: list[str]) -> None:
    """`mmdistill table <folder>...`: every results.json below the folders, paper layout."""
    ap = _Parser(
        prog="mmdistill table",
        description="Aggregate results.json files below the folders into paper-layout tables.",
    )
    ap.add_argument("folders", nargs="+", type=Path, help="sweep or run folders (searched deeply)")
    ap.add_argument("--out", type=Path, help="where to write the tables (default: first folder)")
    ap.add_argument(
        "--into", type=Path, help="also put the Markdown table into this document (a section)"
    )
    ap.add_argument("--section", default="results", help="the section's name for --into")
    ap.add_argument(
        "--columns",
        type=tables.parse_columns,
        default=tables.METRICS,
        help="what each budget shows, e.g. r_mean,cost.bytes,cost.pairs_equiv,cost.wall_s "
        "(also `columns=...`; default: TR/IR@1/5/10 and r_mean)",
    )
    ap.add_argument(
        "--cross-arch",
        action="store_true",
        help="the cross-architecture matrix instead: rows source encoder x method, columns "
        "evaluation encoders, cells r_mean (cross_arch.md, cross_arch.csv)",
    )
    # `columns=...` (the Hydra-style spelling) is the same option as `--columns ...`
    ns = ap.parse_args([re.sub(r"^columns=", "--columns=", a) for a in args])
    if ns.into:
        table_files.check_into(ns.into)
    results, problems = tables.collect(ns.folders)
    if ns.cross_arch:
        _cross_arch_table(ns, results, problems)
        return
    built = tables.build(results, problems, ns.columns)
    for line in built.warnings:
        print(line, file=sys.stderr)
    table_files.print_rich(built)
    files = table_files.write(built, ns.out or ns.folders[0])
    if ns.into:
        table_files.update_section(ns.into, ns.section, table_files.markdown(built, heading="###"))
        files.append(ns.into)
    print(f"{len(results)} results -> " + ", ".join(str(f) for f in files), file=sys.stderr)


def _cross_arch_table(ns: argparse.Namespace, results: list, problems: list[str]) -> None:
    matrix = cross_arch.build(results, problems)
    for line in matrix.warnings:
        print(line, file=sys.stderr)
    text = cross_arch.markdown(matrix)
    print(text)
    files = cross_arch.write(matrix, ns.out or ns.folders[0])
    if ns.into:
        table_files.update_section(ns.into, ns.section, cross_arch.markdown(matrix, heading="###"))
        files.append(ns.into)
    print(f"{len(results)} results -> " + ", ".join(str(f) for f in files), file=sys.stderr)


def export(args: list[str]) -> None:
    """`mmdistill export <run>`: image grid, nearest real captions and similarity heat-map."""
    ap = _Parser(
        prog="mmdistill export",
        description="Image grid, nearest real captions and similarity heat-map of a distill run.",
    )
    ap.add_argument("run", type=Path, help="a distill run folder")
    ap.add_argument("--out", type=Path, help="where to write (default: the run folder)")
    ap.add_argument("--max", type=int, default=64, help="images in the grid (default 64)")
    ap.add_argument("--neighbours", type=int, default=3, help="real images per feature row")
    ap.add_argument("--device", default="cpu", help="for encoding uncached features")
    ap.add_argument(
        "--format",
        choices=sorted(EXPORTS),
        default="png",
        help="png: grid, captions and heat-map files (default); hf: a Hugging Face datasets "
        "folder with a dataset card (default --out: <run>/hf)",
    )
    ns = ap.parse_args(args)
    if not ns.run.is_dir():
        raise UserError(f"{ns.run} is not a folder; give a distill run folder")
    if ns.out is not None:
        check_folders({"--out": ns.out})
    register_resolvers()
    files = EXPORTS[ns.format](ns)
    for f in files:
        print(f, file=sys.stderr)


EXPORTS: dict[str, Callable[[argparse.Namespace], list[Path]]] = {
    "png": lambda ns: export_run(
        ns.run, out=ns.out, max_images=ns.max, neighbours=ns.neighbours, device=ns.device
    ),
    "hf": lambda ns: [share.export_hf(ns.run, out=ns.out, device=ns.device)],
}


def report(args: list[str]) -> None:
    """`mmdistill report <folder>`: one self-contained report.html for a run or a sweep."""
    ap = argparse.ArgumentParser(
        prog="mmdistill report",
        description="One self-contained report.html (inline images, no network) for a run "
        "folder, or for a sweep: its paper-layout table, recall vs pairs, a page per run.",
    )
    ap.add_argument("folder", type=Path, help="a run folder, or a folder of runs (a sweep)")
    ap.add_argument("--out", type=Path, help="the page to write (default: <folder>/report.html)")
    ap.add_argument("--max", type=int, default=256, help="distilled pairs shown (default 256)")
    ap.add_argument("--device", default="cpu", help="for encoding uncached features")
    ap.add_argument(
        "--screenshot", type=Path, help="also load the page in headless Chromium and save a PNG"
    )
    ns = ap.parse_args(args)
    if not ns.folder.is_dir():
        raise UserError(f"{ns.folder} is not a folder; give a run folder or a sweep folder")
    if ns.out is not None and (ns.out.is_dir() or ns.out.suffix.lower() not in (".html", ".htm")):
        raise UserError(f"--out {ns.out} is not an .html page; give the page's file name")
    check_folders({"--out": (ns.out or ns.folder / "report.html").parent})
    register_resolvers()
    page = pages.folder_report(ns.folder, out=ns.out, max_images=ns.max, device=ns.device)
    for problem in page.problems:
        print(problem, file=sys.stderr)
    print(page.path, file=sys.stderr)
    if ns.screenshot:
        from mmdistill.report.browser import load_page

        check = load_page(page.path, screenshot=ns.screenshot)
        for line in check.errors:
            print(f"page error: {line}", file=sys.stderr)
        for where in check.overflow:  # a headless screenshot shows no scroll bar: it looks cut
            print(f"page layout: {where} is wider than the window", file=sys.stderr)
        print(ns.screenshot, file=sys.stderr)


FOLDER_JOBS: dict[str, Callable[[list[str]], None]] = {
    "table": table,
    "export": export,
    "report": report,
}
