"""`mmdistill <verb> [overrides]`: one console script, one Hydra config per job verb.

Job verbs (distill, train, evaluate, buffer) are `@hydra.main` apps over `conf/<verb>.yaml`,
so overrides, `-m` sweeps, `--cfg job` and `--help` all work. `table`, `export` and
`report` take folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from mmdistill import config, io, relaunch, runs, schema, usage
from mmdistill.config import conf_dir, register_resolvers
from mmdistill.errors import UserError
from mmdistill.methods import settings as _units  # noqa: F401  (registers the schema's units)
from mmdistill.sweeps import check_sweep_dirs, check_sweep_subdir, job_args
from mmdistill.usage import FOLDER_VERBS, JOB_VERBS
from mmdistill.version import __version__

# Hydra flags that only print: their command composes no job, or shows the config as given.
HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
CFG_FLAGS = {"--cfg", "-c"}
# The folder of the last job this process ran (`mmdistill.run` returns it).
LAST_RUN: list[Path] = []
# Flags Hydra runs instead of a sweep (it refuses them next to -m with a traceback).
ONE_JOB_FLAGS = CFG_FLAGS | {"--info", "-i", "--shell-completion", "-sc"}


def check_choices(args: list[str], conf: Path) -> None:
    """Fail fast, in one line, on an unknown config-group choice such as `method=nope`."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = conf / key
        if key.startswith("hydra") or "/" in key or not group.is_dir():
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for v in value.split(","):
            v = v.strip()
            if v and v != "null" and v not in choices:
                raise UserError(f"unknown {key} {v!r}; choose one of: {', '.join(choices)}")


def resume_args(verb: str, args: list[str]) -> list[str]:
    """`resume=<run dir>` re-runs that folder's own overrides in place (plus the new ones)."""
    out = []
    for arg in args:
        if not arg.startswith("resume="):
            out.append(arg)
            continue
        run = Path(arg.split("=", 1)[1]).expanduser()
        saved = run / ".hydra" / "overrides.yaml"
        if not saved.is_file():
            raise UserError(
                f"resume={run}: no .hydra/overrides.yaml there; point it at a run folder"
            )
        fix = "the run cannot be resumed; start a new one"
        made_with = run / ".hydra" / "config.yaml"
        tree = io.read_yaml(made_with, fix) if made_with.is_file() else None
        made_by = tree.get("verb") if isinstance(tree, dict) else None
        if made_by is not None and made_by != verb:
            raise UserError(
                f"resume={run} is a `{made_by}` run folder; continue it with "
                f"`mmdistill {made_by} resume={run}`"
            )
        saved_overrides = io.read_yaml(saved, fix) or []
        if not isinstance(saved_overrides, list):
            raise io.damaged(saved, "not a list of overrides", fix)
        previous = [str(o) for o in saved_overrides if not str(o).startswith("resume=")]
        out = previous + out + [f"hydra.run.dir={run}", f"resume={run}"]
    # Flags (--cfg job, -m) go after all overrides, as Hydra expects.
    return [a for a in out if config.is_override(a)] + [a for a in out if not config.is_override(a)]


