"""The evaluation protocol: train K fresh students on a pair set, score retrieval on a split.

Every switch that changes the numbers is config (`conf/eval/`) and recorded with the results:
the student recipe (optimizer, lr or the set's learned step sizes, steps, batch, weight decay,
feature dropout, schedule), checkpoint selection (final step, best on val, or the papers'
best-on-test preset), and the student loss.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import math
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
from mmdistill.models.student import Student
from mmdistill.training.features import RealSplit
from mmdistill.training.losses import LOSSES
from mmdistill.training.pairs import PairSet
from mmdistill.training.retrieval import METRICS, NonFiniteEmbeddings, recall_at_k

log = logging.getLogger(__name__)
SELECTIONS = ("final", "best_val", "best_test")


@torch.no_grad()
def embed_split(
    student: Student, split: RealSplit, device: str, batch: int = 512
) -> tuple[Tensor, Tensor]:
    """L2-normalised image and caption embeddings of a split."""
    student.eval()
    imgs = [
        student.encode_image(split.images[s : s + batch].to(device))
        for s in range(0, len(split.images), batch)
    ]
    txts = []
    for s in range(0, split.n_pairs, batch):
        mask = None if split.text_mask is None else split.text_mask[s : s + batch].to(device)
        txts.append(student.encode_text(split.texts[s : s + batch].to(device), mask))
    return torch.cat(imgs), torch.cat(txts)


def evaluate(student: Student, split: RealSplit, device: str) -> dict[str, float]:
    img, txt = embed_split(student, split, device)
    return recall_at_k(img, txt, split.caption_image)


# eval.lr values that read the set's distilled step sizes: each branch its own (LoRS), or the
# image step size for both branches (MTT-VL's evaluation).
LEARNED = {"learned": None, "learned_image": "image"}


def _param_groups(student: Student, cfg: DictConfig, pairs: PairSet) -> list[dict]:
    """Heads and trunks per branch; 'learned' / 'learned_image' take the set's step sizes."""
    learned = str(cfg.lr) in LEARNED
    if learned and not pairs.step_sizes:
        raise UserError(
            f"eval.lr={cfg.lr} but this pair set has no learned step sizes; "
            "use a number (eval.lr=1e-3)"
        )
    groups = []
    for branch, modules in (
        ("image", (student.image_trunk, student.image_head)),
        ("text", (student.text_trunk, student.text_head)),
    ):
        for part, module in zip(("trunk", "head"), modules, strict=True):
            if module is None:
                continue
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                continue
            if learned:
                lr = float(pairs.step_sizes[LEARNED[str(cfg.lr)] or branch])
            else:
                lr = float(cfg.trunk_lr if part == "trunk" else cfg.lr)
            groups.append({"params": params, "lr": lr, "name": f"{branch}_{part}"})
    return groups


def make_optimizer(student: Student, cfg: DictConfig, pairs: PairSet) -> torch.optim.Optimizer:
    groups = _param_groups(student, cfg, pairs)
    if cfg.optimizer == "adamw":
        # The fused kernel is about 3x faster than the per-tensor loop on CPU's small heads.
        fused = all(p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, weight_decay=float(cfg.weight_decay), fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay)
        )
    raise UserError(f"unknown eval.optimizer {cfg.optimizer!r}; choose adamw or sgd")


def _lr_factor(cfg: DictConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if cfg.schedule == "multistep":  # the papers' x0.1 at the half-way point
        return 0.1 if step >= total // 2 else 1.0
    if cfg.schedule == "none":
        return 1.0
    raise UserError(f"unknown eval.schedule {cfg.schedule!r}; choose cosine, multistep or none")


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
    opt = make_optimizer(student, cfg, pairs)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = LOSSES.get(student_loss_name(cfg, pairs))
    n, steps = len(pairs), int(cfg.steps)
    batch = min(int(cfg.batch_size), n)
    order, pos = torch.randperm(n, generator=gen), 0
    best, best_state, history = -1.0, None, []
    for step in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        student.train()
        images, texts, mask, targets = pairs.batch(idx, device)
        loss = loss_fn(student.logits(images, texts, mask), targets)
        if not torch.isfinite(loss):
            raise UserError(
                f"student loss became {loss.item()} at step {step}; lower eval.lr (now {cfg.lr})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        factor = _lr_factor(cfg, step, steps)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        opt.step()
        last = step + 1 == steps
        if (
            select_on is not None
            and cfg.selection != "final"
            and ((step + 1) % int(cfg.eval_every) == 0 or last)
        ):
            try:
                r = evaluate(student, select_on, device)["r_mean"]
            except NonFiniteEmbeddings:
                r = None  # a diverged checkpoint is never selected
            history.append({"step": step + 1, "r_mean": r})
            if r is not None and r > best:
                best, best_state = r, copy.deepcopy(student.state_dict())
    if best_state is not None:
        student.load_state_dict(best_state)
    return student, {"history": history, "selected_r_mean": best if best_state else None}


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
    try:
        rec = evaluate(student, job.test, job.device)
    except NonFiniteEmbeddings as err:
        raise NonFiniteEmbeddings(f"student {k} (seed {student_seed}): {err}") from None
    rec.update({"student": k, "seed": student_seed, **hist})
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


def _students(job: _StudentJob, todo: list[int], workers: int) -> Iterator[dict]:
    """Each student's record, in student order; students seed every draw they make, so the
    records do not depend on the number of workers."""
    global _JOB
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
) -> ProtocolResult:
    """Train `cfg.students` fresh students and test each; `done` resumes a partial run."""
    results = list(done or [])
    select_on = {"final": None, "best_val": val, "best_test": test}[cfg.selection]
    job = _StudentJob(encoder, pairs, cfg, test, select_on, device, seed)
    todo = list(range(len(results), int(cfg.students)))
    for rec in _students(job, todo, student_workers(cfg, device, len(todo))):
        results.append(rec)
        log.log(log_level, "student %d: r_mean %.2f", rec["student"], rec["r_mean"])
        if on_student:
            on_student(results)
    return ProtocolResult(students=results, summary=summarize(results))
