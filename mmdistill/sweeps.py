"""Sweeps that can be relaunched: stable folders, ratio budgets, per-job threads, failure list.

* A multirun's folder is derived from its own overrides (`multirun/<verb>/<slug>-<hash>`), not
  from the clock, so relaunching the same command finds its jobs: finished ones (`done`) are
  skipped, failed or interrupted ones run again (and resume from their checkpoints).
* `budget.ratio=r` asks for round(r x training pairs) pairs, as the papers' compression ratios.
* `SweepCallback` (configured under hydra.callbacks) limits torch threads per job so parallel
  workers do not oversubscribe the cores (joblib's n_jobs, submitit's cpus_per_task), spreads
  joblib workers over the visible GPUs, and lists the jobs that did not finish when the sweep
  ends. The submitit launchers (mmdistill.launchers) also skip finished jobs before submitting.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mmdistill import io
from mmdistill.config import MULTIRUN_FLAGS, NEUTRAL, register_resolvers
from mmdistill.errors import UserError

SLUG_CHARS = 80
SUBMITIT = "hydra_plugins.hydra_submitit_launcher"


def resolve_budget(budget_cfg: Any, n_train_pairs: int) -> int:
    """The number of pairs a `budget` config asks for: `pairs`, or `ratio` of the training pairs."""
    pairs = budget_cfg.get("pairs") if budget_cfg is not None else None
    ratio = budget_cfg.get("ratio") if budget_cfg is not None else None
    if pairs is not None and ratio is not None:
        raise UserError(
            f"budget.pairs={pairs} and budget.ratio={ratio} are both set; give one of them"
        )
    if pairs is None and ratio is None:
        raise UserError("set budget.pairs (e.g. budget.pairs=100) or budget.ratio (e.g. 0.003)")
    if ratio is not None:
        ratio = float(ratio)
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"budget.ratio={ratio} must be in (0, 1], a fraction of the pairs")
        pairs = int(ratio * n_train_pairs + 0.5)  # half up, not Python's half-to-even
        if pairs < 1:
            raise UserError(
                f"budget.ratio={ratio} of {n_train_pairs} training pairs rounds to 0 pairs; "
                f"use budget.ratio >= {0.5 / n_train_pairs:.2g}"
            )
        return pairs
    pairs = int(pairs)
    if pairs <= 0:
        raise UserError(f"budget.pairs={pairs} must be positive")
    if pairs > n_train_pairs:
        raise UserError(
            f"budget.pairs={pairs} is larger than the training set ({n_train_pairs} pairs); "
            "lower budget.pairs or use a larger dataset"
        )
    return pairs


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _is_hydra(arg: str) -> bool:
    return _key(arg).startswith(("hydra.", "hydra/")) or _key(arg) == "hydra"


def _canonical(arg: str) -> str:
    """`k=b,a` and `k=a,b` sweep the same jobs: sort plain comma lists."""
    key, value = arg.split("=", 1)
    if re.search(r"[\[\](){}'\"]", value):
        return arg
    return f"{key}={','.join(sorted(set(value.split(','))))}"


def sweep_name(args: list[str]) -> str:
    """A folder name that only depends on the set of job-defining overrides (order-free)."""
    overrides = sorted(
        _canonical(a)
        for a in args
        if "=" in a and not a.startswith("-") and not _is_hydra(a) and _key(a) not in NEUTRAL
    )
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    parts = []
    for arg in overrides:
        key, value = arg.split("=", 1)
        value = re.sub(r"[^A-Za-z0-9._]+", "-", value).strip("-")
        parts.append(f"{key.lstrip('+~')}_{value}")
    slug = "__".join(parts)[:SLUG_CHARS].rstrip("_-.") or "defaults"
    return f"{slug}-{digest}"


def job_args(verb: str, args: list[str]) -> list[str]:
    """Command-line overrides as Hydra should see them: stable sweep folder, ratio budgets."""
    given = {_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    launcher = given.get("hydra/launcher", "")
    if launcher.startswith(("slurm", "submitit", "local")) and not _has_module(SUBMITIT):
        raise UserError(
            f"hydra/launcher={launcher} needs the submitit plugin: pip install 'mmdistill[slurm]'"
        )
    extra = []
    if verb == "distill" and given.get("budget.ratio", "null") != "null":
        if "budget.pairs" not in given:
            extra.append("budget.pairs=null")  # the ratio replaces the default pair count
    if any(a in MULTIRUN_FLAGS for a in args) and "hydra.sweep.dir" not in given:
        extra.append(f"hydra.sweep.dir=${{paths.output_dir}}/multirun/{verb}/{sweep_name(args)}")
    # Hydra reads overrides as one positional run: insert ours next to the user's.
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [*args[:at], *extra, *args[at:]]


def check_sweep_subdir(value: str) -> None:
    """`hydra.sweep.subdir=<value>` as given: refused when it leaves the sweep folder (each
    `${...}` taken as one folder name, as Hydra's job values are)."""
    io.confined(Path("the sweep folder"), re.sub(r"\$\{[^}]*\}", "x", value), "hydra.sweep.subdir")


def check_sweep_dirs(sweep_dir: Path, job_dir: Path) -> None:
    """A sweep's job folder (`hydra.sweep.subdir`, made from overrides) stays in its sweep
    folder; one that does not is refused (and removed when Hydra left it empty)."""
    rel = os.path.relpath(os.path.abspath(job_dir), os.path.abspath(sweep_dir))
    if rel == ".." or rel.startswith("../"):
        if job_dir.is_dir() and not any(job_dir.iterdir()):
            job_dir.rmdir()
        raise UserError(
            f"the sweep's job folder {job_dir} is outside its sweep folder {sweep_dir} "
            "(hydra.sweep.subdir, or an override value with '..'); keep it inside"
        )


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def job_folders(sweep_dir: Path) -> list[Path]:
    """A sweep's job folders: those with `.hydra/overrides.yaml` (a job that started) or only a
    `meta.json` (a job that failed before, or died before, recording its config), not counting
    folders inside another job's."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.rglob("meta.json")}
    return sorted(f for f in found if not any(a in found for a in f.parents))


def unfinished_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    """Job folders of a sweep without a `done` marker, with the reason meta.json records."""
    out = []
    for job in job_folders(sweep_dir):
        if (job / "done").is_file():
            continue
        reason = "interrupted or not started"
        meta = job / "meta.json"
        if meta.is_file():
            try:
                info = io.read_json(meta, kind=dict)
                reason = info.get("error") or f"status {info.get('status', '?')}"
            except UserError:
                reason = "unreadable meta.json"
        out.append((job, reason))
    return out


def claim_slot(folder: Path, n: int) -> int:
    """A slot in [0, n) that no live process holds (one file per slot), for one GPU per worker."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        path = folder / f"slot{k}"
        if path.exists() and not _alive(path):
            path.unlink(missing_ok=True)  # its process is gone
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return k
    return os.getpid() % n  # more workers than devices: share


def _alive(path: Path) -> bool:
    try:
        pid = int(path.read_text() or "0")
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True


class SweepCallback(Callback):
    """Per-job thread and device limits; at the end of a multirun, the jobs that did not finish."""

    def __init__(self) -> None:
        self.started = 0.0
        self.slot: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch

        launcher = config.hydra.launcher
        parallel = "joblib" in str(launcher.get("_target_", ""))
        threads = config.get("threads")
        if threads is None and parallel:
            n_jobs = int(launcher.get("n_jobs", -1))
            cores = os.cpu_count() or 1
            threads = 1 if n_jobs <= 0 else max(1, cores // n_jobs)
        elif threads is None and launcher.get("cpus_per_task"):
            # submitit: the job's share of the machine (SLURM's allocation), which torch's
            # default (every core of the node) would oversubscribe.
            threads = int(launcher.cpus_per_task)
        if threads is not None:
            torch.set_num_threads(int(threads))
        logging.getLogger("mmdistill.sweeps").info("torch threads: %d", torch.get_num_threads())
        device = str(config.get("device", "auto"))
        if parallel and device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            if self.slot is None:
                folder = Path(str(config.hydra.sweep.dir)) / ".devices"
                self.slot = claim_slot(folder, torch.cuda.device_count())
            torch.cuda.set_device(self.slot)
        register_resolvers()  # joblib workers are fresh processes

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console

        console = Console(stderr=True, soft_wrap=True)  # job paths stay one line
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = job_folders(sweep_dir)
        failed = unfinished_jobs(sweep_dir)
        took = time.perf_counter() - self.started
        console.print(
            f"sweep {sweep_dir}: {len(jobs) - len(failed)}/{len(jobs)} jobs done ({took:.0f} s)"
        )
        if not failed:
            return
        console.print(f"[red]{len(failed)} job(s) did not finish[/red] (relaunch to retry):")
        for job, reason in failed:
            console.print(f"  {job.relative_to(sweep_dir)}: {reason}")
        sys.exit(1)
