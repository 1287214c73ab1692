"""Starting, resuming and checkpointing a training run.

A run directory holds ``config.yaml`` (the effective config), ``run_info.json`` (code, packages and device of each
start or resume: ``utils/provenance.py``), ``metrics.csv``, ``checkpoints/{last,best}.pt``,
``replay/`` (the memory-mapped buffer, reopened on resume) and the dashboard's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torchrl.data import TensorDictReplayBuffer

from utils.agent import Agent, build_agent
from utils.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from utils.config import (
    ConfigError,
    check_config,
    command_line_overrides,
    config_group_choices,
    resolve_autocast,
    resolve_device,
    resolve_num_threads,
    restore_config,
)
from utils.provenance import record_segment, segment_info
from utils.replay import StepRecorder
from utils.resume import continues_run


@dataclasses.dataclass
class RunState:
    """Counters and bookkeeping saved in every checkpoint."""

    frames: int = 0
    agent_steps: int = 0
    updates: int = 0
    episodes: int = 0
    next_eval: int = 0
    next_checkpoint: int = 0
    last_train_return: float | None = None
    last_eval_return: float | None = None
    best_eval_return: float | None = None
    replay_saved: bool = False
    recorder: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The metrics of the updates made since the last metrics row of the current training phase (one dict of scalar
    # tensors per update): a run interrupted in the middle of a ``logger.log_every`` window logs the same row.
    log_window: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The training environment's random stream at the checkpoint (utils/env_rng.py); None for several envs.
    env_rng: dict[str, Any] | None = None
    # The run's dashboard id (wandb run id), kept across resumes so that all segments log to one dashboard run.
    # Drawn from the OS, not from the seeded RNGs; a checkpoint written before this field gets one on resume.
    run_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4))
    # The config groups' options the run was composed with (utils.config.config_group_choices).
    config_choices: dict[str, str | None] = dataclasses.field(default_factory=dict)


def prepare_run(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Agent, RunState]:
    """Builds the agent for a new run in ``run_dir``, or restores everything from its last checkpoint (``resume``
    set to the run directory, or ``auto`` with a checkpoint there: ``utils/resume.py``)."""
    payload = None
    if continues_run(cfg.resume, run_dir):
        payload = load_checkpoint(run_dir)
        saved_choices = payload["counters"].get("config_choices", {})
        cfg = restore_config(cfg, payload["config"], command_line_overrides(), ("resume",), saved_choices)
        with open_dict(cfg):
            cfg.resume = str(run_dir)
    check_config(cfg)
    if payload is None:
        refuse_finished_or_started_run(run_dir)
    device = resolve_device(cfg.device)
    with open_dict(cfg):
        cfg.num_threads = resolve_num_threads(cfg.num_threads)
    torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.env.seed)
    agent = build_agent(cfg, device, resolve_autocast(cfg.optimization.autocast, device))
    if payload is None:
        state = RunState(
            next_eval=cfg.logger.eval_every, next_checkpoint=cfg.checkpoint_every, config_choices=config_group_choices()
        )
    else:
        load_agent_state(agent, payload)
        state = RunState(**payload["counters"])
        restore_rng_state(payload["rng"])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    record_segment(run_dir, segment_info(state.frames, device, cfg.num_threads))
    return cfg, agent, state


def refuse_finished_or_started_run(run_dir: Path) -> None:
    """A new run must not write into the directory of another: its metrics would be appended to theirs."""
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(
            f"Run directory {run_dir} already holds a run (checkpoints/last.pt); continue it with resume={run_dir} "
            "(or resume=auto) or start a new one in another hydra.run.dir"
        )
    if (run_dir / "metrics.csv").exists():
        # Killed (SIGKILL, a crash) before its first checkpoint: resume=<dir> or auto has nothing to continue.
        raise ConfigError(
            f"Run directory {run_dir} holds a run that saved no checkpoint (metrics.csv without "
            "checkpoints/last.pt), so there is nothing to resume; delete it or start in another hydra.run.dir"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluation_seed(env_seed: int, index: int) -> int:
    """The RNG seed of a run's ``index``-th evaluation: a function of ``env.seed`` and the index only."""
    return int(np.random.SeedSequence([env_seed, index]).generate_state(1)[0])


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Runs the block on Python, NumPy and torch (CPU and CUDA) RNGs seeded with ``seed``, then puts the previous
    states back: what the block draws leaves the caller's random stream (training's) as it was."""
    saved = capture_rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng_state(saved)


def load_agent_state(agent: Agent, payload: dict[str, Any]) -> None:
    """Loads networks (and optimisers when present) from a checkpoint, naming the file when shapes differ."""
    try:
        agent.load_state_dict(payload["agent"])
        if "update" in payload:
            agent.update.load_state_dict(payload["update"])
    except (RuntimeError, KeyError, ValueError) as error:
        first_line = f"missing entry {error}" if isinstance(error, KeyError) else str(error).strip().splitlines()[0]
        raise CheckpointError(f"Checkpoint {payload['path']} does not fit this model/env: {first_line}") from error


def save_run_checkpoint(
    path: Path,
    cfg: DictConfig,
    agent: Agent,
    state: RunState,
    replay: TensorDictReplayBuffer,
    recorder: StepRecorder,
) -> None:
    """Flushes the replay buffer's metadata in place, then writes the checkpoint atomically."""
    if len(replay):
        replay.dumps(path.parent.parent / "replay")
    state.replay_saved = len(replay) > 0
    state.recorder = recorder.state_dict()
    save_atomic(
        {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "agent": agent.state_dict(),
            "update": agent.update.state_dict(),
            "counters": dataclasses.asdict(state),
            "rng": capture_rng_state(),
        },
        path,
    )
