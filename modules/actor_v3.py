"""DreamerV3's actor and critic (Hafner et al., 2023; the authors' ``policy`` and ``value`` heads).

* Continuous actions: an MLP (``actor_layers`` x ``units``, RMSNorm, SiLU) to ``2A`` raw outputs whose output
  layer is scaled by ``actor_outscale`` at initialisation, read as a :class:`BoundedNormal` (mean ``tanh``, std
  ``(max_std - min_std) sigmoid(x + 2) + min_std``). Its samples are not clipped (the environment clips them, and
  the acting policy does too); its mode is the mean.
* Discrete actions: the same MLP to ``K`` logits, a one-hot categorical with ``actor_unimix`` uniform probability.
* Critic: an MLP (``value_layers`` x ``units``) to ``num_bins`` logits of a two-hot distribution over
  symexp-spaced bins, output layer scaled by ``value_outscale`` (0: it first predicts exactly 0).

Neither actor has a differentiable sample for a discrete action: behaviour learning uses REINFORCE by default, and
the ``dynamics`` gradient (``optimization.actor_grad``) needs a continuous actor (``rsample``).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributions import Distribution

from modules.actor import Actor
from modules.v3_distributions import BoundedNormal, UnimixOneHotCategorical
from modules.world_model_v3 import mlp_v3


class ActorV3(Actor):
    """``feature [*, F]`` -> bounded-normal (continuous) or unimix one-hot (discrete) action distribution."""

    def __init__(self, model_cfg: DictConfig, feature_dim: int, action_dim: int, discrete: bool) -> None:
        super().__init__()
        self.discrete = discrete
        self.min_std, self.max_std, self.unimix = (
            model_cfg.actor_min_std,
            model_cfg.actor_max_std,
            model_cfg.actor_unimix,
        )
        outputs = action_dim if discrete else 2 * action_dim
        self.net = mlp_v3(model_cfg, feature_dim, outputs, model_cfg.actor_layers, outscale=model_cfg.actor_outscale)

    def distribution(self, feature: torch.Tensor) -> Distribution:
        raw = self.net(feature).float()
        if self.discrete:
            return UnimixOneHotCategorical(raw, self.unimix, validate_args=False)
        mean_raw, std_raw = raw.chunk(2, dim=-1)
        return BoundedNormal(mean_raw, std_raw, self.min_std, self.max_std, validate_args=False)

    def mode(self, feature: torch.Tensor) -> torch.Tensor:
        return self.distribution(feature).deterministic_sample


def build_value_head_v3(model_cfg: DictConfig, feature_dim: int) -> nn.Module:
    """The critic: ``feature [*, F]`` -> two-hot logits ``[*, num_bins]``."""
    return mlp_v3(model_cfg, feature_dim, model_cfg.num_bins, model_cfg.value_layers, outscale=model_cfg.value_outscale)
