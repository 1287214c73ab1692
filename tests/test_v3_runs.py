"""DreamerV3 end to end through ``dreamer.py``: a tiny run to the end, SIGTERM and ``resume=auto``, ``mode=eval``,
and a pixel run with its evaluation and dream videos.

``experiment=debug_v3``: 200 random prefill frames, 100-frame collection batches, evaluations and ``last.pt`` every
200 frames, updates by ``optimization.train_ratio=1.5`` over 4 x 8 replayed steps (action repeat 2):
``floor((frames - 200) / 2 * 1.5 / 32)`` updates by ``frames``. Every process runs on one torch thread.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import pytest

from tests.cli import ROOT, run_dreamer
from utils.checkpoint import load_checkpoint
from utils.config import compose_config
from utils.train import updates_due

SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PENDULUM = ("experiment=debug_v3", "env=pendulum")
PIXELS = ("experiment=debug_v3", "env=dmc", "env.name=cartpole", "env.task=balance", "logger.video=true")
V3_LOSSES = (
    "loss/world_model",
    "loss/observation",
    "loss/reward",
    "loss/continue",
    "loss/dynamics",
    "loss/representation",
    "loss/actor",
    "loss/value",
    "loss/repval",
    "loss/total",
    "kl",
    "return_scale",
    "grad_norm/all",
)


def scheduled_updates(frames: int) -> int:
    """debug_v3's schedule, written out (see the module docstring)."""
    return 0 if frames < 200 else math.floor((frames - 200) // 2 * 1.5 / 32)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def train_rows(run_dir: Path) -> list[dict[str, str]]:
    return [row for row in read_metrics(run_dir) if row.get("loss/world_model")]


def logged_losses(run_dir: Path) -> list[tuple[str, str, str]]:
    """``(frames, updates, loss/world_model)`` of every training row so far (none before the file exists)."""
    if not (run_dir / "metrics.csv").exists():
        return []
    return [(row["frames"], row["updates"], row["loss/world_model"]) for row in train_rows(run_dir)]


def dreamer(*args: str) -> subprocess.CompletedProcess:
    result = run_dreamer(*args, env=SINGLE_THREAD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def trained_run(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: tuple[str, ...]) -> Path:
    """The run directory of a finished ``dreamer.py`` run with ``overrides``."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    dreamer(*overrides, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "v3_pendulum", PENDULUM)


def test_a_v3_run_trains_to_the_end_and_logs_the_v3_losses(pendulum_run: Path) -> None:
    rows = train_rows(pendulum_run)
    assert rows, "no training rows in metrics.csv"
    for column in V3_LOSSES:
        values = [float(row[column]) for row in rows]
        assert all(math.isfinite(v) for v in values), (column, values)
    assert float(rows[-1]["return_scale"]) >= 1.0
    assert (int(rows[-1]["frames"]), int(rows[-1]["updates"])) == (400, scheduled_updates(400)) == (400, 4)
    eval_frames = [int(row["frames"]) for row in read_metrics(pendulum_run) if row["eval/return"]]
    assert eval_frames == [200, 400]

    checkpoint = load_checkpoint(pendulum_run)
    counters = checkpoint["counters"]
    assert (counters["frames"], counters["updates"]) == (400, 4)
    assert checkpoint["config"]["model"]["name"] == checkpoint["config"]["optimization"]["name"] == "dreamer_v3"
    update = checkpoint["update"]
    assert set(update) == {"optimizer", "slow_value", "return_norm", "updates"}
    assert update["updates"] == 4 and update["optimizer"]["state"]
    # The slow critic is checkpointed beside the critic, with the critic's parameters.
    assert set(update["slow_value"]) == set(checkpoint["agent"]["value"])


def test_mode_eval_on_a_v3_run(pendulum_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = dreamer("mode=eval", f"checkpoint={pendulum_run}", "eval.episodes=2", f"hydra.run.dir={out}")
    results = json.loads((out / "eval_results.json").read_text())
    assert [episode["length"] for episode in results["episodes"]] == [50, 50]  # 100 frames at action repeat 2
    assert all(math.isfinite(episode["return"]) for episode in results["episodes"])
    assert results["policy"] == "deterministic" and "mean ± std over 2 episodes" in result.stdout


def test_sigterm_then_resume_auto_continues_a_v3_run(tmp_path: Path) -> None:
    total = 1600
    run_dir = tmp_path / "run"
    command = (*PENDULUM, f"collector.total_frames={total}", "resume=auto", f"hydra.run.dir={run_dir}")
    process = subprocess.Popen(
        [sys.executable, "dreamer.py", *command],
        cwd=ROOT,
        env={**SINGLE_THREAD_ENV, "WANDB_MODE": "offline"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupted once it has logged two rows of losses (4 updates: optimiser moments, slow critic and return
    # normalisation all have state by then).
    deadline = time.monotonic() + 120
    while len(logged_losses(run_dir)) < 2:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no losses logged"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Interrupted at" in stderr, "the run ended before the signal: nothing is checked"
    interrupted = load_checkpoint(run_dir)["counters"]
    assert 200 <= interrupted["frames"] < total
    # Stopped between units of work: never more updates than the schedule calls for at its frame count.
    assert interrupted["updates"] <= scheduled_updates(interrupted["frames"])
    rows_before = logged_losses(run_dir)

    dreamer(*command)
    final = load_checkpoint(run_dir)["counters"]
    cfg = compose_config(*PENDULUM, f"collector.total_frames={total}")
    assert updates_due(cfg, SimpleNamespace(frames=total)) == scheduled_updates(total) == 32
    assert (final["frames"], final["agent_steps"], final["updates"]) == (total, total // 2, 32)
    segments = json.loads((run_dir / "run_info.json").read_text())["segments"]
    assert [segment["frames"] for segment in segments] == [0, interrupted["frames"]]
    rows = train_rows(run_dir)
    assert logged_losses(run_dir)[: len(rows_before)] == rows_before, "the resume rewrote the interrupted rows"
    updates = [int(row["updates"]) for row in rows]
    assert updates == sorted(set(updates)), f"a row logged twice or out of order: {updates}"
    assert (int(rows[-1]["frames"]), updates[-1]) == (total, 32)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "v3_pixels", PIXELS)


def test_a_v3_pixel_run_logs_evaluation_and_dream_videos(pixel_run: Path) -> None:
    rows = train_rows(pixel_run)
    assert (int(rows[-1]["frames"]), int(rows[-1]["updates"])) == (400, 4)
    assert all(math.isfinite(float(row["loss/observation"])) for row in rows)
    # As experiment=debug's V1 check: per evaluation the real episode (51 frames of 64x64) and the
    # truth | model | error dream grid, under a 14-pixel title row, enlarged 3 times.
    episode_videos = sorted((pixel_run / "videos").glob("eval_episode_*.mp4"))
    dream_videos = sorted((pixel_run / "videos").glob("eval_open_loop_dream_*.mp4"))
    assert len(episode_videos) == len(dream_videos) == 2
    dream = imageio.mimread(dream_videos[-1])
    assert len(dream) == 51 and dream[0].shape == (3 * (14 + 64), 3 * 3 * 64, 3)
    real = imageio.mimread(episode_videos[-1])
    assert len(real) == 51 and real[0].shape == (3 * (14 + 64), 3 * 64, 3)


def test_mode_eval_dreams_on_a_v3_pixel_run(pixel_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    dreamer("mode=eval", f"checkpoint={pixel_run}", "eval.episodes=1", "eval.dreams=true", f"hydra.run.dir={out}")
    results = json.loads((out / "eval_results.json").read_text())
    assert [episode["length"] for episode in results["episodes"]] == [50]
    assert sorted(path.name for path in (out / "dreams").iterdir()) == ["episode_000.gif", "episode_000.mp4"]
    frames = imageio.mimread(out / "dreams" / "episode_000.mp4")
    assert len(frames) == 51  # the reset observation and one per agent step
