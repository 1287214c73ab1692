"""The DreamerV3 optimiser, built from ``optimization=dreamer_v3``.

The authors' optimiser (danijar/dreamerv3 at the commit pinned in tests/data/dreamerv3_reference.yaml,
``dreamerv3/agent.py: Agent._make_opt`` with ``embodied/jax/opt.py``) is one chain over all networks, applied to
each parameter tensor ``p`` with gradient ``g`` at update ``t = 1, 2, ...``:

1. adaptive gradient clipping: ``g *= 1 / max(1, |g| / (agc * max(pmin, |p|)))`` (Frobenius norms per tensor);
2. RMS scaling: ``nu = beta2 * nu + (1 - beta2) * g**2``, ``u = g / (sqrt(nu / (1 - beta2**t)) + eps)``;
3. momentum of the scaled gradient (LaProp order): ``mu = beta1 * mu + (1 - beta1) * u``,
   ``m = mu / (1 - beta1**t)``;
4. ``p -= lr_t * m`` with ``lr_t = lr * min(1, (t - 1) / warmup)`` (a linear ramp from 0; the first update moves
   nothing but fills the moments), or ``lr`` when ``warmup`` is 0.

torchrl's :class:`~torchrl.trainers.algorithms.dreamer_v3.DreamerV3Optimizer` computes exactly these steps (checked
against an independent re-computation in tests/test_v3_optimizer.py), so it is used as is. What it lacks are options
the authors' defaults leave off: weight decay (``agent.opt.wd``, on kernels only), Nesterov momentum and the
``linear``/``cosine`` learning-rate annealing; :func:`make_v3_optimizer` refuses settings that would need them.
Two differences only matter off the authors' path: torchrl skips tensors without a gradient (the authors' JAX
gradients always exist, zeros included, so their moments still decay) while bias-correcting with the shared update
count, and it keeps one update count per parameter group (the authors' one optimiser is one group here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torchrl.trainers.algorithms.dreamer_v3 import DreamerV3Optimizer

from utils.config import ConfigError

# optimization.<key>: the only value torchrl's optimiser (and the authors' defaults) support.
FIXED_SETTINGS = {"momentum": True, "nesterov": False, "weight_decay": 0.0}


def make_v3_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], opt_cfg: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """The authors' DreamerV3 optimiser over ``params`` with the settings of ``opt_cfg`` (``cfg.optimization``).

    Reads ``lr``, ``eps``, ``agc``, ``agc_pmin``, ``warmup``, ``beta1`` and ``beta2``; ``momentum``, ``nesterov`` and
    ``weight_decay`` must keep the authors' defaults (``ConfigError`` otherwise).
    """
    for key, supported in FIXED_SETTINGS.items():
        value = opt_cfg[key]
        if value != supported or isinstance(value, bool) != isinstance(supported, bool):
            raise ConfigError(f"optimization.{key}={value!r} is not supported; only {supported!r} (the authors')")
    return DreamerV3Optimizer(
        params,
        lr=float(opt_cfg["lr"]),
        agc=float(opt_cfg["agc"]),
        parameter_norm_min=float(opt_cfg["agc_pmin"]),
        beta1=float(opt_cfg["beta1"]),
        beta2=float(opt_cfg["beta2"]),
        eps=float(opt_cfg["eps"]),
        warmup_steps=int(opt_cfg["warmup"]),
    )
