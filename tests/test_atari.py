"""Atari (``env=atari``, utils/atari.py): the ALE wrapper against a raw ALE env, the protocol options, the TorchRL
env, replay episodes, the training env's random stream, config errors, V1's tanh reward targets, and debug-size
Boxing runs through ``dreamer.py`` (V1 with videos, resume and dream videos; V3 in grayscale as a sweep job)."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import gymnasium
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torchrl.data import OneHot
from torchrl.envs.utils import check_env_specs

from losses.world_model import WorldModelLoss, sum_event_mean_batch_time, unit_gaussian_nll
from tests.cli import run_dreamer
from tests.runs import check_sequences_stay_in_episodes, episodes_by_id, replay_of, stored_steps
from tests.test_world_model import replay_batch, tiny_world_model
from utils.atari import import_ale, make_atari_gym_env
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, apply_overrides, check_config, compose_config
from utils.env_rng import capture_env_rng, restore_env_rng
from utils.envs import can_terminate, make_env, obs_key, validate_env_config
from utils.replay import StepRecorder, add_steps, make_replay_buffer

SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DEBUG_V1 = ("experiment=debug", "env=atari", "env.name=boxing", "logger.video=true")
DEBUG_V3 = ("experiment=debug_v3", "env=atari", "env.name=boxing", "env.grayscale=true", "logger.video=false")


@pytest.fixture(autouse=True)
def seed_torch(single_torch_thread):
    """Rollouts without a policy draw their random actions from torch's global generator; one torch thread (the
    resize of every screen is 30x slower with two threads on a busy 2-core machine)."""
    torch.manual_seed(0)


def atari_cfg(*overrides: str) -> DictConfig:
    """``cfg.env`` of ``env=atari`` (Boxing, sticky actions 0.25, repeat 4) with overrides."""
    return compose_config("env=atari", *overrides).env


def raw_ale(game: str, seed: int) -> gymnasium.Env:
    """The plain ALE env, one frame per step, no sticky actions, RGB observations, reset with ``seed``."""
    import_ale()
    env = gymnasium.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)
    env.reset(seed=seed)
    return env


def action_indices(count: int, num_actions: int, seed: int = 0) -> list[int]:
    return torch.randint(num_actions, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def play(env, actions: list[int], seed: int | None = None) -> list[TensorDict]:
    """Resets the TorchRL ``env`` (reseeded first when ``seed`` is given) and steps it with one-hot ``actions``;
    returns the "next" tensordicts."""
    if seed is not None:
        env.set_seed(seed)
    td = env.reset()
    outputs = []
    for action in actions:
        td["action"] = torch.nn.functional.one_hot(torch.tensor(action), env.action_spec.shape[-1]).float()
        td = env.step(td)
        outputs.append(td["next"].clone())
        td = td["next"]
    return outputs


def same_trajectory(first: list[TensorDict], second: list[TensorDict]) -> bool:
    return all(
        torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["reward"], b["reward"])
        for a, b in zip(first, second, strict=True)
    )


# --- the ALE wrapper ------------------------------------------------------------------------------------------------


def test_action_repeat_sums_rewards_and_pools_the_last_two_frames():
    """Against the raw ALE env stepped 4 frames per action: the screen is max(frame 3, frame 4), rewards summed."""
    env = make_atari_gym_env(atari_cfg("env.repeat_action_probability=0"))
    raw = raw_ale("Boxing", seed=1)
    first, _ = env.reset(seed=1)
    assert first.shape == (210, 160, 3) and first.dtype == np.uint8
    assert np.array_equal(first, raw.unwrapped.ale.getScreenRGB())
    actions = action_indices(60, env.action_space.n)
    pooled_differs, rewards = False, []
    for action in actions:
        screen, reward, terminated, truncated, _ = env.step(action)
        frames, expected_reward = [], 0.0
        for _ in range(4):
            frame, frame_reward, *_ = raw.step(action)
            frames.append(frame)
            expected_reward += frame_reward
        expected = np.maximum(frames[-2], frames[-1])
        assert np.array_equal(screen, expected)
        assert reward == expected_reward and not (terminated or truncated)
        pooled_differs |= not np.array_equal(expected, frames[-1])
        rewards.append(reward)
    assert pooled_differs, "the max never differed from the last frame: pooling is not checked"
    assert any(rewards), "no reward in 60 steps: the reward sum is not checked"
    assert env.unwrapped.ale.getEpisodeFrameNumber() == 4 * len(actions)


def test_a_step_cut_by_the_episode_end_shows_its_last_frame():
    """A 10-frame episode at repeat 4: steps of 4, 4, then 2 frames; the last screen is frame 10 alone."""
    env = make_atari_gym_env(atari_cfg("env.repeat_action_probability=0", "env.max_episode_frames=10"))
    raw = raw_ale("Boxing", seed=0)
    env.reset(seed=0)
    actions = action_indices(3, env.action_space.n, seed=2)
    endings = [env.step(action)[2:4] for action in actions]
    assert endings == [(False, False), (False, False), (False, True)]
    assert env.unwrapped.ale.getEpisodeFrameNumber() == 10
    frames = [raw.step(action)[0] for action in np.repeat(actions, 4)[:10]]
    assert np.array_equal(env.unwrapped.ale.getScreenRGB(), frames[-1])
    assert not np.array_equal(np.maximum(frames[-2], frames[-1]), frames[-1]), "frames 9 and 10 are alike"


def test_sticky_actions_follow_the_seed():
    """With sticky actions (0.25) the same seed replays the same game and another seed another; without them the
    game is deterministic whatever the seed."""
    actions = action_indices(40, 18)
    assert atari_cfg().repeat_action_probability == 0.25
    env = make_env(atari_cfg())
    sticky = {seed: play(env, actions, seed) for seed in (3, 4)}
    assert same_trajectory(play(env, actions, 3), sticky[3])
    assert not same_trajectory(sticky[3], sticky[4])
    env = make_env(atari_cfg("env.repeat_action_probability=0"))
    plain = {seed: play(env, actions, seed) for seed in (3, 4)}
    assert same_trajectory(plain[3], plain[4])
    assert not same_trajectory(plain[3], sticky[3])


def test_sticky_probability_reaches_ale():
    """At probability 1 every frame repeats the previous action, the reset's NOOP: actions have no effect."""
    actions = action_indices(30, 18)
    always = play(make_env(atari_cfg("env.repeat_action_probability=1")), actions)
    noops = play(make_env(atari_cfg("env.repeat_action_probability=0")), [0] * len(actions))
    assert same_trajectory(always, noops)


