"""The run folder: meta.json, atomic checkpoints, resume, and the `done` marker.

A run folder is Hydra's output dir. Everything in it is JSON, Markdown, PNG or safetensors, so
loading never unpickles anything.

A job stopped by SIGINT or SIGTERM raises `Interrupted` (not an `Exception`, so no handler meant
for failures catches it); `where` says the stage and step it stopped at and `record_interrupt`
marks meta.json `interrupted`. `check_paths` and `check_folders` refuse, before any work, the
names that would build paths outside their roots and folders that cannot be written.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdistill import io
from mmdistill.errors import UserError
from mmdistill.metrics import FILE as METRICS_FILE
from mmdistill.metrics import Metrics
from mmdistill.version import __version__

if TYPE_CHECKING:  # torch is imported where a run starts: the CLI's checks stay fast
    import torch

RUN_FORMAT = 1
# The stage (`Run.timed` name) and the last metrics record of this process's job, for the line
# an interrupted job prints.
_WHERE: dict[str, Any] = {"stage": None, "stream": None, "step": None}
PACKAGES = ("torch", "open_clip_torch", "timm", "transformers", "peft", "hydra-core", "datasets")


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source checkout, if mmdistill runs from one."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def versions() -> dict[str, str]:
    out = {"mmdistill": __version__, "python": platform.python_version()}
    for p in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[p] = importlib.metadata.version(p)
    return out


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: the job stops, exit status 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.at = dict(_WHERE)  # before the stages it unwinds restore their outer ones


class _Tracked(Metrics):
    """The run's metrics file, noting the last stream and step written (`where`)."""

    def write(self, stream: str, step: int, wall: float | None = None, **values: Any) -> None:
        _WHERE.update(stream=stream, step=int(step))
        super().write(stream, step, wall, **values)


def where(run_dir: Path, at: dict[str, Any] | None = None) -> str:
    """Where this process's job stands (or stood, `at`), for the interrupt line:
    `distill, method step 120`."""
    at = _WHERE if at is None else at
    stage = at["stage"]
    if stage is None:
        return "the start (nothing computed yet)"
    if stage == "evaluate":
        done = Path(run_dir) / "students.json"
        try:
            n = len(io.read_json(done, kind=list)) if done.is_file() else 0
        except UserError:
            n = 0
        return f"evaluate, {n} student(s) finished"
    stream, step = at["stream"], at["step"]
    if step is None:
        return stage
    return f"{stage}, {stream} step {step}"


