"""Behaviour learning: λ-returns, discount weights, imagination, actor and value losses, and gradient routing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

from losses.behaviour import ActorLoss, ValueLoss, imagine
from losses.lambda_return import discount_weights, lambda_return
from modules.actor import OneHotActor, TanhGaussianActor
from modules.mlp import build_mlp
from modules.rssm import RSSMPosterior, RSSMPrior, RSSMRollout

DETER, STOCH, ACTION, EMBED, HIDDEN, OBS = 8, 4, 2, 10, 16, 5
FEATURE = DETER + STOCH
BATCH, TIME, HORIZON = 3, 4, 5
GAMMA, LAMBDA = 0.99, 0.95


class ActionBlindPrior(RSSMPrior):
    """A prior whose dynamics ignore the action: no gradient path from the actor's output into the trajectory."""

    def recurrent_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return super().recurrent_step(deter, stoch, torch.zeros_like(action))


def make_parts(
    continue_head: bool = True, discrete: bool = False, prior_class: type[RSSMPrior] = RSSMPrior
) -> SimpleNamespace:
    torch.manual_seed(0)
    prior = prior_class(ACTION, DETER, STOCH, HIDDEN)
    actor = OneHotActor(FEATURE, ACTION, HIDDEN, 2) if discrete else TanhGaussianActor(FEATURE, ACTION, HIDDEN, 2)
    parts = SimpleNamespace(
        encoder=build_mlp(OBS, EMBED, HIDDEN, 1),
        prior=prior,
        posterior=RSSMPosterior(EMBED, DETER, STOCH, HIDDEN),
        actor=actor,
        value=build_mlp(FEATURE, 1, HIDDEN, 2),
        reward_head=build_mlp(FEATURE, 1, HIDDEN, 2),
        continue_head=build_mlp(FEATURE, 1, HIDDEN, 2) if continue_head else None,
    )
    parts.actor_loss = ActorLoss(
        prior,
        actor,
        parts.value,
        parts.reward_head,
        parts.continue_head,
        horizon=HORIZON,
        discount=GAMMA,
        lambda_=LAMBDA,
    )
    parts.value_loss = ValueLoss(parts.value)
    return parts


def posterior_states(parts: SimpleNamespace) -> TensorDict:
    """Posterior ``deter``/``stoch`` ``[B, T, *]`` filtered from random observations, with the encoder's graph."""
    observation = torch.randn(BATCH, TIME, OBS)
    action = torch.rand(BATCH, TIME, ACTION) * 2 - 1
    is_first = torch.zeros(BATCH, TIME, 1, dtype=torch.bool)
    is_first[:, 0] = True
    states = RSSMRollout(parts.prior, parts.posterior)(parts.encoder(observation), action, is_first)
    return TensorDict({"deter": states["deter"], "stoch": states["stoch"]}, batch_size=[BATCH, TIME])


def loop_lambda_return(
    reward: torch.Tensor, value: torch.Tensor, discount: torch.Tensor, lambda_: float
) -> torch.Tensor:
    """Independent reference: the authors' recursion, one scalar at a time."""
    horizon, starts = reward.shape[:2]
    returns = torch.zeros(horizon - 1, starts, 1, dtype=torch.float64)
    for n in range(starts):
        running = value[horizon - 1, n, 0].item()
        for t in reversed(range(horizon - 1)):
            bootstrap = (1 - lambda_) * value[t + 1, n, 0].item() + lambda_ * running
            running = reward[t, n, 0].item() + discount[t, n, 0].item() * bootstrap
            returns[t, n, 0] = running
    return returns


def loop_discount_weights(discount: torch.Tensor) -> torch.Tensor:
    horizon, starts = discount.shape[:2]
    weights = torch.ones(horizon - 1, starts, 1, dtype=torch.float64)
    for n in range(starts):
        for t in range(1, horizon - 1):
            weights[t, n, 0] = weights[t - 1, n, 0] * discount[t - 1, n, 0].item()
    return weights


