"""The authors' initialisation (``model.init=keras``): every layer of the built agent, checked against the Keras rules.

Keras' glorot-uniform draws ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` (variance
``2 / (fan_in + fan_out)``), biases are zeros and the GRU's recurrent kernel is orthogonal. The fans are computed here
by hand from each layer's hyperparameters, not with torch's helper that the code uses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modules.init import initialize
from tests.test_update import make_agent

# dmc_cpu's sizes: layers of 100-6400 weights, enough for the variance check to tell the two schemes apart.
SIZES = ("experiment=dmc_cpu", "optimization.autocast=false")


def glorot_fans(layer: nn.Module) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as Keras counts them for the layer's kernel."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    kernel = math.prod(layer.kernel_size)
    return layer.in_channels * kernel, layer.out_channels * kernel


def check_glorot(weight: torch.Tensor, fan_in: int, fan_out: int, name: str) -> None:
    """Bound and variance of ``U(-a, a)``; the variance within 5 standard errors of its sampling distribution."""
    weight = weight.detach().double().flatten()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    variance = 2.0 / (fan_in + fan_out)
    assert weight.abs().max() <= bound, f"{name}: weights beyond the glorot bound {bound:.4f}"
    standard_error = variance * math.sqrt(0.8 / weight.numel())  # Var of s^2 for a uniform: sigma^4 * 4 / 5 / n
    assert abs(weight.square().mean() - variance) < 5 * standard_error, f"{name}: weight variance is not glorot's"


def agent_networks(init: str) -> dict[str, nn.Module]:
    agent = make_agent(*SIZES, f"model.init={init}")
    return {"world_model": agent.world_model, "actor": agent.actor, "value": agent.value}


def test_keras_init_on_every_layer_of_world_model_actor_and_value() -> None:
    counts = {nn.Linear: 0, nn.Conv2d: 0, nn.ConvTranspose2d: 0, nn.GRUCell: 0}
    for network_name, network in agent_networks("keras").items():
        for layer_name, layer in network.named_modules():
            name = f"{network_name}.{layer_name}"
            if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                counts[type(layer)] += 1
                check_glorot(layer.weight, *glorot_fans(layer), name)
                assert torch.count_nonzero(layer.bias) == 0, f"{name}: bias is not zero"
            elif isinstance(layer, nn.GRUCell):
                counts[nn.GRUCell] += 1
                check_glorot(layer.weight_ih, layer.input_size, 3 * layer.hidden_size, f"{name}.weight_ih")
                recurrent = layer.weight_hh.detach().double()  # [3D, D], the transpose of Keras' [D, 3D] kernel
                identity = torch.eye(layer.hidden_size, dtype=torch.float64)
                gram = recurrent.T @ recurrent
                torch.testing.assert_close(gram, identity, atol=1e-5, rtol=0, msg=f"{name}: weight_hh not orthogonal")
                assert torch.count_nonzero(layer.bias_ih) == torch.count_nonzero(layer.bias_hh) == 0, name
    # Encoder 4 convs, decoder 4 transposed convs, the GRU, and dense layers everywhere.
    assert counts[nn.Conv2d] == 4 and counts[nn.ConvTranspose2d] == 4 and counts[nn.GRUCell] == 1
    assert counts[nn.Linear] > 15


def test_torch_init_keeps_the_layer_defaults() -> None:
    """``model.init=torch``: torch's ``U(±1/sqrt(fan_in))`` weights and non-zero biases, which the glorot check
    tells apart (the test above would fail on them)."""
    decoder_linear = agent_networks("torch")["world_model"].decoder.linear
    assert torch.count_nonzero(decoder_linear.bias) > 0
    with pytest.raises(AssertionError, match="not glorot's"):
        check_glorot(decoder_linear.weight, *glorot_fans(decoder_linear), "decoder.linear")


def test_unknown_init_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown model\.init 'he'; allowed: keras, torch"):
        initialize(nn.Linear(2, 2), "he")
