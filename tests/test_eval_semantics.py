"""What an evaluation means: returns are the environment's reward sums, ``eval.stochastic=true`` samples the actor
without exploration noise, evaluation environments are seeded apart from training ones, and a repeated evaluation
command repeats its numbers. On Pendulum with a tiny untrained agent (``tests.runs.TINY_RUN``, 20-step episodes)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchrl.envs import ExplorationType, set_exploration_type

from tests.runs import TINY_RUN, RunRecord, env_seed_spy
from utils.agent import EVAL_SEED_OFFSET, Agent, build_agent
from utils.checkpoint import save_atomic
from utils.config import compose_config
from utils.eval_mode import run_episodes, run_evaluation
from utils.evaluation import evaluate_policy

STEPS = 20  # agent steps per episode: max_episode_frames 40 at action repeat 2


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_agent(*overrides: str) -> Agent:
    torch.manual_seed(0)
    return build_agent(compose_config(*TINY_RUN, *overrides), torch.device("cpu"), None)


def test_an_episode_return_is_the_sum_of_the_environments_rewards() -> None:
    """The episode's actions replayed on a raw gymnasium Pendulum-v1 with the evaluation seed: the reported return
    is the sum of its per-frame rewards (2 frames per agent step, actions scaled from [-1, 1] to [-2, 2])."""
    agent = tiny_agent()
    torch.manual_seed(1)
    with set_exploration_type(ExplorationType.RANDOM):  # varied actions
        (episode,) = evaluate_policy(agent, 1, seed_offset=EVAL_SEED_OFFSET)
    raw = gymnasium.make("Pendulum-v1", max_episode_steps=2 * STEPS)
    raw.reset(seed=agent.cfg.env.seed + EVAL_SEED_OFFSET)  # make_env seeds with a reset(seed=...) ...
    observation, _ = raw.reset()  # ... and the episode starts with one more reset
    np.testing.assert_allclose(
        episode.steps["observation"][0].numpy(),
        observation,
        rtol=1e-6,
        atol=1e-6,
        err_msg="the evaluation episode must start where a Pendulum seeded env.seed + EVAL_SEED_OFFSET starts",
    )
    rewards = []
    for action in episode.steps["action"][1:]:
        for _ in range(2):
            observation, reward, *_ = raw.step(2 * action.numpy())
            rewards.append(reward)
    assert episode.length == STEPS and len(rewards) == 2 * STEPS
    assert episode.episode_return == pytest.approx(sum(rewards), rel=1e-5), (
        "an episode's return must be the sum of the environment's rewards"
    )
    assert min(rewards) < -0.5  # Pendulum costs: a sum of zeros would check nothing


def constant_actor(agent: Agent, pre_tanh_mean: float, pre_tanh_std: float) -> None:
    """Makes the actor ignore its input: pre-tanh Gaussian ``N(pre_tanh_mean, pre_tanh_std)`` on every state."""
    actor = agent.actor
    raw_std = math.log(math.expm1(pre_tanh_std - actor.min_std)) - actor.raw_init_std if pre_tanh_std > 1e-3 else -60.0
    raw_mean = actor.mean_scale * math.atanh(pre_tanh_mean / actor.mean_scale)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor([raw_mean, raw_std]))


def stochastic_eval_actions(pre_tanh_std: float) -> torch.Tensor:
    """Pre-tanh actions ``[STEPS]`` of one ``eval.stochastic=true`` episode (exploration noise configured: 0.3)."""
    cfg = compose_config(*TINY_RUN, "eval.stochastic=true", "eval.episodes=1", "collector.exploration_noise=0.3")
    agent = tiny_agent()
    constant_actor(agent, pre_tanh_mean=0.3, pre_tanh_std=pre_tanh_std)
    torch.manual_seed(2)
    (episode,) = run_episodes(agent, cfg)
    return torch.atanh(episode.steps["action"][1:, 0].double().clamp(-1 + 1e-12, 1 - 1e-12))


def test_stochastic_evaluation_samples_the_actor_without_exploration_noise() -> None:
    # A nearly deterministic actor: its samples are its mean, so any spread is exploration noise.
    narrow = stochastic_eval_actions(pre_tanh_std=0.0)
    assert (narrow - 0.3).abs().max() < 1e-3, (
        "eval.stochastic=true must not add the training-time exploration noise to the actor's samples"
    )
    # A wide actor (std 0.5 before tanh): the actions are its samples, not its mode.
    wide = stochastic_eval_actions(pre_tanh_std=0.5)
    assert 0.25 < wide.std() < 0.85 and (wide - 0.3).abs().mean() > 0.1, (
        f"eval.stochastic=true must sample the actor (pre-tanh actions {wide.tolist()})"
    )


def test_mode_eval_environments_never_share_a_seed_with_training_ones() -> None:
    cfg = compose_config(*TINY_RUN, "env.num_envs=2", "eval.episodes=1")
    agent = build_agent(cfg, torch.device("cpu"), None)
    record = RunRecord()
    with env_seed_spy(record):
        agent.make_train_env()  # a ParallelEnv: its worker processes start only when it is used
        run_episodes(agent, cfg)
    train, evaluation = set(record.env_seeds["train"]), set(record.env_seeds["eval"])
    assert train == {0, 1} and len(evaluation) == 1, record.env_seeds
    assert not train & evaluation, f"evaluation environments share seeds {train & evaluation} with training"


def test_repeating_an_evaluation_command_repeats_its_numbers(tmp_path: Path) -> None:
    """``run_evaluation`` is what ``dreamer.py mode=eval`` runs; between the two runs the global RNGs are moved on,
    as in a fresh process."""
    cfg = compose_config(*TINY_RUN)
    agent = build_agent(cfg, torch.device("cpu"), None)
    checkpoint = tmp_path / "agent.pt"
    save_atomic({"config": OmegaConf.to_container(cfg, resolve=True), "agent": agent.state_dict()}, checkpoint)
    overrides = ["eval.stochastic=true", "eval.episodes=2"]
    summaries = []
    for attempt in range(2):
        torch.manual_seed(100 + attempt)
        np.random.seed(100 + attempt)
        random.seed(100 + attempt)
        report = run_evaluation(
            compose_config("mode=eval", f"checkpoint={checkpoint}", *overrides), overrides, tmp_path / f"out{attempt}"
        )
        summaries.append(report.summary()["episodes"])
    assert summaries[0] == summaries[1], "repeating an evaluation command must repeat its returns and lengths"
    assert summaries[0][0]["return"] != summaries[0][1]["return"]  # the episodes differ: the RNG is really used
