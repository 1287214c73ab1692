"""Tests of the environment factory (utils/envs.py) on every env config shipped, with short episode limits."""

from pathlib import Path

import dm_env
import gymnasium
import numpy as np
import pytest
import torch
from dm_control import mujoco, suite
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from utils.envs import (
    ActionRepeat,
    ChannelsFirstPixels,
    add_recurrent_primer,
    can_terminate,
    make_env,
    obs_key,
    validate_env_config,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")

# Every env config shipped: name -> Hydra overrides. "dmc" is the default (cheetah-run from pixels).
SHIPPED = {
    "dmc": [],
    "dmc_states": ["env.from_pixels=false"],
    "car_racing": ["env=car_racing"],
    "pendulum": ["env=pendulum"],
    "debug": ["experiment=debug"],
}
# Expected per config: observation key, observation shape, action dim, can terminate.
EXPECTED = {
    "dmc": ("pixels", (3, 64, 64), 6, False),
    "dmc_states": ("observation", (17,), 6, False),
    "car_racing": ("pixels", (3, 64, 64), 3, True),
    "pendulum": ("observation", (3,), 1, False),
    "debug": ("pixels", (3, 64, 64), 1, False),
}


@pytest.fixture(autouse=True)
def seed_torch():
    """Rollouts without a policy draw their random actions from torch's global generator."""
    torch.manual_seed(0)


def env_config(name: str, *overrides: str):
    """The composed ``cfg.env`` of a shipped config, with extra overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=[*SHIPPED[name], *overrides]).env


def random_actions(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[count, dim] actions uniform in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, dim, generator=generator) * 2 - 1


def step_actions(env, actions: torch.Tensor) -> list[TensorDict]:
    """Resets env, steps it with each action; returns the "next" tensordicts."""
    td = env.reset()
    outputs = []
    for action in actions:
        td["action"] = action
        td = env.step(td)
        outputs.append(td["next"].clone())
        td = td["next"]
    return outputs


@pytest.mark.parametrize("name", SHIPPED)
def test_specs_shapes_dtypes_and_bounds(name):
    key, shape, action_dim, terminates = EXPECTED[name]
    cfg = env_config(name, "env.max_episode_frames=8")
    assert obs_key(cfg) == key
    assert can_terminate(cfg) is terminates
    env = make_env(cfg)
    check_env_specs(env)
    assert env.batch_size == torch.Size([])
    action_spec = env.action_spec
    assert action_spec.shape == (action_dim,) and action_spec.dtype == torch.float32
    assert torch.equal(action_spec.space.low, -torch.ones(action_dim))
    assert torch.equal(action_spec.space.high, torch.ones(action_dim))
    rollout = env.rollout(3)
    obs = rollout["next", key]
    assert obs.shape == (3, *shape)
    if key == "pixels":
        assert obs.dtype == torch.uint8
        assert obs.float().std() > 1  # a real image, not a constant frame
    else:
        assert obs.dtype == torch.float32 and torch.isfinite(obs).all()
    assert rollout["next", "reward"].shape == (3, 1) and rollout["next", "reward"].dtype == torch.float32
    for done_key in ("done", "terminated", "truncated"):
        assert rollout["next", done_key].shape == (3, 1) and rollout["next", done_key].dtype == torch.bool
    assert rollout["next", "step_count"].squeeze(-1).tolist() == [1, 2, 3]
    env.close()


def test_dm_control_action_repeat_sums_rewards_and_counts_frames():
    """Against the raw dm_control env stepped action_repeat times per action, with the same seed."""
    cfg = env_config("debug", "env.from_pixels=false", "env.action_repeat=3", "env.seed=5")
    actions = random_actions(4, 1)
    outputs = step_actions(env := make_env(cfg), actions)
    raw = suite.load("cartpole", "balance", task_kwargs={"random": 5})
    raw.reset()
    for action, out in zip(actions, outputs, strict=True):
        reward = 0.0
        for _ in range(3):
            time_step = raw.step(action.double().numpy())
            reward += time_step.reward
        expected_obs = np.concatenate([value.ravel() for value in time_step.observation.values()])
        np.testing.assert_allclose(out["observation"].numpy(), expected_obs, rtol=1e-5, atol=1e-5)
        assert out["reward"].item() == pytest.approx(reward, rel=1e-5), (
            "a step's reward must be the sum of the rewards of its action_repeat frames"
        )
        assert reward > 2  # cartpole-balance gives about 1 per frame: the sum covers all 3 frames
    physics = env.base_env._env.physics
    assert physics.data.time == pytest.approx(4 * 3 * raw.control_timestep())


def test_pendulum_action_repeat_and_action_scaling():
    """Pendulum's native actions are in [-2, 2]: agent action a is applied as 2a, rewards summed over the repeat."""
    cfg = env_config("pendulum", "env.seed=3")
    actions = random_actions(5, 1)
    outputs = step_actions(make_env(cfg), actions)
    raw = gymnasium.make("Pendulum-v1")
    raw.reset(seed=3)  # make_env seeds with a reset(seed=...) ...
    raw.reset()  # ... and the test resets once more
    for action, out in zip(actions, outputs, strict=True):
        reward = 0.0
        for _ in range(2):
            obs, step_reward, *_ = raw.step(2 * action.numpy())
            reward += step_reward
        np.testing.assert_allclose(out["observation"].numpy(), obs, rtol=1e-5, atol=1e-6)
        assert out["reward"].item() == pytest.approx(reward, rel=1e-5)


def test_car_racing_action_repeat_and_action_scaling():
    """CarRacing's gas and brake are in [0, 1]: agent action a is applied as (steer, (gas+1)/2, (brake+1)/2)."""
    cfg = env_config("car_racing", "env.seed=2")
    actions = random_actions(4, 3)
    outputs = step_actions(make_env(cfg), actions)
    raw = gymnasium.make("CarRacing-v3")
    raw.reset(seed=2)
    raw.reset()
    for action, out in zip(actions, outputs, strict=True):
        native = action.clone()
        native[1:] = (native[1:] + 1) / 2
        reward = 0.0
        for _ in range(2):
            obs, step_reward, *_ = raw.step(native.numpy())
            reward += step_reward
        assert out["reward"].item() == pytest.approx(reward, rel=1e-5)
        # Resized 96x96 -> 64x64: the mean colour is kept.
        np.testing.assert_allclose(out["pixels"].float().mean((1, 2)).numpy(), obs.mean((0, 1)), atol=1.0)


class CountingEnv(dm_env.Environment):
    """Reward k at its k-th step; terminates at step ``end``."""

    def __init__(self, end: int):
        self.end = end
        self.steps = 0

    def reset(self) -> dm_env.TimeStep:
        self.steps = 0
        return dm_env.restart(np.zeros(1))

    def step(self, action) -> dm_env.TimeStep:
        self.steps += 1
        if self.steps == self.end:
            return dm_env.termination(float(self.steps), np.zeros(1))
        return dm_env.transition(float(self.steps), np.zeros(1))

    def observation_spec(self):
        return dm_env.specs.Array((1,), np.float64)

    def action_spec(self):
        return dm_env.specs.Array((1,), np.float64)


def test_action_repeat_stops_at_the_episode_end():
    env = ActionRepeat(CountingEnv(end=5), repeat=3)
    env.reset()
    first = env.step(np.zeros(1))
    assert (first.reward, first.step_type, env.steps) == (1 + 2 + 3, dm_env.StepType.MID, 3)
    last = env.step(np.zeros(1))  # the inner episode ends after 2 of the 3 repeats
    assert (last.reward, last.step_type, last.discount, env.steps) == (4 + 5, dm_env.StepType.LAST, 0.0, 5)


def test_pixels_rendered_once_per_agent_step(monkeypatch):
    """The trap: TorchRL's frame_skip would render every repeated frame. We render only what the agent sees."""
    cfg = env_config("debug", "env.action_repeat=4")
    env = make_env(cfg)
    renders = []
    original_render = mujoco.Physics.render

    def counting_render(physics, *args, **kwargs):
        renders.append(physics.data.time)
        return original_render(physics, *args, **kwargs)

    monkeypatch.setattr(mujoco.Physics, "render", counting_render)
    outputs = step_actions(env, random_actions(5, 1))
    assert len(renders) == 1 + 5  # the reset, then one per agent step
    # Each render saw the frame after the last of the 4 repeated frames.
    frame_time = suite.load("cartpole", "balance").control_timestep()
    np.testing.assert_allclose(renders, [4 * frame_time * step for step in range(6)], atol=1e-9)
    # The observation is the current frame of the task's camera (0 for cartpole), at 64x64.
    monkeypatch.undo()
    physics = env.base_env._env.physics
    expected = torch.from_numpy(physics.render(64, 64, camera_id=0).copy()).permute(2, 0, 1)
    assert torch.equal(outputs[-1]["pixels"], expected)


def test_render_quality_fast_sets_renderer_and_paper_keeps_defaults():
    defaults = suite.load("cartpole", "balance").physics.model.vis.quality
    fast = make_env(env_config("debug")).base_env._env.physics.model.vis.quality
    paper = make_env(env_config("debug", "env.render_quality=paper")).base_env._env.physics.model.vis.quality
    assert (fast.offsamples, fast.shadowsize) == (0, 256)
    assert (paper.offsamples, paper.shadowsize) == (defaults.offsamples, defaults.shadowsize)


@pytest.mark.parametrize(("name", "frames", "agent_steps"), [("debug", 10, 5), ("pendulum", 7, 3)])
def test_episode_limit_in_frames(name, frames, agent_steps):
    """max_episode_frames // action_repeat agent steps (action_repeat = 2), then truncated, then a new episode."""
    env = make_env(env_config(name, f"env.max_episode_frames={frames}"))
    rollout = env.rollout(2 * agent_steps + 1, break_when_any_done=False)
    ends = [step for step in range(2 * agent_steps + 1) if rollout["next", "done"][step].item()]
    assert ends == [agent_steps - 1, 2 * agent_steps - 1]
    assert rollout["next", "truncated"][ends].all() and not rollout["next", "terminated"].any()
    assert rollout["step_count"][agent_steps].item() == 0  # the step after the limit starts a new episode


def test_dm_control_episode_limit_is_ours_not_the_task_default():
    """dm_control tasks stop at 1000 frames by themselves; max_episode_frames=1200 must give 600 agent steps."""
    env = make_env(env_config("dmc_states", "env.max_episode_frames=1200"))
    rollout = env.rollout(700)
    assert rollout.shape == (600,) and rollout["next", "truncated"][-1].item()
    assert not rollout["next", "done"][:-1].any()


@pytest.mark.parametrize("name", SHIPPED)
def test_seeding(name):
    key = EXPECTED[name][0]
    cfg = env_config(name, "env.seed=7")
    first = make_env(cfg).reset()[key]
    same = make_env(cfg).reset()[key]
    other = make_env(cfg, seed_offset=1).reset()[key]
    assert torch.equal(first, same)
    assert not torch.equal(first, other)


def test_grayscale_is_luma_of_rgb():
    rgb = make_env(env_config("debug")).reset()["pixels"]
    gray = make_env(env_config("debug", "env.grayscale=true")).reset()["pixels"]
    assert gray.shape == (1, 64, 64) and gray.dtype == torch.uint8
    luma = 0.299 * rgb[0].double() + 0.587 * rgb[1].double() + 0.114 * rgb[2].double()
    assert (gray[0].double() - luma).abs().max() <= 0.5 + 1e-6


def test_channels_first_pixels_transform():
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8)
    assert torch.equal(ChannelsFirstPixels(64)._apply_transform(image), image.permute(2, 0, 1))
    constant = torch.tensor([10, 120, 250], dtype=torch.uint8).expand(96, 96, 3)
    resized = ChannelsFirstPixels(64)._apply_transform(constant)
    assert resized.shape == (3, 64, 64) and resized.dtype == torch.uint8
    assert torch.equal(resized, torch.tensor([10, 120, 250], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 64))
    batch = torch.randint(0, 256, (2, 5, 96, 96, 3), dtype=torch.uint8)
    assert ChannelsFirstPixels(64, grayscale=True)._apply_transform(batch).shape == (2, 5, 1, 64, 64)