def test_life_loss_is_terminal_only_as_an_option():
    """Breakout with random play loses its first life after a few dozen steps."""
    actions = action_indices(200, 4, seed=1)
    ends = {}
    for option in (False, True):
        env = make_atari_gym_env(atari_cfg("env.name=breakout", f"env.terminal_on_life_loss={option}"))
        env.reset(seed=0)
        for step, action in enumerate(actions):
            *_, terminated, _, info = env.step(action)
            if terminated or info["lives"] < 5:
                ends[option] = (step, terminated, info["lives"])
                break
    assert ends[True] == (ends[False][0], True, 4)  # the same step; terminal only with the option
    assert ends[False][1:] == (False, 4)


def test_noop_starts_draw_0_to_noop_max_frames_from_the_seeded_generator():
    """The authors' Atari env plays ``rng.integers(noops + 1)`` no-op frames: 0 to 30 inclusive, each about equally
    often (over 310 resets a count is missing with probability about 31 * (30/31)^310, 1e-3). Only the first reset is
    seeded: a seeded reset reloads the game, which takes a large part of a second."""
    env = make_atari_gym_env(atari_cfg("env.noop_max=30"))

    def noop_counts(resets: int) -> list[int]:
        env.reset(seed=0)
        counts = [env.unwrapped.ale.getEpisodeFrameNumber()]
        for _ in range(resets - 1):
            env.reset()
            counts.append(env.unwrapped.ale.getEpisodeFrameNumber())
        return counts

    counts = noop_counts(310)
    assert set(counts) == set(range(31)), f"no-op counts drawn: {sorted(set(counts))}"
    assert noop_counts(5) == counts[:5], "the draws must come from the seeded generator"
    off = make_atari_gym_env(atari_cfg())
    off.reset(seed=0)
    assert off.unwrapped.ale.getEpisodeFrameNumber() == 0


