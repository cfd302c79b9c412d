"""The evaluation protocol: train K fresh students on a pair set, score retrieval on a split.

Every switch that changes the numbers is config (`conf/eval/`) and recorded with the results:
the student recipe (optimizer, lr or the set's learned step sizes, steps, batch, weight decay,
feature dropout, schedule), checkpoint selection (final step, best on val, or the papers'
best-on-test preset), and the student loss.

Each student also brings back its curve (loss and learning rates every few steps, and the
selection checks' r_mean) with its record; the caller writes it to the run's metrics, so forked
workers never write a file themselves.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from mmdistill.errors import UserError
from mmdistill.models.encoders import Encoder
from mmdistill.models.student import Student, is_image_features
from mmdistill.training.features import RealSplit
from mmdistill.training.pairs import PairSet
from mmdistill.training.precision import autocast
from mmdistill.training.retrieval import METRICS, NonFiniteEmbeddings, recall_at_k
from mmdistill.training.stacked import StackedBatches, StackedStudent, stackable, stacked_loss
from mmdistill.training.trainer import Batches, Recipe, Trainer, pair_loss

log = logging.getLogger(__name__)
SELECTIONS = ("final", "best_val", "best_test")


@torch.no_grad()
def embed_split(
    student: Student, split: RealSplit, device: str, batch: int = 512
) -> tuple[Tensor, Tensor]:
    """L2-normalised image and caption embeddings of a split."""
    student.eval()
    with autocast():
        imgs = [
            student.encode_image(split.images[s : s + batch].to(device)).float()
            for s in range(0, len(split.images), batch)
        ]
        txts = []
        for s in range(0, split.n_pairs, batch):
            mask = None if split.text_mask is None else split.text_mask[s : s + batch].to(device)
            txts.append(student.encode_text(split.texts[s : s + batch].to(device), mask).float())
    return torch.cat(imgs), torch.cat(txts)


def evaluate(student: Student, split: RealSplit, device: str) -> dict[str, float]:
    img, txt = embed_split(student, split, device)
    return recall_at_k(img, txt, split.caption_image)


def student_loss_name(cfg: DictConfig, pairs: PairSet) -> str:
    return pairs.loss if cfg.loss == "auto" else str(cfg.loss)


def train_student(
    student: Student,
    pairs: PairSet,
    cfg: DictConfig,
    seed: int,
    device: str,
    select_on: RealSplit | None = None,
) -> tuple[Student, dict]:
    """Train one student; returns it (at the selected checkpoint) and a small history."""
    if cfg.selection not in SELECTIONS:
        raise UserError(
            f"unknown eval.selection {cfg.selection!r}; choose one of {', '.join(SELECTIONS)}"
        )
    student.to(device)
    gen = torch.Generator().manual_seed(seed)
    steps = int(cfg.steps)
    trainer = Trainer(
        student,
        Recipe.from_cfg(cfg),
        pair_loss(pairs, student_loss_name(cfg, pairs), device),
        total_steps=steps,
        pairs=pairs,
        hint=f"lower eval.lr (now {cfg.lr})",
    )
    best, best_state, history = -1.0, None, []
    t0 = time.perf_counter()
    curve: list[dict] = []

    def log(record: dict) -> None:
        curve.append({**record, "wall": time.perf_counter() - t0})

    trainer.on_log = log
    checked = "test_r_mean" if cfg.selection == "best_test" else "val_r_mean"

    def select(step: int) -> None:
        nonlocal best, best_state
        if select_on is None or cfg.selection == "final":
            return
        if step % int(cfg.eval_every) and step != steps:
            return
        try:
            r = evaluate(student, select_on, device)["r_mean"]
        except NonFiniteEmbeddings:
            r = None  # a diverged checkpoint is never selected
        history.append({"step": step, "r_mean": r})
        if r is not None:
            curve.append({"step": step, checked: r, "wall": time.perf_counter() - t0})
        if r is not None and r > best:
            best, best_state = r, copy.deepcopy(student.state_dict())

    trainer.run(Batches(len(pairs), min(int(cfg.batch_size), len(pairs)), gen), steps, select)
    if best_state is not None:
        student.load_state_dict(best_state)
    hist = {"history": history, "selected_r_mean": best if best_state else None, "curve": curve}
    return student, hist


@dataclass
class ProtocolResult:
    students: list[dict]
    summary: dict[str, dict[str, float]]


def summarize(students: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and (population) std over students for the six recalls and r_mean."""
    out = {}
    for m in (*METRICS, "r_mean"):
        vals = torch.tensor([s[m] for s in students], dtype=torch.float64)
        out[m] = {
            "mean": vals.mean().item(),
            "std": vals.std(unbiased=False).item() if len(vals) > 1 else 0.0,
        }
    return out


