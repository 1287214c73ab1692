"""DreamerV3's world model (Hafner et al., 2023) from TorchRL's V3 layers, as our :class:`WorldModel`.

Parts (sizes from ``cfg.model``; ``F`` = ``deter_dim + stoch_groups * stoch_classes``):

* encoder: pixels ``[*, C, 64, 64]`` in ``[-0.5, 0.5]`` -> TorchRL's ``DreamerV3ImageEncoder`` (stride-2 convs of
  ``cnn_depth * cnn_mults`` channels, channel RMSNorm, SiLU); state vectors ``[*, O]`` -> ``symlog`` then
  ``DreamerV3MLP`` (``mlp_layers`` x ``units``, RMSNorm, SiLU);
* RSSM: ``modules/rssm_v3.py`` (block GRU, ``stoch_groups`` categoricals of ``stoch_classes``, unimix);
* decoder: ``DreamerV3ImageDecoder`` (block-linear projection, transposed convs), shifted to our ``[-0.5, 0.5]``
  pixel range; for state vectors an MLP that predicts ``symlog(x)`` (the loss is symlog-MSE);
* reward head: MLP to ``num_bins`` logits of a two-hot distribution over symexp-spaced bins, output layer scaled by
  ``reward_outscale`` (0: zero-initialised, so it first predicts exactly 0); continue head: MLP to one logit.

TorchRL's image encoder maps its input from ``[0, 1]`` to ``[-0.5, 0.5]`` itself and its decoder adds 0.5 to its
output; the adapters here undo both so that every consumer of :class:`WorldModel` (losses, dream videos,
open-loop predictions) sees pixels in one range for V1 and V3.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchrl.modules import DreamerV3ImageDecoder, DreamerV3ImageEncoder, DreamerV3MLP
from torchrl.modules.models.model_based import symlog

from modules.rssm_v3 import build_rssm_v3
from modules.world_model import WorldModel


class ImageEncoderV3(nn.Module):
    """Pixels ``[*, C, H, W]`` in ``[-0.5, 0.5]`` -> embedding ``[*, E]`` (TorchRL's V3 image encoder)."""

    def __init__(self, core: DreamerV3ImageEncoder) -> None:
        super().__init__()
        self.core = core

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.core(pixels + 0.5)


class VectorEncoderV3(nn.Module):
    """State vector ``[*, O]`` -> ``symlog`` -> MLP -> embedding ``[*, units]``."""

    def __init__(self, core: DreamerV3MLP) -> None:
        super().__init__()
        self.core = core

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.core(symlog(observation))


class ImageDecoderV3(nn.Module):
    """Feature ``[*, F]`` -> pixel means ``[*, C, H, W]`` in our ``[-0.5, 0.5]`` range."""

    def __init__(self, core: DreamerV3ImageDecoder) -> None:
        super().__init__()
        self.core = core

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.core(feature) - 0.5


def mlp_v3(model_cfg: DictConfig, in_dim: int, out_dim: int | None, layers: int, outscale: float = 1.0) -> nn.Module:
    """TorchRL's ``DreamerV3MLP``: ``layers`` x ``units`` (linear, RMSNorm, SiLU), then a linear output layer whose
    initial kernel is scaled by ``outscale`` (none when ``out_dim`` is None)."""
    return DreamerV3MLP(in_dim, out_dim, layers, model_cfg.units, outscale=outscale, norm_eps=model_cfg.norm_eps)


def build_world_model_v3(
    model_cfg: DictConfig,
    *,
    obs_shape: tuple[int, ...],
    from_pixels: bool,
    action_dim: int,
    use_continue: bool,
) -> WorldModel:
    """The V3 world model sized by ``cfg.model`` for observations of ``obs_shape`` (``(C, H, W)`` or ``(O,)``)."""
    if from_pixels:
        image = dict(
            depth=model_cfg.cnn_depth,
            mults=tuple(model_cfg.cnn_mults),
            kernel_size=model_cfg.cnn_kernel,
            norm_eps=model_cfg.norm_eps,
        )
        core = DreamerV3ImageEncoder(in_channels=obs_shape[0], **image)
        encoder, embed_dim = ImageEncoderV3(core), core.output_features(tuple(obs_shape))
    else:
        encoder = VectorEncoderV3(mlp_v3(model_cfg, obs_shape[0], None, model_cfg.mlp_layers))
        embed_dim = model_cfg.units
    rssm = build_rssm_v3(model_cfg, action_dim, embed_dim)
    feature_dim = rssm.prior.deter_dim + rssm.prior.stoch_dim
    if from_pixels:
        decoder = ImageDecoderV3(
            DreamerV3ImageDecoder(feature_dim, tuple(obs_shape), num_blocks=model_cfg.blocks, **image)
        )
    else:
        decoder = mlp_v3(model_cfg, feature_dim, obs_shape[0], model_cfg.mlp_layers)
    reward_head = mlp_v3(
        model_cfg, feature_dim, model_cfg.num_bins, model_cfg.reward_layers, outscale=model_cfg.reward_outscale
    )
    continue_head = (
        mlp_v3(model_cfg, feature_dim, 1, model_cfg.continue_layers, outscale=model_cfg.continue_outscale)
        if use_continue
        else None
    )
    return WorldModel(encoder, rssm, decoder, reward_head, continue_head, from_pixels=from_pixels)