class Run:
    """One run folder; creating it records meta.json, re-opening it checks compatibility."""

    def __init__(self, path: Path, verb: str, device: str, seed: int) -> None:
        import torch

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        io.remove_stale_partials(self.path, recursive=True)  # a killed (-9) run's temp files
        _WHERE.update(stage=None, stream=None, step=None)
        meta_path = self.path / "meta.json"
        saved = None
        if meta_path.is_file():
            saved = io.read_json(
                meta_path, fix="delete it to resume without its timings", kind=dict
            )
        if saved is not None and "started" in saved:  # not just a failure before the start
            self.meta = saved
            if self.meta.get("format") != RUN_FORMAT:
                raise UserError(
                    f"{self.path} was written by another mmdistill version (run format "
                    f"{self.meta.get('format')}, this one reads {RUN_FORMAT}); start a new run"
                )
            self.meta["resumed"] = self.meta.get("resumed", 0) + 1
            for key in ("error", "interrupted_at", "signal"):  # what it resumes from is over
                self.meta.pop(key, None)
        else:
            self.meta = {
                "format": RUN_FORMAT,
                "verb": verb,
                "git": git_state(),
                "versions": versions(),
                "device": device,
                "device_name": torch.cuda.get_device_name()
                if device.startswith("cuda")
                else platform.processor() or platform.machine(),
                "seed": seed,
                "status": "running",
                "timings": {},
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        self.meta["status"] = "running"
        self.save_meta()

    def save_meta(self) -> None:
        io.write_json(self.path / "meta.json", self.meta)

    def set(self, **kv: Any) -> None:
        self.meta.update(kv)
        self.save_meta()

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        outer = dict(_WHERE)
        _WHERE.update(stage=name, stream=None, step=None)
        try:
            yield
        finally:
            _WHERE.update(outer)
            self.meta["timings"][name] = round(
                self.meta["timings"].get(name, 0.0) + time.perf_counter() - t0, 3
            )
            self.save_meta()

    @cached_property
    def metrics(self) -> Metrics:
        """The run's curves (metrics.jsonl): methods, students and experts write there."""
        return _Tracked(self.path / METRICS_FILE)

    @property
    def done(self) -> bool:
        return (self.path / "done").is_file()

    def mark_done(self) -> None:
        self.set(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), peaks=resource_peaks())
        io.write_text(self.path / "done", "")

    def fail(self, message: str) -> None:
        self.set(status="failed", error=message)

    # Checkpoints: tensors in safetensors, everything else in a JSON sidecar.
    def save_checkpoint(
        self, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> None:
        d = self.path / "checkpoints"
        io.save_tensors(d / f"{name}.safetensors", tensors)
        io.write_json(d / f"{name}.json", state)

    def checkpoint_fix(self) -> str:
        """What a damaged checkpoint's message tells the user to do."""
        return f"delete {self.path / 'checkpoints'} to restart the method from scratch"

    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.safetensors"

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        t = self.checkpoint_path(name)
        s = t.with_suffix(".json")
        if not (t.is_file() and s.is_file()):
            return None
        fix = self.checkpoint_fix()
        return io.load_tensors(t, fix=fix), io.read_json(s, fix=fix, kind=dict)


def record_failure(run_dir: Path, message: str) -> None:
    """Mark a run folder's meta.json failed, with the message (a stub before the run started).
    A no-op without the folder, in a finished folder (never rewritten) and when meta.json itself
    is unreadable (kept for the user to look at, as the error says)."""
    meta = Path(run_dir) / "meta.json"
    if not Path(run_dir).is_dir() or (Path(run_dir) / "done").is_file():
        return
    info = {"format": RUN_FORMAT}
    if meta.is_file():
        try:
            info = io.read_json(meta, kind=dict)
        except UserError:
            return
    info.update(status="failed", error=message)
    with contextlib.suppress(UserError, OSError):  # a full disk must not hide the first error
        io.write_json(meta, info)


def record_interrupt(run_dir: Path, at: str, signum: int) -> None:
    """Mark a run folder's meta.json `interrupted` (where, and by which signal); nothing in a
    finished folder, nor in an unreadable meta.json, is rewritten."""
    meta = Path(run_dir) / "meta.json"
    if not Path(run_dir).is_dir() or (Path(run_dir) / "done").is_file():
        return
    info: dict[str, Any] = {"format": RUN_FORMAT}
    if meta.is_file():
        try:
            info = io.read_json(meta, kind=dict)
        except UserError:
            return
    info.update(status="interrupted", interrupted_at=at, signal=signal.Signals(signum).name)
    with contextlib.suppress(UserError, OSError):  # a full disk must not hide the interrupt
        io.write_json(meta, info)


def check_paths(cfg: Any) -> None:
    """Config values that become parts of paths: refused when empty or escaping their root."""
    for key, env in (("output_dir", "MMDISTILL_OUTPUTS"), ("cache_dir", "MMDISTILL_CACHE")):
        value = str(cfg.paths.get(key) or "").strip()
        if not value:
            raise UserError(
                f"paths.{key} is empty (is {env} set to ''?); give a folder: paths.{key}=... "
                f"or {env}=/path/to/folder"
            )
    if "dataset" in cfg and cfg.dataset.get("name") is not None:
        io.plain_name(cfg.dataset.name, "dataset.name")
    if cfg.get("run_name") is not None:  # a part of the default run folder's path
        io.confined(Path(str(cfg.paths.output_dir)), str(cfg.run_name), "run_name")


def check_folders(folders: dict[str, Path]) -> None:
    """Each folder (by the key that names it) is a folder, or can become one, that this
    process can write: checked before any work rather than found out after minutes of it."""
    for key, folder in folders.items():
        folder = Path(folder).expanduser()
        here = folder
        while not here.exists() and here != here.parent:
            here = here.parent
        if not here.is_dir():
            raise UserError(
                f"{key}={folder}: {here} is a file, not a folder; point {key} at a folder"
            )
        try:
            with tempfile.TemporaryFile(dir=here):
                pass
        except OSError as err:
            fault = io.fs_fault(here, err)
            why = str(fault) if fault else f"cannot write {here}: {err.strerror or err}"
            raise UserError(f"{key}={folder}: {why}") from None
        if not os.access(here, os.W_OK | os.X_OK):  # a permission the probe did not need
            raise UserError(f"{key}={folder}: {here} is not writable; point {key} elsewhere")


def resource_peaks() -> dict[str, float | None]:
    """Peak host RSS of this process and of its largest finished child process (forked
    evaluation students; None when it had none), and peak GPU memory allocated by torch (None
    without CUDA), all in MiB: what a run cost at its high-water mark."""
    import resource

    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gpu = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "host_rss_mib": round(rss_kib / 1024, 1),
        "children_rss_mib": round(child_kib / 1024, 1) if child_kib else None,
        "gpu_mib": gpu,
    }
