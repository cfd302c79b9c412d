"""The run folder: meta.json, atomic checkpoints, resume, and the `done` marker.

A run folder is Hydra's output dir. Everything in it is JSON, Markdown, PNG or safetensors, so
loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mmdistill import __version__, io
from mmdistill.errors import UserError
from mmdistill.metrics import FILE as METRICS_FILE
from mmdistill.metrics import Metrics

RUN_FORMAT = 1
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


class Run:
    """One run folder; creating it records meta.json, re-opening it checks compatibility."""

    def __init__(self, path: Path, verb: str, device: str, seed: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
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
            self.meta.pop("error", None)  # the failure this run resumes from is over
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
        try:
            yield
        finally:
            self.meta["timings"][name] = round(
                self.meta["timings"].get(name, 0.0) + time.perf_counter() - t0, 3
            )
            self.save_meta()

    @cached_property
    def metrics(self) -> Metrics:
        """The run's curves (metrics.jsonl): methods, students and experts write there."""
        return Metrics(self.path / METRICS_FILE)

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
    io.write_json(meta, info)


def resource_peaks() -> dict[str, float | None]:
    """Peak host RSS of this process and of its largest finished child process (forked
    evaluation students; None when it had none), and peak GPU memory allocated by torch (None
    without CUDA), all in MiB: what a run cost at its high-water mark."""
    import resource

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
