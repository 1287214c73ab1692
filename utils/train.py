"""The Dreamer training run: random prefill, then collect ``frames_per_batch`` frames / ``train_steps`` updates.

Counters (all kept in checkpoints): ``frames`` (environment frames = agent steps x action repeat, the paper's
x-axis), ``agent_steps``, ``updates`` and ``episodes``. The update schedule is a function of the counters, so a
run interrupted in the middle of a training phase resumes with exactly the updates it still owed.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import ExplorationType, set_exploration_type
from tqdm import tqdm

from utils.agent import EVAL_SEED_OFFSET, Agent
from utils.checkpoint import BEST, CHECKPOINT_DIR, LAST, capture_rng_state, restore_rng_state
from utils.config import algorithm, frames_to_agent_steps
from utils.env_rng import EnvRngSnapshot, capture_env_rng, restore_env_rng
from utils.evaluation import evaluate_policy, log_eval_videos
from utils.metrics import RunLogger, make_dashboard
from utils.preemption import StopSignals, is_stop
from utils.replay import StepRecorder, add_steps, load_replay, make_replay_buffer, resolve_prefetch, sample_sequences
from utils.resume import run_directory
from utils.run_state import RunState, evaluation_seed, isolated_rng, prepare_run, save_run_checkpoint


def train(cfg: DictConfig) -> float | None:
    """Trains (or resumes) a run; returns the last evaluation return (for Hydra sweepers).

    Ctrl-C, SIGTERM and a cluster's preemption signal save ``checkpoints/last.pt``; the signals are then handed on
    (``utils/preemption.py``: under submitit the job is requeued and continues with ``resume=auto``).
    """
    run_dir = run_directory(cfg.resume, Path(HydraConfig.get().runtime.output_dir))
    cfg, agent, state = prepare_run(cfg, run_dir)
    repeat = cfg.env.action_repeat
    batch_steps = frames_to_agent_steps(cfg.collector.frames_per_batch, repeat, "collector.frames_per_batch")
    prefill_frames = cfg.collector.init_random_frames

    replay = _make_replay(cfg, agent.device, run_dir / "replay")
    recorder = StepRecorder(agent.obs_key, cfg.env.num_envs)
    if state.replay_saved:
        load_replay(replay, run_dir / "replay")
        recorder.load_state_dict(state.recorder)
        # The collector below starts its environments afresh: an episode cut by the interruption is not continued.
        recorder.expect_reset()

    dashboard = make_dashboard(cfg.logger, run_dir, run_dir.name, cfg, run_id=state.run_id)
    logger = RunLogger(run_dir, dashboard, cfg.logger.video_fps)
    # Building the env and the collector draws random numbers (a probe of the policy, say); a resumed run would draw
    # them again mid-stream, so neither counts: the run's streams continue from the state they had here.
    streams = capture_rng_state()
    train_env = agent.make_train_env()
    restore_env_rng(train_env, state.env_rng)
    env_rng = EnvRngSnapshot()
    env_rng.state = state.env_rng if state.env_rng is not None else capture_env_rng(train_env)
    train_env.append_transform(env_rng)
    collector = Collector(
        train_env,
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
    restore_rng_state(streams)
    stop_signals = StopSignals().install()
    progress = tqdm(total=cfg.collector.total_frames, initial=state.frames, unit="frame", dynamic_ncols=True)
    clock = _RateClock(state)

    def checkpoint(name: str) -> None:
        state.env_rng = env_rng.state
        with stop_signals.deferred():
            save_run_checkpoint(run_dir / CHECKPOINT_DIR / name, cfg, agent, state, replay, recorder)

    def finish_phase() -> None:
        """What is due after collecting: the owed updates, then an evaluation and a checkpoint when due."""
        _run_due_updates(cfg, agent, replay, state, logger, clock, stop_signals)
        stop_signals.check()
        if state.frames >= state.next_eval and _evaluate(cfg, agent, state, logger):
            checkpoint(BEST)
        stop_signals.check()
        if state.frames >= state.next_checkpoint:
            state.next_checkpoint += cfg.checkpoint_every
            checkpoint(LAST)

    try:
        # A run resumed in the middle of a phase first finishes it, with the data and weights it had.
        finish_phase()
        for batch in collector:
            with stop_signals.deferred():
                _record_batch(batch, replay, recorder, state, repeat)
            finish_phase()
            progress.update(state.frames - progress.n)
            progress.set_postfix(clock.postfix(state), refresh=False)
            if state.frames >= cfg.collector.total_frames:
                break
    except BaseException as error:
        if not is_stop(error):
            raise
        progress.write(
            f"Interrupted at {state.frames} frames; saving {run_dir / CHECKPOINT_DIR / LAST}", file=sys.stderr
        )
    finally:
        stop_signals.stop_raising()
        collector.shutdown()
        progress.close()
    checkpoint(LAST)
    replay.shutdown()
    logger.close()
    stop_signals.restore_and_forward()
    return state.last_eval_return


def _make_replay(cfg: DictConfig, device: torch.device, replay_dir: Path) -> TensorDictReplayBuffer:
    """The run's sequence replay: ``replay_buffer.prefetch`` batches sampled ahead (device default when null),
    pinned for a non-blocking copy when training on CUDA, sampled with a generator seeded by ``env.seed``."""
    buffer_cfg = cfg.replay_buffer
    return make_replay_buffer(
        buffer_cfg.buffer_size,
        buffer_cfg.batch_length,
        buffer_cfg.storage,
        replay_dir,
        batch_size=buffer_cfg.batch_size,
        prefetch=resolve_prefetch(buffer_cfg.prefetch, device),
        pin_memory=device.type == "cuda",
        seed=cfg.env.seed,
    )


def _record_batch(batch, replay, recorder: StepRecorder, state: RunState, repeat: int) -> None:
    """Stores a collector batch ``[E, T]`` or ``[T]`` as steps and updates the frame and episode counters."""
    add_steps(replay, recorder.convert(batch))
    state.agent_steps += batch.numel()
    state.frames = state.agent_steps * repeat
    finished = batch["next", "done"].reshape(-1)
    if finished.any():
        returns = batch["next", "episode_reward"].reshape(-1)[finished]
        state.episodes += int(finished.sum())
        state.last_train_return = float(returns[-1])


def updates_due(cfg: DictConfig, state: RunState) -> int:
    """How many updates the schedule owes by ``state.frames`` (0 during the prefill).

    Dreamer V1 (``optimization.train_steps``): ``train_steps`` at the start of every ``frames_per_batch`` frames
    after the prefill. DreamerV3 (``optimization.train_ratio``, the authors' replayed steps per policy step):
    ``floor(trained policy steps x train_ratio / (batch_size x batch_length))``.
    """
    trained_frames = state.frames - cfg.collector.init_random_frames
    if trained_frames < 0:
        return 0
    if algorithm(cfg.optimization) == "dreamer_v3":
        replayed_per_update = cfg.replay_buffer.batch_size * cfg.replay_buffer.batch_length
        policy_steps = trained_frames // cfg.env.action_repeat
        return int(policy_steps * cfg.optimization.train_ratio // replayed_per_update)
    return (trained_frames // cfg.collector.frames_per_batch + 1) * cfg.optimization.train_steps


def _run_due_updates(
    cfg: DictConfig,
    agent: Agent,
    replay,
    state: RunState,
    logger: RunLogger,
    clock: _RateClock,
    stop_signals: StopSignals,
) -> None:
    """Runs the updates the schedule owes (:func:`updates_due`).

    While no stored episode has ``replay_buffer.batch_length`` steps (a terminating env's first episodes) nothing
    can be sampled: the owed updates wait, with one warning, and are made once a long enough episode is stored.
    """
    due = updates_due(cfg, state)
    # The window of the next metrics row lives in the run state (checkpointed): a resumed run completes the row the
    # interruption cut. A phase's updates after its last row are not carried into the next phase's first row.
    window = state.log_window
    while state.updates < due:
        # One update and its log row are not cut by a stop signal (it waits for them); Ctrl-C puts back the RNGs.
        with stop_signals.deferred(), _undone_if_interrupted(replay):
            batch = sample_sequences(replay, cfg.replay_buffer.batch_size, cfg.replay_buffer.batch_length)
            if batch is None:
                warnings.warn(
                    f"No stored episode has replay_buffer.batch_length={cfg.replay_buffer.batch_length} steps yet; "
                    "the owed updates wait until one has (lower batch_length for shorter episodes).",
                    stacklevel=2,
                )
                break
            window.append(agent.update.step(batch.to(agent.device, non_blocking=True)))
            state.updates += 1
            if state.updates % cfg.logger.log_every == 0:
                logger.log(_train_row(cfg, window, state, clock), step=state.frames)
                window.clear()
    window.clear()


@contextlib.contextmanager
def _undone_if_interrupted(replay: TensorDictReplayBuffer) -> Iterator[None]:
    """An update interrupted by Ctrl-C (stop signals wait for it) after it drew its batch puts back the random
    streams it used, so the checkpoint written next holds the state after the last *completed* update and a resumed
    run draws the same batch and noise again: torch's global generator and, when nothing is prefetched, the replay
    sampler's generator (TorchRL keeps it as ``_rng``; prefetched batches are saved with the buffer instead).
    """
    torch_state = torch.get_rng_state()
    sampler = getattr(replay, "_rng", None) if not getattr(replay, "_prefetch_cap", 0) else None
    sampler_state = None if sampler is None else sampler.get_state()
    try:
        yield
    except BaseException:
        torch.set_rng_state(torch_state)
        if sampler is not None:
            sampler.set_state(sampler_state)
        raise


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
    """Deterministic-policy episodes; logs ``eval/return`` (and videos). True when the return is a new best.

    The episodes and videos draw from RNGs seeded by ``env.seed`` and the evaluation's index, and training's RNG
    states are put back afterwards: an evaluation does not change the training run's random stream.
    """
    index = state.next_eval // cfg.logger.eval_every
    with isolated_rng(evaluation_seed(cfg.env.seed, index)), set_exploration_type(ExplorationType.DETERMINISTIC):
        episodes = evaluate_policy(agent, cfg.logger.eval_episodes, seed_offset=EVAL_SEED_OFFSET + state.episodes)
        if cfg.logger.video and agent.from_pixels:
            log_eval_videos(agent, episodes[0], logger, step=state.frames)
    # Counted as done only now: an evaluation cut by a stop signal is made again (same seed) by the resumed run.
    state.next_eval += cfg.logger.eval_every
    state.last_eval_return = sum(e.episode_return for e in episodes) / len(episodes)
    logger.log(
        {"frames": state.frames, "updates": state.updates, "eval/return": state.last_eval_return}, step=state.frames
    )
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
