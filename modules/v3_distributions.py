"""DreamerV3's numeric building blocks (Hafner et al., 2023), checked against the authors' code (danijar/dreamerv3).

Pieces TorchRL 0.14.1 already gets right, to be used directly (``tests/test_v3_numerics.py`` pins each one):

* ``torchrl.objectives.symlog`` / ``symexp``: ``sign(x) log(1 + |x|)`` and its inverse; both have the
  mathematically correct gradient 1 at ``x = 0``.
* ``torchrl.modules.SymExpTwoHot(255)``: its ``bins`` buffer is ``symexp(linspace(-20, 20, 255))``, built from the
  negative half and mirrored like the authors' ``symexp_twohot`` head, so ``bins[i] == -bins[-1 - i]`` bit for bit.
  ``encode`` interpolates linearly in raw value space (the authors' current ``TwoHot`` with no squash), puts all
  weight on a bin a target lies on and on the outer bin for targets beyond it. ``decode`` pairs mirrored bins
  before summing, so uniform or mirror-symmetric logits decode to exactly 0.0 in float32 (the authors reach the
  same with a middle-outwards sum; a plain ``(softmax(0) * bins).sum()`` gives -0.316). ``loss`` is the two-hot
  cross-entropy. Unlike the authors' ``TwoHot.loss`` it does not stop gradients into the target: callers pass a
  detached target.
* ``torchrl.modules.PercentileValueNorm(quantiles=(0.05, 0.95), rate=0.01, min_scale=1.0)``: EMA of the 5th and 95th
  percentiles (linear interpolation, as ``jnp.percentile``) of the lambda returns, starting from 0, with no debiasing
  (the authors' ``retnorm`` has ``debias: False``), and ``scale() = max(1, high - low)``. ``low`` and ``high`` are
  buffers, so they are checkpointed. Call ``update(returns)`` before ``scale()``, as the authors' ``retnorm(ret,
  update)`` does, and divide the advantages by ``scale()`` without centring them.

Pieces written here, each saying why TorchRL's is not used:

* :class:`BoundedNormal`: TorchRL has no distribution for the authors' ``bounded_normal`` actor head.
* :class:`UnimixOneHotCategorical`: TorchRL's ``OneHotCategorical`` returns int64 samples, and its ``mode`` is
  multi-hot when logits tie (all ones for uniform logits), which is not an action.
* :func:`separate_kl_losses`: TorchRL's ``categorical_kl_terms`` is mathematically the authors' (unimix on both,
  KL summed over the latent groups, then clipped at the free nats), but it returns the batch mean, so per-time-step
  losses (for masking or logging) are not available from it.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, Normal, OneHotCategorical
from torchrl.modules.models.model_based import _unimix_probs


class BoundedNormal(Independent):
    """The authors' continuous actor distribution (``Head.bounded_normal``, ``outs.Normal``), from raw outputs.

    From the raw network outputs ``mean_raw, std_raw [*, A]``::

        mean = tanh(mean_raw)
        std = (max_std - min_std) * sigmoid(std_raw + 2) + min_std

    and a Normal(mean, std) per action dimension, independent over ``A`` (batch shape ``[*]``, event shape ``[A]``).
    As in the authors' code the tanh bounds only the mean, not the sample: samples are ``mean + std * eps`` and are
    not clipped (the authors clip actions to [-1, 1] only in the environment wrapper ``ClipAction``), ``log_prob`` is
    the plain Gaussian log-density summed over ``A`` (no tanh Jacobian), and ``entropy`` is the Gaussian entropy
    summed over ``A``. ``mode``, ``mean`` and ``deterministic_sample`` are ``mean``.

    For ``tensordict.nn.ProbabilisticTensorDictModule``, use ``in_keys={"mean_raw": ..., "std_raw": ...}`` and pass
    ``min_std``/``max_std`` through ``distribution_kwargs``.

    Args:
        mean_raw: ``[*, A]`` unbounded mean output of the network.
        std_raw: ``[*, A]`` unbounded standard-deviation output of the network.
        min_std: Standard deviation as ``std_raw -> -inf``.
        max_std: Standard deviation as ``std_raw -> +inf``.
        validate_args: Passed to ``torch.distributions``.
    """

    def __init__(
        self,
        mean_raw: torch.Tensor,
        std_raw: torch.Tensor,
        min_std: float = 0.1,
        max_std: float = 1.0,
        validate_args: bool | None = None,
    ) -> None:
        if not 0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got min_std={min_std}, max_std={max_std}")
        loc = torch.tanh(mean_raw)
        scale = (max_std - min_std) * torch.sigmoid(std_raw + 2.0) + min_std
        super().__init__(Normal(loc, scale, validate_args=validate_args), 1, validate_args=validate_args)

    @property
    def loc(self) -> torch.Tensor:
        """``[*, A]`` the bounded mean ``tanh(mean_raw)``."""
        return self.base_dist.loc

    @property
    def scale(self) -> torch.Tensor:
        """``[*, A]`` the bounded standard deviation, in ``[min_std, max_std]``."""
        return self.base_dist.scale

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """``[*, A]`` the mean, the action of ``ExplorationType.DETERMINISTIC``."""
        return self.base_dist.loc


class UnimixOneHotCategorical(OneHotCategorical):
    """One-hot categorical over ``K`` actions with probabilities ``(1 - unimix) * softmax(logits) + unimix / K``.

    The authors' discrete actor distribution of the paper and the 2023 release (``OneHotDist`` with ``unimix: 0.01``)
    and their ``outs.Categorical(logits, unimix)``: the mixed probabilities define sampling, ``log_prob``,
    ``entropy`` and the mode. There is no straight-through sample (``has_rsample`` is False): the discrete actor is
    trained with REINFORCE on ``log_prob`` of detached actions. Samples and ``mode`` are float one-hot vectors;
    ``mode`` and ``deterministic_sample`` take the first maximum on ties. The authors' current code (2024 and later)
    uses a plain categorical policy head that ignores ``unimix``; ``unimix=0.0`` gives that.

    Args:
        logits: ``[*, K]`` raw network outputs.
        unimix: Uniform mixing weight in ``[0, 1)``.
        validate_args: Passed to ``torch.distributions``.
    """

    def __init__(self, logits: torch.Tensor, unimix: float = 0.01, validate_args: bool | None = None) -> None:
        super().__init__(logits=_mixed_log_probs(logits, unimix), validate_args=validate_args)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """``[*, K]`` the one-hot most probable action, the action of ``ExplorationType.DETERMINISTIC``."""
        return self.mode


def separate_kl_losses(
    posterior_logits: torch.Tensor,
    prior_logits: torch.Tensor,
    free_nats: float = 1.0,
    unimix: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' dynamics and representation losses (``rssm.RSSM.loss``), per time step.

    Both logits get the uniform mix first. With ``p = post`` and ``q = prior``, each of the ``G`` latent groups
    contributes ``KL(p_g || q_g)``; the sum over groups is then clipped below at ``free_nats``::

        dyn = max(free_nats, sum_g KL(sg(p_g) || q_g))   # trains the prior only
        rep = max(free_nats, sum_g KL(p_g || sg(q_g)))   # trains the posterior only

    Args:
        posterior_logits: ``[*, G, K]`` raw posterior logits (e.g. ``[B, T, 32, 32]``).
        prior_logits: ``[*, G, K]`` raw prior logits.
        free_nats: Lower clip of the summed KL, in nats.
        unimix: Uniform mixing weight in ``[0, 1)`` applied to both distributions.

    Returns:
        ``(dyn, rep)``, each ``[*]`` (e.g. ``[B, T]``), unreduced.
    """
    if posterior_logits.shape != prior_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(posterior_logits.shape)} vs {tuple(prior_logits.shape)}")
    posterior_log_probs = _mixed_log_probs(posterior_logits, unimix)
    prior_log_probs = _mixed_log_probs(prior_logits, unimix)
    dyn = _categorical_kl(posterior_log_probs.detach(), prior_log_probs).sum(-1)
    rep = _categorical_kl(posterior_log_probs, prior_log_probs.detach()).sum(-1)
    return dyn.clamp_min(free_nats), rep.clamp_min(free_nats)


def _mixed_log_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """``[*, K]`` log of TorchRL's uniform-mixed probabilities; ``log_softmax`` without a mix, where probs can be 0."""
    if unimix:
        return _unimix_probs(logits, unimix).log()
    return logits.log_softmax(-1)


def _categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``[*]`` ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` from normalised log-probabilities ``[*, K]``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)
