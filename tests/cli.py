"""Runs the application's command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_dreamer(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python dreamer.py ARGS`` from the repository root; returns the finished process (output captured).

    ``env`` replaces the process environment (default: this one), with headless rendering and offline wandb.
    """
    env = {
        **(os.environ if env is None else env),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
        "WANDB_MODE": "offline",
    }
    return subprocess.run(
        [sys.executable, "dreamer.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
