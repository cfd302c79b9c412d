"""The submitit launchers named by conf/hydra/launcher/local.yaml and slurm.yaml: the plugin's
own, whose `launch` skips finished jobs and lists dead ones (mmdistill.launchers).

Hydra imports every module here when it starts, in any Hydra app of the environment: this one
imports only the submitit plugin (which Hydra imports anyway) and defines nothing without it
(`mmdistill` then says what to install); mmdistill itself is imported when a sweep launches.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
except ImportError:  # pip install 'mmdistill[slurm]'
    BaseSubmititLauncher = None

if BaseSubmititLauncher is not None:

    class _Relaunchable(BaseSubmititLauncher):
        """The plugin's launcher, with finished jobs skipped and dead ones listed."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from mmdistill.launchers import launch

            return launch(self, job_overrides, initial_job_idx)

    class LocalLauncher(_Relaunchable):
        """submitit's local executor: each job a process on this machine, all at once."""

        _EXECUTOR = "local"

    class SlurmLauncher(_Relaunchable):
        """submitit's SLURM executor: each job a SLURM job (one job array per sweep)."""

        _EXECUTOR = "slurm"
