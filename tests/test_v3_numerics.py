"""DreamerV3's numeric building blocks against references written from the equations (numpy, float64).

Covers the TorchRL pieces the project uses as they are (symlog/symexp, the symexp two-hot support, encoding,
decoding and cross-entropy, percentile return normalisation) and the ones in ``modules/v3_distributions.py``
(``BoundedNormal``, ``UnimixOneHotCategorical``, ``separate_kl_losses``). No expectation is computed with the code
under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, ProbabilisticTensorDictModule, set_interaction_type
from torchrl.modules import PercentileValueNorm, SymExpTwoHot
from torchrl.objectives import symexp, symlog

from modules.v3_distributions import BoundedNormal, UnimixOneHotCategorical, separate_kl_losses

NUM_BINS = 255
UNIMIX = 0.01


# ----------------------------------------------------------------------------------------------- numpy references


def np_symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log(1.0 + np.abs(x))


def np_symexp(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * (np.exp(np.abs(x)) - 1.0)


def np_bins() -> np.ndarray:
    return np_symexp(np.linspace(-20.0, 20.0, NUM_BINS))


def np_two_hot(target: float, bins: np.ndarray) -> np.ndarray:
    """Weights on the two bins around ``target``, linear in raw value; all on the outer bin beyond the support."""
    out = np.zeros(len(bins))
    if target <= bins[0]:
        out[0] = 1.0
        return out
    if target >= bins[-1]:
        out[-1] = 1.0
        return out
    for k in range(len(bins) - 1):
        if bins[k] <= target < bins[k + 1]:
            upper = (target - bins[k]) / (bins[k + 1] - bins[k])
            out[k] = 1.0 - upper
            out[k + 1] = upper
            return out
    raise AssertionError("unreachable")


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_mixed_probs(logits: np.ndarray, unimix: float) -> np.ndarray:
    return (1.0 - unimix) * np_softmax(logits) + unimix / logits.shape[-1]


def np_kl_terms(posterior: np.ndarray, prior: np.ndarray, free_nats: float, unimix: float) -> np.ndarray:
    """``max(free_nats, sum_g sum_k p log(p / q))`` over ``[*, G, K]`` mixed distributions, by explicit loops."""
    p, q = np_mixed_probs(posterior, unimix), np_mixed_probs(prior, unimix)
    batch_shape = p.shape[:-2]
    out = np.zeros(batch_shape)
    for idx in np.ndindex(*batch_shape):
        total = 0.0
        for g in range(p.shape[-2]):
            for k in range(p.shape[-1]):
                total += p[idx][g, k] * (math.log(p[idx][g, k]) - math.log(q[idx][g, k]))
        out[idx] = max(free_nats, total)
    return out


def bounded_loc_scale(mean_raw: np.ndarray, std_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.tanh(mean_raw), 0.9 / (1.0 + np.exp(-(std_raw + 2.0))) + 0.1


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ------------------------------------------------------------------------------------------------ symlog / symexp


def test_symlog_symexp_values_inverse_and_gradients() -> None:
    x = np.array([-1e6, -30.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 30.0, 1e6])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(f64(symlog(xt)), np_symlog(x), rtol=1e-12, atol=0)
    np.testing.assert_allclose(f64(symexp(torch.tensor(x[1:-1]))), np_symexp(x[1:-1]), rtol=1e-12, atol=0)
    np.testing.assert_allclose(f64(symexp(symlog(xt))), x, rtol=1e-12, atol=0)
    symlog(xt).sum().backward()
    np.testing.assert_allclose(f64(xt.grad), 1.0 / (1.0 + np.abs(x)), rtol=1e-12)  # 1 at 0, not sign's 0
    y = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    symexp(y).sum().backward()
    np.testing.assert_allclose(f64(y.grad), np.exp(np.abs([-2.0, 0.0, 3.0])), rtol=1e-12)


# ------------------------------------------------------------------------------------------------------ two-hot


def test_bins_are_symexp_linspace_and_exactly_antisymmetric() -> None:
    bins = SymExpTwoHot(NUM_BINS).bins
    assert bins.dtype == torch.float32 and bins.shape == (NUM_BINS,)
    np.testing.assert_allclose(f64(bins), np_bins(), rtol=2e-5, atol=1e-30)
    assert bins[NUM_BINS // 2].item() == 0.0
    assert torch.equal(bins, -bins.flip(0))
    assert bool((bins[1:] > bins[:-1]).all())


def test_two_hot_encode_on_bin_between_bins_and_out_of_range() -> None:
    two_hot = SymExpTwoHot(NUM_BINS)
    bins = two_hot.bins
    bins64 = f64(bins)
    on_bin = [0, 1, 100, 127, 128, 200, 253, 254]
    encoded = two_hot.encode(bins[on_bin])
    for row, k in zip(encoded, on_bin, strict=True):
        assert row[k].item() == 1.0 and row.sum().item() == 1.0 and int((row != 0).sum()) == 1

    rng = np.random.default_rng(0)
    between = np.concatenate([np.array([0.3, -0.3, 2.5, -7.0, 1234.5]), np_symexp(rng.uniform(-19.9, 19.9, 40))])
    encoded = f64(two_hot.encode(torch.tensor(between, dtype=torch.float32)))
    for row, target in zip(encoded, between.astype(np.float32).astype(np.float64), strict=True):
        expected = np_two_hot(target, bins64)
        np.testing.assert_allclose(row, expected, atol=2e-6)
        assert int((row != 0).sum()) <= 2
        # The encoding reproduces the target: the mean of the two-hot is the target itself.
        np.testing.assert_allclose((row * bins64).sum(), target, rtol=2e-6, atol=1e-6)

    outside = torch.tensor([-1e12, -math.inf, 1e12, math.inf])
    encoded = two_hot.encode(outside)
    for row, k in zip(encoded, [0, 0, NUM_BINS - 1, NUM_BINS - 1], strict=True):
        assert row[k].item() == 1.0 and row.sum().item() == 1.0


def test_two_hot_decode_round_trip_and_exact_zero() -> None:
    two_hot = SymExpTwoHot(NUM_BINS)
    targets = torch.tensor([-5000.0, -12.5, -1.0, -0.01, 0.0, 0.02, 0.7, 3.0, 99.0, 1e5])
    decoded = two_hot.decode(two_hot.encode(targets).log())
    np.testing.assert_allclose(f64(decoded), f64(targets), rtol=1e-5, atol=1e-6)

    assert torch.equal(two_hot.decode(torch.zeros(3, NUM_BINS)), torch.zeros(3))
    assert torch.equal(two_hot.decode(torch.full((NUM_BINS,), 7.5)), torch.tensor(0.0))
    half = torch.randn(16, NUM_BINS // 2, generator=torch.Generator().manual_seed(1)) * 3
    middle = torch.randn(16, 1, generator=torch.Generator().manual_seed(2)) * 3
    symmetric = torch.cat([half, middle, half.flip(-1)], -1)
    assert torch.equal(two_hot.decode(symmetric), torch.zeros(16))

    logits = torch.randn(32, NUM_BINS, generator=torch.Generator().manual_seed(3)) * 3
    probs = np_softmax(f64(logits))
    terms = probs * np_bins()
    # float32 rounding of the products bounds the tolerance, relative to the largest contributions.
    np.testing.assert_allclose(f64(two_hot.decode(logits)), terms.sum(-1), rtol=0, atol=1e-5 * np.abs(terms).sum())


def test_two_hot_cross_entropy_and_its_logit_gradient() -> None:
    two_hot = SymExpTwoHot(NUM_BINS)
    bins64 = f64(two_hot.bins)
    targets = torch.tensor([0.0, 0.3, -4.0, 250.0, 1e12, -1e12, float(two_hot.bins[140])])
    logits = (torch.randn(len(targets), NUM_BINS, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    loss = two_hot.loss(logits, targets)
    encoded = np.stack([np_two_hot(t, bins64) for t in f64(targets)])
    log_softmax = np.log(np_softmax(f64(logits)))
    np.testing.assert_allclose(f64(loss), -(encoded * log_softmax).sum(-1), rtol=1e-5)
    loss.sum().backward()
    np.testing.assert_allclose(f64(logits.grad), np_softmax(f64(logits)) - encoded, atol=1e-6)


# ------------------------------------------------------------------------------------------------- KL and unimix


def kl_logits(seed: int, close: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 3, 32, 32]`` posterior and prior logits, far apart or nearly equal."""
    gen = torch.Generator().manual_seed(seed)
    posterior = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64) * 2
    noise = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    prior = posterior + 0.02 * noise if close else noise * 2
    return posterior.requires_grad_(), prior.requires_grad_()


