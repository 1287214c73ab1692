"""The Dreamer training run: random prefill, then collect ``frames_per_batch`` frames / ``train_steps`` updates.

Counters (all kept in checkpoints): ``frames`` (environment frames = agent steps x action repeat, the paper's
x-axis), ``agent_steps``, ``updates`` and ``episodes``. The update schedule is a function of the counters, so a
run interrupted in the middle of a training phase resumes with exactly the updates it still owed.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torchrl.collectors import Collector
from torchrl.envs import ExplorationType, set_exploration_type
from tqdm import tqdm

from utils.agent import EVAL_SEED_OFFSET, Agent
from utils.checkpoint import BEST, CHECKPOINT_DIR, LAST
from utils.config import frames_to_agent_steps
from utils.evaluation import evaluate_policy, log_eval_videos
from utils.metrics import RunLogger, make_dashboard
from utils.replay import StepRecorder, make_replay_buffer, sample_sequences
from utils.run_state import RunState, prepare_run, save_run_checkpoint


class _Stop(Exception):
    """Raised by the SIGTERM handler so that a terminated run saves its checkpoint like Ctrl-C."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def train(cfg: DictConfig) -> float | None:
    """Trains (or resumes) a run; returns the last evaluation return (for Hydra sweepers)."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(HydraConfig.get().runtime.output_dir)
    cfg, agent, state = prepare_run(cfg, run_dir)
    repeat = cfg.env.action_repeat
    batch_steps = frames_to_agent_steps(cfg.collector.frames_per_batch, repeat, "collector.frames_per_batch")
    prefill_frames = cfg.collector.init_random_frames

    replay = make_replay_buffer(
        cfg.replay_buffer.buffer_size, cfg.replay_buffer.batch_length, cfg.replay_buffer.storage, run_dir / "replay"
    )
    recorder = StepRecorder(agent.obs_key, cfg.env.num_envs)
    if state.replay_saved:
        replay.loads(run_dir / "replay")
        recorder.load_state_dict(state.recorder)
        # The collector below starts its environments afresh: an episode cut by the interruption is not continued.
        recorder.expect_reset()

    logger = RunLogger(run_dir, make_dashboard(cfg.logger, run_dir, run_dir.name, cfg), cfg.logger.video_fps)
    collector = Collector(
        agent.make_train_env(),
        agent.policy,
        frames_per_batch=batch_steps,
        total_frames=-1,
        init_random_frames=max(0, prefill_frames - state.frames) // repeat,
        exploration_type=ExplorationType.RANDOM,
        device="cpu",
        policy_device=agent.device,
        # The recurrent state is reset by the env's zero primer (utils.envs.add_recurrent_primer), not InitTracker.
        auto_register_policy_transforms=False,
    )
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    progress = tqdm(total=cfg.collector.total_frames, initial=state.frames, unit="frame", dynamic_ncols=True)
    clock = _RateClock(state)
    try:
        for batch in collector:
            _record_batch(batch, replay, recorder, state, repeat)
            _run_due_updates(cfg, agent, replay, state, logger, clock, batch_steps)
            if state.frames >= state.next_eval and _evaluate(cfg, agent, state, logger):
                save_run_checkpoint(run_dir / CHECKPOINT_DIR / BEST, cfg, agent, state, replay, recorder)
            if state.frames >= state.next_checkpoint:
                state.next_checkpoint += cfg.checkpoint_every
                save_run_checkpoint(run_dir / CHECKPOINT_DIR / LAST, cfg, agent, state, replay, recorder)
            progress.update(state.frames - progress.n)
            progress.set_postfix(clock.postfix(state), refresh=False)
            if state.frames >= cfg.collector.total_frames:
                break
    except (KeyboardInterrupt, _Stop):
        progress.write(
            f"Interrupted at {state.frames} frames; saving {run_dir / CHECKPOINT_DIR / LAST}", file=sys.stderr
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        collector.shutdown()
        progress.close()
    save_run_checkpoint(run_dir / CHECKPOINT_DIR / LAST, cfg, agent, state, replay, recorder)
    logger.close()
    return state.last_eval_return


def _record_batch(batch, replay, recorder: StepRecorder, state: RunState, repeat: int) -> None:
    """Stores a collector batch ``[E, T]`` or ``[T]`` as steps and updates the frame and episode counters."""
    replay.extend(recorder.convert(batch))
    state.agent_steps += batch.numel()
    state.frames = state.agent_steps * repeat
    finished = batch["next", "done"].reshape(-1)
    if finished.any():
        returns = batch["next", "episode_reward"].reshape(-1)[finished]
        state.episodes += int(finished.sum())
        state.last_train_return = float(returns[-1])


def _run_due_updates(
    cfg: DictConfig, agent: Agent, replay, state: RunState, logger: RunLogger, clock: _RateClock, batch_steps: int
) -> None:
    """Runs the updates the schedule owes: ``train_steps`` per ``frames_per_batch`` frames after the prefill."""
    trained_frames = state.frames - cfg.collector.init_random_frames
    if trained_frames < 0:
        return
    due = (trained_frames // cfg.collector.frames_per_batch + 1) * cfg.optimization.train_steps
    window: list[dict[str, torch.Tensor]] = []
    while state.updates < due:
        batch = sample_sequences(replay, cfg.replay_buffer.batch_size, cfg.replay_buffer.batch_length)
        window.append(agent.update.step(batch.to(agent.device)))
        state.updates += 1
        if state.updates % cfg.logger.log_every == 0:
            logger.log(_train_row(cfg, window, state, clock), step=state.frames)
            window = []


def _train_row(cfg: DictConfig, window: list[dict[str, torch.Tensor]], state: RunState, clock: _RateClock) -> dict:
    """The metrics of one log step: means over the last ``log_every`` updates, counters and rates."""
    means = {name: torch.stack([m[name] for m in window]).mean().item() for name in window[0]}
    replayed = state.updates * cfg.replay_buffer.batch_size * cfg.replay_buffer.batch_length
    return {
        "frames": state.frames,
        "agent_steps": state.agent_steps,
        "updates": state.updates,
        "episodes": state.episodes,
        **means,
        "train/return": state.last_train_return,
        "updates_per_agent_step": state.updates / max(state.agent_steps, 1),
        "replayed_steps_per_agent_step": replayed / max(state.agent_steps, 1),
        **clock.rates(state),
    }


def _evaluate(cfg: DictConfig, agent: Agent, state: RunState, logger: RunLogger) -> bool:
    """Deterministic-policy episodes; logs ``eval/return`` (and videos). True when the return is a new best."""
    state.next_eval += cfg.logger.eval_every
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        episodes = evaluate_policy(agent, cfg.logger.eval_episodes, seed_offset=EVAL_SEED_OFFSET + state.episodes)
    state.last_eval_return = sum(e.episode_return for e in episodes) / len(episodes)
    logger.log(
        {"frames": state.frames, "updates": state.updates, "eval/return": state.last_eval_return}, step=state.frames
    )
    if cfg.logger.video and agent.from_pixels:
        log_eval_videos(agent, episodes[0], logger, step=state.frames)
    if state.best_eval_return is not None and state.last_eval_return <= state.best_eval_return:
        return False
    state.best_eval_return = state.last_eval_return
    return True


class _RateClock:
    """Frames/s and updates/s since the run (or resume) started, for the log and the progress bar."""

    def __init__(self, state: RunState) -> None:
        self.start = time.perf_counter()
        self.start_frames, self.start_updates = state.frames, state.updates

    def rates(self, state: RunState) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "frames_per_second": (state.frames - self.start_frames) / elapsed,
            "updates_per_second": (state.updates - self.start_updates) / elapsed,
        }

    def postfix(self, state: RunState) -> dict[str, str]:
        rates = self.rates(state)
        return {
            "fps": f"{rates['frames_per_second']:.0f}",
            "ups": f"{rates['updates_per_second']:.1f}",
            "train": _fmt(state.last_train_return),
            "eval": _fmt(state.last_eval_return),
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
