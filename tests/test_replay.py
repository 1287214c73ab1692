"""Replay: the step format (each observation stored once) and sequences that never cross an episode boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer

import utils.train
from tests.runs import TINY_RUN, check_sequences_stay_in_episodes, checkpoint_state, stored_config, train_in_process
from utils.config import ConfigError, compose_config
from utils.replay import (
    PREFETCH_DEFAULTS,
    StepRecorder,
    add_steps,
    load_replay,
    make_replay_buffer,
    resolve_prefetch,
    sample_sequences,
)


def scripted_stream(episode_lengths: list[int], env_id: int) -> list[tuple[float, float, float, bool]]:
    """An independent description of one env's stream: per transition (obs, action, next_obs, done).

    Observation values encode ``env*1000 + episode*100 + index`` so a stored step tells where it came from.
    """
    transitions = []
    for episode, length in enumerate(episode_lengths):
        for index in range(length):
            obs = env_id * 1000 + episode * 100 + index
            transitions.append((float(obs), float(obs) + 0.25, float(obs + 1), index == length - 1))
    return transitions


def to_batches(streams: list[list[tuple[float, float, float, bool]]], batch_len: int) -> list[TensorDict]:
    """Cuts the env streams into collector-like batches ``[E, batch_len]``."""
    total = min(len(s) for s in streams)
    batches = []
    for start in range(0, total - batch_len + 1, batch_len):
        rows = [s[start : start + batch_len] for s in streams]
        obs = torch.tensor([[r[0] for r in row] for row in rows]).unsqueeze(-1)
        action = torch.tensor([[r[1] for r in row] for row in rows]).unsqueeze(-1)
        next_obs = torch.tensor([[r[2] for r in row] for row in rows]).unsqueeze(-1)
        done = torch.tensor([[r[3] for r in row] for row in rows]).unsqueeze(-1)
        batches.append(
            TensorDict(
                {
                    "observation": obs,
                    "action": action,
                    "next": {"observation": next_obs, "reward": next_obs * 0.5, "done": done, "terminated": done},
                },
                batch_size=[len(streams), batch_len],
            )
        )
    return batches


def test_each_observation_is_stored_once_in_the_authors_step_format() -> None:
    stream = scripted_stream([3, 4], env_id=0)  # 7 transitions, 2 episodes
    recorder = StepRecorder("observation", num_envs=1)
    steps = torch.cat([recorder.convert(b[0]) for b in to_batches([stream], batch_len=7)])
    # Episode 0: reset obs 0, then 1, 2, 3 (terminal); episode 1: reset obs 100, then 101..104.
    assert steps["observation"].squeeze(-1).tolist() == [0, 1, 2, 3, 100, 101, 102, 103, 104]
    assert steps["is_first"].squeeze(-1).tolist() == [True, False, False, False, True, False, False, False, False]
    # The action stored with an observation is the one that led to it (zero at a reset).
    assert steps["action"].squeeze(-1).tolist() == [0, 0.25, 1.25, 2.25, 0, 100.25, 101.25, 102.25, 103.25]
    assert steps["reward"].squeeze(-1).tolist() == [0, 0.5, 1.0, 1.5, 0, 50.5, 51.0, 51.5, 52.0]
    assert steps["terminated"].squeeze(-1).tolist() == [False, False, False, True, False, False, False, False, True]
    assert steps["episode"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert steps["step"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]


def test_episode_ids_and_step_indices_continue_across_batches_and_envs() -> None:
    streams = [scripted_stream([5, 6, 4], env_id=0), scripted_stream([3, 9, 3], env_id=1)]
    recorder = StepRecorder("observation", num_envs=2)
    steps = torch.cat([recorder.convert(b) for b in to_batches(streams, batch_len=4)])
    obs = steps["observation"].squeeze(-1).long()
    # The (env, episode) encoded in each observation maps to exactly one episode id, and step indices match.
    for episode_id in steps["episode"].unique():
        members = obs[steps["episode"] == episode_id]
        assert (members // 100).unique().numel() == 1, f"episode id {int(episode_id)} holds steps of several episodes"
        assert torch.equal(steps["step"][steps["episode"] == episode_id], members % 100), (
            f"episode {int(episode_id)}: step indices must count on across collector batches "
            f"(stored {steps['step'][steps['episode'] == episode_id].tolist()}, expected {(members % 100).tolist()})"
        )
    # ... and each (env, episode) to exactly one id.
    assert steps["episode"].unique().numel() == (obs // 100).unique().numel() == 5


def test_sampled_sequences_never_cross_episode_boundaries_or_mix_envs(tmp_path) -> None:
    torch.manual_seed(0)
    lengths = [[7, 12, 6, 9, 15, 8], [10, 6, 11, 7, 9, 13]]
    streams = [scripted_stream(lengths[env], env) for env in range(2)]
    recorder = StepRecorder("observation", num_envs=2)
    buffer = make_replay_buffer(1000, batch_length=6, storage="memmap", replay_dir=tmp_path / "replay")
    for batch in to_batches(streams, batch_len=5):
        buffer.extend(recorder.convert(batch))
    for _ in range(20):
        sequences = sample_sequences(buffer, batch_size=16, batch_length=6)
        assert sequences.shape == (16, 6)
        obs = sequences["observation"].squeeze(-1).long()
        assert ((obs // 100) == (obs[:, :1] // 100)).all(), "a sequence mixes episodes or environments"
        assert ((obs[:, 1:] - obs[:, :-1]) == 1).all(), "a sequence skips or repeats a step"
        # is_first can only be set where an episode really starts.
        assert torch.equal(sequences["is_first"].squeeze(-1), obs % 100 == 0)


def test_pixel_replay_stores_about_one_image_per_step(tmp_path) -> None:
    recorder = StepRecorder("pixels", num_envs=1)
    frames = torch.randint(0, 255, (1, 21, 3, 64, 64), dtype=torch.uint8)
    done = torch.zeros(1, 20, 1, dtype=torch.bool)
    batch = TensorDict(
        {
            "pixels": frames[:, :-1],
            "action": torch.zeros(1, 20, 6),
            "next": {"pixels": frames[:, 1:], "reward": torch.zeros(1, 20, 1), "done": done, "terminated": done},
        },
        batch_size=[1, 20],
    )
    steps = recorder.convert(batch)
    bytes_per_step = sum(v.element_size() * v[0].numel() for v in steps.values(True, True))
    assert steps.shape == (21,)
    assert torch.equal(steps["pixels"], frames[0])
    assert 3 * 64 * 64 <= bytes_per_step < 3 * 64 * 64 + 100


def test_saving_a_memmap_buffer_writes_metadata_in_place_without_copying(tmp_path) -> None:
    replay_dir = tmp_path / "replay"
    buffer = make_replay_buffer(1000, batch_length=4, storage="memmap", replay_dir=replay_dir)
    steps = TensorDict({"pixels": torch.randint(0, 255, (50, 3, 64, 64), dtype=torch.uint8)}, batch_size=[50])
    buffer.extend(steps)
    buffer.dumps(replay_dir)
    assert [p.relative_to(replay_dir) for p in replay_dir.rglob("pixels.memmap")] == [Path("storage/pixels.memmap")]
    reopened = make_replay_buffer(1000, batch_length=4, storage="memmap", replay_dir=replay_dir)
    reopened.loads(replay_dir)
    assert len(reopened) == 50 and torch.equal(reopened[:50]["pixels"], steps["pixels"])


def filled_buffer(
    lengths: list[int], capacity: int, batch_len: int, batch_length: int, **options: Any
) -> TensorDictReplayBuffer:
    """An in-memory buffer of ``capacity`` steps filled with one env's scripted episodes, ``batch_len`` at a time;
    ``options`` go to :func:`make_replay_buffer` (``batch_size``, ``prefetch``, ``seed``)."""
    recorder = StepRecorder("observation", num_envs=1)
    buffer = make_replay_buffer(capacity, batch_length=batch_length, storage="memory", replay_dir=None, **options)
    for batch in to_batches([scripted_stream(lengths, env_id=0)], batch_len=batch_len):
        add_steps(buffer, recorder.convert(batch[0]))
    return buffer


def sampled_observations(buffer: TensorDictReplayBuffer, batch_length: int, draws: int = 20) -> torch.Tensor:
    """Observations of ``draws`` batches of 16 sequences, ``[draws * 16, batch_length]``, checked to be consecutive
    steps of one episode (the scripted values count up by one within an episode)."""
    try:
        observations = torch.cat(
            [sample_sequences(buffer, 16, batch_length)["observation"].squeeze(-1).long() for _ in range(draws)]
        )
    except RuntimeError as error:  # a sampler that returns partial sequences fails the reshape to [16, batch_length]
        pytest.fail(f"sampling must return whole sequences of batch_length={batch_length} steps: {error}")
    assert ((observations // 100) == (observations[:, :1] // 100)).all(), "a sequence mixes episodes"
    assert ((observations[:, 1:] - observations[:, :-1]) == 1).all(), (
        "a sequence spans the overwrite point (or skips steps)"
    )
    return observations


def test_episodes_shorter_than_batch_length_are_never_sampled_and_never_break_sampling() -> None:
    """What happens to an episode shorter than ``batch_length`` (stored steps: its length + 1 for the reset): it is
    kept in the buffer but never sampled, since a sequence may not cross into the next episode; sampling draws from
    the long enough episodes only. A buffer holding only short episodes must not make sampling (training) fail."""
    torch.manual_seed(0)
    mixed = filled_buffer([3, 12, 2, 4, 9], capacity=1000, batch_len=5, batch_length=6)
    episodes = (sampled_observations(mixed, batch_length=6) // 100).unique().tolist()
    assert episodes == [1, 4], "only the episodes of at least batch_length stored steps can be sampled"
    only_short = filled_buffer([3, 4, 2, 3, 4], capacity=1000, batch_len=4, batch_length=6)
    try:
        sample_sequences(only_short, 4, 6)
    except RuntimeError as error:
        pytest.fail(f"episodes shorter than batch_length make sampling fail: {error}")


def test_a_run_whose_episodes_are_all_shorter_than_batch_length_waits_with_a_warning(tmp_path) -> None:
    """Pendulum episodes of 4 agent steps (5 stored steps) against ``batch_length=6``: nothing can ever be sampled.
    The run still collects all its frames; its owed updates wait (none is made), with a warning naming
    ``replay_buffer.batch_length`` (shown once: Python's default filter), instead of the run failing."""
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"replay_buffer\.batch_length=6") as caught:
        try:
            record = train_in_process(run_dir, (*TINY_RUN, "env.max_episode_frames=8"))
        except Exception as error:
            pytest.fail(f"episodes shorter than batch_length must not make a training run fail: {error!r}")
    assert all("the owed updates wait" in str(w.message) for w in caught if "batch_length" in str(w.message))
    counters = checkpoint_state(run_dir)["counters"]
    assert record.update_calls == 0 and counters["updates"] == 0, "no update can be made from episodes this short"
    assert counters["frames"] == 160 and counters["episodes"] == 20, (
        "a run whose episodes are shorter than batch_length must still collect all its frames"
    )


