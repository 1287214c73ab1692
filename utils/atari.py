"""Atari games through Gymnasium and the Arcade Learning Environment (``ale-py``, which ships the ROMs).

``env.backend=atari`` (``env=atari``): ``env.name`` is an ALE game id (``boxing``, ``pong``, ``ms_pacman``, ...).
:func:`make_atari_gym_env` builds ``ALE/<Game>-v5`` with one emulator frame per ``step`` and wraps it in
:class:`AtariFrames`, which returns the RGB screen ``[210, 160, 3]`` uint8; ``utils.envs`` then resizes it to 64x64
(optionally grayscale) like any other pixel environment. The protocol (Machado et al., 2018) and its options:

* action repeat ``env.action_repeat`` (4), rewards summed, the observation the max over the last two frames (Atari
  games draw some objects on alternate frames only);
* sticky actions: ALE repeats the previous action instead of the new one with probability
  ``env.repeat_action_probability`` (0.25) at every emulator frame, drawn from ALE's own generator, which is seeded
  by the environment's seed (reproducible);
* the minimal action set (``env.full_action_space=false``) or all 18 actions;
* episodes end at game over, or are truncated after ``env.max_episode_frames`` emulator frames (108000: 30 minutes);
* ``env.noop_max`` (0: off): each episode starts with 0 to ``noop_max`` no-op frames (a uniform draw, as the
  authors' Atari env has it);
* ``env.terminal_on_life_loss`` (false): a lost life ends the episode as a termination (the game then restarts).

Why our own wrapper: ALE's ``frameskip`` repeats the action but returns the last frame only (no max-pooling), and
Gymnasium's ``AtariPreprocessing`` pools but needs OpenCV for its resize (not a dependency here). The base env
observes the 128-byte RAM, so no screen is copied on the frames in between: :class:`AtariFrames` reads the screen
only on the last two frames of each agent step (measured: the same cost per agent step as ALE's ``frameskip=4``
with RGB observations, about 20% less than copying every frame's screen).
"""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

import gymnasium
import numpy as np
from omegaconf import DictConfig

# The ALE screen: height, width, RGB.
SCREEN_SHAPE = (210, 160, 3)
# Games named in errors, beside close matches of a misspelt name.
EXAMPLE_GAMES = ("boxing", "pong", "breakout", "ms_pacman", "space_invaders")
# The first action of both ALE action sets.
NOOP = 0


def import_ale() -> ModuleType:
    """``ale_py``, registered with Gymnasium; a one-line ``ValueError`` when it is not installed."""
    try:
        import ale_py
    except ImportError as error:
        raise ValueError(
            "env.backend=atari needs the ale-py package, which is not installed: run `bash setup.sh` "
            "(or `.venv/bin/pip install ale-py`)"
        ) from error
    gymnasium.register_envs(ale_py)
    return ale_py


def validate_atari_config(env_cfg: DictConfig) -> None:
    """The Atari env config's own checks (the game, pixels, the protocol options); one-line ``ValueError``."""
    games = import_ale().roms.get_all_rom_ids()
    if env_cfg.name not in games:
        close = difflib.get_close_matches(str(env_cfg.name).lower(), games, n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"Unknown Atari game {env_cfg.name!r}; {hint}ALE game ids are lower case with underscores, e.g. "
            f"{', '.join(EXAMPLE_GAMES)} ({len(games)} in all: ale_py.roms.get_all_rom_ids())"
        )
    if not env_cfg.from_pixels:
        raise ValueError("Atari games are played from pixels: from_pixels=false is not supported; allowed: true")
    if env_cfg.task is not None:
        raise ValueError(f"Atari games take no task, got task={env_cfg.task!r}; allowed: null")
    probability = env_cfg.repeat_action_probability
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise ValueError(f"repeat_action_probability must be a number in [0, 1], got {probability!r}")
    if isinstance(env_cfg.noop_max, bool) or not isinstance(env_cfg.noop_max, int) or env_cfg.noop_max < 0:
        raise ValueError(f"noop_max must be an integer >= 0 (0: no no-op starts), got {env_cfg.noop_max!r}")


def make_atari_gym_env(env_cfg: DictConfig) -> AtariFrames:
    """The game of ``env_cfg`` (validated by :func:`validate_atari_config`) with the protocol of the module
    docstring: RGB observations ``[210, 160, 3]`` uint8, ``Discrete`` actions. Seeded by ``reset(seed=...)``."""
    ale_py = import_ale()
    env = gymnasium.make(
        f"ALE/{ale_py.registration.rom_id_to_name(env_cfg.name)}-v5",
        obs_type="ram",
        frameskip=1,
        repeat_action_probability=float(env_cfg.repeat_action_probability),
        full_action_space=bool(env_cfg.full_action_space),
        max_num_frames_per_episode=env_cfg.max_episode_frames,
    )
    return AtariFrames(
        env,
        repeat=env_cfg.action_repeat,
        noop_max=env_cfg.noop_max,
        terminal_on_life_loss=bool(env_cfg.terminal_on_life_loss),
    )


class AtariFrames(gymnasium.Wrapper):
    """Action repeat with max-pooling of the last two frames, over an ALE env that steps one frame at a time.

    ``step(action)`` plays ``action`` for ``repeat`` frames (fewer when the episode ends first) and returns the summed
    reward and the screen ``[210, 160, 3]`` uint8: the element-wise max of the last two frames, or the last frame
    alone when the episode ended before the step's last frame. ``reset()`` returns the first screen (after the
    no-op frames, if any). With ``terminal_on_life_loss`` a step that loses a life is terminal.
    """

    def __init__(self, env: gymnasium.Env, repeat: int, noop_max: int = 0, terminal_on_life_loss: bool = False):
        super().__init__(env)
        self.repeat, self.noop_max, self.terminal_on_life_loss = repeat, noop_max, terminal_on_life_loss
        self.ale = env.unwrapped.ale
        self.observation_space = gymnasium.spaces.Box(0, 255, SCREEN_SHAPE, np.uint8)
        self.lives = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        noops = int(self.np_random.integers(self.noop_max + 1)) if self.noop_max else 0
        for _ in range(noops):
            _, _, terminated, truncated, info = self.env.step(NOOP)
            if terminated or truncated:
                _, info = self.env.reset()
        self.lives = self.ale.lives()
        return self.ale.getScreenRGB(), info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward = 0.0
        before_last = None
        for frame in range(self.repeat):
            if frame == self.repeat - 1 and frame > 0:
                before_last = self.ale.getScreenRGB()
            _, frame_reward, terminated, truncated, info = self.env.step(action)
            reward += frame_reward
            if self.terminal_on_life_loss:
                lives = self.ale.lives()
                terminated = terminated or lives < self.lives
                self.lives = lives
            if terminated or truncated:
                break
        screen = self.ale.getScreenRGB()
        if before_last is not None:
            np.maximum(screen, before_last, out=screen)
        return screen, reward, terminated, truncated, info
