"""DreamerV3's losses and update against the authors' equations (danijar/dreamerv3: ``agent.py`` ``loss``,
``imag_loss``, ``repl_loss``, ``lambda_return``; ``rssm.py`` ``RSSM.loss``; ``embodied/jax/outs.py`` ``TwoHot``,
``MSE``, ``Binary``; ``embodied/jax/utils.py`` ``Normalize``, ``SlowModel``).

Every expectation is recomputed here with plain loops and NumPy (float64) from the networks' raw outputs; nothing
below calls the loss code under test to build an expected value. The model is ``experiment=debug_v3`` on Pendulum
(3-dim states, 1-dim actions), a few thousand parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from losses.behaviour_v3 import replay_last
from losses.lambda_return import lambda_return, lambda_return_v3
from utils.agent import Agent, build_agent
from utils.config import compose_config
from utils.train import updates_due

B, T = 3, 6
LAMBDA = 0.95
# Reward and value heads start at exactly 0 (outscale 0): the gradient and hand-computation tests give them
# random output layers so that rewards, values and their gradients are not trivially zero.
LIVE_HEADS = ("model.reward_outscale=1.0", "model.value_outscale=1.0")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread (tiny networks; on a busy 2-core machine a second thread makes them several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_agent(*overrides: str, seed: int = 0) -> Agent:
    torch.manual_seed(seed)
    return build_agent(compose_config("experiment=debug_v3", "env=pendulum", *overrides), torch.device("cpu"), None)


def replay_batch(seed: int = 1) -> TensorDict:
    """A ``[B, T]`` Pendulum batch in the replay layout with an episode end by termination (sequence 0: terminal
    at t=3, next episode from t=4) and one by truncation (sequence 1: a new episode from t=2)."""
    generator = torch.Generator().manual_seed(seed)
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 4] = is_first[1, 2] = True
    terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    terminated[0, 3] = True
    action = (torch.rand(B, T, 1, generator=generator) * 2 - 1).masked_fill(is_first, 0.0)
    reward = (torch.randn(B, T, 1, generator=generator) * 3).masked_fill(is_first, 0.0)
    return TensorDict(
        {
            "observation": torch.randn(B, T, 3, generator=generator) * 4,
            "action": action,
            "reward": reward,
            "terminated": terminated,
            "is_first": is_first,
        },
        batch_size=[B, T],
    )


# ---------------------------------------------------------------------------------------------------------------
# The authors' equations, written out (float64).


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def authors_lambda_return(last, term, rew, boot, disc: float, lam: float) -> np.ndarray:
    """``agent.py: lambda_return`` one scalar at a time: ``[N, L]`` -> ``[N, L - 1]``."""
    n_rows, length = rew.shape
    out = np.zeros((n_rows, length - 1))
    for n in range(n_rows):
        ret = boot[n, -1]
        for t in reversed(range(length - 1)):
            live = (1.0 - term[n, t + 1]) * disc
            cont = (1.0 - last[n, t + 1]) * lam
            ret = rew[n, t + 1] + (1.0 - cont) * live * boot[n, t + 1] + live * cont * ret
            out[n, t] = ret
    return out


def authors_bins(num: int = 255) -> np.ndarray:
    """``heads.py: symexp_twohot``: the negative half of ``symexp(linspace(-20, 20))`` mirrored (float32)."""
    half = np.linspace(-20, 0, (num - 1) // 2 + 1, dtype=np.float32)
    half = np.sign(half) * np.expm1(np.abs(half))
    return np.concatenate([half, -half[:-1][::-1]]).astype(np.float64)


BINS = authors_bins()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def twohot_pred(logits: np.ndarray) -> np.ndarray:
    """``TwoHot.pred``: the expectation of the bins under ``softmax(logits)``."""
    return (np.exp(log_softmax(logits)) * BINS).sum(-1)


def twohot_loss(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``TwoHot.loss`` for each scalar target: ``logits [*, K]``, ``target [*]`` -> ``[*]``."""
    flat_logits, flat_target = logits.reshape(-1, len(BINS)), target.reshape(-1)
    out = np.zeros(len(flat_target))
    top = len(BINS) - 1
    for i, y in enumerate(flat_target):
        below = min(max(int((y >= BINS).sum()) - 1, 0), top)
        above = min(max(len(BINS) - int((y < BINS).sum()), 0), top)
        if below == above:
            weights = {below: 1.0}
        else:
            to_below, to_above = abs(BINS[below] - y), abs(BINS[above] - y)
            weights = {below: to_above / (to_below + to_above), above: to_below / (to_below + to_above)}
        log_pred = log_softmax(flat_logits[i])
        out[i] = -sum(weight * log_pred[k] for k, weight in weights.items())
    return out.reshape(target.shape)


def symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def unimix_categorical_kl(post_logits: np.ndarray, prior_logits: np.ndarray, unimix: float) -> np.ndarray:
    """``KL[q || p]`` of ``OneHot(logits, unimix)`` distributions ``[B, T, G, K]``, summed over the groups."""
    classes = post_logits.shape[-1]
    q = (1 - unimix) * np.exp(log_softmax(post_logits)) + unimix / classes
    p = (1 - unimix) * np.exp(log_softmax(prior_logits)) + unimix / classes
    return (q * (np.log(q) - np.log(p))).sum((-1, -2))


def grads_by_group(loss: torch.Tensor, groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """Total absolute gradient of ``loss`` per named parameter group (0.0 where nothing reaches it)."""
    names = list(groups)
    flat = [p for name in names for p in groups[name]]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    totals, index = {}, 0
    for name in names:
        count = len(groups[name])
        totals[name] = sum(0.0 if g is None else g.abs().sum().item() for g in grads[index : index + count])
        index += count
    return totals


def parameter_groups(agent: Agent) -> dict[str, list[torch.nn.Parameter]]:
    world_model = agent.world_model
    return {
        "actor": list(agent.actor.parameters()),
        "value": list(agent.value.parameters()),
        "encoder": list(world_model.encoder.parameters()),
        "posterior": list(world_model.rssm.posterior.parameters()),
        "prior": list(world_model.rssm.prior.parameters()),
        "decoder": list(world_model.decoder.parameters()),
        "reward_head": list(world_model.reward_head.parameters()),
        "continue_head": list(world_model.continue_head.parameters()),
    }


WORLD_MODEL_GROUPS = ("encoder", "posterior", "prior", "decoder", "reward_head", "continue_head")


# ---------------------------------------------------------------------------------------------------------------
# λ-returns and replay flags.


def test_lambda_return_v3_matches_the_authors_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, length, discount = 5, 7, 0.97
    last = (torch.rand(rows, length, generator=generator) < 0.25).float()
    terminal = (torch.rand(rows, length, generator=generator) < 0.2).float()
    last[0, 3] = terminal[1, 4] = 1.0  # at least one of each, away from the ends
    reward, bootstrap = torch.randn(rows, length, generator=generator), torch.randn(rows, length, generator=generator)
    got = lambda_return_v3(last, terminal, reward, bootstrap, discount, LAMBDA)
    expected = authors_lambda_return(*map(np64, (last, terminal, reward, bootstrap)), discount, LAMBDA)
    assert got.shape == (rows, length - 1)
    np.testing.assert_allclose(np64(got), expected, rtol=1e-5, atol=1e-6)
    # A last step cuts the return: R_t = r_{t+1} + live_t * bootstrap_{t+1} where step t+1 is last.
    np.testing.assert_allclose(
        got[0, 2].item(), (reward[0, 3] + (1 - terminal[0, 3]) * discount * bootstrap[0, 3]).item(), rtol=1e-6
    )


def test_lambda_return_v3_in_imagination_is_v1_lambda_return_on_shifted_rewards() -> None:
    """``last = 0``, ``terminal = 1 - c``, discount 1: the V1 recursion (time-major ``[H, N, 1]``) with reward and
    discount ``t`` taken from imagined step ``t + 1``."""
    generator = torch.Generator().manual_seed(1)
    starts, length = 4, 6
    reward, value = torch.randn(starts, length, generator=generator), torch.randn(starts, length, generator=generator)
    cont = torch.rand(starts, length, generator=generator) * 0.99
    v3 = lambda_return_v3(torch.zeros_like(cont), 1 - cont, reward, value, 1.0, LAMBDA)

    def time_major(x: torch.Tensor) -> torch.Tensor:
        return x.T.unsqueeze(-1)

    def shift(x: torch.Tensor) -> torch.Tensor:  # step t + 1's value at t (the last entry is never read)
        return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)

    v1 = lambda_return(time_major(shift(reward)), time_major(value), time_major(shift(cont)), LAMBDA)
    torch.testing.assert_close(v3, v1.squeeze(-1).T, rtol=1e-5, atol=1e-6)


