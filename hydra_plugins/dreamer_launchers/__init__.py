"""submitit launchers whose jobs continue their run after a requeue (a Hydra plugin: Hydra loads launchers only
from the ``hydra_plugins`` namespace package, which this checkout's root extends).

Each job gets ``resume=auto`` unless its overrides set ``resume`` themselves, so the job that submitit requeues
after a preemption or a time limit (``BaseSubmititLauncher.checkpoint`` resubmits the same arguments) continues from
its run directory's ``checkpoints/last.pt``; a first start, or a restart before the first checkpoint, starts the
run. How the run saves ``last.pt`` before it is requeued: ``utils/preemption.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

AUTO_RESUME = "resume=auto"


def with_auto_resume(overrides: Sequence[str]) -> list[str]:
    """A job's overrides with ``resume=auto`` added, unless they set ``resume`` (``resume=<run dir>``) already."""
    keys = {override.partition("=")[0].lstrip("+~") for override in overrides}
    return list(overrides) if "resume" in keys else [*overrides, AUTO_RESUME]


class _AutoResume:
    """Adds ``resume=auto`` to every job of a sweep before the submitit launcher submits them."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return super().launch([with_auto_resume(overrides) for overrides in job_overrides], initial_job_idx)


class DreamerSlurmLauncher(_AutoResume, SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with auto-resuming jobs (``hydra/launcher=dreamer_slurm``)."""


class DreamerLocalLauncher(_AutoResume, LocalLauncher):
    """The same on this machine through submitit's local executor (``hydra/launcher=dreamer_local``): the jobs run
    as subprocesses, submitit's preemption signal requeues them like SLURM would."""
