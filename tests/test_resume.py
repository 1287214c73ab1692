"""Runs that continue by themselves: ``resume=auto``, requeue by a submitit launcher, one dashboard run per
training run, a resumed invocation's files in its own run directory, and evaluations outside training's RNG."""

from __future__ import annotations

import collections
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from wandb.proto import wandb_internal_pb2

from tests.cli import ROOT, run_dreamer
from utils.agent import build_agent
from utils.checkpoint import capture_rng_state, load_checkpoint
from utils.config import ConfigError, apply_overrides, compose_config
from utils.metrics import RunLogger
from utils.run_state import RunState, prepare_run
from utils.train import _evaluate

# experiment=debug on Pendulum: 100-frame batches, 200 prefill frames, 2 updates per batch, last.pt every 200 frames.
TOTAL_FRAMES = 1200
RUN = ("experiment=debug", "env=pendulum", f"collector.total_frames={TOTAL_FRAMES}")


def scheduled_updates(frames: int) -> int:
    return ((frames - 200) // 100 + 1) * 2


def segments(run_dir: Path) -> list[int]:
    return [segment["frames"] for segment in json.loads((run_dir / "run_info.json").read_text())["segments"]]


def replay_length(run_dir: Path) -> int:
    return json.loads((run_dir / "replay" / "storage" / "storage_metadata.json").read_text())["len"]


def stored_observations(run_dir: Path, steps: int) -> torch.Tensor:
    path = run_dir / "replay" / "storage" / "observation.memmap"
    return torch.from_file(str(path), size=steps * 3, dtype=torch.float32).clone()


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "dreamer.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.2)


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` transaction log (LevelDB-style log: 32 KiB blocks of CRC, length, type, data)."""
    data, position, block, chunk = path.read_bytes(), 7, 32768, b""  # 7 bytes of file header
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_segment(offline_run: Path) -> tuple[set[str], dict[str, list[float]]]:
    """The run ids and, per metric, the logged values of one offline wandb run directory."""
    ids, history = set(), collections.defaultdict(list)
    for record in wandb_records(next(offline_run.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "run":
            ids.add(record.run.run_id)
        elif record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)].append(json.loads(item.value_json))
    return ids, history


def test_sigterm_then_the_same_command_line_continues_the_run_and_its_dashboard_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = (*RUN, "resume=auto", "logger.backend=wandb", f"hydra.run.dir={run_dir}")
    process = start(*command)
    wait_for(run_dir / "checkpoints" / "best.pt", process)  # after the first evaluation, so rows were logged
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-3000:]
    interrupted = load_checkpoint(run_dir)
    frames = interrupted["counters"]["frames"]
    assert 200 <= frames < TOTAL_FRAMES
    stored = replay_length(run_dir)
    observations = stored_observations(run_dir, stored)
    first_overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()

    # resume=auto restores counters and the RNG states saved at the interruption (not a fresh seed).
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    _, _, state = prepare_run(compose_config(*RUN, "resume=auto"), copy)
    assert (state.frames, state.updates, state.run_id) == (frames, interrupted["counters"]["updates"], state.run_id)
    assert torch.equal(torch.get_rng_state(), interrupted["rng"]["torch"])
    assert np.random.get_state()[2] == interrupted["rng"]["numpy_pos"]

    result = run_dreamer(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(run_dir)["counters"]
    assert (final["frames"], final["updates"]) == (TOTAL_FRAMES, scheduled_updates(TOTAL_FRAMES))
    assert segments(run_dir) == [0, frames]
    # The replay buffer was continued: old steps unchanged, the new agent steps (and episode resets) appended.
    assert replay_length(run_dir) > stored + (TOTAL_FRAMES - frames) // 2 - 1
    assert torch.equal(stored_observations(run_dir, stored), observations)
    # The second invocation's Hydra files are its own, in the run directory; the first one's are untouched.
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == first_overrides
    assert "resume=auto" in yaml.safe_load((run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text())
    assert (run_dir / "dreamer.log").is_file()

    # One dashboard run: both offline segments carry the checkpoint's run id, and their steps continue.
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    (first_ids, first), (second_ids, second) = map(wandb_segment, offline_runs)
    assert first_ids == second_ids == {final["run_id"]}
    assert all(name.name.endswith(final["run_id"]) for name in offline_runs)
    # The second segment may first log the updates the interrupted batch still owed, at the interruption's frame
    # count, but never a row of the first segment again: no earlier update count and no evaluation twice.
    assert max(first["frames"]) <= frames <= min(second["frames"]) and max(second["frames"]) == TOTAL_FRAMES
    assert max(first["updates"]) <= interrupted["counters"]["updates"] <= min(second["updates"])
    assert not set(first["eval/step"]) & set(second["eval/step"]), (first["eval/step"], second["eval/step"])


def submitit_tasks(root: int) -> list[int]:
    """Descendants of process ``root`` that run a submitit job (``python -m submitit.core._submit``)."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"submitit.core._submit" in command:
            found.append(pid)
        stack.extend(int(child) for child in children)
    return found


def test_a_preempted_submitit_job_is_requeued_and_continues_its_run(tmp_path: Path) -> None:
    """The requeue path of the SLURM launcher, on submitit's local executor (``hydra/launcher=dreamer_local``,
    the same launcher class but for submitit's executor): the job gets submitit's preemption signal (USR2) in the
    middle of training; it saves ``last.pt``, submitit calls the launcher's ``checkpoint()`` (the same job
    arguments, ``resume=auto`` among them), requeues the job, and the new job continues the run. Not covered
    without a cluster: sbatch's ``--signal`` delivery and ``scontrol requeue`` (SLURM's ``_requeue``)."""
    sweep_dir = tmp_path / "sweep"
    process = start("-m", "hydra/launcher=dreamer_local", *RUN, f"hydra.sweep.dir={sweep_dir}")
    run_dir = sweep_dir / "0_Pendulum-v1-None_seed0"
    wait_for(run_dir / "checkpoints" / "last.pt", process)
    (task,) = submitit_tasks(process.pid)
    os.kill(task, signal.SIGUSR2)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr.decode()[-3000:]

    first, resumed_at = segments(run_dir)
    assert first == 0 and 200 <= resumed_at < TOTAL_FRAMES
    final = load_checkpoint(run_dir)["counters"]
    assert (final["frames"], final["updates"]) == (TOTAL_FRAMES, scheduled_updates(TOTAL_FRAMES))
    assert "resume=auto" in yaml.safe_load((run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text())
    job_log = "".join(path.read_text() for path in (sweep_dir / ".submitit").glob("*/*_log.err"))
    assert "Caught signal SIGUSR2" in job_log and f"Interrupted at {resumed_at} frames" in job_log


def test_a_mistyped_resume_path_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    outputs = ROOT / "outputs"
    before = set(outputs.rglob("*")) if outputs.exists() else set()
    result = run_dreamer(f"resume={tmp_path / 'nope'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("dreamer: error: Checkpoint not found")
    assert not (tmp_path / "nope").exists()
    assert (set(outputs.rglob("*")) if outputs.exists() else set()) == before


def test_a_run_accepts_its_own_config_groups_on_resume_and_refuses_others() -> None:
    saved = compose_config("experiment=debug", "env=pendulum")
    choices = {"experiment": "debug", "env": "pendulum"}
    merged = apply_overrides(saved, ["experiment=debug", "env=pendulum", "collector.total_frames=800"], (), choices)
    assert merged.collector.total_frames == 800
    with pytest.raises(ConfigError, match=r"Cannot select env=car_racing .*\(it was composed with env=pendulum\)"):
        apply_overrides(saved, ["env=car_racing"], (), choices)
    with pytest.raises(ConfigError, match="Cannot select experiment=debug for a saved run"):
        apply_overrides(saved, ["experiment=debug"], (), {})


def test_an_evaluation_leaves_the_training_rng_as_it_was_and_repeats_itself(tmp_path: Path) -> None:
    cfg = compose_config("experiment=debug", "env=pendulum")
    agent = build_agent(cfg, torch.device("cpu"), None)
    logger = RunLogger(tmp_path, None, cfg.logger.video_fps)
    torch.manual_seed(123)
    before = capture_rng_state()
    returns = []
    for _ in range(2):
        state = RunState(frames=200, next_eval=200)
        _evaluate(cfg, agent, state, logger)
        returns.append(state.last_eval_return)
        after = capture_rng_state()
        assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]
        assert torch.equal(after["numpy_keys"], before["numpy_keys"]) and after["numpy_pos"] == before["numpy_pos"]
    assert returns[0] == returns[1]


def test_a_resumed_run_continues_its_tensorboard_run(tmp_path: Path) -> None:
    """Both segments write into one tensorboard run directory (the run directory's name), the second's steps after
    the first's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    for args in (
        (*RUN, "logger.backend=tensorboard", "collector.total_frames=400", f"hydra.run.dir={run_dir}"),
        (f"resume={run_dir}", "collector.total_frames=600"),
    ):
        result = run_dreamer(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "tensorboard").iterdir())
    assert [path.name for path in runs] == ["run"], f"a resumed run must not open a second tensorboard run: {runs}"
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2, "one event file per segment"
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    steps = [event.step for event in events.Scalars("loss/world_model")]
    assert steps == sorted(steps) and steps[0] <= 400 < steps[-1], f"the resumed segment's steps must follow: {steps}"
