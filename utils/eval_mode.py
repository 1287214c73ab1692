"""``mode=eval``: runs a trained agent from a checkpoint, prints its returns and optionally writes dream videos.

``python dreamer.py mode=eval checkpoint=<run dir or .pt> [eval.episodes=5] [eval.stochastic=true]
[eval.dreams=true] [eval.imagination_horizon=15]``

* The config is the one stored in the checkpoint. Command-line overrides may change evaluation settings (``eval.*``,
  ``device``, ``env.seed``, ``env.render_quality``, ``logger.*``, ...), never the networks (``model.*``) or the
  environment's identity (``utils.config.apply_overrides`` refuses those). Keys the code added after the checkpoint
  was written take the current defaults.
* The policy filters the real observations with the world model and acts with the actor's mode
  (``ExplorationType.DETERMINISTIC``). ``eval.stochastic=true`` samples the actor instead (``ExplorationType.RANDOM``)
  *without* the training-time exploration noise (``collector.exploration_noise`` is not added).
* Episodes run on one environment seeded ``env.seed + 10000`` (as the training run's evaluations, apart from the
  training environments); torch, NumPy and Python are seeded with ``env.seed``, so a repeated command repeats
  its results.
* Output (in the invocation's Hydra output directory): a table on stdout (return and length per episode, then
  mean ± standard deviation; the population standard deviation, 0 for one episode), ``eval_results.json``, and with
  ``eval.dreams=true`` ``dreams/episode_NNN.mp4`` and ``.gif`` per episode (layout: ``utils/dream_video.py``).
  Dreams need a pixel environment: with a state-vector env (Pendulum) ``eval.dreams=true`` is refused.
  Every file is written to a temporary name and renamed, after all episodes ran; the JSON comes last.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image
from torchrl.envs import ExplorationType, set_exploration_type

from utils.agent import EVAL_SEED_OFFSET, Agent, build_agent
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import ConfigError, check_config, command_line_overrides, resolve_device, restore_config
from utils.dream_video import dream_video, panel_titles
from utils.evaluation import EpisodeResult, evaluate_policy
from utils.files import atomic_output
from utils.metrics import write_mp4
from utils.run_state import load_agent_state, seed_everything

RESULTS_FILE = "eval_results.json"
DREAMS_DIR = "dreams"
# Sections of the stored config that define the agent (a checkpoint without them is not a run's).
REQUIRED_SECTIONS = ("env", "model", "optimization", "collector")


@dataclasses.dataclass
class EvalReport:
    """What an evaluation produced: the effective config, the episodes and the dream video paths (mp4, gif)."""

    cfg: DictConfig
    checkpoint: str
    trained_frames: int | None
    episodes: list[EpisodeResult]
    videos: list[tuple[Path, Path]]

    def summary(self) -> dict[str, Any]:
        """The JSON written to ``eval_results.json``."""
        returns = np.array([episode.episode_return for episode in self.episodes])
        lengths = np.array([episode.length for episode in self.episodes])
        rows = [
            {"episode": index, "return": float(r), "length": int(n)}
            for index, (r, n) in enumerate(zip(returns, lengths, strict=True))
        ]
        for row, (mp4, gif) in zip(rows, self.videos, strict=False):
            row.update(video_mp4=str(mp4), video_gif=str(gif))
        env = self.cfg.env
        return {
            "checkpoint": self.checkpoint,
            "trained_frames": self.trained_frames,
            "env": {"backend": env.backend, "name": env.name, "task": env.task, "seed": env.seed},
            "policy": policy_name(self.cfg),
            "episodes": rows,
            "mean_return": float(returns.mean()),
            "std_return": float(returns.std()),
            "mean_length": float(lengths.mean()),
            "std_length": float(lengths.std()),
            "dreams": bool(self.cfg.eval.dreams),
            "imagination_horizon": int(self.cfg.eval.imagination_horizon),
            "dream_panels": panel_titles(self.cfg.eval.imagination_horizon) if self.cfg.eval.dreams else None,
        }

    def table(self) -> str:
        """The episodes' returns and lengths, then their mean ± standard deviation."""
        summary = self.summary()
        env = self.cfg.env
        name = env.name if env.task is None else f"{env.name}-{env.task}"
        frames = "" if self.trained_frames is None else f", trained {self.trained_frames} frames"
        lines = [
            f"Evaluation of {self.checkpoint} ({name}{frames}; {summary['policy']} policy)",
            f"{'episode':>7}  {'return':>10}  {'length':>6}",
            *(f"{row['episode']:>7}  {row['return']:>10.2f}  {row['length']:>6}" for row in summary["episodes"]),
            f"mean ± std over {len(self.episodes)} episodes: return {summary['mean_return']:.2f} ± "
            f"{summary['std_return']:.2f}, length {summary['mean_length']:.1f} ± {summary['std_length']:.1f}",
        ]
        return "\n".join(lines)


