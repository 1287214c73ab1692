"""DreamerUpdate: each optimiser steps only its own group, clipping, compiled == eager, and the autocast code path."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from utils.agent import Agent, build_agent
from utils.config import compose_config

B, T = 3, 6


def make_agent(*overrides: str, autocast_dtype: torch.dtype | None = None) -> Agent:
    torch.manual_seed(0)
    return build_agent(compose_config("experiment=debug", *overrides), torch.device("cpu"), autocast_dtype)


def replay_batch(action_dim: int) -> TensorDict:
    generator = torch.Generator().manual_seed(1)
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    return TensorDict(
        {
            "pixels": torch.randint(0, 256, (B, T, 3, 64, 64), dtype=torch.uint8, generator=generator),
            "action": torch.rand(B, T, action_dim, generator=generator) * 2 - 1,
            "reward": torch.rand(B, T, 1, generator=generator),
            "terminated": torch.zeros(B, T, 1, dtype=torch.bool),
            "is_first": is_first,
        },
        batch_size=[B, T],
    )


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


@pytest.mark.parametrize("stepping", ["world_model", "actor", "value"])
def test_each_optimiser_changes_only_its_own_parameters(stepping: str) -> None:
    frozen_rates = [f"optimization.{name}_lr=0.0" for name in ("world_model", "actor", "value") if name != stepping]
    agent = make_agent(*frozen_rates)
    before = {name: snapshot(getattr(agent, name)) for name in ("world_model", "actor", "value")}
    metrics = agent.update.step(replay_batch(agent.info.action_dim))
    for name in ("world_model", "actor", "value"):
        assert changed(getattr(agent, name), before[name]) == (name == stepping), name
    assert {"loss/world_model", "loss/actor", "loss/value", "grad_norm/actor"} <= set(metrics)


def test_world_model_step_matches_the_world_model_part_of_a_full_step() -> None:
    """With actor and value frozen, a full step and a world-model-only step leave the same world model."""
    frozen = ("optimization.actor_lr=0.0", "optimization.value_lr=0.0")
    full, alone = make_agent(*frozen), make_agent(*frozen)
    actor_before, value_before = snapshot(alone.actor), snapshot(alone.value)
    torch.manual_seed(3)
    full.update.step(replay_batch(full.info.action_dim))
    torch.manual_seed(3)
    terms = alone.update.world_model_step(replay_batch(alone.info.action_dim))
    for after_full, after_alone in zip(full.world_model.parameters(), alone.world_model.parameters(), strict=True):
        torch.testing.assert_close(after_alone, after_full)
    assert not changed(alone.actor, actor_before) and not changed(alone.value, value_before)
    assert {"loss_world_model", "kl"} <= set(terms.keys())


def test_gradients_are_clipped_per_group() -> None:
    agent = make_agent("optimization.grad_clip=0.001")
    metrics = agent.update.step(replay_batch(agent.info.action_dim))
    for name in ("world_model", "actor", "value"):
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in getattr(agent, name).parameters() if p.grad is not None])
        )
        assert metrics[f"grad_norm/{name}"] > 0.001  # the logged norm is the one before clipping
        assert norm <= 0.001 * (1 + 1e-4)


def test_compiled_losses_match_eager_on_a_fixed_batch() -> None:
    eager = make_agent()
    compiled = make_agent("optimization.compile=true", "optimization.compile_backend=aot_eager")
    compiled.world_model.load_state_dict(eager.world_model.state_dict())
    compiled.actor.load_state_dict(eager.actor.state_dict())
    compiled.value.load_state_dict(eager.value.state_dict())
    results = []
    for agent in (eager, compiled):
        torch.manual_seed(3)
        terms = agent.update.losses(replay_batch(agent.info.action_dim))
        results.append([terms[0]["loss_world_model"], terms[1]["loss_actor"], terms[2]["loss_value"]])
    for eager_value, compiled_value in zip(*results, strict=True):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-4, atol=1e-4)
    before = snapshot(compiled.actor)
    compiled.update.step(replay_batch(compiled.info.action_dim))
    assert changed(compiled.actor, before)


def test_bfloat16_autocast_update_keeps_the_gru_in_float32() -> None:
    """The CUDA autocast path, exercised with the CPU's autocast: finite losses and a float32 recurrent state."""
    agent = make_agent(autocast_dtype=torch.bfloat16)
    assert not any(scaler.is_enabled() for scaler in agent.update.scalers.values())
    batch = replay_batch(agent.info.action_dim)
    metrics = agent.update.step(batch)
    assert all(torch.isfinite(value) for value in metrics.values())
    assert batch["deter"].dtype == torch.float32


def test_cpu_bfloat16_matches_float32_on_the_first_step_and_trains() -> None:
    """The CPU bfloat16 path (``optimization.autocast=bfloat16`` on a CPU with native bf16): the first step's losses
    agree with float32 within bfloat16's precision (8 mantissa bits: about 0.4% per rounding), and repeated updates on
    one batch lower the world-model loss with every term finite."""
    float32, bfloat16 = make_agent(), make_agent(autocast_dtype=torch.bfloat16)
    first = []
    for agent in (float32, bfloat16):
        torch.manual_seed(3)
        world_model_terms, _, value_terms = agent.update.losses(replay_batch(agent.info.action_dim))
        first.append([world_model_terms["loss_world_model"], world_model_terms["kl"], value_terms["loss_value"]])
        assert all(term.dtype == torch.float32 for term in first[-1])
    for full, half in zip(*first, strict=True):
        torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
    batch = replay_batch(bfloat16.info.action_dim)
    batch["pixels"] = torch.full_like(batch["pixels"], 220)  # learnable, unlike uniform noise (already at its mean)
    history = [bfloat16.update.step(batch.clone()) for _ in range(12)]
    assert all(torch.isfinite(value) for metrics in history for value in metrics.values())
    # The observation NLL without its constant 0.5 * log(2 pi) per pixel: the squared reconstruction error.
    constant = 3 * 64 * 64 * 0.5 * math.log(2 * math.pi)
    squared_errors = [metrics["loss/observation"] - constant for metrics in history]
    assert squared_errors[-1] < 0.97 * squared_errors[0]


def test_float16_overflow_skips_only_that_groups_step_and_halves_its_scale() -> None:
    agent = make_agent(autocast_dtype=torch.float16)
    before = {name: snapshot(getattr(agent, name)) for name in ("world_model", "actor", "value")}
    scales = {name: scaler.get_scale() for name, scaler in agent.update.scalers.items()}
    metrics = agent.update.step(replay_batch(agent.info.action_dim))
    assert all(torch.isfinite(value) for name, value in metrics.items() if name.startswith("loss/"))
    for name in ("world_model", "actor", "value"):
        overflowed = not torch.isfinite(metrics[f"grad_norm/{name}"])
        assert changed(getattr(agent, name), before[name]) != overflowed, name
        expected_scale = scales[name] / 2 if overflowed else scales[name]
        assert agent.update.scalers[name].get_scale() == expected_scale, name
    # At the initial scale of 2**16 the world-model loss (summed over 64x64x3 pixels) overflows float16.
    assert not torch.isfinite(metrics["grad_norm/world_model"])
