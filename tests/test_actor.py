"""Action and value models: tanh-Gaussian and one-hot actors, their builders, and the value builder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from modules.actor import OneHotActor, TanhGaussianActor, build_actor
from modules.heads import build_value_head

FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS = 6, 3, 16, 2
MODEL_CFG = Path(__file__).resolve().parents[1] / "config" / "model" / "dreamer_v1.yaml"


def last_layer(actor: nn.Module) -> nn.Linear:
    return actor.net[-1]


def hand_log_prob(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``sum_i log N(atanh(y_i); mean_i, std_i) - log(1 - y_i^2)`` in float64, written out."""
    y, mean, std = y.double(), mean.double(), std.double()
    x = 0.5 * torch.log((1 + y) / (1 - y))
    gaussian = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return (gaussian - torch.log(1 - y**2)).sum(-1)


def test_tanh_gaussian_log_prob_matches_hand_computation() -> None:
    torch.manual_seed(0)
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, init_std=1.0)
    feature = torch.randn(64, FEATURE_DIM)
    mean, std = actor.gaussian(feature)
    # Fresh actions (not from the distribution's cache), away from the float32 saturation of tanh.
    y = torch.tanh(torch.empty(64, ACTION_DIM).uniform_(-2.5, 2.5))
    log_prob = actor.distribution(feature).log_prob(y)
    assert log_prob.shape == (64,)
    torch.testing.assert_close(log_prob.double(), hand_log_prob(y, mean, std), rtol=1e-4, atol=1e-4)


def test_log_prob_of_own_samples_uses_exact_pre_image() -> None:
    """With init_std 5 most samples saturate tanh to ±1 in float32; their log-prob must still be exact."""
    torch.manual_seed(1)
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS)
    feature = torch.randn(256, FEATURE_DIM)
    mean, std = actor.gaussian(feature)
    torch.manual_seed(2)
    distribution = actor.distribution(feature)
    action = distribution.rsample()
    torch.manual_seed(2)
    pre_tanh = torch.distributions.Normal(mean, std).rsample().double()  # the same noise as the actor's sample
    expected = (
        torch.distributions.Normal(mean.double(), std.double()).log_prob(pre_tanh)
        + 2 * torch.log(torch.cosh(pre_tanh))  # -log(1 - tanh(x)^2) = 2 log cosh(x)
    ).sum(-1)
    assert (action.abs() == 1).any(), "test needs saturated samples"
    torch.testing.assert_close(distribution.log_prob(action).double(), expected, rtol=1e-4, atol=1e-3)


def test_log_prob_is_finite_at_the_bounds() -> None:
    torch.manual_seed(0)
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS)
    feature = torch.randn(2, FEATURE_DIM)
    bounds = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 0.0, 1.0]])
    assert torch.isfinite(actor.distribution(feature).log_prob(bounds)).all()


def test_initial_std_is_init_std_and_mean_is_bounded() -> None:
    torch.manual_seed(0)
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, mean_scale=5.0, init_std=5.0, min_std=1e-4)
    feature = torch.randn(32, FEATURE_DIM)
    nn.init.zeros_(last_layer(actor).weight)
    nn.init.zeros_(last_layer(actor).bias)
    mean, std = actor.gaussian(feature)
    torch.testing.assert_close(std, torch.full_like(std, 5.0 + 1e-4))
    torch.testing.assert_close(mean, torch.zeros_like(mean))

    with torch.no_grad():
        last_layer(actor).bias.fill_(1e4)
    mean, _ = actor.gaussian(feature)
    assert mean.abs().max() <= 5.0 and mean.abs().min() > 4.9


def test_tanh_gaussian_samples_are_bounded_differentiable_and_tanh_mean_mode() -> None:
    torch.manual_seed(0)
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, mode_estimate="tanh_mean")
    feature = torch.randn(128, FEATURE_DIM)
    action = actor(feature)
    assert action.shape == (128, ACTION_DIM)
    assert action.abs().max() <= 1.0
    action.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    torch.testing.assert_close(actor.mode(feature), torch.tanh(actor.gaussian(feature)[0]))


