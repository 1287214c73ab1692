"""Observation decoders of Dreamer (Hafner et al., 2020, App. A; the authors' ``ConvDecoder``).

The decoder maps the model feature ``[*, F]`` to the mean of a unit-variance Gaussian over the
observation. Pixels: a linear layer to ``32 * cnn_depth`` units seen as a ``1x1`` image, then four
transposed convolutions of stride 2 with kernels ``5, 5, 6, 6`` and ``cnn_depth * (4, 2, 1)``, ``C``
channels (ReLU between them, none after the last): ``[*, C, 64, 64]``. State vectors: an MLP of
``mlp_layers x dense_units`` ELU to ``O``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from modules.mlp import build_mlp

IMAGE_SIZE = 64
KERNEL_SIZES = (5, 5, 6, 6)
DEPTH_MULTIPLIERS = (4, 2, 1)
STRIDE = 2


class PixelDecoder(nn.Module):
    """``[*, F]`` features to ``[*, C, 64, 64]`` image means (in the ``[-0.5, 0.5]`` pixel scale)."""

    def __init__(self, feature_dim: int, out_channels: int, cnn_depth: int = 32) -> None:
        super().__init__()
        self.bottleneck = 32 * cnn_depth
        self.linear = nn.Linear(feature_dim, self.bottleneck)
        widths = (self.bottleneck, *(multiplier * cnn_depth for multiplier in DEPTH_MULTIPLIERS), out_channels)
        layers: list[nn.Module] = []
        for index, kernel in enumerate(KERNEL_SIZES):
            layers.append(nn.ConvTranspose2d(widths[index], widths[index + 1], kernel, STRIDE))
            if index < len(KERNEL_SIZES) - 1:
                layers.append(nn.ReLU())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        lead_shape = feature.shape[:-1]
        hidden = self.linear(feature).reshape(-1, self.bottleneck, 1, 1)
        image = self.deconvs(hidden)
        return image.reshape(*lead_shape, *image.shape[-3:])


def build_decoder(model_cfg: DictConfig, feature_dim: int, obs_shape: tuple[int, ...], from_pixels: bool) -> nn.Module:
    """The decoder from ``[*, F]`` to the mean of ``obs_shape`` (``(C, 64, 64)`` pixels or ``(O,)`` states)."""
    if from_pixels:
        channels, height, width = obs_shape
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"The pixel decoder produces {IMAGE_SIZE}x{IMAGE_SIZE} images, got {height}x{width}.")
        return PixelDecoder(feature_dim, channels, model_cfg.cnn_depth)
    (obs_dim,) = obs_shape
    return build_mlp(feature_dim, obs_dim, model_cfg.dense_units, model_cfg.mlp_layers)
