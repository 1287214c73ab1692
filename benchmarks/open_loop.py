"""Open-loop accuracy of the world model: how well does the prior predict what the actor will imagine?

    python benchmarks/open_loop.py                       # Pendulum preset against the paper's KL settings
    python benchmarks/open_loop.py --variant "optimization.kl_scale=0.1" --variant "" --json out.json
    python benchmarks/open_loop.py --updates 20 --episodes 2 experiment=debug   # Hydra overrides last

The actor learns only from the prior's imagined rollouts, so a world model that reconstructs its inputs well but
predicts poorly open-loop cannot teach it anything. Each ``--variant`` is a space-separated list of Hydra overrides
applied on top of the base config (the positional overrides; default ``experiment=pendulum``). For each variant the
script trains a fresh world model (only the world model: ``DreamerUpdate.world_model_step``, sizes and rates from
the config) for ``--updates`` updates on ``--episodes`` episodes of uniformly random actions, then, on held-out
random episodes, filters the first ``--context`` steps with the posterior and rolls the prior ``--horizon`` steps
ahead with the recorded actions (using the prior's mean, no observations). It prints, per variant and imagined step
``k``, the mean squared error of the decoded observation and of the predicted reward (in environment units) against
the recorded ones, with two baselines: predicting the last filtered observation ("copy last") and the variance of
the data. It also reports the final mean KL (free nats clamp the loss below their value: where the KL sits below,
the prior gets no gradient). The default variants compare the Pendulum preset (KL balancing) with the paper's KL
term, with no free nats and no balancing, and with a 100× lighter KL term. JSON: one record per (variant, step), with
the variant's ``free_nats``, ``kl_scale`` and ``kl_balance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.rssm import feature  # noqa: E402
from modules.world_model import WorldModel  # noqa: E402
from utils.agent import build_agent  # noqa: E402
from utils.config import compose_config  # noqa: E402
from utils.envs import make_env, obs_key  # noqa: E402
from utils.replay import StepRecorder, make_replay_buffer, sample_sequences  # noqa: E402
from utils.update import DreamerUpdate  # noqa: E402

DEFAULT_OVERRIDES = ["experiment=pendulum"]
HELD_OUT_SEED_OFFSET = 50_000


def random_episodes(cfg: DictConfig, episodes: int, seed_offset: int) -> TensorDict:
    """``episodes`` episodes of uniformly random actions in the replay step format, stacked ``[E, T]``.

    Every episode runs to the configured limit, so all have the same length ``T`` (the limit plus the reset step).
    """
    env = make_env(cfg.env, seed_offset=seed_offset)
    recorder = StepRecorder(obs_key(cfg.env), num_envs=1)
    max_steps = cfg.env.max_episode_frames // cfg.env.action_repeat
    steps = []
    for episode in range(episodes):
        env.set_seed(cfg.env.seed + seed_offset + episode)
        steps.append(recorder.convert(env.rollout(max_steps)))
        recorder.expect_reset()
    env.close()
    return torch.stack(steps)


def train_world_model(update: DreamerUpdate, data: TensorDict, cfg: DictConfig, updates: int) -> float:
    """``updates`` world-model-only steps on sequences sampled from ``data [E, T]``; returns the last batch-mean KL."""
    replay = make_replay_buffer(data.numel(), cfg.replay_buffer.batch_length, "memory", None)
    replay.extend(data.reshape(-1))
    kl = float("nan")
    for _ in range(updates):
        terms = update.world_model_step(
            sample_sequences(replay, cfg.replay_buffer.batch_size, cfg.replay_buffer.batch_length)
        )
        kl = terms["kl"].item()
    return kl


@torch.no_grad()
def open_loop_errors(
    world_model: WorldModel, episodes: TensorDict, context: int, horizon: int, reward_scale: float
) -> dict[str, torch.Tensor]:
    """Squared errors ``[horizon]`` of the prior's open-loop predictions on ``episodes [E, T]`` after ``context`` steps.

    Returns ``observation`` and ``reward`` (model vs recorded, averaged over episodes and observation dims),
    ``copy_last`` (the last filtered observation as the prediction) and the data variances ``observation_var``
    and ``reward_var`` (scalars) for scale.
    """
    filtered = episodes[:, :context].clone()
    world_model(filtered)
    deter, stoch = filtered["deter"][:, -1], filtered["stoch"][:, -1]
    target = world_model.preprocess(episodes[world_model.obs_key][:, context : context + horizon])
    last = world_model.preprocess(episodes[world_model.obs_key][:, context - 1])
    predicted_obs, predicted_reward = [], []
    for k in range(horizon):
        deter, mean, _, _ = world_model.rssm.prior(deter, stoch, episodes["action"][:, context + k])
        stoch = mean
        state = feature(deter, stoch)
        predicted_obs.append(world_model.decoder(state))
        predicted_reward.append(world_model.reward_head(state) / reward_scale)
    predicted_obs = torch.stack(predicted_obs, dim=1)
    predicted_reward = torch.stack(predicted_reward, dim=1)
    reward = episodes["reward"][:, context : context + horizon]
    return {
        "observation": (predicted_obs - target).square().flatten(2).mean(-1).mean(0),
        "reward": (predicted_reward - reward).square().flatten(2).mean(-1).mean(0),
        "copy_last": (last.unsqueeze(1) - target).square().flatten(2).mean(-1).mean(0),
        "observation_var": target.var(dim=(0, 1)).mean(),
        "reward_var": reward.var(),
    }


DEFAULT_VARIANTS = [
    "optimization.free_nats=3 optimization.kl_balance=null",  # the paper's KL term
    "optimization.kl_balance=null",  # free nats 0, no KL balancing
    "optimization.kl_balance=null optimization.kl_scale=0.01",  # a lighter KL term: the posterior keeps more detail
    "",  # the preset as it is (free nats 0, KL balancing 0.8)
]


def measure(
    cfg: DictConfig, variant: str, train: TensorDict, held_out: TensorDict, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Trains a world model on ``train [E, T]`` under ``cfg``; returns one record per imagined step on ``held_out``."""
    torch.manual_seed(cfg.env.seed)
    agent = build_agent(cfg, torch.device("cpu"), None)
    start = time.perf_counter()
    kl = train_world_model(agent.update, train, cfg, args.updates)
    minutes = (time.perf_counter() - start) / 60
    errors = open_loop_errors(agent.world_model, held_out, args.context, args.horizon, cfg.optimization.reward_scale)
    return [
        {
            "variant": variant,
            "free_nats": cfg.optimization.free_nats,
            "kl_scale": cfg.optimization.kl_scale,
            "kl_balance": cfg.optimization.kl_balance,
            "step": k + 1,
            "observation_mse": errors["observation"][k].item(),
            "copy_last_mse": errors["copy_last"][k].item(),
            "observation_var": errors["observation_var"].item(),
            "reward_mse": errors["reward"][k].item(),
            "reward_var": errors["reward_var"].item(),
            "final_kl": kl,
            "updates": args.updates,
            "train_minutes": minutes,
        }
        for k in range(args.horizon)
    ]


