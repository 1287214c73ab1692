"""Replay: the step format (each observation stored once) and sequences that never cross an episode boundary."""

from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDict

from utils.replay import StepRecorder, make_replay_buffer, sample_sequences


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
        assert (members // 100).unique().numel() == 1
        assert torch.equal(steps["step"][steps["episode"] == episode_id], members % 100)
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
