"""Tiny training runs in this process (no subprocess start-up), with probes into what they did.

``train_in_process`` runs ``utils.train.train`` exactly as ``dreamer.py`` does, on Pendulum with a tiny model, and
records what a test cannot read from the run directory: the updates and policy steps made, the seeds every
environment was built with, the collector batches, and a snapshot of the whole learner state at an interruption.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict

import utils.envs
import utils.run_state
import utils.train
from utils.agent import Agent
from utils.checkpoint import capture_rng_state, load_checkpoint
from utils.config import compose_config
from utils.replay import make_replay_buffer, sample_sequences
from utils.update import DreamerUpdate

# Pendulum (action repeat 2) with a tiny model: 20-step episodes, 20-step collection batches (episodes line up with
# batches), one random episode of prefill, then 3 updates per batch: phases at 40, 80, 120 and 160 frames.
TINY_RUN = (
    "experiment=pendulum",
    "device=cpu",
    "model.deter_dim=8",
    "model.stoch_dim=2",
    "model.rssm_hidden_dim=8",
    "model.dense_units=8",
    "model.mlp_embed_dim=8",
    "replay_buffer.batch_size=2",
    "replay_buffer.batch_length=6",
    "env.max_episode_frames=40",
    "collector.frames_per_batch=40",
    "collector.init_random_frames=40",
    "collector.total_frames=160",
    "optimization.train_steps=3",
    "optimization.imagination_horizon=3",
    "logger.log_every=1",
    "logger.eval_every=80",
    "logger.eval_episodes=1",
    "checkpoint_every=100000",
)
# metrics.csv columns that measure wall-clock time: the only ones allowed to differ between identical runs.
RATE_COLUMNS = ("frames_per_second", "updates_per_second")


@dataclasses.dataclass
class RunRecord:
    """What one ``train`` call did (see the module docstring)."""

    update_calls: int = 0
    # Seeds of the environments built, by purpose ("train", "eval"): one per environment copy.
    env_seeds: dict[str, list[int]] = dataclasses.field(default_factory=lambda: {"train": [], "eval": []})
    # The collector batches of the training environments, as they came.
    batches: list[TensorDict] = dataclasses.field(default_factory=list)
    # Collector batches recorded before each update call (order of collection and updates).
    batches_before_update: list[int] = dataclasses.field(default_factory=list)
    interrupted: dict[str, Any] | None = None


def learner_state(update: DreamerUpdate) -> dict[str, Any]:
    """Deep copies of the networks, the optimisers and gradient scalers, and the RNG streams."""
    return {
        "agent": {name: copy.deepcopy(module.state_dict()) for name, module in update.groups.items()},
        "update": copy.deepcopy(update.state_dict()),
        "rng": copy.deepcopy(capture_rng_state()),
    }


@contextlib.contextmanager
def env_seed_spy(record: RunRecord) -> Iterator[pytest.MonkeyPatch]:
    """Records the seed of every environment copy built by ``Agent.make_train_env`` / ``make_eval_env``."""
    purpose: list[str] = []

    def labelled(method_name: str, label: str):
        original = getattr(Agent, method_name)

        @functools.wraps(original)
        def method(self: Agent, *args: Any, **kwargs: Any):
            purpose.append(label)
            try:
                return original(self, *args, **kwargs)
            finally:
                purpose.pop()

        return method

    single = utils.envs._make_single_env

    def make_single(env_cfg: DictConfig, seed: int, device: Any):
        if purpose:
            record.env_seeds[purpose[-1]].append(seed)
        return single(env_cfg, seed, device)

    def copy_factory(function: Any, env_cfg: DictConfig, seed: int, *args: Any) -> functools.partial:
        """``utils.envs.make_env`` builds ``ParallelEnv`` copies from ``partial(_make_single_env, cfg, seed, ...)``."""
        if purpose:
            record.env_seeds[purpose[-1]].append(seed)
        return functools.partial(single, env_cfg, seed, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Agent, "make_train_env", labelled("make_train_env", "train"))
        patch.setattr(Agent, "make_eval_env", labelled("make_eval_env", "eval"))
        patch.setattr(utils.envs, "_make_single_env", make_single)
        patch.setattr(utils.envs, "partial", copy_factory)
        yield patch


def train_in_process(
    run_dir: Path,
    overrides: tuple[str, ...] = TINY_RUN,
    *,
    resume: bool = False,
    interrupt_at_update: int | None = None,
) -> RunRecord:
    """Trains (``resume=False``) or resumes the run in ``run_dir`` as ``dreamer.py`` would, on one torch thread.

    ``overrides`` are the command line of a new run, or the overrides given beside ``resume=``. With
    ``interrupt_at_update=n`` the n-th update call of this ``train`` raises ``KeyboardInterrupt`` (Ctrl-C) in its
    middle, after its forward passes drew from torch's stream and before any optimiser step; the learner state at
    the start of that update is kept in ``RunRecord.interrupted``.
    """
    record = RunRecord()

    def ctrl_c(*args: Any) -> None:
        """Ctrl-C in the middle of an update: after its forward passes drew latent noise from torch's stream,
        before any optimiser step."""
        raise KeyboardInterrupt

    update_step, record_batch = DreamerUpdate.step, utils.train._record_batch

    def step(self: DreamerUpdate, batch: TensorDict) -> dict[str, torch.Tensor]:
        record.update_calls += 1
        record.batches_before_update.append(len(record.batches))
        if record.update_calls == interrupt_at_update:
            record.interrupted = learner_state(self)
            with pytest.MonkeyPatch.context() as inner:
                inner.setattr(DreamerUpdate, "_apply", ctrl_c)
                update_step(self, batch)
        metrics = update_step(self, batch)
        # Nothing in a Pendulum run reads Python's or NumPy's global stream (a resume that forgot to restore them
        # would pass unseen); each completed update draws from both, as an environment or augmentation might.
        random.random()
        np.random.random()
        return metrics

    def collected(batch: TensorDict, *args: Any) -> None:
        record.batches.append(batch.clone())
        record_batch(batch, *args)

    hydra = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(run_dir)))
    threads = torch.get_num_threads()
    with env_seed_spy(record) as patch:
        patch.setattr(utils.train, "HydraConfig", SimpleNamespace(get=lambda: hydra))
        patch.setattr(utils.run_state, "command_line_overrides", lambda: list(overrides) if resume else [])
        patch.setattr(DreamerUpdate, "step", step)
        patch.setattr(utils.train, "_record_batch", collected)
        cfg = compose_config(*overrides, *([f"resume={run_dir}"] if resume else []))
        torch.set_num_threads(1)
        try:
            utils.train.train(cfg)
        finally:
            torch.set_num_threads(threads)
    return record


def stored_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(run_dir / "config.yaml")


def replay_of(run_dir: Path):
    """The run's replay buffer, reopened from its run directory as a resume does."""
    cfg = stored_config(run_dir).replay_buffer
    replay = make_replay_buffer(cfg.buffer_size, cfg.batch_length, cfg.storage, run_dir / "replay")
    replay.loads(run_dir / "replay")
    return replay