def print_table(records: list[dict[str, Any]], steps: list[int]) -> None:
    print(
        f"{'free nats':>9} {'KL scale':>8} {'balance':>7} {'KL':>6} | "
        + " | ".join(f"step {k:>2}: obs / reward MSE" for k in steps)
    )
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = {r["step"]: r for r in records if r["variant"] == variant}
        first = rows[1]
        cells = " | ".join(f"{rows[k]['observation_mse']:10.3f} / {rows[k]['reward_mse']:8.2f}" for k in steps)
        balance = "-" if first["kl_balance"] is None else f"{first['kl_balance']:g}"
        print(f"{first['free_nats']:>9g} {first['kl_scale']:>8g} {balance:>7} {first['final_kl']:6.2f} | {cells}")
    first = records[0]
    baseline = " | ".join(
        f"{next(r['copy_last_mse'] for r in records if r['step'] == k):10.3f} / {'':>8}" for k in steps
    )
    print(f"{'copy last':>33} | {baseline}")
    print(f"data variance: observation {first['observation_var']:.3f}, reward {first['reward_var']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="space-separated Hydra overrides on top of the base config; repeat to compare (default: DEFAULT_VARIANTS)",
    )
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--episodes", type=int, default=60, help="random training episodes")
    parser.add_argument("--held-out-episodes", type=int, default=10)
    parser.add_argument("--context", type=int, default=10, help="steps filtered before imagining")
    parser.add_argument("--horizon", type=int, default=15, help="imagined steps (the paper's horizon)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=pendulum)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = args.overrides or DEFAULT_OVERRIDES
    cfg = compose_config(*base)
    train = random_episodes(cfg, args.episodes, 0)
    held_out = random_episodes(cfg, args.held_out_episodes, HELD_OUT_SEED_OFFSET)
    records = [
        record
        for variant in (args.variant if args.variant is not None else DEFAULT_VARIANTS)
        for record in measure(compose_config(*base, *variant.split()), variant, train, held_out, args)
    ]
    print_table(records, sorted({1, min(5, args.horizon), min(10, args.horizon), args.horizon}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
