"""The authors' ``strided: False`` DreamerV3 image networks (``modules/image_v3.py``).

References are written here independently of the module: parameter counts from the layer formulas, the forward
passes as a line-by-line NHWC translation of danijar/dreamerv3 ``dreamerv3/rssm.py`` (``Encoder.__call__`` image
branch, ``Decoder.__call__`` image branch with ``bspace``) using only the module's parameter tensors, and the
initialisation from ``embodied/jax/nets.py`` ``Initializer('trunc_normal', 'in')`` (truncated normal in +-2,
times ``1.1368 / sqrt(fan_in)``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from modules.image_v3 import UnstridedImageDecoderV3, UnstridedImageEncoderV3

DEPTH = 4
MULTS = (2, 3, 4, 4)
KERNEL = 5
DETER = 64
STOCH = 16
UNITS = 16
BLOCKS = 8
EPS = 1e-4


def make_encoder(channels: int, depth: int = DEPTH) -> UnstridedImageEncoderV3:
    return UnstridedImageEncoderV3(channels, depth, MULTS, KERNEL, EPS)


def make_decoder(channels: int, outscale: float = 1.0, depth: int = DEPTH, **sizes: int) -> UnstridedImageDecoderV3:
    deter, stoch, units = sizes.get("deter", DETER), sizes.get("stoch", STOCH), sizes.get("units", UNITS)
    return UnstridedImageDecoderV3(deter, stoch, (channels, 64, 64), depth, MULTS, units, KERNEL, BLOCKS, outscale, EPS)


def perturb_(module: torch.nn.Module) -> None:
    """Random norm scales and biases, so that a reference comparison also exercises them."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)


# ------------------------------------------------------------------------ references (authors' code, NHWC, by hand)