def evaluate(cfg: DictConfig) -> EvalReport:
    """``mode=eval`` entry point (inside Hydra): evaluates ``cfg.checkpoint`` into Hydra's output directory."""
    return run_evaluation(cfg, command_line_overrides(), Path(HydraConfig.get().runtime.output_dir))


def run_evaluation(cfg: DictConfig, overrides: list[str], out_dir: Path) -> EvalReport:
    """Loads the checkpoint, runs the episodes, prints the table, then writes videos and JSON into ``out_dir``."""
    cfg, payload = load_eval_config(cfg, overrides)
    device = resolve_device(cfg.device)
    seed_everything(cfg.env.seed)
    agent = build_agent(cfg, device, autocast_dtype=None)
    # Only the networks: the optimiser state is of no use here, and a change of its format must not stop evaluation.
    load_agent_state(agent, {key: value for key, value in payload.items() if key != "update"})
    episodes = run_episodes(agent, cfg)
    report = EvalReport(cfg, payload["path"], payload.get("counters", {}).get("frames"), episodes, [])
    print(report.table(), flush=True)
    if cfg.eval.dreams:
        videos = [
            dream_video(agent.world_model, agent.actor, episode.steps, episode.rgb_frames, cfg.eval.imagination_horizon)
            for episode in episodes
        ]
        report.videos = write_dream_videos(videos, out_dir / DREAMS_DIR, cfg.logger.video_fps)
    results_path = out_dir / RESULTS_FILE
    with atomic_output(results_path) as temporary:
        temporary.write_text(json.dumps(report.summary(), indent=2) + "\n")
    print(f"Results: {results_path}")
    for mp4, gif in report.videos:
        print(f"Dream video: {mp4} ({gif.name})")
    return report


def load_eval_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The checkpoint's payload and the config to evaluate it with (stored config + allowed overrides), checked."""
    if cfg.checkpoint is None:
        raise ConfigError("mode=eval needs checkpoint=<run directory or .pt file>")
    payload = load_checkpoint(cfg.checkpoint)
    stored = payload.get("config")
    if not isinstance(stored, dict) or any(not isinstance(stored.get(key), dict) for key in REQUIRED_SECTIONS):
        sections = ", ".join(REQUIRED_SECTIONS)
        raise CheckpointError(
            f"Checkpoint {payload['path']} carries no complete config (needs the sections {sections})"
        )
    if not isinstance(payload.get("agent"), dict):
        raise CheckpointError(f"Checkpoint {payload['path']} carries no agent weights")
    eval_cfg = restore_config(cfg, stored, overrides, ignore=("checkpoint", "mode"))
    with open_dict(eval_cfg):
        eval_cfg.mode = "eval"
        eval_cfg.checkpoint = payload["path"]
    check_config(eval_cfg)
    check_eval_settings(eval_cfg)
    return eval_cfg, payload


def check_eval_settings(cfg: DictConfig) -> None:
    """One-line ``ConfigError`` for a bad ``eval.*`` value (or dreams asked of a state-vector environment)."""
    for name in ("episodes", "imagination_horizon"):
        value = cfg.eval[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"eval.{name}={value!r} must be a positive integer")
    for name in ("stochastic", "dreams"):
        if not isinstance(cfg.eval[name], bool):
            raise ConfigError(f"eval.{name}={cfg.eval[name]!r} must be true or false")
    if cfg.eval.dreams and not cfg.env.from_pixels:
        raise ConfigError(
            f"eval.dreams=true needs a pixel environment; {cfg.env.name} observes a state vector "
            "(env.from_pixels=false)"
        )


def policy_name(cfg: DictConfig) -> str:
    return "stochastic" if cfg.eval.stochastic else "deterministic"


def run_episodes(agent: Agent, cfg: DictConfig) -> list[EpisodeResult]:
    """``eval.episodes`` episodes of the actor's mode, or of its samples without exploration noise (stochastic)."""
    exploration = ExplorationType.RANDOM if cfg.eval.stochastic else ExplorationType.DETERMINISTIC
    agent.policy.exploration_noise = 0.0
    with set_exploration_type(exploration):
        return evaluate_policy(agent, cfg.eval.episodes, EVAL_SEED_OFFSET, keep_rgb_frames=bool(cfg.eval.dreams))


def write_dream_videos(videos: list[np.ndarray], directory: Path, fps: int) -> list[tuple[Path, Path]]:
    """Writes each video ``[T + 1, H, W, 3]`` as ``episode_NNN.mp4`` and ``.gif``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frames in enumerate(videos):
        mp4, gif = directory / f"episode_{index:03d}.mp4", directory / f"episode_{index:03d}.gif"
        with atomic_output(mp4) as temporary:
            write_mp4(frames, temporary, fps)
        with atomic_output(gif) as temporary:
            write_gif(frames, temporary, fps)
        paths.append((mp4, gif))
    return paths


def write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    """uint8 ``[T, H, W, 3]`` as a looping GIF (each frame quantised to its own 256-colour palette)."""
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