# --- the TorchRL environment ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "actions", "channels"),
    [
        ((), 18, 3),
        (("env.name=pong",), 6, 3),
        (("env.name=pong", "env.full_action_space=true"), 18, 3),
        (("env.grayscale=true",), 18, 1),
    ],
    ids=["boxing", "pong", "pong-full", "grayscale"],
)
def test_specs_one_hot_actions_and_pixels(overrides, actions, channels):
    cfg = atari_cfg("env.max_episode_frames=40", *overrides)
    assert obs_key(cfg) == "pixels" and can_terminate(cfg)
    env = make_env(cfg)
    check_env_specs(env)
    spec = env.action_spec
    assert isinstance(spec, OneHot) and spec.shape == (actions,) and spec.dtype == torch.float32
    rollout = env.rollout(4)
    assert rollout["next", "pixels"].shape == (4, channels, 64, 64) and rollout["next", "pixels"].dtype == torch.uint8
    assert rollout["next", "pixels"].float().std() > 1
    assert (rollout["action"].sum(-1) == 1).all()


def test_the_torchrl_env_is_the_wrapper_resized():
    """The pixels are the wrapper's pooled screen, resized to 64x64 (mean colour kept)."""
    cfg = atari_cfg("env.seed=5")
    actions = action_indices(5, 18)
    outputs = play(make_env(cfg), actions)
    wrapper = make_atari_gym_env(cfg)
    wrapper.reset(seed=5)
    for action, out in zip(actions, outputs, strict=True):
        screen, reward, *_ = wrapper.step(action)
        assert out["reward"].item() == reward
    np.testing.assert_allclose(outputs[-1]["pixels"].float().mean((1, 2)).numpy(), screen.mean((0, 1)), atol=1.5)


def test_episode_limit_in_frames():
    """40 frames at repeat 4: 10 agent steps, truncated (not terminated), then a new episode."""
    rollout = make_env(atari_cfg("env.max_episode_frames=40")).rollout(21, break_when_any_done=False)
    ends = rollout["next", "done"].squeeze(-1).nonzero().squeeze(-1).tolist()
    assert ends == [9, 19]
    assert rollout["next", "truncated"][ends].all() and not rollout["next", "terminated"].any()


def test_replay_keeps_episodes_apart_and_terminations_at_their_end():
    """Breakout, life loss terminal, episodes of at most 30 agent steps: terminations and truncations stored."""
    env = make_env(atari_cfg("env.name=breakout", "env.terminal_on_life_loss=true", "env.max_episode_frames=120"))
    rollout = env.rollout(150, break_when_any_done=False)
    terminated, truncated = rollout["next", "terminated"].sum().item(), rollout["next", "truncated"].sum().item()
    assert terminated > 0 and truncated > 0, (terminated, truncated)
    steps = StepRecorder("pixels", num_envs=1).convert(rollout)
    episodes = episodes_by_id(steps, "terminated")  # checks step indices and is_first per episode
    assert sum(int(flags.sum()) for flags in episodes.values()) == terminated
    assert all(not flags[:-1].any() for flags in episodes.values()), "a termination before an episode's end"
    replay = make_replay_buffer(1000, 6, "memory", None, seed=0)
    add_steps(replay, steps)
    check_sequences_stay_in_episodes(replay, batch_size=8, batch_length=6)


def test_the_sticky_action_stream_is_saved_and_restored():
    """The training env's random state (np_random and ALE's generator) restored into a fresh env continues it: the
    next episodes play the same."""
    cfg = atari_cfg("env.max_episode_frames=400")
    actions = action_indices(60, 18)
    env = make_env(cfg)
    play(env, actions[:20])
    state = capture_env_rng(env)
    assert set(state) == {"gymnasium", "ale"} and state["ale"].dtype == torch.uint8
    expected = play(env, actions)
    restored = make_env(cfg)
    assert not same_trajectory(play(restored, actions), expected), "a fresh env plays the same: nothing is checked"
    restore_env_rng(restored, state)
    assert same_trajectory(play(restored, actions), expected)


