"""DreamerV3's image encoder and decoder in the authors' ``strided: False`` form (their default).

The authors' code (danijar/dreamerv3 ``dreamerv3/rssm.py``, ``Encoder`` and ``Decoder``; configs ``enc.simple`` and
``dec.simple`` set ``strided: False``) builds its CNNs from stride-1 convolutions:

* encoder stage ``i``: 5x5 stride-1 "same" conv to ``depth * mults[i]`` channels, 2x2 max-pool, channel RMSNorm,
  SiLU (in that order); the final map is flattened;
* decoder: the deterministic state goes through a block-linear layer of ``block_space`` blocks (each block of
  ``deter`` writes its own group of channels of the first ``H/16 x W/16`` map) and the stochastic state through
  linear (``2 * units``), RMSNorm, SiLU, linear (to the whole first map); their sum is channel-RMSNormed and SiLU'd;
  then for every stage but the first, 2x nearest-neighbour upsampling, 5x5 stride-1 conv, channel RMSNorm, SiLU;
  then one more upsampling and an output conv (initial kernel times ``outscale``) and a sigmoid: the image mean is
  in ``[0, 1]`` and its loss is the squared error summed over pixels.

TorchRL's ``DreamerV3ImageEncoder`` / ``DreamerV3ImageDecoder`` implement the ``strided: True`` variant instead
(stride-2 convs, stride-2 transposed convs, a single (block-)linear projection of the whole feature, an unbounded
linear output plus 0.5). These classes exist so that ``model=dreamer_v3`` with ``cnn_strided: false`` runs the
authors' default networks. The pieces TorchRL does get right are reused: its conv and linear initialisation
(truncated normal in +-2 std, ``1.1368 / sqrt(fan_in)``, i.e. std ``1 / sqrt(fan_in)``, fan-in of a conv
``kernel^2 * in_channels``, of a block-linear layer its whole input width; zero biases), its block-linear layer and
its RMSNorms (learned scale, no shift).

Pixels here are in our range ``[-0.5, 0.5]`` (``pixel / 255 - 0.5``), which is exactly what the authors' encoder
feeds its first conv, so the encoder applies no shift; the decoder returns ``sigmoid(x) - 0.5``, the authors' mean
moved into the same range (a squared-error loss is unchanged by shifting mean and target alike).

Memory layouts follow the authors' NHWC code where it matters for loading their weights index for index: the
encoder flattens its last map as ``(h, w, c)``, the block-linear output of block ``g`` is read as ``(h, w, c)``
and becomes channels ``g * C / block_space ...``, and the stochastic projection is read as ``(h, w, c)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchrl.modules.models.model_based import (
    _dreamer_v3_conv_init,
    _dreamer_v3_init,
    _DreamerV3BlockLinear,
    _DreamerV3ChannelRMSNorm,
    _DreamerV3RMSNorm,
)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """Stride-1 "same" conv (odd ``kernel``) with the authors' init (trunc-normal, std ``1 / sqrt(k^2 * in)``)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd integer, got {kernel}.")
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=kernel // 2)
    _dreamer_v3_conv_init(conv)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Dense layer with the authors' init (trunc-normal, std ``1 / sqrt(in_features)``, zero bias)."""
    linear = nn.Linear(in_features, out_features)
    _dreamer_v3_init(linear)
    return linear


