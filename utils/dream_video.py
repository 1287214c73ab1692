"""Dream videos of ``mode=eval``: what the agent sees, what its world model makes of it, and what it imagines next.

A dream video has one frame per observation ``o_t`` of an episode, ``t = 0 .. T`` (the reset observation, then the
one reached by each of the ``T`` agent steps: ``T + 1`` frames). Each frame is a row of 64x64 panels under a
``LABEL_HEIGHT``-pixel row of titles::

    real | input | recon | dream +k1 | dream +k2 | dream +H

* ``real``: the environment's RGB image of ``o_t`` (for a grayscale env, the colour image before the conversion);
* ``input``: ``o_t`` as the networks get it (64x64; grayscale shown grey);
* ``recon``: the decoder's mean for the model state ``s_t = (h_t, z_t)`` filtered from ``o_0 .. o_t`` and the
  actions taken (posterior sample, as the acting policy does);
* ``dream +k``: the decoder's mean for the state the model imagines ``k`` steps after ``s_t``, rolling its prior
  (sampled ``z``) with the actor's deterministic action (its mode) on each imagined state, without observations.
  The offsets are ``ceil(H/3), ceil(2H/3), H`` (duplicates dropped) for ``H = eval.imagination_horizon``: 5, 10 and
  15 by default. The ``dream +k`` panel of frame ``t`` can be compared with the ``real`` panel of frame ``t + k``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tensordict import TensorDict

from modules.actor import Actor
from modules.rssm import RSSMPrior, feature
from modules.world_model import WorldModel
from utils.evaluation import to_uint8_frames

PANEL = 64
LABEL_HEIGHT = 14
DREAM_PANELS = 3
FIXED_TITLES = ("real", "input", "recon")
# Imagined states decoded at once (bounds the decoder's activation memory on long episodes).
DECODE_CHUNK = 256


def dream_offsets(horizon: int) -> tuple[int, ...]:
    """The imagination offsets shown for ``horizon`` ``H``: ``ceil(k H / 3)`` for ``k = 1, 2, 3``, without repeats."""
    return tuple(sorted({math.ceil(horizon * k / DREAM_PANELS) for k in range(1, DREAM_PANELS + 1)}))


def panel_titles(horizon: int) -> list[str]:
    """Titles of the panels, left to right."""
    return [*FIXED_TITLES, *(f"dream +{offset}" for offset in dream_offsets(horizon))]


@torch.no_grad()
def filter_states(world_model: WorldModel, steps: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior states of an episode's ``steps [T + 1]`` (replay format): ``deter [T + 1, D]``, ``stoch [T + 1, S]``.

    Filtered afresh from the episode (the acting policy's own posterior samples are not kept).
    """
    batch = steps.unsqueeze(0).to(next(world_model.parameters()).device)  # [1, T + 1]
    states = world_model.rssm(world_model.embed(batch[world_model.obs_key]), batch["action"], batch["is_first"])
    return states["deter"][0], states["stoch"][0]


@torch.no_grad()
def imagine_deterministic(
    prior: RSSMPrior, actor: Actor, deter: torch.Tensor, stoch: torch.Tensor, offsets: tuple[int, ...]
) -> torch.Tensor:
    """Features ``[K, N, F]`` of the states imagined ``offsets`` (``K`` of them) steps after each start.

    Starts: ``deter [N, D]``, ``stoch [N, S]``. Each imagined step takes the actor's mode on the current state and
    samples the prior's next state.
    """
    kept = []
    for step in range(1, max(offsets) + 1):
        deter, _, _, stoch = prior(deter, stoch, actor.mode(feature(deter, stoch)))
        if step in offsets:
            kept.append(feature(deter, stoch))
    return torch.stack(kept)


@torch.no_grad()
def decode_frames(decoder: torch.nn.Module, features: torch.Tensor) -> np.ndarray:
    """Decoder means of ``features [N, F]`` as RGB uint8 frames ``[N, 64, 64, 3]`` (grayscale repeated)."""
    frames = [to_uint8_frames(decoder(chunk)) for chunk in features.split(DECODE_CHUNK)]
    return to_rgb(np.concatenate(frames))


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` with ``C`` = 1 or 3 -> ``[N, H, W, 3]``."""
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def label_row(titles: list[str]) -> np.ndarray:
    """White titles centred over each panel on black: uint8 ``[LABEL_HEIGHT, len(titles) * 64, 3]``."""
    image = Image.new("RGB", (PANEL * len(titles), LABEL_HEIGHT))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, title in enumerate(titles):
        left, _, right, _ = draw.textbbox((0, 0), title, font=font)
        draw.text((index * PANEL + (PANEL - (right - left)) // 2, 1), title, fill=(255, 255, 255), font=font)
    return np.asarray(image)


@torch.no_grad()
def dream_video(
    world_model: WorldModel, actor: Actor, steps: TensorDict, rgb_frames: torch.Tensor, horizon: int
) -> np.ndarray:
    """The dream video of one episode (see the module docstring): uint8 ``[T + 1, LABEL_HEIGHT + 64, P * 64, 3]``.

    ``steps [T + 1]``: the episode in replay format (uint8 pixels); ``rgb_frames``: uint8 ``[T + 1, 3, 64, 64]``;
    ``P = 3 + len(dream_offsets(horizon))`` panels.
    """
    deter, stoch = filter_states(world_model, steps)
    imagined = imagine_deterministic(world_model.rssm.prior, actor, deter, stoch, dream_offsets(horizon))
    panels = [
        rgb_frames.permute(0, 2, 3, 1).numpy(),
        to_rgb(steps[world_model.obs_key].permute(0, 2, 3, 1).numpy()),
        decode_frames(world_model.decoder, feature(deter, stoch)),
        *(decode_frames(world_model.decoder, features) for features in imagined),
    ]
    return titled(np.concatenate(panels, axis=2), panel_titles(horizon))  # panels: [T + 1, 64, P * 64, 3]


def titled(panels: np.ndarray, titles: list[str], scale: int = 1) -> np.ndarray:
    """uint8 frames ``[T, 64, P * 64, C]`` (``P`` panels side by side, ``C`` = 1 or 3) under a row of ``titles``,
    enlarged ``scale`` times by pixel repetition: ``[T, scale * (LABEL_HEIGHT + 64), scale * P * 64, 3]``."""
    panels = to_rgb(panels)
    labels = np.broadcast_to(label_row(titles), (panels.shape[0], LABEL_HEIGHT, *panels.shape[2:]))
    frames = np.concatenate([labels, panels], axis=1)
    return np.ascontiguousarray(frames.repeat(scale, axis=1).repeat(scale, axis=2))
