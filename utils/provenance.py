"""What produced a run: ``run_info.json`` in its directory, one segment per start or resume.

Each segment records when it started, at which frame, the code (git commit of this checkout and whether it had
uncommitted changes), the versions of the packages that shape the numbers, the device and the thread count. A
resumed run appends a segment, so a week-long run that crossed a code change says so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from utils.files import atomic_output

RUN_INFO = "run_info.json"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "torch",
    "torchrl",
    "tensordict",
    "hydra-core",
    "numpy",
    "dm_control",
    "mujoco",
    "gymnasium",
    "ale-py",
    "wandb",
)


def git_revision(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root`` (``None`` outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in ``PACKAGES`` (``None`` when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def segment_info(frames: int, device: torch.device, num_threads: int) -> dict[str, Any]:
    """The record of one start or resume of a run at ``frames``."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "frames": frames,
        **git_revision(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "num_threads": num_threads,
    }


def record_segment(run_dir: Path, segment: dict[str, Any]) -> None:
    """Appends ``segment`` to ``run_dir/run_info.json`` (written atomically)."""
    path = run_dir / RUN_INFO
    segments = json.loads(path.read_text())["segments"] if path.exists() else []
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps({"segments": [*segments, segment]}, indent=2) + "\n")
