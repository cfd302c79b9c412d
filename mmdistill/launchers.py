"""What the submitit launchers (local and SLURM) add to the plugin's: sweeps that can be
relaunched on a cluster.

The plugin's own launchers submit every job of a sweep and then stop at the first job whose
process died, with a traceback and no failure list. Ours (the classes in
hydra_plugins/mmdistill_launchers, where Hydra requires launchers to live, named by
conf/hydra/launcher/local.yaml and slurm.yaml) run `launch` below instead:

* A finished job (`done`, made with this very config: `relaunch.check`) is skipped before it is
  submitted, with `already done, skipped: <folder>` on the sweep's console: a relaunched SLURM
  sweep does not queue each finished job for a GPU only for it to find its `done` marker.
* Every submitted job is waited for. One whose process ended without finishing (killed, out of
  memory, past its time limit) is marked failed in its meta.json, naming its submitit log, so
  the sweep's failure list (`sweeps.SweepCallback`) names it and the sweep exits 1.

Only the plugin classes import this module, so it runs only where submitit is installed.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from mmdistill import io, relaunch, runs
from mmdistill.console import console
from mmdistill.errors import UserError
from mmdistill.sweeps import check_sweep_dirs

log = logging.getLogger(__name__)
KEEP = ("failed", "interrupted")  # a job's own record of how it ended, kept as it is


def launch(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """The plugin's `BaseSubmititLauncher.launch`, with finished jobs skipped before
    submission and jobs that died returned as completed (recorded failed in their folder)."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    log.info(f"Submitit '{launcher._EXECUTOR}' sweep output dir : {sweep_dir}")
    returns: list[JobReturn] = []
    todo: list[tuple[int, int, list[str], Path | None]] = []  # position, num, overrides, dir
    for pos, given in enumerate(job_overrides):
        overrides, num = list(given), initial_job_idx + pos
        run_dir, done = finished(launcher, overrides, num)
        returns.append(JobReturn(overrides, status=JobStatus.COMPLETED))
        if done:
            console.print(f"already done, skipped: {run_dir}")
            continue
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        todo.append((pos, num, overrides, run_dir))
    if todo:
        state = Singleton.get_state()
        params = [(o, "hydra.sweep.dir", n, f"job_id_for_{n}", state) for _, n, o, _ in todo]
        try:
            made = executor(launcher)
        except UserError as err:  # Hydra would print it with a traceback: end as the CLI does
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        jobs = made.map_array(launcher, *zip(*params, strict=True))
        for (pos, _, overrides, run_dir), job in zip(todo, jobs, strict=True):
            returns[pos] = outcome(job, overrides, run_dir, sweep_dir)
    return returns


def executor(launcher: Any) -> Any:
    """submitit's executor for the launcher's parameters, built as the plugin builds it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    kind, params = launcher._EXECUTOR, launcher.params
    init = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    try:
        made = submitit.AutoExecutor(cluster=kind, **init)
    except RuntimeError as err:  # SLURM's: 'Could not detect "srun"'
        raise UserError(
            f"hydra/launcher={'slurm' if kind == 'slurm' else 'local'} cannot submit here "
            f"({err}); submit from a SLURM login node, or try the sweep on this machine with "
            "hydra/launcher=local"
        ) from None
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    made.update_parameters(
        **{
            k if k in base else f"{kind}_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    return made


def finished(launcher: Any, overrides: list[str], num: int) -> tuple[Path | None, bool]:
    """A job's run folder, as the job will name it (None when only the job itself can, e.g.
    from `hydra.job.id`), and whether it is finished with this config. Whatever this cannot
    settle (a folder made with other settings, one outside the sweep) is left to the job,
    which reports it in the sweep's failure list."""
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        hydra_config.set_config(cfg)  # resolves ${hydra:...} as in the job (hydra's run_job)
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        run_dir = Path(os.path.abspath(sweep_dir / str(cfg.hydra.sweep.subdir)))
    except OmegaConfBaseException:
        hydra_config.cfg = before
        return None, False
    try:
        check_sweep_dirs(sweep_dir, run_dir)
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        resuming = task.get("resume") is not None
        return run_dir, relaunch.check(run_dir, task, resuming).state == "done"
    except (UserError, OmegaConfBaseException):
        return run_dir, False
    finally:
        hydra_config.cfg = before


def outcome(job: Any, overrides: list[str], run_dir: Path | None, sweep_dir: Path) -> JobReturn:
    """A submitted job's return, waited for. A job whose process ended without returning (or
    whose task raised past the CLI's own handling) is recorded failed in its folder and
    returned as completed, so that the sweep goes on to wait for the others and lists it."""
    try:
        ret = job.results()[0]
    except RuntimeError:  # submitit's UncompletedJobError and FailedJobError
        reason = f"submitit job {job.job_id}{_state(job)}"
    else:
        if ret.status != JobStatus.FAILED:
            return ret
        err = ret._return_value
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    log_file, root = Path(os.path.abspath(job.paths.stderr)), Path(os.path.abspath(sweep_dir))
    if log_file.is_relative_to(root):
        log_file = log_file.relative_to(root)  # as the sweep's failure list names jobs
    message = f"the job's process ended without finishing ({reason}); its log: {log_file}"
    console.print(f"[red]job failed[/red] ({run_dir or ' '.join(overrides)}): {message}")
    if run_dir is not None:
        record_dead(run_dir, message)
    return JobReturn(overrides, status=JobStatus.COMPLETED)


def _state(job: Any) -> str:
    """SLURM's word for how the job ended (`, state TIMEOUT`, OUT_OF_MEMORY, NODE_FAIL...);
    nothing for a local job, whose state says only that its controller is gone."""
    if type(job).__module__.startswith("submitit.local"):
        return ""
    try:
        return f", state {job.state}"
    except Exception:  # a scheduler query that fails must not hide the job's failure
        return ""


def record_dead(run_dir: Path, message: str) -> None:
    """Mark a dead job's folder failed, unless the job recorded how it ended itself (an
    interrupt, a failure) or its meta.json is unreadable (kept for the user to look at)."""
    meta = run_dir / "meta.json"
    try:
        status = io.read_json(meta, kind=dict).get("status") if meta.is_file() else None
    except UserError:
        return
    if status in KEEP:
        return
    run_dir.mkdir(parents=True, exist_ok=True)  # a job that died before making its folder
    runs.record_failure(run_dir, message)
