"""Evaluation episodes and the two training videos: the real episode and the open-loop dream."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs import RenameTransform, TransformedEnv

from modules.rssm import feature
from modules.world_model import WorldModel
from utils.agent import Agent
from utils.envs import PIXELS_KEY, ChannelsFirstPixels
from utils.metrics import RunLogger
from utils.replay import StepRecorder

DREAM_CONTEXT = 5
DREAM_TITLES = ("truth", "model", "error")
# Training's evaluation videos are enlarged this many times (64x64 panels become 192x192).
VIDEO_SCALE = 3
RGB_FRAME_KEY = "rgb_frame"


@dataclasses.dataclass
class EpisodeResult:
    """One evaluation episode: its return, its length ``T`` in agent steps, and its steps ``[T + 1]`` (replay format).

    ``rgb_frames`` (only when asked for): uint8 ``[T + 1, 3, H, W]``, the RGB image behind each step's observation.
    """

    episode_return: float
    length: int
    steps: TensorDict
    rgb_frames: torch.Tensor | None = None


def add_rgb_frames(env: TransformedEnv, size: int) -> None:
    """Makes a pixel env also return ``"rgb_frame"`` uint8 ``[3, size, size]``: the raw RGB image, resized.

    The copy is taken before the env's own pixel transform, so it stays in colour when the agent sees grayscale;
    otherwise it equals ``"pixels"`` (same resizing).
    """
    env.insert_transform(0, RenameTransform([PIXELS_KEY], [RGB_FRAME_KEY], create_copy=True))
    env.insert_transform(1, ChannelsFirstPixels(size, grayscale=False, in_key=RGB_FRAME_KEY))


def evaluate_policy(
    agent: Agent, episodes: int, seed_offset: int, keep_rgb_frames: bool = False
) -> list[EpisodeResult]:
    """Runs ``episodes`` full episodes of ``agent.policy`` (under the caller's exploration type) on a fresh env.

    ``keep_rgb_frames`` (pixel envs only) also keeps each episode's RGB images (``EpisodeResult.rgb_frames``).
    """
    env = agent.make_eval_env(seed_offset)
    if keep_rgb_frames:
        add_rgb_frames(env, agent.cfg.env.image_size)
    max_steps = agent.cfg.env.max_episode_frames // agent.cfg.env.action_repeat
    results = []
    with torch.no_grad():
        for _ in range(episodes):
            rollout = env.rollout(max_steps, agent.policy, auto_reset=True, break_when_any_done=True).cpu()
            steps = StepRecorder(agent.obs_key, num_envs=1).convert(rollout)
            rgb_frames = None
            if keep_rgb_frames:  # the reset image, then the image reached by each step: aligned with ``steps``
                rgb_frames = torch.cat([rollout[RGB_FRAME_KEY][:1], rollout["next", RGB_FRAME_KEY]])
            results.append(EpisodeResult(float(rollout["next", "reward"].sum()), rollout.shape[0], steps, rgb_frames))
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
    """Logs the real evaluation episode and an open-loop dream of it (pixel environments), titled (``episode``;
    ``truth | model | error``) and enlarged ``VIDEO_SCALE`` times so that they are readable on a dashboard."""
    from utils.dream_video import titled  # utils.dream_video imports this module

    pixels = episode.steps[agent.obs_key].permute(0, 2, 3, 1).numpy()  # uint8 [T, H, W, C]
    logger.log_video("eval/episode", titled(pixels, ["episode"], VIDEO_SCALE), step=step)
    dream = open_loop_dream(agent.world_model, episode.steps)
    logger.log_video("eval/open_loop_dream", titled(dream, list(DREAM_TITLES), VIDEO_SCALE), step=step)
