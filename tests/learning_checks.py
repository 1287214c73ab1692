"""A learning check of ``benchmarks/learning.py`` as a test: its CI short form by default, the issue's full check with
``DREAMER_FULL_LEARNING=1`` (three seeds, 30k frames, the check's own target)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from benchmarks.learning import CHECKS, main

FULL = os.environ.get("DREAMER_FULL_LEARNING") == "1"
FULL_FRAMES = 30_000


@dataclasses.dataclass(frozen=True)
class ShortForm:
    """One seed (seed 0, one thread) of a check's preset cut to ``frames``, passing at a final evaluation return of
    at least ``target``; ``overrides`` are further ``key=value`` settings of the short form."""

    frames: int
    target: float
    overrides: tuple[str, ...] = ()


def check_learns(check: str, short: ShortForm, out: Path) -> None:
    """Runs ``check`` (short or full form) into ``out`` and asserts its curve and a passing verdict."""
    if FULL:
        args = [check, "--seeds", "0", "1", "2", "--jobs", "2"]
        frames, target = FULL_FRAMES, CHECKS[check].target
    else:
        settings = [f"collector.total_frames={short.frames}", *short.overrides]
        # One thread: the models are small, and a second OpenMP thread on a busy 2-core machine slows them down.
        args = [check, "--seeds", "0", "--threads", "1", "--target", str(short.target), "--set", *settings]
        frames, target = short.frames, short.target
    status = main([*args, "--out", str(out)])

    verdict = json.loads((out / "verdict.json").read_text())
    assert (out / "curve.png").stat().st_size > 0
    assert verdict["final_frames"] == frames and verdict["target"] == target
    assert verdict["final_return_mean"] >= target, verdict
    assert status == 0 and verdict["passed"]
