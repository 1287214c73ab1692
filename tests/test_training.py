"""The training application end to end: outputs, schedule, checkpoints, interruption and resume, autocast fallback."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch

from tests.cli import ROOT, run_dreamer
from utils.checkpoint import load_checkpoint

# experiment=debug: 100-frame batches, 200 prefill frames, 2 updates per batch, 400 frames, 50-step episodes.
DEBUG_UPDATES = (400 - 200) // 100 * 2 + 2  # a training phase at 200, 300 and 400 frames


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def replay_length(run_dir: Path) -> int:
    return json.loads((run_dir / "replay" / "storage" / "storage_metadata.json").read_text())["len"]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("debug") / "run"
    result = run_dreamer("experiment=debug", "logger.video=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_debug_run_writes_metrics_checkpoints_and_videos(debug_run: Path) -> None:
    rows = read_metrics(debug_run)
    train_rows = [r for r in rows if r["loss/world_model"]]
    eval_rows = [r for r in rows if r["eval/return"] and not r["loss/world_model"]]
    for column in ("frames", "agent_steps", "updates", "loss/world_model", "loss/actor", "loss/value", "kl"):
        assert all(r[column] != "" for r in train_rows), column
    assert {"train/return", "eval/return", "grad_norm/world_model", "imagined_return", "actor_entropy"} <= set(rows[0])
    assert {"updates_per_agent_step", "replayed_steps_per_agent_step", "frames_per_second"} <= set(rows[0])
    assert int(train_rows[-1]["updates"]) == DEBUG_UPDATES and int(train_rows[-1]["frames"]) == 400
    assert [int(r["frames"]) for r in eval_rows] == [200, 400]
    # Both ratio conventions: updates per agent step and replayed steps (batch 4 x length 8) per agent step.
    last = train_rows[-1]
    assert float(last["updates_per_agent_step"]) == pytest.approx(DEBUG_UPDATES / 200)
    assert float(last["replayed_steps_per_agent_step"]) == pytest.approx(DEBUG_UPDATES * 32 / 200)

    checkpoint = load_checkpoint(debug_run)
    assert checkpoint["counters"]["frames"] == 400 and checkpoint["counters"]["updates"] == DEBUG_UPDATES
    assert checkpoint["config"]["env"]["name"] == "cartpole"
    assert set(checkpoint["update"]) >= {
        "optimizer/world_model",
        "optimizer/actor",
        "optimizer/value",
        "grad_scaler/world_model",
    }
    assert (debug_run / "checkpoints" / "best.pt").is_file()
    assert not list((debug_run / "checkpoints").glob(".*tmp*"))

    # Two videos per evaluation: the real episode (51 steps of 64x64) and the truth | model | error dream grid,
    # under a 14-pixel row of titles, enlarged 3 times.
    episode_videos = sorted((debug_run / "videos").glob("eval_episode_*.mp4"))
    dream_videos = sorted((debug_run / "videos").glob("eval_open_loop_dream_*.mp4"))
    assert len(episode_videos) == len(dream_videos) == 2
    dream = imageio.mimread(dream_videos[-1])
    assert len(dream) == 51 and dream[0].shape == (3 * (14 + 64), 3 * 3 * 64, 3)
    real = imageio.mimread(episode_videos[-1])
    assert len(real) == 51 and real[0].shape == (3 * (14 + 64), 3 * 64, 3)
    # The "truth" panel of the dream is the real episode (up to video compression); the title rows differ.
    truth = torch.tensor(dream[10][3 * 14 :, : 3 * 64].astype(float))
    assert (truth - torch.tensor(real[10][3 * 14 :].astype(float))).abs().mean() < 8
    assert (dream[10][: 3 * 14, : 3 * 64] != real[10][: 3 * 14]).any()  # "truth" vs "episode"


def test_resume_extends_a_finished_run_with_counters_and_buffer_intact(debug_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(debug_run), str(run_dir)], check=True)
    stored_before = replay_length(run_dir)
    pixels_before = torch.from_file(
        str(run_dir / "replay" / "storage" / "pixels.memmap"), size=stored_before * 3 * 64 * 64, dtype=torch.uint8
    )

    result = run_dreamer(f"resume={run_dir}", "collector.total_frames=600")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["counters"]["frames"] == 600
    assert checkpoint["counters"]["updates"] == DEBUG_UPDATES + 2 * 2
    assert checkpoint["config"]["collector"]["total_frames"] == 600
    stored_after = replay_length(run_dir)
    assert stored_after == stored_before + 200 // 2 + 200 // 100  # 100 agent steps + 2 episode resets
    pixels_after = torch.from_file(
        str(run_dir / "replay" / "storage" / "pixels.memmap"), size=stored_before * 3 * 64 * 64, dtype=torch.uint8
    )
    assert torch.equal(pixels_before, pixels_after)
    frames = [int(r["frames"]) for r in read_metrics(run_dir) if r["loss/world_model"]]
    assert frames == sorted(frames) and frames[-1] == 600
    # Provenance: one segment per start or resume, with this checkout's commit and the installed torch.
    segments = json.loads((run_dir / "run_info.json").read_text())["segments"]
    assert [segment["frames"] for segment in segments] == [0, 400]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert segments[-1]["commit"] == head and segments[-1]["packages"]["torch"] == torch.__version__
    assert segments[-1]["num_threads"] >= 1 and isinstance(segments[-1]["dirty"], bool)


def test_sigterm_saves_a_loadable_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "dreamer.py", "experiment=debug", "collector.total_frames=100000", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "best.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Interrupted at" in stderr
    interrupted = load_checkpoint(run_dir)["counters"]
    assert 200 <= interrupted["frames"] < 100000

    result = run_dreamer(f"resume={run_dir}", f"collector.total_frames={interrupted['frames'] + 200}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_checkpoint(run_dir)["counters"]
    assert resumed["frames"] == interrupted["frames"] + 200
    # The schedule is a function of the counters: every update the frames called for has been made.
    assert resumed["updates"] == ((resumed["frames"] - 200) // 100 + 1) * 2


def test_autocast_on_cpu_falls_back_to_float32_with_one_warning(tmp_path: Path) -> None:
    result = run_dreamer(
        "experiment=debug", "optimization.autocast=float16", "collector.total_frames=200", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("optimization.autocast=float16: float16 autocast needs CUDA") == 1


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda d: d / "missing", "Checkpoint not found"),
        (
            lambda d: (d / "x.pt").write_text("not a checkpoint") and d / "x.pt",
            "is a file; resume takes a run directory",
        ),
    ],
)
def test_resume_from_a_bad_checkpoint_is_one_clear_line(tmp_path: Path, make_path, message: str) -> None:
    path = make_path(tmp_path)
    result = run_dreamer(f"resume={path}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_resume_from_a_truncated_checkpoint_names_the_file(debug_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    data = (debug_run / "checkpoints" / "last.pt").read_bytes()
    (run_dir / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])
    result = run_dreamer(f"resume={run_dir}")
    assert result.returncode == 2
    assert "last.pt" in result.stderr and "truncated" in result.stderr


def test_a_new_run_in_the_directory_of_another_is_one_clear_line(debug_run: Path) -> None:
    metrics_before = (debug_run / "metrics.csv").read_bytes()
    result = run_dreamer("experiment=debug", f"hydra.run.dir={debug_run}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"already holds a run (checkpoints/last.pt); continue it with resume={debug_run}" in result.stderr
    assert (debug_run / "metrics.csv").read_bytes() == metrics_before


def test_resume_auto_where_a_run_saved_no_checkpoint_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    """A run killed before its first checkpoint leaves metrics.csv only: neither a new run nor resume=auto may
    append to it, and the message must not send the user to a resume that cannot work."""
    (tmp_path / "metrics.csv").write_text("frames,eval/return\n100,1.0\n")
    for resume in ("null", "auto"):
        result = run_dreamer("experiment=debug", f"resume={resume}", f"hydra.run.dir={tmp_path}")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert "holds a run that saved no checkpoint" in result.stderr and "nothing to resume" in result.stderr
    assert (tmp_path / "metrics.csv").read_text() == "frames,eval/return\n100,1.0\n"


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("wandb", "wandb/offline-run-*/run-*.wandb"),
        ("tensorboard", "tensorboard/**/events.out.tfevents.*"),
        ("none", None),
    ],
)
def test_dashboard_backends_write_their_files(tmp_path: Path, backend: str, expected: str | None) -> None:
    result = run_dreamer(
        "experiment=debug",
        f"logger.backend={backend}",
        "logger.video=true",
        "collector.total_frames=200",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "metrics.csv").is_file() and len(list((tmp_path / "videos").glob("*.mp4"))) == 2
    if expected is None:
        assert not any((tmp_path / name).exists() for name in ("wandb", "tensorboard", "csv_logs"))
    else:
        assert list(tmp_path.glob(expected)), f"no {expected} in {sorted(p.name for p in tmp_path.iterdir())}"
    if backend == "wandb":
        assert list(tmp_path.glob("wandb/offline-run-*/files/media/videos/eval/*.mp4"))
