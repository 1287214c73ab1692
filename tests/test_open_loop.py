"""The open-loop world-model benchmark: step alignment of its errors, and a tiny end-to-end run with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tensordict import TensorDict

from benchmarks.open_loop import main, open_loop_errors
from utils.agent import build_agent
from utils.config import compose_config

TINY_PENDULUM = [
    "experiment=pendulum",
    "model.deter_dim=8",
    "model.stoch_dim=2",
    "model.rssm_hidden_dim=8",
    "model.dense_units=8",
    "model.mlp_embed_dim=8",
    "replay_buffer.batch_size=2",
    "replay_buffer.batch_length=4",
]


def test_errors_line_up_with_the_imagined_steps() -> None:
    """On episodes whose observation and reward at step t equal t, copying the last filtered observation (step
    ``context - 1``) misses step ``context + k`` by ``k + 1``; a reward head that always predicts 0 misses by
    ``context + k``."""
    agent = build_agent(compose_config(*TINY_PENDULUM), torch.device("cpu"), None)
    torch.nn.init.zeros_(agent.world_model.reward_head[-1].weight)
    torch.nn.init.zeros_(agent.world_model.reward_head[-1].bias)
    episodes, length, context, horizon = 3, 12, 4, 5
    time_index = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(episodes, length, 1)
    data = TensorDict(
        {
            "observation": time_index.expand(episodes, length, 3).clone(),
            "action": torch.zeros(episodes, length, 1),
            "reward": time_index.clone(),
            "is_first": (time_index == 0).clone(),
        },
        batch_size=[episodes, length],
    )
    errors = open_loop_errors(agent.world_model, data, context, horizon, reward_scale=0.5)
    steps = torch.arange(horizon, dtype=torch.float32)
    torch.testing.assert_close(errors["copy_last"], (steps + 1).square())
    torch.testing.assert_close(errors["reward"], (steps + context).square())
    assert errors["observation"].shape == (horizon,)


def test_tiny_run_writes_one_record_per_variant_and_step(tmp_path: Path) -> None:
    out = tmp_path / "open_loop.json"
    variants = ["--variant", "optimization.free_nats=3 optimization.kl_balance=null", "--variant", ""]
    args = [*variants, "--updates", "2", "--episodes", "1", "--held-out-episodes", "2", "--context", "3"]
    assert main([*args, "--horizon", "4", "--json", str(out), *TINY_PENDULUM]) == 0
    records = json.loads(out.read_text())
    preset = compose_config(*TINY_PENDULUM).optimization
    expected = [(3.0, None, k) for k in range(1, 5)] + [(preset.free_nats, preset.kl_balance, k) for k in range(1, 5)]
    assert [(r["free_nats"], r["kl_balance"], r["step"]) for r in records] == expected
    for record in records:
        assert all(torch.isfinite(torch.tensor(float(record[key]))) for key in ("observation_mse", "reward_mse"))
    # Both variants saw the same held-out data.
    assert records[0]["copy_last_mse"] == records[4]["copy_last_mse"]