def test_separate_kl_values_above_and_below_free_nats() -> None:
    posterior, prior = kl_logits(0, close=False)
    dyn, rep = separate_kl_losses(posterior, prior, free_nats=1.0, unimix=UNIMIX)
    expected = np_kl_terms(f64(posterior), f64(prior), 1.0, UNIMIX)
    assert dyn.shape == rep.shape == (2, 3)
    assert (expected > 5.0).all()  # above the threshold: the KL itself
    np.testing.assert_allclose(f64(dyn), expected, rtol=1e-10)
    np.testing.assert_allclose(f64(rep), expected, rtol=1e-10)
    # The clip applies to the sum over the 32 groups: with small per-group KLs, clipping each group first would give
    # about 32 where the sum is a few nats.
    gen = torch.Generator().manual_seed(8)
    posterior, prior = (torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64) * 0.5 for _ in range(2))
    dyn, _ = separate_kl_losses(posterior, prior, free_nats=1.0, unimix=UNIMIX)
    expected = np_kl_terms(f64(posterior), f64(prior), 1.0, UNIMIX)
    assert (expected > 2.0).all() and (expected < 16.0).all()
    np.testing.assert_allclose(f64(dyn), expected, rtol=1e-10)

    posterior, prior = kl_logits(1, close=True)
    unclipped = np_kl_terms(f64(posterior), f64(prior), 0.0, UNIMIX)
    assert (unclipped < 0.5).all() and (unclipped > 0.0).all()
    dyn, rep = separate_kl_losses(posterior, prior, free_nats=1.0, unimix=UNIMIX)
    assert torch.equal(dyn, torch.ones_like(dyn)) and torch.equal(rep, torch.ones_like(rep))
    (dyn.sum() + rep.sum()).backward()
    assert not posterior.grad.any() and not prior.grad.any()  # clipped: no gradient at all
    dyn, rep = separate_kl_losses(posterior.detach(), prior.detach(), free_nats=0.0, unimix=UNIMIX)
    np.testing.assert_allclose(f64(dyn), unclipped, rtol=1e-9)