def random_trajectory(horizon: int = 7, starts: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards, values and discounts ``[H, N, 1]``; discounts vary and include hard episode ends (zeros)."""
    torch.manual_seed(3)
    reward = torch.randn(horizon, starts, 1)
    value = torch.randn(horizon, starts, 1) * 3
    discount = GAMMA * torch.rand(horizon, starts, 1) * (torch.rand(horizon, starts, 1) > 0.25)
    assert (discount == 0).any() and (discount > 0).any()
    return reward, value, discount


def test_lambda_return_matches_loop_with_continue_mask() -> None:
    reward, value, discount = random_trajectory()
    returns = lambda_return(reward, value, discount, LAMBDA)
    assert returns.shape == (6, 6, 1)
    torch.testing.assert_close(returns.double(), loop_lambda_return(reward, value, discount, LAMBDA))


def test_lambda_return_limits() -> None:
    """λ=1: discounted Monte-Carlo return bootstrapped at the end; λ=0: one-step TD targets."""
    reward, value, discount = random_trajectory(horizon=3, starts=4)
    r, v, g = reward, value, discount
    monte_carlo = torch.stack([r[0] + g[0] * r[1] + g[0] * g[1] * v[2], r[1] + g[1] * v[2]])
    torch.testing.assert_close(lambda_return(reward, value, discount, 1.0), monte_carlo)
    one_step = torch.stack([r[0] + g[0] * v[1], r[1] + g[1] * v[2]])
    torch.testing.assert_close(lambda_return(reward, value, discount, 0.0), one_step)


def test_lambda_return_is_differentiable_and_ignores_the_last_reward() -> None:
    reward, value, discount = (x.requires_grad_() for x in random_trajectory())
    lambda_return(reward, value, discount, LAMBDA).sum().backward()
    assert reward.grad[:-1].abs().min() > 0 and (reward.grad[-1] == 0).all()
    assert value.grad[1:].abs().sum() > 0 and (value.grad[0] == 0).all()
    assert discount.grad.abs().sum() > 0


def test_discount_weights_match_loop() -> None:
    _, _, discount = random_trajectory()
    weights = discount_weights(discount.requires_grad_())
    assert weights.shape == (6, 6, 1) and not weights.requires_grad
    torch.testing.assert_close(weights.double(), loop_discount_weights(discount))


def test_imagination_shapes_and_detached_starts() -> None:
    parts = make_parts()
    start_deter = torch.randn(7, DETER, requires_grad=True)
    start_stoch = torch.randn(7, STOCH, requires_grad=True)
    trajectory = imagine(parts.prior, parts.actor, start_deter, start_stoch, HORIZON)
    expected = {"deter": DETER, "stoch": STOCH, "feature": FEATURE, "action": ACTION}
    for key, size in expected.items():
        assert trajectory[key].shape == (HORIZON, 7, size)
    assert trajectory["action_log_prob"].shape == (HORIZON, 7)
    torch.testing.assert_close(trajectory["feature"], torch.cat([trajectory["deter"], trajectory["stoch"]], -1))
    trajectory["feature"].sum().backward()
    assert start_deter.grad is None and start_stoch.grad is None


def test_imagination_first_state_follows_the_prior_from_the_start() -> None:
    parts = make_parts()
    start_deter, start_stoch = torch.randn(7, DETER), torch.randn(7, STOCH)
    trajectory = imagine(parts.prior, parts.actor, start_deter, start_stoch, HORIZON)
    first_deter = parts.prior.recurrent_step(start_deter, start_stoch, trajectory["action"][0])
    torch.testing.assert_close(trajectory["deter"][0], first_deter)


def test_actor_loss_reaches_neither_encoder_nor_posterior() -> None:
    parts = make_parts()
    output = parts.actor_loss(posterior_states(parts))
    output["loss_actor"].backward()
    for module in (parts.encoder, parts.posterior):
        assert all(p.grad is None for p in module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.actor.parameters())


def test_actor_input_is_detached() -> None:
    parts = make_parts()
    input_requires_grad: list[bool] = []
    parts.actor.net.register_forward_pre_hook(lambda _, args: input_requires_grad.append(args[0].requires_grad))
    trajectory = imagine(parts.prior, parts.actor, torch.randn(7, DETER), torch.randn(7, STOCH), HORIZON)
    assert len(input_requires_grad) == HORIZON and not any(input_requires_grad)
    # The imagined states themselves depend on the actor's sampled actions.
    assert trajectory["feature"].requires_grad


def test_actor_gradient_only_through_actions_into_the_dynamics() -> None:
    blind = make_parts(prior_class=ActionBlindPrior)
    blind.actor_loss(posterior_states(blind).detach())["loss_actor"].backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in blind.actor.parameters())

    seeing = make_parts()
    seeing.actor_loss(posterior_states(seeing).detach())["loss_actor"].backward()
    assert sum(p.grad.abs().sum() for p in seeing.actor.parameters()) > 0


@pytest.mark.parametrize("continue_head", [True, False])
def test_actor_loss_matches_independent_computation(continue_head: bool) -> None:
    parts = make_parts(continue_head=continue_head)
    states = posterior_states(parts).detach()
    torch.manual_seed(11)
    output = parts.actor_loss(states)
    # With a continue head the last step of each sequence starts no imagination (the authors': it could be terminal).
    starts = states[:, :-1] if continue_head else states
    torch.manual_seed(11)
    trajectory = imagine(
        parts.prior, parts.actor, starts["deter"].reshape(-1, DETER), starts["stoch"].reshape(-1, STOCH), HORIZON
    )
    features = trajectory["feature"]
    reward, value = parts.reward_head(features), parts.value(features)
    if continue_head:
        discount = GAMMA / (1 + torch.exp(-parts.continue_head(features)))
    else:
        discount = torch.full_like(reward, GAMMA)
    returns = loop_lambda_return(reward, value, discount, LAMBDA)
    weights = loop_discount_weights(discount)
    if not continue_head:
        gamma_powers = GAMMA ** torch.arange(HORIZON - 1, dtype=torch.float64)
        torch.testing.assert_close(weights, gamma_powers.view(-1, 1, 1).expand_as(weights))

    torch.testing.assert_close(output["loss_actor"].double(), -(weights * returns).mean())
    torch.testing.assert_close(output["target_return"].double(), returns)
    torch.testing.assert_close(output["discount_weight"].double(), weights)
    torch.testing.assert_close(output["imagined_feature"], features[:-1])
    torch.testing.assert_close(output["imagined_reward"], reward.mean())
    torch.testing.assert_close(output["imagined_return"].double(), returns.mean())
    torch.testing.assert_close(output["actor_entropy"], -trajectory["action_log_prob"].mean())
    n = BATCH * (TIME - 1) if continue_head else BATCH * TIME
    assert output["imagined_feature"].shape == (HORIZON - 1, n, FEATURE)
    assert output["target_return"].shape == output["discount_weight"].shape == (HORIZON - 1, n, 1)
    for key in ("imagined_feature", "target_return", "discount_weight", "actor_entropy", "imagined_return"):
        assert not output[key].requires_grad


def test_saturation_diagnostics_match_the_actor_on_the_imagined_states() -> None:
    """``actor/mean_abs``, ``actor/std_median`` and ``actor/saturated_fraction`` recomputed from the actor's Gaussian
    at every state an action was taken in (the start and the first ``H - 1`` imagined states)."""
    parts = make_parts(continue_head=False)
    torch.nn.init.normal_(parts.actor.net[-1].weight, std=3.0)  # spread the means over the saturated range too
    states = posterior_states(parts).detach()
    torch.manual_seed(5)
    output = parts.actor_loss(states)
    torch.manual_seed(5)
    trajectory = imagine(
        parts.prior, parts.actor, states["deter"].reshape(-1, DETER), states["stoch"].reshape(-1, STOCH), HORIZON
    )
    start = torch.cat([states["deter"], states["stoch"]], -1).reshape(1, -1, FEATURE)
    acting_features = torch.cat([start, trajectory["feature"][:-1]])
    mean, std = (x.detach() for x in parts.actor.gaussian(acting_features))
    on_acting_states = "the actor's diagnostics must come from the states it acted in (start, then imagined)"
    torch.testing.assert_close(output["actor/mean_abs"], mean.abs().mean(), msg=on_acting_states)
    torch.testing.assert_close(
        output["actor/std_median"], std.flatten().sort().values[(std.numel() - 1) // 2], msg=on_acting_states
    )
    saturated = (trajectory["action"].abs() > 0.99).double().mean()
    assert 0.0 < saturated < 1.0
    torch.testing.assert_close(output["actor/saturated_fraction"].double(), saturated)


def test_a_one_hot_actor_has_no_saturation_diagnostics() -> None:
    parts = make_parts(discrete=True)
    output = parts.actor_loss(posterior_states(parts).detach())
    assert not any(key.startswith("actor/") for key in output.keys(include_nested=True))


def test_actor_entropy_of_a_uniform_policy_is_log_num_actions() -> None:
    parts = make_parts(discrete=True)
    torch.nn.init.zeros_(parts.actor.net[-1].weight)
    torch.nn.init.zeros_(parts.actor.net[-1].bias)
    output = parts.actor_loss(posterior_states(parts).detach())
    torch.testing.assert_close(output["actor_entropy"], torch.tensor(math.log(ACTION)))


def test_actor_optimiser_step_changes_only_the_actor() -> None:
    parts = make_parts()
    others = [parts.encoder, parts.prior, parts.posterior, parts.value, parts.reward_head, parts.continue_head]
    before = [[p.detach().clone() for p in module.parameters()] for module in others]
    actor_before = [p.detach().clone() for p in parts.actor.parameters()]
    optimiser = torch.optim.Adam(parts.actor.parameters(), lr=1e-3)

    parts.actor_loss(posterior_states(parts))["loss_actor"].backward()
    assert all(p.grad is not None for p in parts.actor.parameters())
    optimiser.step()

    for module, saved in zip(others, before, strict=True):
        for parameter, old in zip(module.parameters(), saved, strict=True):
            assert torch.equal(parameter, old)
    assert all(not torch.equal(p, old) for p, old in zip(parts.actor.parameters(), actor_before, strict=True))


def test_value_loss_reaches_only_the_value_and_matches_hand_computation() -> None:
    parts = make_parts()
    actor_output = parts.actor_loss(posterior_states(parts))
    value_output = parts.value_loss(actor_output)
    value_output["loss_value"].backward()

    prediction = parts.value(actor_output["imagined_feature"]).double()
    target, weight = actor_output["target_return"].double(), actor_output["discount_weight"].double()
    negative_log_likelihood = 0.5 * (prediction - target) ** 2 + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(value_output["loss_value"].double(), (weight * negative_log_likelihood).mean())
    torch.testing.assert_close(value_output["value_mean"].double(), prediction.mean())

    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.value.parameters())
    for module in (parts.encoder, parts.prior, parts.posterior, parts.actor, parts.reward_head, parts.continue_head):
        assert all(p.grad is None for p in module.parameters())


def test_horizon_below_two_is_refused() -> None:
    parts = make_parts()
    with pytest.raises(ValueError, match="horizon"):
        ActorLoss(parts.prior, parts.actor, parts.value, parts.reward_head, horizon=1)


def gru_cell_by_hand(x: torch.Tensor, h: torch.Tensor, gru: torch.nn.GRUCell) -> torch.Tensor:
    """PyTorch's GRUCell equations (gates stacked reset, update, new) written out."""
    input_r, input_z, input_n = (x @ gru.weight_ih.T + gru.bias_ih).chunk(3, -1)
    hidden_r, hidden_z, hidden_n = (h @ gru.weight_hh.T + gru.bias_hh).chunk(3, -1)
    reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
    new = torch.tanh(input_n + reset * hidden_n)
    return (1 - update) * new + update * h


def test_imagination_matches_a_hand_written_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the same noise, ``imagine`` and a loop written from the equations agree at every step: the actor's
    tanh-Gaussian sample on the current state, then ``h' = GRU(h, [z, a])`` and ``z' ~ N(prior(h'))``."""
    parts = make_parts()
    starts = 5
    generator = torch.Generator().manual_seed(7)
    action_noise = [torch.randn(starts, ACTION, generator=generator) for _ in range(HORIZON)]
    state_noise = [torch.randn(starts, STOCH, generator=generator) for _ in range(HORIZON)]
    queues = {"action": iter(action_noise), "state": iter(state_noise)}
    monkeypatch.setattr(
        torch.distributions.normal, "_standard_normal", lambda shape, dtype, device: next(queues["action"]).to(dtype)
    )
    monkeypatch.setattr("modules.rssm.sample_gaussian", lambda mean, std: mean + std * next(queues["state"]))
    start_deter, start_stoch = torch.randn(starts, DETER), torch.randn(starts, STOCH)
    trajectory = imagine(parts.prior, parts.actor, start_deter, start_stoch, HORIZON)
    assert next(queues["action"], None) is None and next(queues["state"], None) is None, "noise draws per step"

    actor, prior = parts.actor, parts.prior
    deter, stoch = start_deter, start_stoch
    with torch.no_grad():
        for t in range(HORIZON):
            raw_mean, raw_std = actor.net(torch.cat([deter, stoch], -1)).chunk(2, -1)
            mean = actor.mean_scale * torch.tanh(raw_mean / actor.mean_scale)
            std = torch.nn.functional.softplus(raw_std + actor.raw_init_std) + actor.min_std
            action = torch.tanh(mean + std * action_noise[t])
            deter = gru_cell_by_hand(prior.input_layer(torch.cat([stoch, action], -1)), deter, prior.gru)
            prior_mean, prior_raw_std = prior.output_layer(deter).chunk(2, -1)
            stoch = prior_mean + (torch.nn.functional.softplus(prior_raw_std) + prior.min_std) * state_noise[t]
            for key, expected in (("action", action), ("deter", deter), ("stoch", stoch)):
                torch.testing.assert_close(
                    trajectory[key][t],
                    expected,
                    msg=f"imagined {key} at step {t} differs from the hand-written rollout",
                )