def student_workers(cfg: DictConfig, device: str, students: int) -> int:
    """How many students train at once: on CPU one process per torch thread by default, each
    at one thread (small heads use threads poorly: two one-thread students finish in about
    0.6x the time of two two-thread students in turn); on GPU one at a time."""
    wanted = cfg.get("workers", "auto")
    if device != "cpu" or students < 2 or "fork" not in mp.get_all_start_methods():
        return 1
    n = torch.get_num_threads() if str(wanted) == "auto" else int(wanted)
    return max(1, min(n, students))


@dataclass
class _StudentJob:
    """What a student needs; forked workers inherit it instead of unpickling it."""

    encoder: Encoder
    pairs: PairSet
    cfg: DictConfig
    test: RealSplit
    select_on: RealSplit | None
    device: str
    seed: int


_JOB: _StudentJob | None = None


def _train_and_test(job: _StudentJob, k: int) -> dict:
    student_seed = job.seed * 1000 + k
    student = job.encoder.new_student(student_seed, feature_dropout=float(job.cfg.feature_dropout))
    student, hist = train_student(
        student, job.pairs, job.cfg, student_seed, job.device, job.select_on
    )
    rec = _test(job, student, k)
    rec.update(hist)
    return rec


def _in_worker(k: int) -> dict:
    assert _JOB is not None
    return _train_and_test(_JOB, k)


def _one_thread_worker() -> None:
    """Pool initializer: one torch thread, and exit when the parent dies (a killed job must
    not leave students training for a minute): the kernel's parent-death signal on Linux,
    else a thread that watches the parent's pid."""
    torch.set_num_threads(1)
    parent = mp.parent_process()
    if parent is None:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1  # linux/prctl.h
        armed = libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        armed = False
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent.pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def train_together(cfg: DictConfig, device: str, encoder: Encoder) -> bool:
    """Whether students train as one stacked model: `eval.together` true, or auto on a GPU,
    for head-only students (frozen trunks) with linear heads and final-step selection."""
    wanted = str(cfg.get("together", "auto")).lower()  # YAML reads true / false as booleans
    heads = {str(encoder.cfg.head.image), str(encoder.cfg.head.text)}
    head_only = encoder.image_space == "feature" and encoder.text_space == "feature"
    if wanted == "false" or cfg.selection != "final" or not head_only:
        return False
    if not heads <= {"linear", "identity"}:
        return False
    return wanted == "true" or torch.device(device).type == "cuda"