def reference_kl(posterior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``sum_g KL(p_g || q_g)`` with both mixed, written out in float64 (no stop-gradient)."""
    p = (1 - UNIMIX) * torch.softmax(posterior, -1) + UNIMIX / posterior.shape[-1]
    q = (1 - UNIMIX) * torch.softmax(prior, -1) + UNIMIX / prior.shape[-1]
    return (p * (p.log() - q.log())).sum((-1, -2))


def test_separate_kl_gradients_reach_prior_for_dyn_and_posterior_for_rep() -> None:
    posterior, prior = kl_logits(2, close=False)
    post_ref, prior_ref = (x.detach().clone().requires_grad_() for x in (posterior, prior))
    reference_kl(post_ref, prior_ref).sum().backward()

    dyn, _ = separate_kl_losses(posterior, prior, free_nats=1.0, unimix=UNIMIX)
    dyn.sum().backward()
    assert posterior.grad is None or not posterior.grad.any()
    np.testing.assert_allclose(f64(prior.grad), f64(prior_ref.grad), rtol=1e-8, atol=1e-12)

    posterior.grad, prior.grad = None, None
    _, rep = separate_kl_losses(posterior, prior, free_nats=1.0, unimix=UNIMIX)
    rep.sum().backward()
    assert prior.grad is None or not prior.grad.any()
    np.testing.assert_allclose(f64(posterior.grad), f64(post_ref.grad), rtol=1e-8, atol=1e-12)


def test_unimix_bounds_probabilities_and_the_kl() -> None:
    k = 32
    peaked = torch.zeros(4, 32, k, dtype=torch.float64)
    peaked[..., 0] = 1e4  # softmax is one-hot; the mix keeps every class at 0.01 / K
    opposite = torch.zeros(4, 32, k, dtype=torch.float64)
    opposite[..., 1] = 1e4
    dyn, rep = separate_kl_losses(peaked, opposite, free_nats=1.0, unimix=UNIMIX)
    np.testing.assert_allclose(f64(dyn), np_kl_terms(f64(peaked), f64(opposite), 1.0, UNIMIX), rtol=1e-10)
    assert torch.isfinite(rep).all()
    # Two one-hots mixed with 1%: each group's KL is at most log((0.99 + 0.01/K) / (0.01/K)).
    assert (dyn <= 32 * math.log((0.99 + 0.01 / k) / (0.01 / k)) + 1e-9).all()

    dist = UnimixOneHotCategorical(peaked.float(), unimix=UNIMIX)
    assert dist.probs.min().item() >= (0.01 / k) * (1 - 1e-6)
    np.testing.assert_allclose(f64(dist.probs), np_mixed_probs(f64(peaked), UNIMIX), rtol=1e-5)


# ----------------------------------------------------------------------------------------------- UnimixOneHot


def test_unimix_one_hot_probs_log_prob_entropy_mode_and_sampling() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 30.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 1.0, -50.0]])
    dist = UnimixOneHotCategorical(logits, unimix=UNIMIX)
    probs = np_mixed_probs(f64(logits), UNIMIX)
    np.testing.assert_allclose(f64(dist.probs), probs, rtol=1e-6)
    actions = torch.eye(4)[[3, 1, 0]]
    np.testing.assert_allclose(f64(dist.log_prob(actions)), np.log(probs[[0, 1, 2], [3, 1, 0]]), rtol=1e-6)
    np.testing.assert_allclose(f64(dist.entropy()), -(probs * np.log(probs)).sum(-1), rtol=1e-6)
    # Ties take the first maximum: a one-hot action, also through tensordict's deterministic interaction.
    expected_mode = torch.eye(4)[[3, 0, 1]]
    assert torch.equal(dist.mode, expected_mode) and torch.equal(dist.deterministic_sample, expected_mode)
    module = ProbabilisticTensorDictModule(
        in_keys=["logits"], out_keys=["action"], distribution_class=UnimixOneHotCategorical
    )
    with set_interaction_type(InteractionType.DETERMINISTIC):
        assert torch.equal(module(TensorDict(logits=logits, batch_size=[3]))["action"], expected_mode)

    torch.manual_seed(9)
    n = 200_000
    samples = dist.sample((n,))
    assert samples.dtype == torch.float32 and torch.equal(samples.sum(-1), torch.ones(n, 3))
    freq = f64(samples.mean(0))
    # 5 binomial standard errors; the rare classes of the first row (p = 0.0025) exist only through the mix.
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12).all()
    assert freq[0, :3].min() > 0.0015


# ----------------------------------------------------------------------------------------------- BoundedNormal


def test_bounded_normal_log_prob_and_entropy_match_a_gaussian_written_out() -> None:
    gen = torch.Generator().manual_seed(5)
    mean_raw = torch.randn(5, 3, generator=gen) * 2
    std_raw = torch.randn(5, 3, generator=gen) * 3
    dist = BoundedNormal(mean_raw, std_raw)
    loc, scale = bounded_loc_scale(f64(mean_raw), f64(std_raw))
    assert dist.batch_shape == (5,) and dist.event_shape == (3,)
    np.testing.assert_allclose(f64(dist.loc), loc, rtol=1e-6)
    np.testing.assert_allclose(f64(dist.scale), scale, rtol=1e-6)
    # Actions beyond [-1, 1] too: plain Gaussian density, no tanh Jacobian, no clipping.
    actions = torch.tensor([-1.7, -0.2, 0.0, 0.9, 1.4]).unsqueeze(-1).expand(5, 3)
    a = f64(actions)
    expected = (-0.5 * ((a - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(f64(dist.log_prob(actions)), expected, rtol=1e-5)
    np.testing.assert_allclose(f64(dist.entropy()), (0.5 * np.log(2 * np.pi * np.e * scale**2)).sum(-1), rtol=1e-6)


def test_bounded_normal_monte_carlo_entropy_and_unclipped_samples() -> None:
    torch.manual_seed(6)
    mean_raw = torch.tensor([[3.0, -0.5], [0.0, 1.0]])
    std_raw = torch.tensor([[1.0, -1.5], [4.0, 0.0]])
    dist = BoundedNormal(mean_raw, std_raw)
    n = 200_000
    samples = dist.sample((n,))
    neg_log_prob = -dist.log_prob(samples).double()
    standard_error = neg_log_prob.std(0) / math.sqrt(n)
    assert ((neg_log_prob.mean(0) - dist.entropy().double()).abs() <= 5 * standard_error).all()
    loc, scale = bounded_loc_scale(f64(mean_raw), f64(std_raw))
    np.testing.assert_allclose(f64(samples.mean(0)), loc, atol=5 * scale.max() / math.sqrt(n))
    np.testing.assert_allclose(f64(samples.std(0)), scale, rtol=0.01)
    assert (samples[:, 0, 0] > 1.0).float().mean().item() > 0.2  # mean near 1, std near 1: many samples above 1


def test_bounded_normal_bounds_at_extreme_inputs_and_deterministic_sample() -> None:
    mean_raw = torch.tensor([[-1e4, -3.0, 0.0, 3.0, 1e4]])
    std_raw = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    dist = BoundedNormal(mean_raw, std_raw, min_std=0.1, max_std=1.0)
    assert (dist.scale >= 0.1).all() and (dist.scale <= 1.0).all()
    np.testing.assert_allclose(f64(dist.scale[0, [0, 1]]), [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(f64(dist.scale[0, [3, 4]]), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(dist.scale[0, 2].item(), 0.9 / (1 + math.exp(-2.0)) + 0.1, rtol=1e-6)
    assert torch.equal(dist.loc[0, [0, 4]], torch.tensor([-1.0, 1.0]))
    assert torch.isfinite(dist.log_prob(torch.zeros(1, 5))).all()
    other = BoundedNormal(torch.zeros(1, 2), torch.tensor([[-1e4, 1e4]]), min_std=0.3, max_std=0.7)
    np.testing.assert_allclose(f64(other.scale), [[0.3, 0.7]], rtol=1e-6)
    with pytest.raises(ValueError):
        BoundedNormal(mean_raw, std_raw, min_std=0.5, max_std=0.2)

    expected = torch.tanh(mean_raw)
    assert torch.equal(dist.deterministic_sample, expected) and torch.equal(dist.mode, expected)
    module = ProbabilisticTensorDictModule(
        in_keys={"mean_raw": "mean_raw", "std_raw": "std_raw"},
        out_keys=["action"],
        distribution_class=BoundedNormal,
        distribution_kwargs={"min_std": 0.1, "max_std": 1.0},
        return_log_prob=True,
    )
    data = TensorDict(mean_raw=mean_raw, std_raw=std_raw, batch_size=[1])
    with set_interaction_type(InteractionType.DETERMINISTIC):
        assert torch.equal(module(data.clone())["action"], expected)
    with set_interaction_type(InteractionType.RANDOM):
        out = module(data.clone())
    assert not torch.equal(out["action"], expected) and out["action_log_prob"].shape == (1,)


def test_bounded_normal_rsample_is_differentiable_in_both_raw_outputs() -> None:
    mean_raw = torch.zeros(4, 2, requires_grad=True)
    std_raw = torch.zeros(4, 2, requires_grad=True)
    BoundedNormal(mean_raw, std_raw).rsample().pow(2).sum().backward()
    assert mean_raw.grad.abs().sum() > 0 and std_raw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ percentile normalisation


def test_percentile_return_normalisation_matches_a_numpy_ema() -> None:
    norm = PercentileValueNorm(shape=1, quantiles=(0.05, 0.95), rate=0.01, min_scale=1.0)
    rng = np.random.default_rng(7)
    low = high = 0.0  # the authors start both EMAs at zero, with no debiasing
    scales = []
    for step in range(60):
        returns = rng.normal(loc=3.0 * step, scale=2.0 + 2.0 * step, size=(16, 15, 1)).astype(np.float32)
        norm.update(torch.from_numpy(returns))
        flat = returns.astype(np.float64).ravel()
        low = 0.99 * low + 0.01 * np.percentile(flat, 5)
        high = 0.99 * high + 0.01 * np.percentile(flat, 95)
        scale = max(1.0, high - low)
        scales.append(scale)
        np.testing.assert_allclose(norm.low.item(), low, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(norm.high.item(), high, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(norm.scale().item(), scale, rtol=1e-4)
    assert scales[0] == 1.0 and scales[-1] > 20.0  # both sides of max(1, high - low) were exercised
    advantages = torch.tensor([[-5.0], [0.0], [12.0]])
    np.testing.assert_allclose(f64(norm.normalize(advantages)), f64(advantages) / scales[-1], rtol=1e-4)

    restored = PercentileValueNorm(shape=1, quantiles=(0.05, 0.95), rate=0.01, min_scale=1.0)
    restored.load_state_dict(norm.state_dict())
    assert torch.equal(restored.scale(), norm.scale())