def stored_steps(run_dir: Path) -> TensorDict:
    """Every step of the run's replay buffer, in storage order (as saved by its last checkpoint)."""
    replay = replay_of(run_dir)
    return replay[: len(replay)]


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Paths where two nested structures of dicts, lists, tensors and numbers differ (tensors: bit for bit)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{path}: keys {sorted(map(str, set(expected) ^ set(actual)))}"]
        return [line for key in expected for line in differences(expected[key], actual[key], f"{path}/{key}")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [
            line
            for i, (a, b) in enumerate(zip(expected, actual, strict=True))
            for line in differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        same = expected.shape == actual.shape and expected.dtype == actual.dtype and torch.equal(expected, actual)
        return [] if same else [path]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def checkpoint_state(run_dir: Path) -> dict[str, Any]:
    """The learner state, counters and RNG of a run's last checkpoint (without the dashboard's run id: each run has
    its own)."""
    payload = load_checkpoint(run_dir)
    state = {key: payload[key] for key in ("agent", "update", "rng", "counters")}
    state["counters"] = {key: value for key, value in state["counters"].items() if key != "run_id"}
    return state


def check_sequences_stay_in_episodes(replay: Any, batch_size: int, batch_length: int, draws: int = 20) -> None:
    """Samples ``draws`` batches: every sequence is consecutive steps of one episode, ``is_first`` only at step 0."""
    for _ in range(draws):
        sequences = sample_sequences(replay, batch_size, batch_length)
        episode, step = sequences["episode"], sequences["step"]
        assert (episode == episode[:, :1]).all(), "a sampled sequence crosses from one episode into another"
        assert ((step[:, 1:] - step[:, :-1]) == 1).all(), "a sampled sequence skips or repeats steps of its episode"
        assert torch.equal(sequences["is_first"].squeeze(-1), step == 0), "is_first is set where no episode starts"


def episodes_by_id(steps: TensorDict, key: str = "observation") -> dict[int, torch.Tensor]:
    """Stored steps grouped by episode id, each in storage order: id -> ``key`` values ``[n, *]``.

    Checks on the way that each episode's step indices count 0, 1, 2, ... with ``is_first`` exactly at step 0.
    """
    grouped = {}
    for episode in steps["episode"].unique().tolist():
        members = steps[steps["episode"] == episode]
        count = members.shape[0]
        assert members["step"].tolist() == list(range(count)), f"episode {episode}: steps {members['step'].tolist()}"
        assert members["is_first"].squeeze(-1).tolist() == [True] + [False] * (count - 1), f"episode {episode}"
        grouped[episode] = members[key]
    return grouped


def acted_by_the_policy(batch: TensorDict) -> bool:
    """Whether every step of a collector batch was the policy's (it writes its action as the next "prev_action");
    the random prefill's steps are not."""
    return torch.equal(batch["next", "prev_action"], batch["action"])