def ref_rms(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """nets.Norm('rms'): x * rsqrt(mean(x^2, -1) + eps) * scale over the last (channel) axis."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * scale


def ref_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """nets.Conv2D(depth, K) on NHWC, 'SAME' padding, stride 1."""
    y = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding="same")
    return y.permute(0, 2, 3, 1)


def ref_encoder(enc: UnstridedImageEncoderV3, img: torch.Tensor) -> torch.Tensor:
    """rssm.py Encoder, image branch: x = img/255 - 0.5 (our input already), then per stage conv, 2x2 max by
    reshape, norm, silu; flatten (h, w, c)."""
    x = img.permute(0, 2, 3, 1)
    for conv, norm in zip(enc.convs, enc.norms, strict=True):
        x = ref_conv(x, conv)
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).amax((2, 4))
        x = F.silu(ref_rms(x, norm.weight))
    return x.reshape(x.shape[0], -1)


def ref_decoder(dec: UnstridedImageDecoderV3, feat: torch.Tensor) -> torch.Tensor:
    """rssm.py Decoder, image branch with bspace: returns the sigmoid mean in [0, 1], NHWC."""
    n = feat.shape[0]
    deter, stoch = feat[:, :DETER], feat[:, DETER:]
    C = DEPTH * MULTS[-1]
    h = w = 64 // 2 ** len(MULTS)
    u, g = h * w * C, BLOCKS
    kernel = dec.deter_proj.weight  # [g, D/g, u/g], the authors' BlockLinear kernel layout
    x0 = torch.einsum("nki,kio->nko", deter.reshape(n, g, DETER // g), kernel).reshape(n, u) + dec.deter_proj.bias
    x0 = x0.reshape(n, g, h, w, C // g).permute(0, 2, 3, 1, 4).reshape(n, h, w, C)  # '(g h w c) -> h w (g c)'
    x1 = stoch @ dec.stoch_hidden.weight.T + dec.stoch_hidden.bias
    x1 = F.silu(ref_rms(x1, dec.stoch_hidden_norm.weight))
    x1 = (x1 @ dec.stoch_proj.weight.T + dec.stoch_proj.bias).reshape(n, h, w, C)
    x = F.silu(ref_rms(x0 + x1, dec.space_norm.weight))
    for conv, norm in zip(dec.convs, dec.norms, strict=True):
        x = x.repeat_interleave(2, 2).repeat_interleave(2, 1)
        x = F.silu(ref_rms(ref_conv(x, conv), norm.weight))
    x = x.repeat_interleave(2, 2).repeat_interleave(2, 1)
    return torch.sigmoid(ref_conv(x, dec.out))


# ---------------------------------------------------------------------------------------------------- counts


def conv_params(cin: int, cout: int) -> int:
    return KERNEL * KERNEL * cin * cout + cout


def encoder_params(channels: int, depth: int) -> int:
    total, cin = 0, channels
    for mult in MULTS:
        cout = depth * mult
        total += conv_params(cin, cout) + cout  # conv + RMSNorm scale
        cin = cout
    return total


def decoder_params(channels: int, depth: int, deter: int, stoch: int, units: int) -> int:
    c_last = depth * MULTS[-1]
    space = c_last * 4 * 4
    total = deter * space // BLOCKS + space  # block-linear: g blocks of [deter/g, space/g], bias
    total += stoch * 2 * units + 2 * units + 2 * units  # sp1 + its norm
    total += 2 * units * space + space + c_last  # sp2 + spnorm
    cin = c_last
    for mult in reversed(MULTS[:-1]):
        cout = depth * mult
        total += conv_params(cin, cout) + cout
        cin = cout
    return total + conv_params(cin, channels)


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("channels", [3, 1])
def test_shapes(channels: int) -> None:
    torch.manual_seed(0)
    enc, dec = make_encoder(channels), make_decoder(channels)
    pixels = torch.rand(2, 3, channels, 64, 64) - 0.5
    embed = enc(pixels)
    assert enc.output_features((channels, 64, 64)) == DEPTH * MULTS[-1] * 4 * 4 == 256
    assert embed.shape == (2, 3, 256)
    recon = dec(torch.randn(2, 3, DETER + STOCH))
    assert recon.shape == (2, 3, channels, 64, 64)
    assert dec(torch.randn(DETER + STOCH)).shape == (channels, 64, 64)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("depth, deter, stoch, units", [(DEPTH, DETER, STOCH, UNITS), (16, 2048, 32 * 16, 256)])
def test_parameter_counts(channels: int, depth: int, deter: int, stoch: int, units: int) -> None:
    enc = make_encoder(channels, depth)
    dec = make_decoder(channels, depth=depth, deter=deter, stoch=stoch, units=units)
    assert sum(p.numel() for p in enc.parameters()) == encoder_params(channels, depth)
    assert sum(p.numel() for p in dec.parameters()) == decoder_params(channels, depth, deter, stoch, units)


def test_encoder_stage_sizes() -> None:
    enc = make_encoder(3)
    maps = enc.stages(torch.rand(2, 3, 64, 64) - 0.5)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (DEPTH * mult, size, size) for mult, size in zip(MULTS, (32, 16, 8, 4), strict=True)
    ]


@pytest.mark.parametrize("channels", [3, 1])
def test_encoder_matches_authors_forward(channels: int) -> None:
    torch.manual_seed(1)
    enc = make_encoder(channels)
    perturb_(enc)
    pixels = torch.randint(0, 256, (3, channels, 64, 64)).float() / 255 - 0.5
    torch.testing.assert_close(enc(pixels), ref_encoder(enc, pixels), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_decoder_matches_authors_forward(channels: int) -> None:
    torch.manual_seed(2)
    dec = make_decoder(channels)
    perturb_(dec)
    feat = torch.randn(3, DETER + STOCH)
    ref = ref_decoder(dec, feat).permute(0, 3, 1, 2)
    torch.testing.assert_close(dec(feat) + 0.5, ref, rtol=1e-4, atol=1e-5)


def test_decoder_output_range() -> None:
    torch.manual_seed(3)
    feat = 10 * torch.randn(8, DETER + STOCH)
    out = make_decoder(3, outscale=100.0)(feat)  # large logits: a linear head would leave [-0.5, 0.5]
    assert out.min() >= -0.5 and out.max() <= 0.5
    assert out.abs().max() > 0.45  # saturates towards the bounds, both sides
    assert (out > 0.45).any() and (out < -0.45).any()
    # outscale 0, zero bias: logits 0, mean sigmoid(0) = 0.5, i.e. 0 in our range.
    assert torch.equal(make_decoder(3, outscale=0.0)(feat), torch.zeros(8, 3, 64, 64))


def test_deter_projection_is_block_diagonal() -> None:
    torch.manual_seed(4)
    dec = make_decoder(3)
    g, c = BLOCKS, DEPTH * MULTS[-1]
    deter = torch.randn(DETER)
    # Raw block-linear layer: output block b [space / g] against input block b' [DETER / g].
    jac = torch.autograd.functional.jacobian(lambda x: dec.deter_proj(x[None])[0], deter)
    jac = jac.reshape(g, -1, g, DETER // g)
    # As a map: channel group b (c / g channels, every position) against deter block b'.
    jac_map = torch.autograd.functional.jacobian(lambda x: dec.deter_map(x[None])[0], deter)
    jac_map = jac_map.reshape(g, c // g, 4, 4, g, DETER // g)
    for b in range(g):
        for other in range(g):
            blocks = (jac[b, :, other], jac_map[b, :, :, :, other])
            for block in blocks:
                if b == other:
                    assert (block != 0).float().mean() > 0.99
                else:
                    assert torch.count_nonzero(block) == 0


def test_conv_init_statistics() -> None:
    torch.manual_seed(5)
    enc = make_encoder(3, depth=16)
    conv = enc.convs[2]  # 5x5, 48 -> 64 channels
    fan_in = KERNEL * KERNEL * 16 * MULTS[1]
    w = conv.weight.detach()
    assert w.numel() == fan_in * 16 * MULTS[2]
    # Truncated standard normal in [-2, 2] has std 0.8796; times 1.1368 -> std 1.
    assert w.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.03)
    assert w.mean().abs().item() < 0.03 / math.sqrt(fan_in)
    bound = 2 * 1.1368 / math.sqrt(fan_in)
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(conv.bias) == 0
    dec = make_decoder(3, outscale=0.5, depth=16, deter=2048, stoch=512, units=256)
    block = dec.deter_proj.weight.detach()
    assert block.std().item() == pytest.approx(1 / math.sqrt(2048), rel=0.03)  # fan-in: the whole deter
    out_fan = KERNEL * KERNEL * 16 * MULTS[0]
    assert dec.out.weight.std().item() == pytest.approx(0.5 / math.sqrt(out_fan), rel=0.1)
    assert dec.stoch_proj.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.03)


def test_rejects_bad_resolution() -> None:
    with pytest.raises(ValueError):
        make_encoder(3)(torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError):
        UnstridedImageDecoderV3(DETER, STOCH, (3, 56, 56), DEPTH, MULTS, UNITS)
