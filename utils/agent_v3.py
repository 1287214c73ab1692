"""Builds DreamerV3's learner from ``cfg.model`` / ``cfg.optimization`` (``model=dreamer_v3``): the world model,
actor and critic, their losses and the update. ``utils/agent.py`` wraps them with the acting policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import nn
from torchrl.modules import PercentileValueNorm, SymExpTwoHot

from losses.behaviour_v3 import BehaviourLossV3
from losses.world_model_v3 import WorldModelLossV3
from modules.actor_v3 import ActorV3, build_value_head_v3
from modules.world_model import WorldModel
from modules.world_model_v3 import build_world_model_v3
from utils.update_v3 import DreamerV3Update, make_slow_copy

if TYPE_CHECKING:
    from utils.agent import EnvInfo


def build_v3_learner(
    cfg: DictConfig,
    info: EnvInfo,
    use_continue: bool,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> tuple[WorldModel, ActorV3, nn.Module, DreamerV3Update]:
    """``(world_model, actor, value, update)`` of DreamerV3 for the configured environment, on ``device``."""
    model, opt = cfg.model, cfg.optimization
    world_model = build_world_model_v3(
        model,
        obs_shape=info.obs_shape,
        from_pixels=cfg.env.from_pixels,
        action_dim=info.action_dim,
        use_continue=use_continue,
    ).to(device)
    feature_dim = world_model.feature_dim
    actor = ActorV3(model, feature_dim, info.action_dim, info.discrete).to(device)
    value = build_value_head_v3(model, feature_dim).to(device)
    slow_value = make_slow_copy(value)
    bins = SymExpTwoHot(model.num_bins).bins.to(device)
    world_model_loss = WorldModelLossV3(
        world_model,
        bins=bins,
        free_nats=opt.free_nats,
        unimix=model.unimix,
        rec_scale=opt.rec_scale,
        reward_scale=opt.reward_loss_scale,
        continue_scale=opt.continue_scale,
        dyn_scale=opt.dyn_scale,
        rep_scale=opt.rep_scale,
        horizon=opt.horizon,
    )
    return_norm = PercentileValueNorm(
        quantiles=(opt.retnorm_low / 100, opt.retnorm_high / 100),
        rate=opt.retnorm_rate,
        min_scale=opt.retnorm_limit,
        device=device,
    )
    behaviour_loss = BehaviourLossV3(
        world_model.rssm.prior,
        actor,
        value,
        slow_value,
        world_model.reward_head,
        world_model.continue_head,
        bins=bins,
        horizon=opt.imagination_horizon,
        discount_horizon=opt.horizon,
        lambda_=opt.return_lambda,
        actor_entropy=opt.actor_entropy,
        slowreg_scale=opt.slowreg_scale,
        actor_scale=opt.actor_scale,
        value_scale=opt.value_scale,
        repval_scale=opt.repval_scale,
        actor_grad=opt.actor_grad,
        return_norm=return_norm,
    )
    update = DreamerV3Update(
        modules={"world_model": world_model, "actor": actor, "value": value},
        slow_value=slow_value,
        world_model_loss=world_model_loss,
        behaviour_loss=behaviour_loss,
        opt_cfg=opt,
        device=device,
        autocast_dtype=autocast_dtype,
    )
    return world_model, actor, value, update
