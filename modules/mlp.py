"""Multi-layer perceptrons used by every dense head of Dreamer."""

from __future__ import annotations

from torch import nn


def build_mlp(
    in_dim: int,
    out_dim: int,
    hidden: int,
    layers: int,
    activation: type[nn.Module] = nn.ELU,
) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden`` with ``activation``, then a linear output.

    Maps ``[*, in_dim]`` to ``[*, out_dim]``. The authors' heads are written as
    "MLP L×W ELU": ``L`` hidden dense layers of ``W`` units followed by a linear
    projection to the distribution parameters.
    """
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), activation()]
        width = hidden
    blocks.append(nn.Linear(width, out_dim))
    return nn.Sequential(*blocks)
