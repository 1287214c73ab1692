"""DreamerV3's world model (Hafner et al., 2023) from TorchRL's V3 layers, as our :class:`WorldModel`.

Parts (sizes from ``cfg.model``; ``F`` = ``deter_dim + stoch_groups * stoch_classes``):

* encoder: pixels ``[*, C, 64, 64]`` in ``[-0.5, 0.5]`` -> the authors' CNN (``modules/image_v3.py``: stride-1
  convs of ``cnn_depth * cnn_mults`` channels each followed by 2x2 max-pooling, channel RMSNorm, SiLU), or with
  ``cnn_strided: true`` TorchRL's ``DreamerV3ImageEncoder`` (stride-2 convs); state vectors ``[*, O]`` -> ``symlog``
  then ``DreamerV3MLP`` (``mlp_layers`` x ``units``, RMSNorm, SiLU);
* RSSM: ``modules/rssm_v3.py`` (block GRU, ``stoch_groups`` categoricals of ``stoch_classes``, unimix);
* decoder: the authors' (block-linear projection of ``h`` plus an MLP projection of ``z``, then nearest-neighbour
  upsampling and stride-1 convs, sigmoid mean) or TorchRL's ``DreamerV3ImageDecoder`` (transposed convs), both
  in our ``[-0.5, 0.5]`` pixel range; for state vectors an MLP that predicts ``symlog(x)`` (symlog-MSE loss);
* reward head: MLP to ``num_bins`` logits of a two-hot distribution over symexp-spaced bins, output layer scaled by
  ``reward_outscale`` (0: zero-initialised, so it first predicts exactly 0); continue head: MLP to one logit.

TorchRL's image layers implement the authors' ``strided: True`` variant, not their default. Its encoder maps its
input from ``[0, 1]`` to ``[-0.5, 0.5]`` itself and its decoder adds 0.5 to its output; the adapters here undo both,
so that every consumer of :class:`WorldModel` (losses, dream videos, open-loop predictions) sees pixels in one range
for V1 and V3.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchrl.modules import DreamerV3ImageDecoder, DreamerV3ImageEncoder, DreamerV3MLP
from torchrl.modules.models.model_based import symlog

from modules.image_v3 import UnstridedImageDecoderV3, UnstridedImageEncoderV3
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


def _image_encoder(model_cfg: DictConfig, obs_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """The pixel encoder and its embedding size: the authors' (``cnn_strided: false``) or TorchRL's strided one."""
    sizes = dict(depth=model_cfg.cnn_depth, mults=tuple(model_cfg.cnn_mults), norm_eps=model_cfg.norm_eps)
    if model_cfg.cnn_strided:
        core = DreamerV3ImageEncoder(in_channels=obs_shape[0], kernel_size=model_cfg.cnn_kernel, **sizes)
        return ImageEncoderV3(core), core.output_features(obs_shape)
    encoder = UnstridedImageEncoderV3(obs_shape[0], kernel=model_cfg.cnn_kernel, **sizes)
    return encoder, encoder.output_features(obs_shape)


def _image_decoder(model_cfg: DictConfig, obs_shape: tuple[int, int, int], deter_dim: int, stoch_dim: int) -> nn.Module:
    """The pixel decoder: the authors' (``cnn_strided: false``) or TorchRL's strided one."""
    sizes = dict(depth=model_cfg.cnn_depth, mults=tuple(model_cfg.cnn_mults), norm_eps=model_cfg.norm_eps)
    if model_cfg.cnn_strided:
        core = DreamerV3ImageDecoder(
            deter_dim + stoch_dim, obs_shape, kernel_size=model_cfg.cnn_kernel, num_blocks=model_cfg.blocks, **sizes
        )
        return ImageDecoderV3(core)
    return UnstridedImageDecoderV3(
        deter_dim,
        stoch_dim,
        obs_shape,
        units=model_cfg.units,
        kernel=model_cfg.cnn_kernel,
        block_space=model_cfg.dec_block_space,
        outscale=model_cfg.decoder_outscale,
        **sizes,
    )


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
        encoder, embed_dim = _image_encoder(model_cfg, tuple(obs_shape))
    else:
        encoder = VectorEncoderV3(mlp_v3(model_cfg, obs_shape[0], None, model_cfg.mlp_layers))
        embed_dim = model_cfg.units
    rssm = build_rssm_v3(model_cfg, action_dim, embed_dim)
    feature_dim = rssm.prior.deter_dim + rssm.prior.stoch_dim
    if from_pixels:
        decoder = _image_decoder(model_cfg, tuple(obs_shape), rssm.prior.deter_dim, rssm.prior.stoch_dim)
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
