"""Weight initialisation of the authors' code (TF2 Keras defaults), applied once when the networks are built.

The authors' layers are Keras ``Dense``, ``Conv2D``, ``Conv2DTranspose`` and ``GRUCell`` with their default
initialisers: glorot-uniform kernels (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, variance
``2 / (fan_in + fan_out)``) and zero biases; the GRU cell's recurrent kernel is orthogonal. torch's defaults differ
(uniform ``±1/sqrt(fan_in)`` weights and non-zero biases) and, measured on freshly built Dreamer networks, give a
3-5x smaller initial KL and 7-10x flatter reward and value heads, which starves the prior of gradient while the
KL sits below the free nats (issue 14).

Keras' ``Orthogonal`` initialises the GRU's whole recurrent kernel ``[D, 3D]`` at once (its rows are orthonormal);
torch stores the transpose (``weight_hh [3D, D]``), so ``nn.init.orthogonal_`` on it draws from the same
distribution: ``weight_hh^T weight_hh = I``. Each gate block is then a third of an orthogonal matrix, not an
orthogonal matrix of its own.
"""

from __future__ import annotations

from torch import nn

INIT_SCHEMES = ("keras", "torch")
GLOROT_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def keras_init_(module: nn.Module) -> nn.Module:
    """Re-initialises every dense, convolution and GRU-cell layer inside ``module`` in place; returns ``module``.

    Dense / conv / transposed conv: glorot-uniform weight (``nn.init.xavier_uniform_``, whose fans match Keras' for
    all three layouts), zero bias. ``GRUCell``: glorot-uniform input kernel ``weight_ih [3D, I]``, orthogonal
    recurrent kernel ``weight_hh [3D, D]``, zero biases.
    """
    for layer in module.modules():
        if isinstance(layer, GLOROT_LAYERS):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.GRUCell):
            nn.init.xavier_uniform_(layer.weight_ih)
            nn.init.orthogonal_(layer.weight_hh)
            for bias in (layer.bias_ih, layer.bias_hh):
                if bias is not None:
                    nn.init.zeros_(bias)
    return module


def initialize(module: nn.Module, scheme: str) -> nn.Module:
    """Applies ``model.init``: ``keras`` (the authors', :func:`keras_init_`) or ``torch`` (keep torch's defaults)."""
    if scheme == "keras":
        return keras_init_(module)
    if scheme == "torch":
        return module
    raise ValueError(f"Unknown model.init {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