# --- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["env.name=boxng"], "Unknown Atari game 'boxng'; did you mean boxing? ALE game ids are lower case"),
        (["env.name=Pong"], "Unknown Atari game 'Pong'; did you mean pong?"),
        (["env.name=nope"], "Unknown Atari game 'nope'; ALE game ids are lower case with underscores, e.g. boxing"),
        (["env.from_pixels=false"], "Atari games are played from pixels: from_pixels=false is not supported"),
        (["env.from_pixels=false", "env.grayscale=true"], "grayscale=true needs from_pixels=true"),
        (["env.task=run"], "Atari games take no task, got task='run'; allowed: null"),
        (["env.repeat_action_probability=1.5"], "repeat_action_probability must be a number in [0, 1], got 1.5"),
        (["env.noop_max=-1"], "noop_max must be an integer >= 0 (0: no no-op starts), got -1"),
    ],
)
def test_validation_errors_are_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        validate_env_config(atari_cfg(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_ale_py_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # import ale_py now raises ImportError
    with pytest.raises(ValueError) as error:
        validate_env_config(atari_cfg())
    assert "env.backend=atari needs the ale-py package, which is not installed" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_atari_preset_has_the_authors_discrete_settings():
    cfg = compose_config("experiment=atari", "env.name=pong")
    assert (cfg.env.backend, cfg.env.name, cfg.env.action_repeat) == ("atari", "pong", 4)
    assert cfg.collector.exploration_noise == 0.4 and cfg.optimization.reward_transform == "tanh"
    assert (cfg.optimization.imagination_horizon, cfg.optimization.kl_scale) == (10, 0.1)
    assert compose_config("env=atari").optimization.reward_transform == "none"


def test_the_atari100k_v3_preset_is_the_authors_atari100k_setup():
    """Pinned to danijar/dreamerv3 at e3f02248693a79dc8b0ebd62c93683888ddaccfe (tests/data/dreamerv3_reference.yaml):
    dreamerv3/configs.yaml, block ``atari100k`` (run: steps 1.1e5, envs 1, train_ratio 256; env.atari100k: size
    [64, 64], repeat 4, sticky False, gray False, actions needed, lives unused, noops 30), the defaults block (batch
    16 x 64) and embodied/envs/atari.py's defaults for what the block leaves out (length 108000 frames)."""
    from benchmarks.learning import CHECKS

    cfg = compose_config("experiment=atari100k_v3", "env.name=pong")
    check_config(cfg)
    authors = {
        "env.backend": "atari",
        "env.action_repeat": 4,  # repeat
        "env.image_size": 64,  # size
        "env.grayscale": False,  # gray
        "env.repeat_action_probability": 0.0,  # sticky: False
        "env.full_action_space": False,  # actions: needed
        "env.noop_max": 30,  # noops (a uniform 0..30 frames, theirs and ours)
        "env.terminal_on_life_loss": False,  # lives: unused
        "env.max_episode_frames": 108000,  # Atari(length=108000)
        "env.num_envs": 1,  # run.envs
        "optimization.train_ratio": 256.0,  # run.train_ratio
        "replay_buffer.batch_size": 16,  # batch_size
        "replay_buffer.batch_length": 64,  # batch_length
        "model.name": "dreamer_v3",
    }
    actual = {key: OmegaConf.select(cfg, key) for key in authors}
    assert actual == authors
    # Ours: the small size (their block keeps size200m), 100k agent steps (their run.steps 1.1e5 runs 10% past the
    # benchmark's budget), uniform random actions until one batch of 16 x 64 steps is stored.
    assert (cfg.model.size, cfg.model.deter_dim) == ("12m", 2048)
    assert cfg.collector.total_frames == 100_000 * cfg.env.action_repeat
    assert cfg.collector.init_random_frames == 16 * 64 * cfg.env.action_repeat
    assert cfg.env.name == "pong" and compose_config("experiment=atari100k_v3").env.name == "boxing"
    assert CHECKS["atari_v3"].preset == "atari100k_v3"


def test_tanh_reward_transform_squashes_the_reward_target():
    """V1's reward loss with ``optimization.reward_transform=tanh``: ``-log N(scale * tanh(r); predicted, 1)``."""
    world_model = tiny_world_model((5,), from_pixels=False)
    batch = replay_batch(2, 4, (5,), from_pixels=False)
    batch["reward"] = batch["reward"] * 6 - 3
    terms = {}
    for name in ("none", "tanh"):
        loss = WorldModelLoss(
            world_model, free_nats=3.0, kl_scale=1.0, continue_scale=1.0, reward_scale=2.0, reward_transform=name
        )
        torch.manual_seed(0)
        td = batch.clone()
        terms[name] = loss(td)["loss_reward"]
    expected = sum_event_mean_batch_time(unit_gaussian_nll(td["reward_pred"], 2.0 * torch.tanh(batch["reward"])))
    torch.testing.assert_close(terms["tanh"], expected)
    assert not torch.isclose(terms["none"], terms["tanh"])
    with pytest.raises(ValueError, match="reward_transform='clip'; allowed: none, tanh"):
        WorldModelLoss(world_model, free_nats=3.0, kl_scale=1.0, continue_scale=1.0, reward_transform="clip")


# --- runs through dreamer.py ---------------------------------------------------------------------------------------


def dreamer(*args: str) -> None:
    result = run_dreamer(*args, env=SINGLE_THREAD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiment=debug on Boxing to 400 frames (evaluations with videos at 200 and 400), then resumed to 600."""
    run_dir = tmp_path_factory.mktemp("atari_v1") / "run"
    dreamer(*DEBUG_V1, f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_v1_boxing_run_trains_with_one_hot_actions_and_the_continue_head(v1_run: Path):
    rows = [row for row in metrics(v1_run) if row["loss/world_model"]]
    assert (int(rows[-1]["frames"]), int(rows[-1]["updates"])) == (400, 6)
    for column in ("loss/world_model", "loss/continue", "loss/actor", "loss/value", "actor_entropy"):
        assert all(math.isfinite(float(row[column])) for row in rows), column
    # A fresh one-hot actor over Boxing's 18 actions is near uniform: entropy near log 18.
    assert float(rows[0]["actor_entropy"]) == pytest.approx(math.log(18), abs=0.1)
    steps = stored_steps(v1_run)
    actions = steps["action"][~steps["is_first"].squeeze(-1)]
    assert actions.dtype == torch.float32 and (actions.sum(-1) == 1).all() and ((actions == 0) | (actions == 1)).all()
    assert steps["pixels"].shape[1:] == (3, 64, 64) and steps["pixels"].dtype == torch.uint8
    assert set(load_checkpoint(v1_run)["counters"]["env_rng"]) == {"gymnasium", "ale"}
    videos = sorted(path.name for path in (v1_run / "videos").glob("*.mp4"))
    assert len(videos) == 4  # episode and open-loop dream at 200 and 400 frames
    dream = imageio.mimread(v1_run / "videos" / "eval_open_loop_dream_000000400.mp4")
    assert len(dream) == 26 and dream[0].shape == (3 * (14 + 64), 3 * 3 * 64, 3)  # 25 agent steps + the reset


def test_mode_eval_with_dreams_on_the_v1_boxing_run(v1_run: Path, tmp_path: Path):
    out = tmp_path / "eval"
    dreamer("mode=eval", f"checkpoint={v1_run}", "eval.episodes=1", "eval.dreams=true", f"hydra.run.dir={out}")
    results = json.loads((out / "eval_results.json").read_text())
    assert [episode["length"] for episode in results["episodes"]] == [25]
    assert results["policy"] == "deterministic"
    frames = imageio.mimread(out / "dreams" / "episode_000.mp4")
    assert len(frames) == 26


def test_resuming_the_v1_boxing_run(v1_run: Path):
    dreamer(f"resume={v1_run}", "collector.total_frames=600")
    counters = load_checkpoint(v1_run)["counters"]
    assert (counters["frames"], counters["updates"], counters["episodes"]) == (600, 10, 6)
    segments = json.loads((v1_run / "run_info.json").read_text())["segments"]
    assert [segment["frames"] for segment in segments] == [0, 400]
    updates = [int(row["updates"]) for row in metrics(v1_run) if row["loss/world_model"]]
    assert updates == sorted(set(updates)) and updates[-1] == 10
    check_sequences_stay_in_episodes(replay_of(v1_run), batch_size=4, batch_length=8)


def test_a_v3_grayscale_boxing_sweep_job(tmp_path: Path):
    """experiment=debug_v3 in grayscale through the multirun launcher (one job): the V3 discrete actor."""
    dreamer("-m", *DEBUG_V3, f"hydra.sweep.dir={tmp_path}")
    run_dir = tmp_path / "0_boxing-None_seed0"
    rows = [row for row in metrics(run_dir) if row["loss/world_model"]]
    assert (int(rows[-1]["frames"]), int(rows[-1]["updates"])) == (400, 2)
    assert all(math.isfinite(float(row["loss/actor"])) for row in rows)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["config"]["model"]["name"] == "dreamer_v3"
    output_layer = [value for key, value in checkpoint["agent"]["actor"].items() if key.endswith("weight")][-1]
    assert output_layer.shape[0] == 18  # logits of Boxing's 18 actions
    assert stored_steps(run_dir)["pixels"].shape[1:] == (1, 64, 64)


def test_the_action_set_of_a_saved_run_cannot_change():
    """The actor's output size follows the action set: a resume or an evaluation may not switch it."""
    saved = compose_config("env=atari")
    with pytest.raises(ConfigError, match=r"Cannot change env.full_action_space \(saved False\)"):
        apply_overrides(saved, ["env.full_action_space=true"], ignore=())