def _together(job: _StudentJob, todo: list[int]) -> list[dict]:
    """Train the students `todo` at once as one `StackedStudent`, each with the seeds and
    draws it would have alone."""
    dropout = float(job.cfg.feature_dropout)
    device = torch.device(job.device)
    students, gens, batches = [], [], []
    for k in todo:
        seed = job.seed * 1000 + k
        students.append(job.encoder.new_student(seed, feature_dropout=dropout).to(device))
        gen = torch.Generator(device=device)
        if device.type == "cpu":  # alone, its masks would come right after its heads' init
            gen.set_state(torch.get_rng_state())
        else:  # new_student seeded the GPU's generator, which head init does not touch
            gen.manual_seed(seed)
        gens.append(gen)
        size = min(int(job.cfg.batch_size), len(job.pairs))
        batches.append(Batches(len(job.pairs), size, torch.Generator().manual_seed(seed)))
    if not stackable(students):
        raise ValueError("train_together allowed students that cannot be stacked")
    model = StackedStudent(students)
    t0, curve = time.perf_counter(), []

    def log(record: dict) -> None:  # the summed loss of K students, as their mean
        curve.append(
            {**record, "loss": record["loss"] / len(todo), "wall": time.perf_counter() - t0}
        )

    trainer = Trainer(
        model,
        Recipe.from_cfg(job.cfg),
        stacked_loss(job.pairs, student_loss_name(job.cfg, job.pairs), dropout, gens, job.device),
        total_steps=int(job.cfg.steps),
        pairs=job.pairs,
        hint=f"lower eval.lr (now {job.cfg.lr})",
        on_log=log,
    )
    trainer.run(StackedBatches(batches), int(job.cfg.steps))
    model.unstack_into(students)
    records = []
    for k, student in zip(todo, students, strict=True):
        rec = _test(job, student, k)
        rec.update(history=[], selected_r_mean=None, curve=[])
        records.append(rec)
    if records:  # one curve for the stacked model: it trains the K students as one
        records[0].update(curve=curve, curve_stream="students")
    return records


def _test(job: _StudentJob, student: Student, k: int) -> dict:
    seed = job.seed * 1000 + k
    try:
        rec = evaluate(student, job.test, job.device)
    except NonFiniteEmbeddings as err:
        raise NonFiniteEmbeddings(f"student {k} (seed {seed}): {err}") from None
    rec.update({"student": k, "seed": seed})
    return rec


def _students(job: _StudentJob, todo: list[int], workers: int) -> Iterator[dict]:
    """Each student's record, in student order; students seed every draw they make, so the
    records do not depend on the number of workers, nor on training together."""
    global _JOB
    if todo and train_together(job.cfg, job.device, job.encoder):
        yield from _together(job, todo)
        return
    if workers <= 1:
        for k in todo:
            yield _train_and_test(job, k)
        return
    _JOB = job
    try:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_one_thread_worker) as pool:
            yield from pool.imap(_in_worker, todo)
    finally:
        _JOB = None


def run_protocol(
    encoder: Encoder,
    pairs: PairSet,
    cfg: DictConfig,
    test: RealSplit,
    val: RealSplit | None,
    device: str,
    seed: int,
    done: list[dict] | None = None,
    on_student: Callable[[list[dict]], None] | None = None,
    log_level: int = logging.INFO,
    on_curve: Callable[[str, list[dict]], None] | None = None,
) -> ProtocolResult:
    """Train `cfg.students` fresh students and test each; `done` resumes a partial run.
    `on_curve(stream, records)` receives each student's curve (stream `student/<k>`)."""
    results = list(done or [])
    if is_image_features(pairs.images):  # features sit on the device once, not per batch
        pairs = pairs.to(device)
    select_on = {"final": None, "best_val": val, "best_test": test}[cfg.selection]
    job = _StudentJob(encoder, pairs, cfg, test, select_on, device, seed)
    todo = list(range(len(results), int(cfg.students)))
    for rec in _students(job, todo, student_workers(cfg, device, len(todo))):
        curve = rec.pop("curve", [])
        stream = rec.pop("curve_stream", f"student/{rec['student']}")
        if on_curve is not None and curve:
            on_curve(stream, curve)
        results.append(rec)
        log.log(log_level, "student %d: r_mean %.2f", rec["student"], rec["r_mean"])
        if on_student:
            on_student(results)
    return ProtocolResult(students=results, summary=summarize(results))