def _run_dir(args: list[str]) -> Path | None:
    """The folder a single run writes to, when the command names it (`hydra.run.dir=`)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    if not given or "${" in given[-1]:
        return None
    return Path(given[-1]).expanduser()


def _job_app(verb: str) -> Callable[[], None]:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    @hydra.main(config_path=str(conf_dir()), config_name=verb, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        import torch

        from mmdistill.console import console
        from mmdistill.jobs import JOBS, resolve_device
        from mmdistill.methods import settings as _in_worker  # noqa: F401  (registers units there)
        from mmdistill.runs import record_failure
        from mmdistill.training import precision

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            config.limited(cfg)
            schema.check(cfg, verb)
            if multirun:
                check_sweep_dirs(Path(str(hc.sweep.dir)), run_dir)
            folder = relaunch.check(run_dir, cfg, resuming=cfg.get("resume") is not None)
            LAST_RUN[:] = [Path(str(hc.sweep.dir)) if multirun else run_dir]
            if folder.state == "done":
                console.print(f"already done, skipped: {run_dir}")
                return
            with relaunch.held(run_dir), _stops_cleanly(run_dir, multirun), _fs_faults(run_dir):
                folder.accept(
                    cfg, HydraConfig.instance().cfg, say=logging.getLogger("mmdistill").info
                )
                device = resolve_device(str(cfg.device))
                precision.configure(str(cfg.get("precision", "auto")), device)
                try:
                    JOBS[verb](cfg, run_dir, device)
                except torch.cuda.OutOfMemoryError:
                    raise UserError(
                        f"the GPU ran out of memory in `{verb}`; lower method.syn_steps, the "
                        "batch sizes (method.batch_syn, method.syn_batch, eval.batch_size, "
                        "expert.batch_size) or budget.pairs, or use precision=bf16"
                    ) from None
            console.print(f"run folder: {run_dir}")
        except UserError as err:
            if not isinstance(err, relaunch.RunConflict):
                record_failure(run_dir, str(err))
            if multirun:
                console.print(f"[red]job failed[/red] ({run_dir}): {err}")
                return
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:
            record_failure(run_dir, f"{type(err).__name__}: {err}")
            if not multirun:
                raise
            # One crashing job must not stop the sweep; it is listed when the sweep ends.
            logging.getLogger("mmdistill").exception("job failed")
            console.print(
                f"[red]job failed[/red] ({run_dir}): {type(err).__name__}: {err}", soft_wrap=True
            )

    return app


@contextlib.contextmanager
def _stops_cleanly(run_dir: Path, multirun: bool) -> Iterator[None]:
    """SIGINT / SIGTERM in a job: partial files removed, meta.json `interrupted`, one line,
    exit 130 / 143 (a sweep stops too: relaunching it resumes its jobs)."""
    try:
        yield
    except runs.Interrupted as stop:
        _ignore_signals()  # a second Ctrl-C must not cut the clean-up short
        io.remove_partials()
        at = runs.where(run_dir, stop.at)
        runs.record_interrupt(run_dir, at, stop.signum)
        again = "relaunch the sweep's command" if multirun else f"resume={run_dir}"
        print(f"interrupted at {at}; resume with {again}", file=sys.stderr)
        sys.exit(128 + stop.signum)


@contextlib.contextmanager
def _fs_faults(where: Path | None = None) -> Iterator[None]:
    """A full, read-only or forbidden disk met by any writer (metrics lines, plots) is one
    line naming the path and its free space, not a traceback."""
    try:
        yield
    except OSError as err:
        fault = io.fs_fault(Path(err.filename or where or "."), err)
        if fault is None:
            raise
        raise fault from None


def _check_paths(args: list[str], configs: list, multirun: bool) -> None:
    """Before Hydra makes any folder: no empty or escaping folder settings, and the run and
    cache folders can be written."""
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        given = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
        if given and not given[-1].strip().strip("'\"").strip():
            raise UserError(
                f"{key} is empty; give a folder ({key}=outputs/my-run) or leave it out for a "
                "new dated folder"
            )
    subdir = [a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.subdir=")]
    if subdir:
        check_sweep_subdir(subdir[-1])
    run_dir = _run_dir(args)
    for cfg in configs:
        runs.check_paths(cfg)
        out = ("hydra.run.dir", run_dir) if run_dir is not None and not multirun else None
        runs.check_folders(
            dict(
                [out or ("paths.output_dir (MMDISTILL_OUTPUTS)", Path(str(cfg.paths.output_dir)))]
                + [("paths.cache_dir (MMDISTILL_CACHE)", Path(str(cfg.paths.cache_dir)))]
            )
        )


def _run_job_verb(verb: str, args: list[str]) -> None:
    if {"--help", "-h"}.intersection(args):
        print(usage.verb_help(verb), end="")
        return
    script = usage.shell_completion(args)
    if script is not None:
        print(script, end="")
        return
    if "COMP_LINE" in os.environ and ("-sc" in args or "--shell-completion" in args):
        # the completion script sends `mmdistill <verb> -sc query=bash` with the verb taken out
        # of the line, as Hydra reads `<app> <overrides>`
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace(f" {verb}", "", 1)
    check_choices(args, conf_dir())
    args = job_args(verb, resume_args(verb, args))
    flags = [a for a in args if not config.is_override(a)]
    printing = bool(CFG_FLAGS.intersection(flags))
    one_job = sorted(ONE_JOB_FLAGS.intersection(flags))
    if one_job and any(a in config.MULTIRUN_FLAGS for a in flags):
        raise UserError(
            f"{one_job[0]} shows one job, not a sweep: drop -m and give one value per swept key "
            "(e.g. method=random budget.pairs=100)"
        )
    if not HELP_FLAGS.intersection(flags):
        configs = config.job_configs(verb, args, check=not printing)
        multirun = any(a in config.MULTIRUN_FLAGS for a in flags)
        if not printing:
            _check_paths(args, configs, multirun)
        run_dir = _run_dir(args)
        if run_dir is not None and not multirun and not printing:
            resuming = any(a.startswith("resume=") for a in args)
            if relaunch.check(run_dir, configs[0], resuming).state == "done":
                from mmdistill.console import console

                LAST_RUN[:] = [run_dir]
                console.print(f"already done, skipped: {run_dir}")
                return
    register_resolvers()
    sys.argv = [f"mmdistill-{verb}", *args]
    _job_app(verb)()


def main(argv: list[str] | None = None) -> None:
    """The console script: every message a user error ends with is one line, exit 2; output
    cut short by a closed pipe (`| head`) ends quietly."""
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # stdout's reader is gone: point it at devnull so the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage.USAGE, end="")
        return
    if argv[0] in ("--version", "-V"):
        print(f"mmdistill {__version__}")
        return
    if argv[0] in ("-sc", "--shell-completion"):
        script = usage.shell_completion(argv)
        if script is None:
            raise UserError("-sc: give install=bash or install=zsh (mmdistill -sc install=bash)")
        print(script, end="")
        return
    verb, args = argv[0], argv[1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("root").setLevel(logging.ERROR)
    with _signals_stop(verb), _fs_faults():
        if verb in JOB_VERBS:
            _run_job_verb(verb, args)
        elif verb in FOLDER_VERBS:
            from mmdistill.jobs import FOLDER_JOBS

            FOLDER_JOBS[verb](args)
        else:
            raise UserError(
                f"unknown verb {verb!r}; choose one of: {', '.join(JOB_VERBS + FOLDER_VERBS)}"
            )


_MAIN_PID = os.getpid()


def _on_signal(signum: int, frame: object) -> None:
    """The parent stops with `Interrupted`; a forked worker (students, DataLoader) leaves
    stopping to its parent, which ends it: a terminal's Ctrl-C reaches the whole group."""
    if os.getpid() != _MAIN_PID:
        if signum == signal.SIGTERM:
            os._exit(128 + signum)
        return
    raise runs.Interrupted(signum)


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _signals_stop(verb: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise `runs.Interrupted` in this process for the command's length
    (the previous handlers come back after it, for callers such as tests); outside a job's
    run folder (folder verbs, composing the config) it ends the command in one line too."""
    global _MAIN_PID
    if threading.current_thread() is not threading.main_thread():  # handlers live there
        yield
        return
    _MAIN_PID = os.getpid()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    except (runs.Interrupted, KeyboardInterrupt) as stop:
        _ignore_signals()
        io.remove_partials()
        print(f"interrupted during `{verb}`; partial files removed, run it again", file=sys.stderr)
        sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
