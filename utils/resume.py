"""Which run an invocation trains, and where Hydra writes for it.

``resume`` selects the run:

* ``null`` (default): a new run in Hydra's output directory (refused when that directory already holds a run);
* ``auto``: continue the run in Hydra's output directory when it holds ``checkpoints/last.pt``, else start a new
  run there. The same command line therefore starts a run and continues it after a preemption or a time limit
  (the SLURM launcher requeues its jobs this way: ``hydra_plugins/dreamer_launchers``);
* ``<run dir>``: continue the run in that directory.

A continued run keeps its own directory: the resolvers registered by :func:`register_resolvers` make Hydra's output
directory the resumed run's directory (``hydra.run.dir``, and a sweep job's ``hydra.sweep.subdir``), and write the
invocation's ``.hydra/`` files to ``.hydra/resume-<n>/`` there (the first invocation's ``.hydra/`` stays as it was).
:func:`check_resume_overrides` refuses a ``resume=`` path without a checkpoint before Hydra creates anything.

Importing this module registers the resolvers: a process that unpickles ``dreamer.main`` (a joblib or submitit
worker) imports it through ``main``'s reference to :func:`register_resolvers` before it resolves its job's config.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from utils.checkpoint import CHECKPOINT_DIR, LAST, CheckpointError

AUTO = "auto"
HYDRA_SUBDIR = ".hydra"
RESUME_SUBDIR_PREFIX = "resume-"


def holds_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's ``checkpoints/last.pt``."""
    return (run_dir / CHECKPOINT_DIR / LAST).is_file()


def run_directory(resume: str | None, output_dir: Path) -> Path:
    """The run directory of an invocation: ``resume=<run dir>``'s directory, else Hydra's output directory."""
    return output_dir if resume in (None, AUTO) else Path(resume).expanduser()


def continues_run(resume: str | None, run_dir: Path) -> bool:
    """Whether the invocation continues the run in ``run_dir`` (always for ``resume=<run dir>``; for ``auto`` when
    ``run_dir`` holds a checkpoint; never for ``null``)."""
    if resume is None:
        return False
    return resume != AUTO or holds_checkpoint(run_dir)


def resumed_run_dir(resume: str | None, default: str) -> str:
    """Resolver of ``hydra.run.dir`` and ``hydra.sweep.subdir``: the absolute path of ``resume=<run dir>`` (an
    absolute subdirectory replaces the sweep directory in Hydra's path join), else ``default``."""
    if resume in (None, AUTO):
        return default
    return str(Path(resume).expanduser().absolute())


def hydra_output_subdir(resume: str | None, output_dir: str) -> str:
    """Resolver of ``hydra.output_subdir``: ``.hydra`` for a new run; ``.hydra/resume-<n>`` for the n-th
    continuation of the run in ``output_dir``."""
    run_dir = Path(output_dir)
    if not continues_run(resume, run_dir):
        return HYDRA_SUBDIR
    earlier = len(list((run_dir / HYDRA_SUBDIR).glob(f"{RESUME_SUBDIR_PREFIX}*")))
    return f"{HYDRA_SUBDIR}/{RESUME_SUBDIR_PREFIX}{earlier + 1}"


def register_resolvers() -> None:
    """Registers the resolvers used by ``config/config.yaml``'s ``hydra`` section (idempotent). Cached, so that a
    config resolves ``.hydra/resume-<n>`` once, before Hydra creates that directory."""
    for name, function in (("dreamer_run_dir", resumed_run_dir), ("dreamer_output_subdir", hydra_output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)


def check_resume_value(value: object) -> None:
    """Refuses a ``resume`` value that is neither ``null``, ``auto`` nor a run directory holding a checkpoint."""
    if value is None or value == AUTO:
        return
    path = Path(str(value)).expanduser()
    if path.is_file():
        raise CheckpointError(
            f"resume={value} is a file; resume takes a run directory (holding {CHECKPOINT_DIR}/{LAST}) or auto"
        )
    if not holds_checkpoint(path):
        raise CheckpointError(
            f"Checkpoint not found: {path / CHECKPOINT_DIR / LAST} (resume takes a run directory or auto)"
        )


def check_resume_overrides(overrides: list[str]) -> None:
    """Checks every ``resume=`` value of a command line (each value of a sweep), before Hydra creates directories.

    Overrides Hydra cannot parse are left to Hydra's own error.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return
    for override in parsed:
        if override.key_or_group == "resume":
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                check_resume_value(value)


register_resolvers()