class UnstridedImageEncoderV3(nn.Module):
    """Pixels ``[*, C, H, W]`` in ``[-0.5, 0.5]`` -> features ``[*, E]``, ``E = depth * mults[-1] * H/2^n * W/2^n``.

    Stage ``i`` (``n = len(mults)`` stages): ``Conv2d(k x k, stride 1, same) -> MaxPool2d(2) ->
    ChannelRMSNorm -> SiLU`` with ``depth * mults[i]`` channels. ``H`` and ``W`` must divide by ``2^n``.
    The final map ``[N, C', h, w]`` is flattened in the authors' ``(h, w, c)`` order.
    """

    def __init__(
        self,
        in_channels: int,
        depth: int,
        mults: Sequence[int],
        kernel: int = 5,
        norm_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if not mults:
            raise ValueError("mults must contain at least one stage.")
        self.in_channels = in_channels
        self.channels = tuple(depth * mult for mult in mults)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        previous = in_channels
        for channels in self.channels:
            self.convs.append(_conv(previous, channels, kernel))
            self.norms.append(_DreamerV3ChannelRMSNorm(channels, norm_eps))
            previous = channels

    def output_features(self, image_shape: Sequence[int]) -> int:
        """Flattened feature count ``E`` for an image of shape ``(C, H, W)``."""
        _, height, width = image_shape
        factor = 2 ** len(self.channels)
        if height % factor or width % factor:
            raise ValueError(f"Image height and width {tuple(image_shape[1:])} must divide by 2 ** stages = {factor}.")
        return self.channels[-1] * (height // factor) * (width // factor)

    def stages(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after every stage, ``[N, depth * mults[i], H / 2^(i+1), W / 2^(i+1)]`` for ``i`` in
        ``0 .. n-1``, for pixels ``[N, C, H, W]``."""
        maps = []
        x = pixels
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.max_pool2d(conv(x), kernel_size=2, stride=2)
            x = F.silu(norm(x))
            maps.append(x)
        return maps

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [*, C, H, W]`` in ``[-0.5, 0.5]`` -> ``[*, E]``."""
        batch_shape = pixels.shape[:-3]
        self.output_features(pixels.shape[-3:])  # checks the resolution
        last = self.stages(pixels.reshape(-1, *pixels.shape[-3:]))[-1]
        return last.permute(0, 2, 3, 1).reshape(*batch_shape, -1)


class UnstridedImageDecoderV3(nn.Module):
    """Feature ``[*, deter_dim + stoch_dim]`` (``deter`` first, then the flat ``stoch``) -> pixel means
    ``[*, C, H, W]`` in ``[-0.5, 0.5]``: the authors' sigmoid mean in ``[0, 1]`` minus 0.5.

    With ``n = len(mults)``, ``C_i = depth * mults[i]``, first map ``[C_{n-1}, h, w]``, ``h = H / 2^n``,
    ``w = W / 2^n``:

    * ``x0 = BlockLinear(deter_dim -> h*w*C_{n-1}, block_space blocks)(deter)``; block ``g`` fills channels
      ``[g, g+1) * C_{n-1} / block_space``;
    * ``x1 = Linear(h*w*C_{n-1})(SiLU(RMSNorm(Linear(2 * units)(stoch))))``;
    * ``x = SiLU(ChannelRMSNorm(x0 + x1))``;
    * for ``i = n-2 .. 0``: ``x = SiLU(ChannelRMSNorm(Conv(k, stride 1 -> C_i)(Upsample2x_nearest(x))))``;
    * ``mean = sigmoid(Conv(k, stride 1 -> C; kernel times outscale)(Upsample2x_nearest(x))) - 0.5``.
    """

    def __init__(
        self,
        deter_dim: int,
        stoch_dim: int,
        image_shape: Sequence[int],
        depth: int,
        mults: Sequence[int],
        units: int,
        kernel: int = 5,
        block_space: int = 8,
        outscale: float = 1.0,
        norm_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if not mults:
            raise ValueError("mults must contain at least one stage.")
        if block_space < 1 or deter_dim % block_space:
            raise ValueError(f"deter_dim {deter_dim} must divide by block_space {block_space}.")
        image_channels, height, width = image_shape
        factor = 2 ** len(mults)
        if height % factor or width % factor:
            raise ValueError(f"Image height and width {(height, width)} must divide by 2 ** stages = {factor}.")
        channels = tuple(depth * mult for mult in mults)
        if channels[-1] % block_space:
            raise ValueError(f"Channels of the first map {channels[-1]} must divide by block_space {block_space}.")
        self.deter_dim = deter_dim
        self.stoch_dim = stoch_dim
        self.image_shape = (image_channels, height, width)
        self.block_space = block_space
        self.initial_shape = (channels[-1], height // factor, width // factor)
        space = math.prod(self.initial_shape)
        self.deter_proj = _DreamerV3BlockLinear(deter_dim, space, block_space)
        self.stoch_hidden = _linear(stoch_dim, 2 * units)
        self.stoch_hidden_norm = _DreamerV3RMSNorm(2 * units, norm_eps)
        self.stoch_proj = _linear(2 * units, space)
        self.space_norm = _DreamerV3ChannelRMSNorm(channels[-1], norm_eps)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        previous = channels[-1]
        for out_channels in reversed(channels[:-1]):
            self.convs.append(_conv(previous, out_channels, kernel))
            self.norms.append(_DreamerV3ChannelRMSNorm(out_channels, norm_eps))
            previous = out_channels
        self.out = _conv(previous, image_channels, kernel)
        with torch.no_grad():
            self.out.weight.mul_(outscale)

    def deter_map(self, deter: torch.Tensor) -> torch.Tensor:
        """``deter [N, D]`` -> its block-linear map ``[N, C_{n-1}, h, w]``; channel group ``g`` (of
        ``C_{n-1} / block_space``) depends on ``deter`` block ``g`` only (the authors' ``'(g h w c) -> h w (g c)'``)."""
        c, h, w = self.initial_shape
        g = self.block_space
        x0 = self.deter_proj(deter).reshape(-1, g, h, w, c // g)
        return x0.permute(0, 1, 4, 2, 3).reshape(-1, c, h, w)

    def stoch_map(self, stoch: torch.Tensor) -> torch.Tensor:
        """``stoch [N, S]`` -> ``Linear(SiLU(RMSNorm(Linear(stoch))))`` as a map ``[N, C_{n-1}, h, w]``."""
        c, h, w = self.initial_shape
        x1 = self.stoch_proj(F.silu(self.stoch_hidden_norm(self.stoch_hidden(stoch))))
        return x1.reshape(-1, h, w, c).permute(0, 3, 1, 2)

    def first_map(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """``deter [N, D]``, ``stoch [N, S]`` -> the first feature map ``[N, C_{n-1}, h, w]`` (after norm, SiLU)."""
        return F.silu(self.space_norm(self.deter_map(deter) + self.stoch_map(stoch)))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature [*, deter_dim + stoch_dim]`` -> pixel means ``[*, C, H, W]`` in ``[-0.5, 0.5]``."""
        batch_shape = feature.shape[:-1]
        feature = feature.reshape(-1, feature.shape[-1])
        deter, stoch = feature.split([self.deter_dim, self.stoch_dim], dim=-1)
        x = self.first_map(deter, stoch)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.silu(norm(conv(F.interpolate(x, scale_factor=2, mode="nearest"))))
        x = self.out(F.interpolate(x, scale_factor=2, mode="nearest"))
        return (torch.sigmoid(x) - 0.5).reshape(*batch_shape, *self.image_shape)