def test_replay_last_is_the_next_first_or_a_terminal_step() -> None:
    batch = replay_batch()
    is_first, terminated = batch["is_first"].squeeze(-1), batch["terminated"].squeeze(-1)
    got = replay_last(is_first, terminated)
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            next_first = t + 1 < T and bool(is_first[b, t + 1])
            expected[b, t] = float(next_first or bool(terminated[b, t]))
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert expected[0, 3] == 1 and expected[1, 1] == 1 and expected[:, -1].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# World-model loss.

WM_SCALES = {"rec_scale": 0.7, "reward_loss_scale": 1.3, "continue_scale": 0.9, "dyn_scale": 0.6, "rep_scale": 0.2}


def test_world_model_loss_terms_match_the_authors_equations() -> None:
    agent = make_agent(*LIVE_HEADS, *(f"optimization.{k}={v}" for k, v in WM_SCALES.items()))
    loss = agent.update.world_model_loss
    # Free nats between the smallest and the largest KL of this batch, so that the clamp matters somewhere.
    torch.manual_seed(3)
    probe = replay_batch()
    loss(probe)
    kl = unimix_categorical_kl(np64(probe["post_logits"]), np64(probe["prior_logits"]), 0.01)
    assert kl.min() < kl.max()
    free_nats = float(np.median(kl))
    loss.free_nats = free_nats

    torch.manual_seed(3)
    td = replay_batch()
    terms = loss(td)
    np.testing.assert_allclose(np64(td["post_logits"]), np64(probe["post_logits"]))  # same sampling noise

    observation = np64(td["observation"])
    rec = ((np64(td["reconstruction"]) - symlog(observation)) ** 2).sum(-1)  # symlog MSE summed over the state
    rew = twohot_loss(np64(td["reward_pred"]), np64(td["reward"])[..., 0])
    cont_target = (1 - np64(td["terminated"])[..., 0]) * (1 - 1 / 333)
    logit = np64(td["continue_logit"])[..., 0]
    con = -(cont_target * np.log(sigmoid(logit)) + (1 - cont_target) * np.log(sigmoid(-logit)))
    kl = unimix_categorical_kl(np64(td["post_logits"]), np64(td["prior_logits"]), 0.01)
    clamped = np.maximum(kl, free_nats)  # per step, then averaged; dyn and rep have the same value
    expected = {
        "loss_observation": WM_SCALES["rec_scale"] * rec.mean(),
        "loss_reward": WM_SCALES["reward_loss_scale"] * rew.mean(),
        "loss_continue": WM_SCALES["continue_scale"] * con.mean(),
        "loss_dynamics": WM_SCALES["dyn_scale"] * clamped.mean(),
        "loss_representation": WM_SCALES["rep_scale"] * clamped.mean(),
        "kl": kl.mean(),
        "kl/above_free_nats": (kl > free_nats).mean(),
    }
    expected["loss_world_model"] = sum(expected[k] for k in list(expected)[:5])
    for key, value in expected.items():
        np.testing.assert_allclose(terms[key].item(), value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < expected["kl/above_free_nats"] < 1
    assert terms["loss_world_model"].requires_grad


class FixedOutputs(torch.nn.Module):
    """Stands in for the world model inside the loss: the batch already holds its outputs."""

    from_pixels = False

    def forward(self, td: TensorDict) -> TensorDict:
        return td


@pytest.mark.parametrize("term", ["dyn", "rep"])
def test_dynamics_kl_trains_the_prior_logits_and_representation_kl_the_posterior(term: str) -> None:
    agent = make_agent()
    loss = agent.update.world_model_loss
    loss.free_nats = 0.0
    loss.rec_scale = loss.reward_scale = loss.continue_scale = 0.0
    loss.dyn_scale, loss.rep_scale = (1.0, 0.0) if term == "dyn" else (0.0, 1.0)
    td = replay_batch()
    # Parameters: the representation loss never reaches the prior's logit layers (sg(prior)); the dynamics loss does.
    prior_head = list(agent.world_model.rssm.prior.core.rnn_to_prior_projector.parameters())
    reached = grads_by_group(loss(td)["loss_world_model"], {"prior_head": prior_head})["prior_head"]
    assert (reached > 0) == (term == "dyn"), reached
    # Logits: with the logits as leaves (no path through the recurrent state), each KL reaches one side only.
    td["post_logits"] = td["post_logits"].detach().requires_grad_()
    td["prior_logits"] = td["prior_logits"].detach().requires_grad_()
    loss.world_model = FixedOutputs()
    terms = loss(td)
    post, prior = torch.autograd.grad(terms["loss_world_model"], [td["post_logits"], td["prior_logits"]])
    trained, stopped = (prior, post) if term == "dyn" else (post, prior)
    assert trained.abs().sum() > 0, f"{term}: no gradient reaches the logits it trains"
    assert torch.equal(stopped, torch.zeros_like(stopped)), f"{term}: gradient leaks into the stopped side"
    # The gradient is the KL's: d/d logits of mean_steps sum_gk q log(q / p), unimix probabilities (by hand).
    classes, unimix = td["post_logits"].shape[-1], 0.01
    soft_q, soft_p = np.exp(log_softmax(np64(td["post_logits"]))), np.exp(log_softmax(np64(td["prior_logits"])))
    q, p = (1 - unimix) * soft_q + unimix / classes, (1 - unimix) * soft_p + unimix / classes
    if term == "dyn":  # d KL / d p = -q / p
        upstream, soft = -q / p, soft_p
    else:  # d KL / d q = log(q / p) + 1
        upstream, soft = np.log(q / p) + 1, soft_q
    dsoft = (1 - unimix) * upstream / (B * T)
    by_hand = soft * (dsoft - (dsoft * soft).sum(-1, keepdims=True))
    np.testing.assert_allclose(np64(trained), by_hand, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour losses.

BEHAVIOUR_SETTINGS = (
    "optimization.actor_scale=0.8",
    "optimization.value_scale=1.1",
    "optimization.repval_scale=0.4",
    "optimization.actor_entropy=0.05",
    "optimization.slowreg_scale=0.5",
)


def behaviour_inputs(*overrides: str) -> SimpleNamespace:
    """An agent with live heads and the replay batch after its world model ran on it (``deter``, ``stoch`` and
    ``feature`` written, ``feature`` with its graph)."""
    agent = make_agent(*LIVE_HEADS, *overrides)
    td = replay_batch()
    torch.manual_seed(2)
    agent.world_model(td)
    return SimpleNamespace(agent=agent, td=td, loss=agent.update.behaviour_loss)


def test_reinforce_losses_reach_only_their_own_parameters() -> None:
    parts = behaviour_inputs()
    terms = parts.loss(parts.td)
    groups = parameter_groups(parts.agent)
    actor = grads_by_group(terms["loss_actor"], groups)
    assert actor["actor"] > 0
    assert all(actor[name] == 0 for name in groups if name != "actor"), actor
    value = grads_by_group(terms["loss_value"], groups)
    assert value["value"] > 0
    assert all(value[name] == 0 for name in groups if name != "value"), value
    repval = grads_by_group(terms["loss_repval"], groups)
    assert repval["value"] > 0 and repval["encoder"] > 0 and repval["posterior"] > 0 and repval["prior"] > 0, repval
    assert repval["actor"] == repval["decoder"] == repval["reward_head"] == repval["continue_head"] == 0, repval
    assert not any(p.requires_grad for p in parts.loss.slow_value.parameters())


def test_behaviour_losses_match_the_authors_imag_loss_and_repl_loss() -> None:
    parts = behaviour_inputs(*BEHAVIOUR_SETTINGS)
    loss, agent, td = parts.loss, parts.agent, parts.td
    # A return scale above its floor of 1, so that the division by it is checked.
    low_before, high_before = -3.0, 2.0
    loss.return_norm.low.fill_(low_before)
    loss.return_norm.high.fill_(high_before)
    torch.manual_seed(5)
    terms = loss(td)
    torch.manual_seed(5)  # the same imagined trajectory: imagination draws first in forward
    features, actions = loss.imagine(td["deter"].flatten(0, 1), td["stoch"].flatten(0, 1))
    with torch.no_grad():
        reward_logits = np64(agent.world_model.reward_head(features))
        cont_logit = np64(agent.world_model.continue_head(features))[..., 0]
        value_logits = np64(agent.value(features))
        slow_logits = np64(loss.slow_value(features))
        raw = np64(agent.actor.net(features))
        replay_logits = np64(agent.value(td["feature"]))
        replay_slow_logits = np64(loss.slow_value(td["feature"]))
    actions = np64(actions)
    horizon = features.shape[1] - 1
    assert features.shape[:2] == (B * T, 4 + 1)

    # imag_loss (contdisc: disc = 1, the continue head carries the discount; slowtar False).
    reward, cont, value = twohot_pred(reward_logits), sigmoid(cont_logit), twohot_pred(value_logits)
    weight = np.cumprod(cont, axis=1)
    returns = authors_lambda_return(np.zeros_like(cont), 1 - cont, reward, value, 1.0, LAMBDA)
    low = 0.99 * low_before + 0.01 * np.percentile(returns, 5)
    high = 0.99 * high_before + 0.01 * np.percentile(returns, 95)
    scale = max(1.0, high - low)
    assert scale > 1.0
    advantage = (returns - value[:, :horizon]) / scale
    mean_raw, std_raw = raw[:, :horizon, :1], raw[:, :horizon, 1:]
    mean, std = np.tanh(mean_raw), 0.9 * sigmoid(std_raw + 2) + 0.1
    taken = actions[:, :horizon]
    logpi = (-0.5 * ((taken - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + np.log(std)).sum(-1)
    policy = -(weight[:, :horizon] * (logpi * advantage + 0.05 * entropy))
    critic = twohot_loss(value_logits[:, :horizon], returns) + 0.5 * twohot_loss(
        value_logits[:, :horizon], twohot_pred(slow_logits)[:, :horizon]
    )
    value_loss = weight[:, :horizon] * critic

    # repl_loss: bootstrapped with each replay state's imagined return, cut at episode ends.
    is_first, terminated = np64(td["is_first"])[..., 0], np64(td["terminated"])[..., 0]
    last = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            last[b, t] = float(terminated[b, t] or (t + 1 < T and is_first[b, t + 1]))
    boot = returns[:, 0].reshape(B, T)
    replay_returns = authors_lambda_return(last, terminated, np64(td["reward"])[..., 0], boot, 1 - 1 / 333, LAMBDA)
    replay_critic = twohot_loss(replay_logits[:, :-1], replay_returns) + 0.5 * twohot_loss(
        replay_logits[:, :-1], twohot_pred(replay_slow_logits)[:, :-1]
    )
    repval = (1 - last[:, :-1]) * replay_critic

    expected = {
        "loss_actor": 0.8 * policy.mean(),
        "loss_value": 1.1 * value_loss.mean(),
        "loss_repval": 0.4 * repval.mean(),
        "return_scale": scale,
        "imagined_return": returns.mean(),
        "imagined_continue": cont.mean(),
        "actor_entropy": entropy.mean(),
    }
    for key, value_ in expected.items():
        np.testing.assert_allclose(terms[key].item(), value_, rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(loss.return_norm.low.item(), low, rtol=1e-5)
    np.testing.assert_allclose(loss.return_norm.high.item(), high, rtol=1e-5)


def test_return_normalisation_updates_only_in_training_mode() -> None:
    parts = behaviour_inputs()
    norm = parts.loss.return_norm
    norm.low.fill_(-3.0)
    norm.high.fill_(2.0)
    parts.loss.eval()
    terms = parts.loss(parts.td)
    assert (norm.low.item(), norm.high.item()) == (-3.0, 2.0), "evaluation mode must not move the return EMA"
    assert terms["return_scale"].item() == 5.0
    parts.loss.train()
    parts.loss(parts.td)
    assert (norm.low.item(), norm.high.item()) != (-3.0, 2.0), "training mode must move the return EMA"


def test_dynamics_actor_gradient_reaches_only_the_actor() -> None:
    parts = behaviour_inputs("optimization.actor_grad=dynamics")
    terms = parts.loss(parts.td)
    groups = parameter_groups(parts.agent)
    actor = grads_by_group(terms["loss_actor"], groups)
    assert actor["actor"] > 0
    assert all(actor[name] == 0 for name in groups if name != "actor"), actor
    # The returns themselves carry the gradient (not only the entropy bonus): without it the actor still learns.
    parts.loss.actor_entropy = 0.0
    terms = parts.loss(parts.td)
    assert grads_by_group(terms["loss_actor"], groups)["actor"] > 0
    # The critic still learns from the (detached) imagined features, and only the critic.
    value = grads_by_group(terms["loss_value"], groups)
    assert value["value"] > 0 and all(value[name] == 0 for name in (*WORLD_MODEL_GROUPS, "actor")), value


def test_dynamics_imagination_feeds_the_actor_detached_features() -> None:
    """As the authors' DreamerV1/V2 (``policy(stop_gradient(feat))``) and our V1 ``imagine``: the imagined states
    depend on the sampled actions, but the actor's input carries no gradient."""
    parts = behaviour_inputs("optimization.actor_grad=dynamics")
    inputs: list[bool] = []
    hook = parts.agent.actor.net.register_forward_pre_hook(lambda _, args: inputs.append(args[0].requires_grad))
    features, _ = parts.loss.imagine(parts.td["deter"].flatten(0, 1), parts.td["stoch"].flatten(0, 1))
    hook.remove()
    assert len(inputs) == 4 + 1 and not any(inputs)
    assert features.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# The update: slow critic, state round trip.


def perturb(module: torch.nn.Module, seed: int = 9) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def check_slow_step(slow: list[torch.Tensor], critic: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    for s, c, b in zip(slow, critic, before, strict=True):
        torch.testing.assert_close(s, 0.02 * c + 0.98 * b, rtol=1e-6, atol=1e-7)


SLOW_RUN = ("optimization.warmup=0", "optimization.lr=1e-3", "model.value_outscale=1.0")


def test_slow_critic_moves_two_percent_towards_the_critic_after_each_update() -> None:
    agent = make_agent(*SLOW_RUN)
    slow = agent.update.slow_value
    perturb(slow)  # the slow critic starts equal to the critic; make the mix visible
    before, critic_before = snapshot(slow), snapshot(agent.value)
    agent.update.step(replay_batch())
    critic = snapshot(agent.value)
    assert any(not torch.equal(a, b) for a, b in zip(critic, critic_before, strict=True)), "the critic did not learn"
    check_slow_step(snapshot(slow), critic, before)
    assert agent.update.updates == 1


def test_slow_critic_every_two_updates_moves_on_updates_0_and_2() -> None:
    agent = make_agent(*SLOW_RUN, "optimization.slow_critic_every=2")
    slow = agent.update.slow_value
    perturb(slow)
    moved = []
    for update in range(4):
        before = snapshot(slow)
        agent.update.step(replay_batch(seed=update))
        after = snapshot(slow)
        changed = any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
        moved.append(changed)
        if changed:
            check_slow_step(after, snapshot(agent.value), before)
    assert moved == [True, False, True, False]
    assert agent.update.updates == 4


def test_state_dict_round_trip_continues_identically() -> None:
    original = make_agent(*LIVE_HEADS)
    for step in range(2):
        original.update.step(replay_batch(seed=step))
    saved = copy.deepcopy({"agent": original.state_dict(), "update": original.update.state_dict()})
    assert saved["update"]["updates"] == 2 and saved["update"]["optimizer"]["state"]
    assert saved["update"]["return_norm"]["high"].item() != 0.0

    restored = make_agent(*LIVE_HEADS, seed=1)  # other initial weights: everything must come from the state
    restored.load_state_dict(saved["agent"])
    restored.update.load_state_dict(saved["update"])
    metrics = []
    for agent in (original, restored):
        torch.manual_seed(11)
        metrics.append(agent.update.step(replay_batch(seed=5)))
    assert metrics[0].keys() == metrics[1].keys()
    different = [key for key in metrics[0] if not torch.equal(metrics[0][key], metrics[1][key])]
    assert not different, f"a restored update computes other values on its next step: {different}"
    for name in ("world_model", "actor", "value"):
        for a, b in zip(getattr(original, name).parameters(), getattr(restored, name).parameters(), strict=True):
            assert torch.equal(a, b), name
    for a, b in zip(original.update.slow_value.parameters(), restored.update.slow_value.parameters(), strict=True):
        assert torch.equal(a, b), "slow critic"
    assert restored.update.updates == original.update.updates == 3


# ---------------------------------------------------------------------------------------------------------------
# The update schedule.


@pytest.mark.parametrize(
    ("overrides", "frames_and_updates"),
    [
        # debug_v3: 200 prefill frames, action repeat 2, train_ratio 1.5, 4 x 8 replayed steps per update.
        ((), [(0, 0), (198, 0), (200, 0), (242, 0), (244, 1), (300, 2), (328, 3), (400, 4), (1000, 18)]),
        # One update per policy step: 32 replayed steps per update at ratio 32.
        (("optimization.train_ratio=32",), [(100, 0), (200, 0), (202, 1), (204, 2), (400, 100)]),
        (("collector.init_random_frames=0", "optimization.train_ratio=8"), [(0, 0), (6, 0), (8, 1), (400, 50)]),
    ],
    ids=["debug_v3", "ratio32", "no_prefill"],
)
def test_v3_updates_follow_the_train_ratio(overrides: tuple[str, ...], frames_and_updates: list) -> None:
    cfg = compose_config("experiment=debug_v3", "env=pendulum", *overrides)
    for frames, expected in frames_and_updates:
        # floor(policy steps after the prefill * train_ratio / (batch_size * batch_length)), written out:
        prefill = cfg.collector.init_random_frames
        steps = (frames - prefill) // 2
        by_formula = 0 if frames < prefill else math.floor(steps * cfg.optimization.train_ratio / 32)
        assert by_formula == expected, (frames, by_formula)
        assert updates_due(cfg, SimpleNamespace(frames=frames)) == expected, frames


def test_bfloat16_autocast_matches_float32_on_the_first_step_and_keeps_every_term_float32() -> None:
    """DreamerV3 under CPU bfloat16 autocast: the networks run in bfloat16, every loss term comes out in float32, and
    the first step's terms agree with float32 within bfloat16's precision (a few roundings of 0.4% each)."""
    metrics = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        agent = build_agent(compose_config("experiment=debug_v3", "env=pendulum"), torch.device("cpu"), dtype)
        batch = replay_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            terms = agent.update.world_model_loss(batch)
            behaviour = agent.update.behaviour_loss(batch)
        if dtype is not None:
            assert batch["reconstruction"].dtype == torch.bfloat16, "autocast is not active: nothing is checked"
            found = {**dict(terms.items()), **dict(behaviour.items())}
            assert all(value.dtype == torch.float32 for value in found.values()), {
                key: value.dtype for key, value in found.items() if value.dtype != torch.float32
            }
        torch.manual_seed(1)
        metrics[dtype] = agent.update.step(batch)
    for key in ("loss/observation", "loss/reward", "loss/dynamics", "loss/value", "loss/repval"):
        torch.testing.assert_close(metrics[torch.bfloat16][key], metrics[None][key], rtol=0.03, atol=0.01, msg=key)
    assert all(torch.isfinite(value) for value in metrics[torch.bfloat16].values())
