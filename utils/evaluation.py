"""Evaluation episodes and the two training videos: the real episode and the open-loop dream."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tensordict import TensorDict

from modules.rssm import feature
from modules.world_model import WorldModel
from utils.agent import Agent
from utils.metrics import RunLogger
from utils.replay import StepRecorder

DREAM_CONTEXT = 5


@dataclasses.dataclass
class EpisodeResult:
    """One evaluation episode: its return, its length in agent steps, and its steps ``[T + 1]`` (replay format)."""

    episode_return: float
    length: int
    steps: TensorDict


def evaluate_policy(agent: Agent, episodes: int, seed_offset: int) -> list[EpisodeResult]:
    """Runs ``episodes`` full episodes of ``agent.policy`` (under the caller's exploration type) on a fresh env."""
    env = agent.make_eval_env(seed_offset)
    max_steps = agent.cfg.env.max_episode_frames // agent.cfg.env.action_repeat
    results = []
    with torch.no_grad():
        for _ in range(episodes):
            rollout = env.rollout(max_steps, agent.policy, auto_reset=True, break_when_any_done=True).cpu()
            steps = StepRecorder(agent.obs_key, num_envs=1).convert(rollout)
            results.append(EpisodeResult(float(rollout["next", "reward"].sum()), rollout.shape[0], steps))
    env.close()
    return results


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """Float images in ``[-0.5, 0.5]`` ``[T, C, H, W]`` -> uint8 ``[T, H, W, C]``, clamped before conversion."""
    scaled = ((images.float() + 0.5).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def open_loop_dream(world_model: WorldModel, steps: TensorDict, context: int = DREAM_CONTEXT) -> np.ndarray:
    """The model observes the first ``context`` steps of ``steps [T]``, then imagines the rest from the actions.

    Returns uint8 frames ``[T, H, 3W, C]``: truth | model (reconstruction, then open-loop prediction) | error,
    where error = (model - truth + 1) / 2 as in the authors' summaries (grey = no error).
    """
    batch = steps.unsqueeze(0).to(next(world_model.parameters()).device)  # [1, T]
    truth = world_model.preprocess(batch[world_model.obs_key])
    observed = world_model.rssm(
        world_model.encoder(truth[:, :context]), batch["action"][:, :context], batch["is_first"][:, :context]
    )
    features = [feature(observed["deter"], observed["stoch"])]
    deter, stoch = observed["deter"][:, -1], observed["stoch"][:, -1]
    for t in range(context, batch.shape[1]):
        deter, _, _, stoch = world_model.rssm.prior(deter, stoch, batch["action"][:, t])
        features.append(feature(deter, stoch).unsqueeze(1))
    model = world_model.decoder(torch.cat(features, dim=1)).clamp(-0.5, 0.5)
    error = (model - truth + 1.0) / 2.0 - 0.5
    grid = torch.cat([truth, model, error], dim=-1)[0]  # [T, C, H, 3W]
    return to_uint8_frames(grid)


def log_eval_videos(agent: Agent, episode: EpisodeResult, logger: RunLogger, step: int) -> None:
    """Logs the real evaluation episode and an open-loop dream of it (pixel environments)."""
    pixels = episode.steps[agent.obs_key]  # uint8 [T, C, H, W]
    logger.log_video("eval/episode", pixels.permute(0, 2, 3, 1).numpy(), step=step)
    logger.log_video("eval/open_loop_dream", open_loop_dream(agent.world_model, episode.steps), step=step)