@pytest.mark.parametrize(
    ("lengths", "capacity"),
    [([7, 12, 6, 9, 15, 8, 11, 10], 25), ([40], 20)],
    ids=["many_episodes", "one_episode_longer_than_the_buffer"],
)
def test_a_full_buffer_wraps_around_without_sequences_across_the_overwrite_point(
    lengths: list[int], capacity: int
) -> None:
    """The newest steps overwrite the oldest; no sequence joins the newest step to the oldest one left (with one
    episode longer than the buffer, both carry the same episode id: only the step index tells them apart)."""
    torch.manual_seed(0)
    buffer = filled_buffer(lengths, capacity=capacity, batch_len=5, batch_length=6)
    stored = buffer[:capacity]["observation"].squeeze(-1).long()
    assert len(buffer) == capacity and stored.unique().numel() == capacity, "the buffer holds repeated steps"
    # Scripted observations grow with time: the newest step is the largest, the oldest one left follows it.
    cursor = int(stored.argmax()) + 1
    assert cursor < capacity, "the buffer did not wrap around"
    newest, oldest = stored[cursor - 1], stored[cursor]
    observations = sampled_observations(buffer, batch_length=6, draws=40)
    pairs = torch.stack([observations[:, :-1], observations[:, 1:]], -1).reshape(-1, 2)
    assert not ((pairs[:, 0] == newest) & (pairs[:, 1] == oldest)).any()
    assert torch.isin(observations, stored[:cursor]).any(), "no sequence reaches the steps written after the wrap"


