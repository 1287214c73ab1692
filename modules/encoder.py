"""Observation encoders of Dreamer (Hafner et al., 2020, App. A; the authors' ``ConvEncoder``).

Pixels: four ``4x4`` convolutions of stride 2 with ``cnn_depth * (1, 2, 4, 8)`` channels and ReLU,
flattened. A ``[*, C, 64, 64]`` image in ``[-0.5, 0.5]`` gives a ``[*, 32 * cnn_depth]`` embedding
(1024 at the paper's ``cnn_depth = 32``). State vectors: an MLP of ``mlp_layers x dense_units`` ELU
to ``mlp_embed_dim``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from modules.mlp import build_mlp

DEPTH_MULTIPLIERS = (1, 2, 4, 8)
KERNEL_SIZE = 4
STRIDE = 2


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in ``[0, 255]`` to float32 in ``[-0.5, 0.5]`` (same shape)."""
    return pixels.float() / 255.0 - 0.5


class PixelEncoder(nn.Module):
    """``[*, C, H, W]`` float pixels in ``[-0.5, 0.5]`` to a flat ``[*, E]`` embedding.

    Any number of leading dimensions (``[B, T]``, ``[N]``, ...) is accepted.
    """

    def __init__(self, in_channels: int, cnn_depth: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for multiplier in DEPTH_MULTIPLIERS:
            layers += [nn.Conv2d(channels, multiplier * cnn_depth, KERNEL_SIZE, STRIDE), nn.ReLU()]
            channels = multiplier * cnn_depth
        self.convs = nn.Sequential(*layers)

    def output_dim(self, image_size: tuple[int, int]) -> int:
        """Embedding size ``E`` for images of ``(H, W)`` pixels (``32 * cnn_depth`` at 64x64)."""
        height, width = image_size
        for _ in DEPTH_MULTIPLIERS:
            height, width = (height - KERNEL_SIZE) // STRIDE + 1, (width - KERNEL_SIZE) // STRIDE + 1
        return self.convs[-2].out_channels * height * width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        lead_shape = pixels.shape[:-3]
        embedding = self.convs(pixels.reshape(-1, *pixels.shape[-3:]))
        return embedding.reshape(*lead_shape, -1)


def build_encoder(model_cfg: DictConfig, obs_shape: tuple[int, ...], from_pixels: bool) -> tuple[nn.Module, int]:
    """The encoder for ``obs_shape`` (``(C, H, W)`` pixels or ``(O,)`` states) and its embedding size ``E``."""
    if from_pixels:
        channels, height, width = obs_shape
        encoder = PixelEncoder(channels, model_cfg.cnn_depth)
        return encoder, encoder.output_dim((height, width))
    (obs_dim,) = obs_shape
    encoder = build_mlp(obs_dim, model_cfg.mlp_embed_dim, model_cfg.dense_units, model_cfg.mlp_layers)
    return encoder, model_cfg.mlp_embed_dim
