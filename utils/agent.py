"""Builds the whole agent from the config: networks, losses, the update, the acting policy and its environments."""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig
from torch import nn
from torchrl.data import OneHot
from torchrl.envs import EnvBase, RewardSum, TransformedEnv

from losses.behaviour import ActorLoss, ValueLoss
from losses.world_model import WorldModelLoss
from modules.actor import build_actor
from modules.heads import build_value_head
from modules.init import initialize
from modules.policy import DreamerPolicy
from modules.world_model import WorldModel, build_world_model
from utils.agent_v3 import build_v3_learner
from utils.config import algorithm
from utils.envs import add_recurrent_primer, can_terminate, make_env, obs_key
from utils.update import DreamerUpdate
from utils.update_v3 import DreamerV3Update

EVAL_SEED_OFFSET = 10_000


@dataclasses.dataclass
class EnvInfo:
    """What the networks need to know about the environment."""

    obs_key: str
    obs_shape: tuple[int, ...]
    action_dim: int
    discrete: bool

    @classmethod
    def probe(cls, env_cfg: DictConfig) -> EnvInfo:
        env = make_env(_single(env_cfg))
        key = obs_key(env_cfg)
        info = cls(
            obs_key=key,
            obs_shape=tuple(env.observation_spec[key].shape),
            action_dim=env.action_spec.shape[-1],
            discrete=isinstance(env.action_spec, OneHot),
        )
        env.close()
        return info


def _single(env_cfg: DictConfig) -> DictConfig:
    single = env_cfg.copy()
    single.num_envs = 1
    return single


@dataclasses.dataclass
class Agent:
    """The trained parts (``world_model``, ``actor``, ``value``), their ``update`` and the acting ``policy``."""

    cfg: DictConfig
    device: torch.device
    info: EnvInfo
    world_model: WorldModel
    actor: nn.Module
    value: nn.Module
    policy: DreamerPolicy
    update: DreamerUpdate | DreamerV3Update

    @property
    def obs_key(self) -> str:
        return self.info.obs_key

    @property
    def from_pixels(self) -> bool:
        return bool(self.cfg.env.from_pixels)

    def _with_primer(self, env: EnvBase) -> TransformedEnv:
        prior = self.world_model.rssm.prior
        env = add_recurrent_primer(env, prior.deter_dim, prior.stoch_dim, self.info.action_dim)
        env.append_transform(RewardSum())
        return env

    def make_train_env(self) -> TransformedEnv:
        """``env.num_envs`` training environments with the policy's recurrent keys and episode returns."""
        return self._with_primer(make_env(self.cfg.env))

    def make_eval_env(self, seed_offset: int = EVAL_SEED_OFFSET) -> TransformedEnv:
        """One evaluation environment, seeded apart from the training ones."""
        return self._with_primer(make_env(_single(self.cfg.env), seed_offset=seed_offset, device=self.device))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: getattr(self, name).state_dict() for name in ("world_model", "actor", "value")}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in ("world_model", "actor", "value"):
            getattr(self, name).load_state_dict(state[name])


def build_agent(cfg: DictConfig, device: torch.device, autocast_dtype: torch.dtype | None) -> Agent:
    """Every network sized by ``cfg.model`` for the configured environment, on ``device``: Dreamer V1, or
    DreamerV3 with ``model=dreamer_v3`` (``utils/agent_v3.py``)."""
    info = EnvInfo.probe(cfg.env)
    model, opt = cfg.model, cfg.optimization
    use_continue = can_terminate(cfg.env) if model.continue_head == "auto" else bool(model.continue_head)
    if algorithm(model) == "dreamer_v3":
        world_model, actor, value, update = build_v3_learner(cfg, info, use_continue, device, autocast_dtype)
        return Agent(cfg, device, info, world_model, actor, value, _policy(cfg, info, world_model, actor), update)
    world_model = build_world_model(
        model,
        obs_shape=info.obs_shape,
        from_pixels=cfg.env.from_pixels,
        action_dim=info.action_dim,
        use_continue=use_continue,
    )
    feature_dim = world_model.feature_dim
    actor = build_actor(model, feature_dim, info.action_dim, info.discrete, cfg.eval.actor_mode)
    value = build_value_head(model, feature_dim)
    world_model, actor, value = (initialize(net, model.init).to(device) for net in (world_model, actor, value))
    world_model_loss = WorldModelLoss(
        world_model,
        free_nats=opt.free_nats,
        kl_scale=opt.kl_scale,
        continue_scale=opt.continue_scale,
        reward_scale=opt.reward_scale,
        kl_balance=opt.kl_balance,
        free_nats_mode=opt.free_nats_mode,
        reward_transform=opt.reward_transform,
    )
    actor_loss = ActorLoss(
        world_model.rssm.prior,
        actor,
        value,
        world_model.reward_head,
        world_model.continue_head,
        horizon=opt.imagination_horizon,
        discount=opt.discount,
        lambda_=opt.return_lambda,
    )
    value_loss = ValueLoss(value)
    update = DreamerUpdate(
        world_model=world_model,
        actor=actor,
        value=value,
        world_model_loss=world_model_loss,
        actor_loss=actor_loss,
        value_loss=value_loss,
        opt_cfg=opt,
        device=device,
        autocast_dtype=autocast_dtype,
        compile=opt.compile,
        compile_backend=opt.compile_backend,
    )
    return Agent(cfg, device, info, world_model, actor, value, _policy(cfg, info, world_model, actor), update)


def _policy(cfg: DictConfig, info: EnvInfo, world_model: WorldModel, actor: nn.Module) -> DreamerPolicy:
    """The acting policy on the world model's encoder and RSSM."""
    return DreamerPolicy(
        world_model.encoder,
        world_model.rssm.prior,
        world_model.rssm.posterior,
        actor,
        observation_key=info.obs_key,
        exploration_noise=cfg.collector.exploration_noise,
    )
