"""The DreamerV3 optimiser against an independent NumPy re-computation of the authors' update rule.

The reference below is written from the authors' equations (adaptive gradient clipping per tensor with the pmin
floor, RMS scaling, then momentum, each bias-corrected, and a linear learning-rate ramp from 0), in float64.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

from utils.config import ConfigError, compose_config
from utils.v3_optimizer import make_v3_optimizer

SETTINGS = {
    "lr": 0.1,
    "eps": 1e-20,
    "agc": 0.3,
    "agc_pmin": 1e-3,
    "warmup": 2,
    "beta1": 0.9,
    "beta2": 0.999,
    "momentum": True,
    "nesterov": False,
    "weight_decay": 0.0,
}


@dataclass
class AuthorsOptimiser:
    """The authors' update rule in float64 NumPy, one state per tensor."""

    settings: dict
    step: int = 0
    nu: list[np.ndarray] = field(default_factory=list)
    mu: list[np.ndarray] = field(default_factory=list)

    def update(self, params: list[np.ndarray], grads: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool], float]:
        """New parameters, whether each tensor's gradient was clipped, and the learning rate used."""
        s = self.settings
        if not self.nu:
            self.nu = [np.zeros_like(p) for p in params]
            self.mu = [np.zeros_like(p) for p in params]
        self.step += 1
        t = self.step
        lr = s["lr"] * min(1.0, (t - 1) / s["warmup"]) if s["warmup"] else s["lr"]
        new_params, clipped = [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            bound = s["agc"] * max(s["agc_pmin"], np.linalg.norm(p))
            clipped.append(bool(np.linalg.norm(g) > bound))
            g = g / max(1.0, np.linalg.norm(g) / bound)
            self.nu[i] = s["beta2"] * self.nu[i] + (1 - s["beta2"]) * g * g
            scaled = g / (np.sqrt(self.nu[i] / (1 - s["beta2"] ** t)) + s["eps"])
            self.mu[i] = s["beta1"] * self.mu[i] + (1 - s["beta1"]) * scaled
            new_params.append(p - lr * self.mu[i] / (1 - s["beta1"] ** t))
        return new_params, clipped, lr


def initial_params(rng: np.random.Generator) -> list[np.ndarray]:
    """A kernel, a zero bias (its norm sits on the pmin floor) and a vector of ones."""
    return [rng.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32), np.ones(5, np.float32)]


def gradients(rng: np.random.Generator, steps: int) -> list[list[np.ndarray]]:
    """Per step: a small kernel gradient (never clipped), large bias and vector gradients (always clipped)."""
    return [
        [
            (1e-3 * rng.normal(size=(4, 3))).astype(np.float32),
            rng.normal(size=3).astype(np.float32),
            (10 * rng.normal(size=5)).astype(np.float32),
        ]
        for _ in range(steps)
    ]


def torch_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[np.ndarray]) -> None:
    """One optimiser step with the given gradients."""
    for param, grad in zip(params, grads, strict=True):
        param.grad = torch.from_numpy(grad.copy())
    optimizer.step()


def test_updates_match_the_authors_equations() -> None:
    rng = np.random.default_rng(0)
    start = initial_params(rng)
    grads = gradients(rng, 3)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in start]
    optimizer = make_v3_optimizer(params, SETTINGS)
    authors = AuthorsOptimiser(SETTINGS)
    expected = [p.astype(np.float64) for p in start]
    for t, step_grads in enumerate(grads, start=1):
        expected, clipped, lr = authors.update(expected, [g.astype(np.float64) for g in step_grads])
        # The data exercise what they claim: clipping off for the kernel, on for the others; warm-up 0, lr/2, lr.
        assert clipped == [False, True, True], (t, clipped)
        assert lr == SETTINGS["lr"] * min(1.0, (t - 1) / SETTINGS["warmup"])
        torch_step(optimizer, params, step_grads)
        for i, (param, want) in enumerate(zip(params, expected, strict=True)):
            np.testing.assert_allclose(
                param.detach().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"step {t}, tensor {i}"
            )
        if t == 1:
            assert all(np.array_equal(p.detach().numpy(), s) for p, s in zip(params, start, strict=True)), (
                "the first warm-up update must not move the parameters"
            )
    # The bias started at 0: its clipping bound used the pmin floor until it moved.
    assert np.linalg.norm(expected[1]) > SETTINGS["agc_pmin"]


def test_first_update_without_warmup_is_lr_times_the_gradient_sign() -> None:
    """At t = 1 the bias-corrected RMS is |g| and the momentum is g / |g|: every element moves by exactly lr."""
    settings = {**SETTINGS, "warmup": 0}
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    grad = np.array([40.0, -1e-3, 0.0, -7.0], np.float32)
    optimizer = make_v3_optimizer([param], settings)
    torch_step(optimizer, [param], [grad])
    expected = np.array([1.0, -2.0, 0.5, 3.0]) - settings["lr"] * np.sign(grad)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-6)


def test_state_dict_round_trip_continues_identically() -> None:
    settings = {**SETTINGS, "warmup": 4}
    rng = np.random.default_rng(1)
    start = initial_params(rng)
    grads = gradients(rng, 5)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in start]
    optimizer = make_v3_optimizer(params, settings)
    for step_grads in grads[:2]:
        torch_step(optimizer, params, step_grads)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = make_v3_optimizer(restored_params, settings)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.param_groups[0]["step"] == 2
    for step_grads in grads[2:]:
        torch_step(optimizer, params, step_grads)
        torch_step(restored, restored_params, step_grads)
        for original, copy in zip(params, restored_params, strict=True):
            assert torch.equal(original, copy)


def test_the_factory_reads_optimization_dreamer_v3() -> None:
    cfg = compose_config("model=dreamer_v3", "optimization=dreamer_v3").optimization
    optimizer = make_v3_optimizer([torch.nn.Parameter(torch.ones(2))], cfg)
    assert isinstance(optimizer, DreamerV3Optimizer)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["eps"], group["agc"], group["parameter_norm_min"]) == (4e-5, 1e-20, 0.3, 1e-3)
    assert (group["beta1"], group["beta2"], group["warmup_steps"]) == (0.9, 0.999, 1000)


@pytest.mark.parametrize(
    ("key", "value"), [("weight_decay", 0.01), ("nesterov", True), ("momentum", False), ("momentum", 1)]
)
def test_settings_torchrl_cannot_follow_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"optimization\.{key}={value!r} is not supported"):
        make_v3_optimizer([torch.nn.Parameter(torch.ones(2))], {**SETTINGS, key: value})
