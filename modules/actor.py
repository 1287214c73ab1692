"""Dreamer's action model (Hafner et al., 2020, Sec. 3 and App. A; authors' ``ActionDecoder``).

An MLP of ``actor_layers`` x ``dense_units`` ELU reads the model feature ``[h, z]`` (``[*, F]``) and parameterises

* continuous actions: a tanh-transformed diagonal Gaussian with
  ``mean = mean_scale * tanh(raw_mean / mean_scale)`` and ``std = softplus(raw_std + c) + min_std``,
  ``c = log(exp(init_std) - 1)`` so that a zero network output gives ``std = init_std (+ min_std)``;
* discrete actions: a one-hot categorical with straight-through gradients.

Every actor exposes ``distribution(feature)`` (event shape ``[A]``; ``rsample()`` is differentiable in both cases),
``mode(feature) -> [*, A]`` (the action used for evaluation) and ``forward(feature) -> [*, A]``,
a reparameterised (continuous) or straight-through (discrete) sample.
"""

from __future__ import annotations

import abc
import math

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    OneHotCategoricalStraightThrough,
    TanhTransform,
    TransformedDistribution,
)
from torch.nn import functional as F

from modules.mlp import build_mlp

MODE_ESTIMATES = ("sample_max", "tanh_mean")


class ClippedTanhTransform(TanhTransform):
    """``y = tanh(x)`` whose inverse clips ``|y|`` just below 1 (the authors' ``TanhBijector``).

    In float32, ``tanh(x)`` is exactly ``±1`` for ``|x| > 9``, where ``atanh`` would give an infinite pre-image and a
    ``-inf`` log-probability. Samples drawn with ``rsample`` keep their exact pre-image through the transform's cache
    (``cache_size=1``), so the clip only matters for actions that did not come from the same distribution object.
    """

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        limit = 1.0 - torch.finfo(y.dtype).eps
        return super()._inverse(y.clamp(-limit, limit))


class Actor(nn.Module, abc.ABC):
    """Common interface of the action models: ``feature [*, F]`` to an action distribution over ``[*, A]``."""

    discrete: bool

    @abc.abstractmethod
    def distribution(self, feature: torch.Tensor) -> Distribution:
        """Action distribution with batch shape ``[*]`` and event shape ``[A]``; ``rsample()`` is differentiable."""

    @abc.abstractmethod
    def mode(self, feature: torch.Tensor) -> torch.Tensor:
        """Deterministic action ``[*, A]`` for evaluation."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Differentiable sample ``[*, A]`` (reparameterised, or straight-through for one-hot actions)."""
        return self.distribution(feature).rsample()


class TanhGaussianActor(Actor):
    """Tanh-transformed diagonal Gaussian over ``[-1, 1]^A``.

    ``log_prob(y) = sum_i [log N(atanh(y_i); mean_i, std_i) - log(1 - y_i^2)]``. The tanh-Gaussian has no
    closed-form mode; :meth:`mode` estimates it as ``mode_estimate`` says:

    * ``sample_max`` (the authors' ``SampleDist.mode``): the most likely of ``MODE_SAMPLES`` samples of the
      squashed distribution;
    * ``tanh_mean``: ``tanh(mean)``, the squashed Gaussian mean.

    The two agree while the std is small. With a large std the squashed density piles up near ``±1`` (the
    ``-log(1 - y^2)`` term), so the most likely sample is close to a bound even where ``tanh(mean)`` is near 0.
    """

    discrete = False
    MODE_SAMPLES = 100

    def __init__(
        self,
        feature_dim: int,
        action_dim: int,
        hidden: int = 400,
        layers: int = 4,
        mean_scale: float = 5.0,
        init_std: float = 5.0,
        min_std: float = 1e-4,
        mode_estimate: str = "sample_max",
    ) -> None:
        super().__init__()
        if mode_estimate not in MODE_ESTIMATES:
            raise ValueError(f"Unknown actor mode estimate {mode_estimate!r}; allowed: {', '.join(MODE_ESTIMATES)}")
        self.net = build_mlp(feature_dim, 2 * action_dim, hidden, layers)
        self.mean_scale, self.min_std = mean_scale, min_std
        self.raw_init_std = math.log(math.expm1(init_std))
        self.mode_estimate = mode_estimate

    def gaussian(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh Gaussian ``(mean [*, A], std [*, A])`` in float32, ``|mean| < mean_scale``, ``std > min_std``."""
        raw_mean, raw_std = self.net(feature).float().chunk(2, dim=-1)
        mean = self.mean_scale * torch.tanh(raw_mean / self.mean_scale)
        std = F.softplus(raw_std + self.raw_init_std) + self.min_std
        return mean, std

    def distribution(self, feature: torch.Tensor) -> Distribution:
        mean, std = self.gaussian(feature)
        squashed = TransformedDistribution(
            Normal(mean, std, validate_args=False), [ClippedTanhTransform(cache_size=1)], validate_args=False
        )
        return Independent(squashed, 1, validate_args=False)

    @staticmethod
    def pre_tanh_gaussian(distribution: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian ``(mean [*, A], std [*, A])`` under the tanh of a distribution made by :meth:`distribution`."""
        normal = distribution.base_dist.base_dist
        return normal.loc, normal.scale

    def mode(self, feature: torch.Tensor) -> torch.Tensor:
        if self.mode_estimate == "tanh_mean":
            return torch.tanh(self.gaussian(feature)[0])
        distribution = self.distribution(feature)
        samples = distribution.sample((self.MODE_SAMPLES,))
        best = distribution.log_prob(samples).argmax(dim=0)
        return samples.gather(0, best[None, ..., None].expand(1, *samples.shape[1:]))[0]


class OneHotActor(Actor):
    """One-hot categorical; ``rsample`` is ``one_hot_sample + probs - probs.detach()`` (straight-through gradients)."""

    discrete = True

    def __init__(self, feature_dim: int, action_dim: int, hidden: int = 400, layers: int = 4) -> None:
        super().__init__()
        self.net = build_mlp(feature_dim, action_dim, hidden, layers)

    def distribution(self, feature: torch.Tensor) -> Distribution:
        return OneHotCategoricalStraightThrough(logits=self.net(feature).float(), validate_args=False)

    def mode(self, feature: torch.Tensor) -> torch.Tensor:
        logits = self.net(feature).float()
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)


def build_actor(
    model_cfg: DictConfig, feature_dim: int, action_dim: int, discrete: bool, mode_estimate: str = "sample_max"
) -> Actor:
    """The action model of ``cfg.model`` (``actor_layers``, ``dense_units``, ``mean_scale``, ``init_std``,
    ``actor_min_std``) for ``feature [*, F]`` and ``A`` actions; ``mode_estimate`` is ``eval.actor_mode``
    (continuous actions only: a one-hot actor's mode is its most likely action)."""
    if discrete:
        return OneHotActor(feature_dim, action_dim, model_cfg.dense_units, model_cfg.actor_layers)
    return TanhGaussianActor(
        feature_dim,
        action_dim,
        model_cfg.dense_units,
        model_cfg.actor_layers,
        mean_scale=model_cfg.mean_scale,
        init_std=model_cfg.init_std,
        min_std=model_cfg.actor_min_std,
        mode_estimate=mode_estimate,
    )
