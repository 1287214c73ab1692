"""Dense heads that read the model feature ``[*, F]`` (Hafner et al., 2020, App. A), sized by ``cfg.model``.

* reward: ``reward_layers x dense_units`` ELU -> 1, the mean of a unit-variance Gaussian;
* continue: ``continue_layers x dense_units`` ELU -> 1, the logit of a Bernoulli (1 = the episode goes on);
* value: ``value_layers x dense_units`` ELU -> 1, the mean of a unit-variance Gaussian.

Each is a ``build_mlp`` ``nn.Sequential`` mapping ``[*, F]`` to ``[*, 1]``.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from modules.mlp import build_mlp


def build_reward_head(model_cfg: DictConfig, feature_dim: int) -> nn.Sequential:
    """Reward mean ``[*, 1]`` from ``[*, F]``."""
    return build_mlp(feature_dim, 1, model_cfg.dense_units, model_cfg.reward_layers)


def build_continue_head(model_cfg: DictConfig, feature_dim: int) -> nn.Sequential:
    """Continue logit ``[*, 1]`` from ``[*, F]``."""
    return build_mlp(feature_dim, 1, model_cfg.dense_units, model_cfg.continue_layers)


def build_value_head(model_cfg: DictConfig, feature_dim: int) -> nn.Sequential:
    """State-value mean ``[*, 1]`` from ``[*, F]``."""
    return build_mlp(feature_dim, 1, model_cfg.dense_units, model_cfg.value_layers)