def test_sample_max_mode_is_the_most_likely_of_100_samples() -> None:
    """The authors' ``SampleDist.mode``: draw 100 squashed samples per state, keep the one of highest density."""
    actor = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, init_std=1.0)
    assert actor.mode_estimate == "sample_max"
    feature = torch.randn(32, FEATURE_DIM)
    mean, std = (x.detach() for x in actor.gaussian(feature))
    torch.manual_seed(3)
    mode = actor.mode(feature)
    torch.manual_seed(3)
    samples = torch.tanh(torch.normal(mean.expand(100, -1, -1), std.expand(100, -1, -1)))
    log_probs = torch.stack([hand_log_prob(sample, mean, std) for sample in samples])
    expected = samples[log_probs.argmax(dim=0), torch.arange(32)]
    torch.testing.assert_close(mode, expected)


def test_sample_max_and_tanh_mean_differ_while_the_std_is_large() -> None:
    """With a zero network output (mean 0, std = init_std = 5) tanh(mean) is 0 but the squashed density peaks near
    ±1, so the most likely sample sits near a bound; with a small std both estimates agree."""
    wide = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, init_std=5.0)
    narrow = TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, init_std=0.01)
    for actor in (wide, narrow):
        nn.init.zeros_(last_layer(actor).weight)
        nn.init.zeros_(last_layer(actor).bias)
    torch.manual_seed(0)
    feature = torch.randn(256, FEATURE_DIM)
    assert (wide.mode(feature).abs() > 0.9).float().mean() > 0.9
    assert narrow.mode(feature).abs().max() < 0.05


def test_unknown_mode_estimate_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown actor mode estimate 'median'"):
        TanhGaussianActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS, mode_estimate="median")


def test_one_hot_actor_straight_through_gradient_and_mode() -> None:
    torch.manual_seed(0)
    actor = OneHotActor(FEATURE_DIM, ACTION_DIM, HIDDEN, LAYERS)
    feature = torch.randn(16, FEATURE_DIM)
    weights = torch.randn(16, ACTION_DIM)

    action = actor(feature)
    assert ((action == 0) | (action == 1)).all() and (action.sum(-1) == 1).all()
    sample_grads = torch.autograd.grad((weights * action).sum(), list(actor.parameters()))
    probs = torch.softmax(actor.net(feature), dim=-1)
    probs_grads = torch.autograd.grad((weights * probs).sum(), list(actor.parameters()))
    for sample_grad, probs_grad in zip(sample_grads, probs_grads, strict=True):
        torch.testing.assert_close(sample_grad, probs_grad)

    expected_mode = torch.nn.functional.one_hot(probs.argmax(-1), ACTION_DIM).float()
    torch.testing.assert_close(actor.mode(feature), expected_mode)


@pytest.mark.parametrize("discrete", [False, True])
def test_builders_follow_the_model_config(discrete: bool) -> None:
    cfg = OmegaConf.load(MODEL_CFG)
    cfg.dense_units = 8
    actor = build_actor(cfg, FEATURE_DIM, ACTION_DIM, discrete)
    actor_layers = [m for m in actor.net if isinstance(m, nn.Linear)]
    assert len(actor_layers) == cfg.actor_layers + 1
    assert all(layer.out_features == 8 for layer in actor_layers[:-1])
    assert actor_layers[-1].out_features == (ACTION_DIM if discrete else 2 * ACTION_DIM)
    assert isinstance(actor, OneHotActor if discrete else TanhGaussianActor)
    if not discrete:
        nn.init.zeros_(last_layer(actor).weight)
        nn.init.zeros_(last_layer(actor).bias)
        _, std = actor.gaussian(torch.randn(2, FEATURE_DIM))
        torch.testing.assert_close(std, torch.full_like(std, cfg.init_std + cfg.actor_min_std))

    value = build_value_head(cfg, FEATURE_DIM)
    value_layers = [m for m in value if isinstance(m, nn.Linear)]
    assert len(value_layers) == cfg.value_layers + 1
    assert value(torch.randn(4, 5, FEATURE_DIM)).shape == (4, 5, 1)
