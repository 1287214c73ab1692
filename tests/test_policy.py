"""Acting policy: filtering step, recurrent state carried through an env, resets, action bounds and exploration."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.envs import GymEnv, InitTracker, StepCounter, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from modules.actor import Actor, OneHotActor, TanhGaussianActor
from modules.mlp import build_mlp
from modules.policy import DreamerPolicy
from modules.rssm import RSSMPosterior, RSSMPrior, feature
from utils.envs import add_recurrent_primer

DETER, STOCH, EMBED, HIDDEN, OBS = 8, 4, 10, 16, 3
FEATURE = DETER + STOCH
NOISE = 0.3


def make_policy(
    action_dim: int = 2,
    actor: Actor | None = None,
    encoder: nn.Module | None = None,
    observation_key: str = "observation",
) -> DreamerPolicy:
    torch.manual_seed(0)
    return DreamerPolicy(
        encoder if encoder is not None else build_mlp(OBS, EMBED, HIDDEN, 1),
        RSSMPrior(action_dim, DETER, STOCH, HIDDEN),
        RSSMPosterior(EMBED, DETER, STOCH, HIDDEN),
        actor if actor is not None else TanhGaussianActor(FEATURE, action_dim, HIDDEN, 2),
        observation_key=observation_key,
        exploration_noise=NOISE,
    )


def acting_input(batch: tuple[int, ...], action_dim: int = 2) -> TensorDict:
    torch.manual_seed(1)
    return TensorDict(
        {
            "observation": torch.randn(*batch, OBS),
            "deter": torch.randn(*batch, DETER),
            "stoch": torch.randn(*batch, STOCH),
            "prev_action": torch.rand(*batch, action_dim) * 2 - 1,
        },
        batch_size=batch,
    )


def constant_actor(action_dim: int, discrete: bool, bias: list[float]) -> Actor:
    """An actor whose output ignores the feature: zero last-layer weights and the given bias."""
    if discrete:
        actor = OneHotActor(FEATURE, action_dim, HIDDEN, 1)
    else:
        actor = TanhGaussianActor(FEATURE, action_dim, HIDDEN, 1, init_std=1e-6, min_std=0.0)
    nn.init.zeros_(actor.net[-1].weight)
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor(bias))
    return actor


def test_keys_and_filtering_step() -> None:
    policy = make_policy()
    assert policy.in_keys == ["observation", "deter", "stoch", "prev_action"]
    assert policy.out_keys == ["action", ("next", "deter"), ("next", "stoch"), ("next", "prev_action")]
    td = acting_input((3,))
    torch.manual_seed(5)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        out = policy(td.clone())

    with torch.no_grad():
        deter = policy.prior.recurrent_step(td["deter"], td["stoch"], td["prev_action"])
        torch.manual_seed(5)
        _, _, stoch = policy.posterior(deter, policy.encoder(td["observation"]))
        action = policy.actor.mode(feature(deter, stoch))
    torch.testing.assert_close(out["next", "deter"], deter)
    torch.testing.assert_close(out["next", "stoch"], stoch)
    torch.testing.assert_close(out["action"], action)
    torch.testing.assert_close(out["next", "prev_action"], out["action"])
    assert not out["action"].requires_grad


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_output_shapes_follow_the_batch(batch: tuple[int, ...]) -> None:
    out = make_policy()(acting_input(batch))
    assert out["action"].shape == (*batch, 2)
    assert out["next", "deter"].shape == (*batch, DETER)
    assert out["next", "stoch"].shape == (*batch, STOCH)


def test_is_init_zeroes_the_state_of_starting_envs_only() -> None:
    policy = make_policy()
    td = acting_input((2,))
    td["is_init"] = torch.tensor([[True], [False]])
    out = policy(td.clone())
    with torch.no_grad():
        reset = policy.prior.recurrent_step(torch.zeros(DETER), torch.zeros(STOCH), torch.zeros(2))
        carried = policy.prior.recurrent_step(td["deter"][1], td["stoch"][1], td["prev_action"][1])
    torch.testing.assert_close(
        out["next", "deter"][0], reset, msg="at is_init the policy must zero the state and the previous action"
    )
    torch.testing.assert_close(out["next", "deter"][1], carried, msg="without is_init the policy must carry its state")


def test_state_is_carried_through_an_env_and_zeroed_at_resets() -> None:
    env = TransformedEnv(GymEnv("Pendulum-v1"), StepCounter(max_steps=3))
    env.append_transform(InitTracker())
    env = add_recurrent_primer(env, DETER, STOCH, 1)
    env.set_seed(0)
    policy = make_policy(action_dim=1)
    rollout = env.rollout(7, policy, break_when_any_done=False)
    env.close()

    is_init = rollout["is_init"].squeeze(-1)
    assert is_init.tolist() == [True, False, False, True, False, False, True]
    for key in ("deter", "stoch", "prev_action"):
        assert (rollout[key][is_init] == 0).all()
        torch.testing.assert_close(rollout[key][1:][~is_init[1:]], rollout["next", key][:-1][~is_init[1:]])
    assert (rollout["next", "deter"].abs().sum(-1) > 0).all()
    torch.testing.assert_close(rollout["next", "prev_action"], rollout["action"])


def test_pixels_are_normalised_before_the_encoder() -> None:
    seen: list[torch.Tensor] = []
    encoder = nn.Sequential(nn.Flatten(-3), nn.Linear(3 * 8 * 8, EMBED))
    encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    policy = make_policy(encoder=encoder, observation_key="pixels")
    assert policy.in_keys[0] == "pixels"
    td = acting_input((2,)).exclude("observation")
    td["pixels"] = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    policy(td)
    torch.testing.assert_close(seen[0], td["pixels"].float() / 255 - 0.5)


def test_continuous_actions_stay_in_bounds_in_both_modes() -> None:
    policy = make_policy(actor=constant_actor(2, discrete=False, bias=[2.0, -2.0, 0.0, 0.0]))
    td = acting_input((500,))
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mode_action = policy(td.clone())["action"]
    with set_exploration_type(ExplorationType.RANDOM):
        noisy_action = policy(td.clone())["action"]
    for action in (mode_action, noisy_action):
        assert action.abs().max() <= 1.0
    expected_mode = torch.tanh(5.0 * torch.tanh(torch.tensor([2.0, -2.0]) / 5.0))  # mean_scale 5
    torch.testing.assert_close(mode_action, expected_mode.expand(500, 2))
    # The mode is ±0.956: the noise pushes about 44% of the actions past the bound, where they are clipped.
    assert ((noisy_action[:, 0] == 1.0).float().mean() - 0.45).abs() < 0.07
    assert ((noisy_action[:, 1] == -1.0).float().mean() - 0.45).abs() < 0.07


def test_gaussian_exploration_noise_statistics() -> None:
    policy = make_policy(actor=constant_actor(2, discrete=False, bias=[0.0, 0.0, 0.0, 0.0]))
    td = acting_input((4000,))
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        mode_action = policy(td.clone())["action"]
    noisy_action = policy(td.clone())["action"]  # no exploration type set: explores, as under RANDOM
    noise = noisy_action - mode_action
    assert (noise.std() - NOISE).abs() < 0.01
    assert noise.mean().abs() < 0.01


def test_epsilon_greedy_rate_for_one_hot_actions() -> None:
    actions = 4
    actor = constant_actor(actions, discrete=True, bias=[30.0, 0.0, 0.0, 0.0])
    policy = make_policy(action_dim=actions, actor=actor)
    td = acting_input((4000,), action_dim=actions)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        greedy = policy(td.clone())["action"]
    with set_exploration_type(ExplorationType.RANDOM):
        explored = policy(td.clone())["action"]
    for action in (greedy, explored):
        assert ((action == 0) | (action == 1)).all() and (action.sum(-1) == 1).all()
    assert (greedy[:, 0] == 1).all()
    # A random action replaces the greedy one with probability epsilon and differs from it 3 times in 4.
    off_greedy = (explored[:, 0] == 0).float().mean()
    assert (off_greedy - NOISE * (actions - 1) / actions).abs() < 0.025
