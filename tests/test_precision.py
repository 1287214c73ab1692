"""Precision: the GRU computes in float32 under autocast, the loss terms are float32, reward_scale scales the reward
target, and ``optimization.compile=true`` (inductor, the default backend) matches eager on CPU.

Autocast is entered here with ``torch.autocast("cpu", dtype=torch.bfloat16)`` (or ``build_agent``'s
``autocast_dtype``) directly, whatever the config allows on this machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from tensordict import TensorDict
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from modules.rssm import RSSMPosterior, RSSMPrior, RSSMRollout
from tests.runs import TINY_RUN
from utils.agent import Agent, build_agent
from utils.config import compose_config

MATMULS = ("mm", "addmm", "bmm", "matmul", "linear")
B, T = 2, 3


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the operands of every matrix product dispatched while active (after autocast casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.seen.append((func.overloadpacket.__name__, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gru_records(gru: torch.nn.GRUCell) -> Iterator[tuple[MatmulDtypes, list[tuple[torch.Tensor, ...]]]]:
    """While active, records the matmul dtypes inside each call of ``gru``, and each call's inputs and output."""
    mode, calls = MatmulDtypes(), []

    def leave(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        mode.__exit__(None, None, None)
        calls.append((*(a.detach() for a in args), output.detach()))

    handles = [gru.register_forward_pre_hook(lambda module, args: mode.__enter__() and None)]
    handles.append(gru.register_forward_hook(leave))
    try:
        yield mode, calls
    finally:
        for handle in handles:
            handle.remove()


def test_the_gru_computes_in_float32_under_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    prior = RSSMPrior(action_dim=2, deter_dim=8, stoch_dim=4, hidden_dim=16)
    rollout = RSSMRollout(prior, RSSMPosterior(10, deter_dim=8, stoch_dim=4, hidden_dim=16))
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    with gru_records(prior.gru) as (mode, calls), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        rollout(torch.randn(B, T, 10), torch.rand(B, T, 2) * 2 - 1, is_first)  # the world model's filter
        deter, *_ = prior(torch.randn(B, 8), torch.randn(B, 4), torch.rand(B, 2))  # an imagination step
        linear_dtype = prior.input_layer(torch.randn(B, 6)).dtype
    assert linear_dtype == torch.bfloat16, "autocast is not active: nothing is checked"
    assert len(calls) == T + 1 and mode.seen, "the GRU was not called (or its matmuls not seen)"
    assert all(dtypes == {torch.float32} for _, dtypes in mode.seen), (
        f"under autocast the GRU's matmuls must run in float32, saw {mode.seen}"
    )
    for gru_input, hidden, output in calls:
        assert output.dtype == torch.float32
        torch.testing.assert_close(output, prior.gru(gru_input.float(), hidden.float()), rtol=1e-6, atol=1e-6)
    assert deter.dtype == torch.float32


def fixed_batch(action_dim: int, reward_scale_of_rewards: float = 10.0) -> TensorDict:
    """A ``[B, T]`` Pendulum-like replay batch with rewards in ``[-10, 0]``."""
    generator = torch.Generator().manual_seed(1)
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    return TensorDict(
        {
            "observation": torch.randn(B, T, 3, generator=generator),
            "action": (torch.rand(B, T, action_dim, generator=generator) * 2 - 1).masked_fill(is_first, 0.0),
            "reward": -reward_scale_of_rewards * torch.rand(B, T, 1, generator=generator),
            "terminated": torch.zeros(B, T, 1, dtype=torch.bool),
            "is_first": is_first,
        },
        batch_size=[B, T],
    )


def tiny_agent(*overrides: str, autocast_dtype: torch.dtype | None = None) -> Agent:
    torch.manual_seed(0)
    return build_agent(compose_config(*TINY_RUN, *overrides), torch.device("cpu"), autocast_dtype)


def test_loss_terms_are_float32_under_bfloat16_autocast() -> None:
    agent = tiny_agent(autocast_dtype=torch.bfloat16)
    batch = fixed_batch(agent.info.action_dim)
    terms = agent.update.losses(batch)
    assert batch["reconstruction"].dtype == torch.bfloat16, "autocast is not active: nothing is checked"
    found = {
        f"{name}:{key}": value.dtype
        for name, output in zip(("world_model", "actor", "value"), terms, strict=True)
        for key, value in output.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    }
    assert {"world_model:loss_kl", "actor:loss_actor", "value:loss_value"} <= set(found)
    assert all(dtype == torch.float32 for dtype in found.values()), (
        f"under autocast every loss term must be float32: {[k for k, v in found.items() if v != torch.float32]}"
    )


def test_reward_scale_scales_the_reward_target() -> None:
    """``optimization.reward_scale`` s: the reward term is ``-log N(s * r; predicted reward, 1)``."""
    for scale in (1.0, 0.1):
        agent = tiny_agent(f"optimization.reward_scale={scale}")
        batch = fixed_batch(agent.info.action_dim)
        terms = agent.update.world_model_loss(batch)
        expected = (
            0.5 * (scale * batch["reward"] - batch["reward_pred"]).square() + 0.5 * math.log(2 * math.pi)
        ).mean()
        torch.testing.assert_close(
            terms["loss_reward"],
            expected.detach(),
            msg=f"optimization.reward_scale={scale} must scale the reward target",
        )


def test_compiled_update_with_inductor_matches_eager() -> None:
    """``optimization.compile=true`` with its default backend (inductor: C++ code built with gcc).

    Inductor draws its own random numbers (Philox) unless ``fallback_random`` is set, so without it the sampled
    latents differ from eager ones and nothing could be compared; with it, losses and one update match to float32
    rounding. One compile thread: worker processes cost more than they save on a busy 2-core machine.
    """
    eager = tiny_agent("optimization.imagination_horizon=2")
    compiled = tiny_agent("optimization.imagination_horizon=2", "optimization.compile=true")
    assert compiled.cfg.optimization.compile_backend == "inductor"
    results = []
    counters.clear()
    try:
        with torch._inductor.config.patch(fallback_random=True, compile_threads=1):
            for agent in (eager, compiled):
                torch.manual_seed(3)
                terms = agent.update.losses(fixed_batch(agent.info.action_dim))
                losses = [terms[0]["loss_world_model"], terms[1]["loss_actor"], terms[2]["loss_value"]]
                torch.manual_seed(4)
                agent.update.step(fixed_batch(agent.info.action_dim))
                results.append((losses, [p.detach().clone() for p in agent.world_model.parameters()]))
        compiled_stats = {name: dict(counts) for name, counts in counters.items()}
    finally:
        torch._dynamo.reset()
    # Matching eager proves nothing unless the losses really went through dynamo and inductor (a cache hit counts).
    assert compiled_stats.get("frames", {}).get("ok", 0) >= 3, (
        f"optimization.compile=true must compile the world-model, actor and value losses: dynamo {compiled_stats}"
    )
    assert any(key.startswith("fxgraph_cache") for key in compiled_stats.get("inductor", {})), (
        f"optimization.compile=true must compile with its backend, inductor: {compiled_stats}"
    )
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    for name, expected, got in zip(("world model", "actor", "value"), eager_losses, compiled_losses, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"inductor {name} loss differs from eager")
    for expected, got in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg="an inductor update differs from eager")