LENGTHS = [7, 12, 6, 9, 15, 8, 11, 10, 30, 5]


def draws(buffer: TensorDictReplayBuffer, count: int, batch_size: int = 16, batch_length: int = 6) -> list[TensorDict]:
    return [sample_sequences(buffer, batch_size, batch_length) for _ in range(count)]


def test_prefetching_draws_the_same_valid_sequences_as_sampling_on_demand() -> None:
    """The buffer's own generator draws the sequences: a buffer prefetching one batch returns exactly the batches, in
    the same order, that sampling on demand returns, so they never cross an episode and keep the same distribution.
    (With more than one, TorchRL's threads take turns at the generator in no fixed order: not reproducible.)"""
    prefetch = 1
    on_demand = filled_buffer(LENGTHS, capacity=1000, batch_len=5, batch_length=6, batch_size=16, seed=3)
    ahead = filled_buffer(LENGTHS, capacity=1000, batch_len=5, batch_length=6, batch_size=16, seed=3, prefetch=prefetch)
    expected, got = draws(on_demand, 10), draws(ahead, 10)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have.shape == (16, 6)
        assert torch.equal(have["observation"], want["observation"]), f"prefetched batch {index} differs"
    sampled_observations(ahead, batch_length=6, draws=10)  # consecutive steps of one episode only
    other_seed = filled_buffer(LENGTHS, capacity=1000, batch_len=5, batch_length=6, batch_size=16, seed=4)
    assert not torch.equal(draws(other_seed, 1)[0]["observation"], expected[0]["observation"])
    ahead.shutdown()


