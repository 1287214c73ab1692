"""λ-returns over an imagined trajectory, in the authors' convention (``tools.lambda_return`` called from
``Dreamer._train``). Tensors are time-major: ``[H, N, 1]`` for ``H`` imagined steps from ``N`` start states.

For ``t = 0 .. H-2``:

    R_t = r_t + γ_t · ((1 - λ) · v_{t+1} + λ · R_{t+1}),   R_{H-1} = v_{H-1} (bootstrap),

so the last imagined step only provides the bootstrap value, and ``γ_t`` (the discount, times the predicted
continue probability when the continue head is on) discounts the step from ``t`` to ``t+1``.
"""

from __future__ import annotations

import torch
from torchrl.objectives.value.functional import td_lambda_return_estimate


def lambda_return(reward: torch.Tensor, value: torch.Tensor, discount: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``R_0 .. R_{H-2}`` ``[H-1, N, 1]`` from ``reward``, ``value`` and ``discount`` ``[H, N, 1]`` (``H >= 2``).

    TorchRL's ``td_lambda_return_estimate`` (``rolling_gamma=True``, tensor-valued gamma, nothing done) computes
    exactly this recursion when given ``next_state_value = value[1:]``, ``reward[:-1]`` and ``gamma = discount[:-1]``:
    it seeds the recursion with the last next-state value ``value[H-1]`` and bootstraps each step with
    ``(1 - λ) · nv_t + λ · G_{t+1}`` (``tests/test_behaviour_loss.py`` checks it against a plain loop). Its
    ``done``/``terminated`` flags are not used: episode ends inside imagination are soft, carried by ``discount``.
    Gradients flow to ``reward``, ``value`` and ``discount``.
    """
    if reward.shape[0] < 2:
        raise ValueError(f"lambda_return needs at least 2 imagined steps, got {reward.shape[0]}")
    not_done = torch.zeros_like(reward[:-1], dtype=torch.bool)
    return td_lambda_return_estimate(
        gamma=discount[:-1],
        lmbda=lambda_,
        next_state_value=value[1:],
        reward=reward[:-1],
        done=not_done,
        time_dim=0,
    )


def discount_weights(discount: torch.Tensor) -> torch.Tensor:
    """Weights ``[H-1, N, 1]`` = cumulative product of ``[1, γ_0, .., γ_{H-3}]`` from ``discount [H, N, 1]``.

    Weight ``t`` is the probability (times ``γ^t``) that imagined step ``t`` is still inside the episode; it
    multiplies both the actor's and the value's loss at step ``t``. The gradient is stopped (authors).
    """
    shifted = torch.cat([torch.ones_like(discount[:1]), discount[:-2]], dim=0)
    return torch.cumprod(shifted, dim=0).detach()


def lambda_return_v3(
    last: torch.Tensor,
    terminal: torch.Tensor,
    reward: torch.Tensor,
    bootstrap: torch.Tensor,
    discount: float,
    lambda_: float,
) -> torch.Tensor:
    """DreamerV3's λ-returns (the authors' ``lambda_return``), batch-major: ``[N, L]`` inputs -> ``[N, L-1]``.

    For ``t = L-2 .. 0``, with ``live_t = (1 - terminal_{t+1}) · discount`` and ``c_t = (1 - last_{t+1}) · λ``::

        R_t = reward_{t+1} + live_t · ((1 - c_t) · bootstrap_{t+1} + c_t · R_{t+1}),   R_{L-1} = bootstrap_{L-1}.

    ``reward[t]`` is received on arriving at step ``t``. In imagination ``bootstrap`` is the critic's value,
    ``terminal = 1 - continue probability``, ``last = 0`` and ``discount = 1`` (the continue head carries the
    discount): then this is :func:`lambda_return` on the rewards shifted by one step. On replay sequences
    ``bootstrap`` is the imagined return from each replay state and ``last`` cuts the return at episode ends.
    """
    live = (1.0 - terminal[:, 1:]) * discount
    cont = (1.0 - last[:, 1:]) * lambda_
    intermediate = reward[:, 1:] + (1.0 - cont) * live * bootstrap[:, 1:]
    returns = [bootstrap[:, -1]]
    for t in reversed(range(live.shape[1])):
        returns.append(intermediate[:, t] + live[:, t] * cont[:, t] * returns[-1])
    return torch.stack(returns[:0:-1], dim=1)