def counting_policy(td: TensorDict) -> TensorDict:
    """Adds 1 to each recurrent key and acts 0: the keys count the steps since the last reset."""
    for key in ("deter", "stoch", "prev_action"):
        td[key] = td[key] + 1
    td["action"] = torch.zeros_like(td["prev_action"])
    return td


def test_recurrent_primer_zeroes_state_at_every_reset():
    env = add_recurrent_primer(make_env(env_config("pendulum", "env.max_episode_frames=6")), 4, 3, 1)
    reset = env.reset()
    for key, dim in (("deter", 4), ("stoch", 3), ("prev_action", 1)):
        assert torch.equal(reset[key], torch.zeros(dim))
    rollout = env.rollout(8, counting_policy, break_when_any_done=False)  # episodes of 3 agent steps
    expected = (rollout["step_count"] + 1).float()  # 1, 2, 3, 1, 2, 3, 1, 2
    assert expected.squeeze(-1).tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    for key, dim in (("deter", 4), ("stoch", 3), ("prev_action", 1)):
        assert torch.equal(rollout[key], expected.expand(8, dim))


def test_parallel_envs_are_seeded_apart_and_primer_resets_per_copy():
    env = make_env(env_config("pendulum", "env.num_envs=2", "env.seed=11"))
    env = add_recurrent_primer(env, 2, 2, 1)
    try:
        assert env.batch_size == (2,)
        td = env.reset()
        single = [make_env(env_config("pendulum", f"env.seed={seed}")).reset()["observation"] for seed in (11, 12)]
        assert torch.equal(td["observation"], torch.stack(single))
        td = env.step(counting_policy(td))["next"]
        td = env.reset(td.set("_reset", torch.tensor([[True], [False]])))
        assert torch.equal(td["deter"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert td["step_count"].squeeze(-1).tolist() == [0, 1]
    finally:
        env.close()


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("dmc", ["env.backend=nope"], "Unknown env backend 'nope'; available: dm_control, gymnasium"),
        ("dmc", ["env.name=nope"], "Unknown dm_control domain 'nope'; available: acrobot, ball_in_cup, cartpole"),
        ("dmc", ["env.task=nope"], "Unknown task 'nope' for dm_control domain 'cheetah'; available: run"),
        ("pendulum", ["env.name=Nope-v0"], "Unknown gymnasium env id 'Nope-v0'; supported: CarRacing-v3"),
        ("car_racing", ["env.from_pixels=false"], "'CarRacing-v3' is not supported with from_pixels=False"),
        ("pendulum", ["env.from_pixels=true"], "'Pendulum-v1' is not supported with from_pixels=True"),
        ("dmc", ["env.render_quality=ultra"], "Unknown render_quality 'ultra'; available: paper, fast"),
        ("dmc", ["env.action_repeat=0"], "action_repeat must be an integer >= 1, got 0"),
        ("dmc", ["env.image_size=84"], "image_size=84 is not supported; allowed: 64"),
        ("dmc_states", ["env.grayscale=true"], "grayscale=true needs from_pixels=true"),
        ("dmc", ["env.max_episode_frames=1"], "max_episode_frames=1 is shorter than one agent step"),
    ],
)
def test_validation_errors_are_one_line(name, overrides, message):
    with pytest.raises(ValueError) as error:
        validate_env_config(env_config(name, *overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validation_builds_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("validate_env_config must not build an environment")

    monkeypatch.setattr(suite, "load", fail)
    monkeypatch.setattr(gymnasium, "make", fail)
    for name in SHIPPED:
        validate_env_config(env_config(name))


def test_other_gymnasium_state_envs():
    env = make_env(env_config("pendulum", "env.name=MountainCarContinuous-v0"))
    check_env_specs(env)
    assert env.reset()["observation"].shape == (2,)
    with pytest.raises(ValueError, match="'FrozenLake-v1' has a Discrete observation; supported: Box"):
        make_env(env_config("pendulum", "env.name=FrozenLake-v1"))
