"""A run folder's identity: the config that made it, checked whenever a command runs into a
folder that already exists, so that nothing finished is rewritten and nothing is recorded
under settings it was not made with.

* A finished folder (`done`) is skipped when the command's config is the folder's own, and
  refused otherwise; either way nothing in it is written, `.hydra/` included (Hydra's own
  `.hydra/` writer is off, `accept` writes it once a command is let in).
* An unfinished folder is continued when the config is its own. `resume=<folder>` may also
  change the method's settings (while the distilled set is not finished: a partial one,
  kept after a divergence, is) and the evaluation protocol, whose finished students are then
  trained again. Data, encoder, noise, seed, budget and method stay fixed.
* Settings that cannot change what is computed (device, threads, workers, paths) are ignored.
* One process at a time works in a folder: `held` takes an OS lock (flock, released by the
  kernel when the process dies, however it dies) and a second process is refused, naming the
  holder's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmdistill import io, schema
from mmdistill.config import NEUTRAL
from mmdistill.errors import UserError

RESUMABLE = ("method", "expert")  # but not method.name or method.family
PROTOCOL = ("eval",)
# Keys added to the configs after folders were made without them, each a function of keys
# those folders do record (a preset's family follows from its name): absent in an older
# folder, they are no difference.
ADDED = ("method.family",)
SHOWN = 3  # differing keys named in a message
LOCK = ".lock"  # in the run folder: holds the pid of the process working there


class RunConflict(UserError):
    """A command that would overwrite or mislabel a run folder; the folder is left as it is."""


class FolderBusy(RunConflict):
    """Another live process works in the run folder; nothing is written there."""


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """This process's exclusive hold on a run folder for the length of the block."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise io.fs_fault(path, err) or err from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderBusy(
                f"{run_dir} is in use by another mmdistill process (pid {holder}); wait for it "
                "to finish (or stop it), or give another hydra.run.dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise io.fs_fault(path, err) or err from None
        yield
    finally:
        os.close(fd)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat(tree: dict) -> dict[str, Any]:
    return {k: v for k, v in schema.flatten(tree, {})}


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a folder was made with, or None when it records none."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    tree = io.read_yaml(path, fix="the folder's settings cannot be checked; use a new run folder")
    if not isinstance(tree, dict):
        raise io.damaged(path, "not a config mapping", "use a new run folder")
    try:
        return schema.resolved(OmegaConf.create(tree))
    except UserError:  # an interpolation this process cannot resolve: compare the text
        return tree


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, ignoring the neutral ones."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    return {
        k: (a.get(k), b.get(k))
        for k in keys
        if not _under(k, NEUTRAL) and a.get(k) != b.get(k) and not (k in ADDED and k not in a)
    }


def describe(diff: dict[str, tuple[Any, Any]]) -> str:
    def shown(v: Any) -> str:
        return "absent" if v is None else json.dumps(v) if isinstance(v, list | dict) else str(v)

    parts = [f"{k}: {shown(a)} -> {shown(b)}" for k, (a, b) in list(diff.items())[:SHOWN]]
    more = f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    return ", ".join(parts) + more


def _finished_set(run_dir: Path) -> bool:
    """Whether the folder holds a distilled set that is not partial."""
    side = run_dir / "distilled.json"
    if not side.is_file():
        return False
    info = io.read_json(side, fix="delete distilled.* to distil again", kind=dict)
    return not info.get("partial")


@dataclass
class Relaunch:
    """What a command may do with its run folder: start it (`new`), continue it (`resume`),
    or nothing (`done`: finished with this very config)."""

    run_dir: Path
    state: str
    changed_protocol: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def accept(self, cfg: DictConfig, hydra_cfg: DictConfig | None, say: Any = print) -> None:
        """Record the config the folder now runs with (.hydra/), and drop the students of an
        evaluation protocol the command changed."""
        hydra_dir = self.run_dir / ".hydra"
        io.write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        if hydra_cfg is not None:
            io.write_text(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
            overrides = OmegaConf.to_container(hydra_cfg.hydra.overrides.task)
            io.write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(overrides))
        students = self.run_dir / "students.json"
        if self.changed_protocol and students.is_file():
            say(
                f"evaluation settings changed ({describe(self.changed_protocol)}): the students "
                "trained so far are trained again"
            )
            students.unlink()


def check(run_dir: Path, cfg: DictConfig | dict, resuming: bool) -> Relaunch:
    """Whether a command with config `cfg` may run in `run_dir`; RunConflict (one line, the
    folder untouched) when it would overwrite or mislabel what is there."""
    run_dir = Path(run_dir)
    new = schema.resolved(cfg) if isinstance(cfg, DictConfig) else cfg
    done = (run_dir / "done").is_file()
    old = saved_config(run_dir)
    if old is None:
        return Relaunch(run_dir, "done" if done else "new")
    diff = differences(old, new)
    if done:
        if diff:
            raise RunConflict(
                f"{run_dir} is a finished run made with other settings ({describe(diff)}); it "
                "is left as it is: give a new hydra.run.dir (or none) to run these settings"
            )
        return Relaunch(run_dir, "done")
    if not diff:
        return Relaunch(run_dir, "resume")
    if not resuming:
        raise RunConflict(
            f"{run_dir} was started with other settings ({describe(diff)}); relaunch it with "
            f"its own settings, continue it with resume={run_dir} plus the method or eval "
            "settings to change, or give a new hydra.run.dir"
        )
    fixed = {k: v for k, v in diff.items() if not _under(k, RESUMABLE + PROTOCOL)}
    fixed.update({k: v for k, v in diff.items() if k in ("method.name", "method.family")})
    if "method.name" in fixed:  # another preset: its family follows from its name
        fixed.pop("method.family", None)
    if fixed:
        raise RunConflict(
            f"resume={run_dir} cannot change {', '.join(fixed)} ({describe(fixed)}): a run "
            "folder keeps its data, encoder, noise, seed, budget and method; give a new "
            "hydra.run.dir for these settings"
        )
    method = {k: v for k, v in diff.items() if _under(k, RESUMABLE)}
    if method and _finished_set(run_dir):
        raise RunConflict(
            f"resume={run_dir} cannot change {describe(method)}: the distilled set there is "
            "finished and was made with the old settings; give a new hydra.run.dir"
        )
    protocol = {k: v for k, v in diff.items() if _under(k, PROTOCOL)}
    return Relaunch(run_dir, "resume", protocol)


class RunLogHandler(logging.FileHandler):
    """The job's log file in its run folder (Hydra's `hydra.job_logging` file handler), opened
    on the first record and silent once the folder is finished: a command skipped as `done`
    appends nothing to it."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode=mode, encoding=encoding, delay=True)
        self.folder = Path(filename).parent

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.folder / "done").is_file():
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A log line the disk cannot take (full, read-only) is dropped, not printed as a
        traceback: the job's own write reports the fault in one line."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)