def test_steps_added_while_prefetching_reach_later_batches_and_never_tear_sequences() -> None:
    """Batches prefetched before new steps are stored come from the buffer as it was; later ones see the new steps,
    and no sequence mixes episodes while the buffer wraps around under the prefetching thread."""
    recorder = StepRecorder("observation", num_envs=1)
    buffer = make_replay_buffer(40, batch_length=6, storage="memory", replay_dir=None, batch_size=8, prefetch=2)
    batches = to_batches([scripted_stream([9, 14, 7, 20, 11, 25, 13, 8], env_id=0)], batch_len=10)
    add_steps(buffer, recorder.convert(batches[0][0]))
    add_steps(buffer, recorder.convert(batches[1][0]))
    seen = []
    for batch in batches[2:]:
        for _ in range(3):
            observations = sample_sequences(buffer, 8, 6)["observation"].squeeze(-1).long()
            assert ((observations // 100) == (observations[:, :1] // 100)).all(), "a sequence mixes episodes"
            assert ((observations[:, 1:] - observations[:, :-1]) == 1).all(), "a sequence skips steps"
            seen.append(observations.flatten())
        add_steps(buffer, recorder.convert(batch[0]))
    newest_episode = int(torch.cat(seen).max()) // 100
    assert newest_episode >= 5, "steps stored while prefetching never reached a sampled batch"
    buffer.shutdown()


def test_a_prefetching_buffer_resumes_with_the_batches_it_would_have_drawn(tmp_path) -> None:
    """``dumps`` keeps the prefetched batches and the generator, so a reopened buffer continues the uninterrupted
    stream of batches; reopening it with another prefetch count (or none) drops the queue instead of failing."""
    replay_dir = tmp_path / "replay"
    recorder = StepRecorder("observation", num_envs=1)
    options = dict(storage="memmap", replay_dir=replay_dir, batch_size=16, seed=1)
    buffer = make_replay_buffer(1000, batch_length=6, prefetch=1, **options)
    for batch in to_batches([scripted_stream(LENGTHS, env_id=0)], batch_len=5):
        add_steps(buffer, recorder.convert(batch[0]))
    draws(buffer, 3)
    buffer.dumps(replay_dir)
    uninterrupted = draws(buffer, 4)
    buffer.shutdown()

    reopened = make_replay_buffer(1000, batch_length=6, prefetch=1, **options)
    load_replay(reopened, replay_dir)
    for index, (want, have) in enumerate(zip(uninterrupted, draws(reopened, 4), strict=True)):
        assert torch.equal(have["observation"], want["observation"]), f"batch {index} after the resume differs"
    reopened.shutdown()
    for prefetch in (0, 2):
        other = make_replay_buffer(1000, batch_length=6, prefetch=prefetch, **options)
        load_replay(other, replay_dir)
        assert len(other) == len(buffer)
        sampled_observations(other, batch_length=6, draws=3)
        other.shutdown()


def test_prefetch_resolves_per_device_and_refuses_bad_counts() -> None:
    assert resolve_prefetch(None, torch.device("cpu")) == PREFETCH_DEFAULTS["cpu"]
    assert resolve_prefetch(None, torch.device("cuda")) == PREFETCH_DEFAULTS["cuda"] > 0
    assert resolve_prefetch(3, torch.device("cpu")) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"replay_buffer\.prefetch"):
            resolve_prefetch(bad, torch.device("cpu"))
    with pytest.raises(ValueError, match="prefetch needs batch_size"):
        make_replay_buffer(10, batch_length=2, storage="memory", replay_dir=None, prefetch=1)


def test_the_cuda_replay_is_pinned_prefetched_and_sized_from_the_config(tmp_path) -> None:
    """The CUDA path without a GPU: the buffer a CUDA run builds pins its batches and prefetches the CUDA default;
    a CPU run's buffer pins nothing. (Sampling a pinned batch needs CUDA itself.)"""
    cfg = compose_config("experiment=debug", "replay_buffer.storage=memory")
    cuda, cpu = (utils.train._make_replay(cfg, torch.device(kind), tmp_path) for kind in ("cuda", "cpu"))
    assert (cuda._pin_memory, cuda._prefetch_cap) == (True, PREFETCH_DEFAULTS["cuda"])
    assert (cpu._pin_memory, cpu._prefetch_cap) == (False, PREFETCH_DEFAULTS["cpu"])
    assert cuda.batch_size == cfg.replay_buffer.batch_size * cfg.replay_buffer.batch_length
    cuda.shutdown()


def test_a_run_with_prefetch_resumes_and_samples_valid_sequences(tmp_path) -> None:
    """A tiny run with ``replay_buffer.prefetch=1``, interrupted in a training phase and resumed with prefetch 2,
    makes all its updates, and its saved replay reopens (with the run's prefetch) to sample valid sequences."""
    run_dir = tmp_path / "run"
    train_in_process(run_dir, (*TINY_RUN, "replay_buffer.prefetch=1"), interrupt_at_update=5)
    resumed = train_in_process(run_dir, ("replay_buffer.prefetch=2",), resume=True)
    assert checkpoint_state(run_dir)["counters"]["updates"] == 12
    assert resumed.update_calls == 8
    cfg = stored_config(run_dir)
    assert cfg.replay_buffer.prefetch == 2
    replay = utils.train._make_replay(cfg, torch.device("cpu"), run_dir / "replay")
    load_replay(replay, run_dir / "replay")
    check_sequences_stay_in_episodes(replay, cfg.replay_buffer.batch_size, cfg.replay_buffer.batch_length)
    replay.shutdown()
