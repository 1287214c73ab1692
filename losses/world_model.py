"""World-model loss of Dreamer (Hafner et al., 2020, Sec. 4: reconstruction objective; the authors' model loss).

For a ``[B, T]`` batch, with every term averaged over ``B`` and ``T``:

* observation: ``-log N(x; decoder mean, 1)`` summed over the observation dims (pixels as floats in
  ``[-0.5, 0.5]``), the ``0.5 * log(2 pi)`` constant included;
* reward: ``-log N(reward_scale * f(r); reward mean, 1)`` with ``f`` the ``reward_transform``: ``none`` (the
  identity) or ``tanh`` (the authors' ``clip_rewards`` for Atari: ``tanh(r)``, so the model and the behaviour
  learning see squashed rewards; logged returns stay raw);
* continue (only with a continue head): ``continue_scale * BCE(logit, 1 - terminated)``;
* KL: ``kl_scale * free(KL(posterior || prior))``, the KL of diagonal Gaussians summed over the stochastic
  dims, with free nats in one of the two published forms (``free_nats_mode``):

  - ``batch`` (the authors' TF2 code): ``max(mean_bt KL_bt, free_nats)``, the clamp on the batch-averaged KL;
    below it the term is constant and gives no gradient at all;
  - ``step`` (the paper's original code): ``mean_bt max(KL_bt, free_nats)``, a clamp per batch element and time
    step; only the elements above the free nats give gradient.

  With ``kl_balance = a`` (KL balancing, DreamerV2: Hafner et al., 2021, Sec. 2) the same value is split
  into ``a * free(KL(sg(posterior) || prior)) + (1 - a) * free(KL(posterior || sg(prior)))`` (``sg``:
  stop-gradient): the prior is pulled toward the posterior with weight ``a``, the posterior toward the prior
  with ``1 - a``. ``kl_balance = None`` is Dreamer V1 (both with weight 1).

``loss_world_model`` is their sum and the only term to backpropagate; the named terms are
returned detached, for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch.nn import functional as F
from torchrl.objectives import LossModule

from modules.world_model import OBS_FLOAT_KEY, WorldModel

HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
FREE_NATS_MODES = ("batch", "step")
REWARD_TRANSFORMS = {"none": lambda reward: reward, "tanh": torch.tanh}


def unit_gaussian_nll(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise ``-log N(target; mean, 1)``, same shape as the inputs."""
    return 0.5 * (target - mean).square() + HALF_LOG_TWO_PI


def diagonal_gaussian_kl(
    mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean_q, std_q) || N(mean_p, std_p))`` of diagonal Gaussians, summed over the last dim: ``[*, S] -> [*]``.

    ``KL = sum_s log(std_p / std_q) + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2``.
    """
    variance_ratio = (std_q / std_p).square()
    mean_term = ((mean_q - mean_p) / std_p).square()
    return 0.5 * (variance_ratio + mean_term - 1.0 - variance_ratio.log()).sum(-1)


def sum_event_mean_batch_time(values: torch.Tensor) -> torch.Tensor:
    """``[B, T, *event]`` to a scalar: sum over the event dims, mean over ``B`` and ``T``."""
    return values.flatten(2).sum(-1).mean()


class WorldModelLoss(LossModule):
    """Runs the world model on a ``[B, T]`` batch (writing its keys into it) and returns the loss terms.

    ``forward(td)`` returns a TensorDict with batch size ``[]``: ``loss_world_model`` (the total, to
    backpropagate), and detached for logging ``loss_observation``, ``loss_reward``, ``loss_continue``
    (only with a continue head), ``loss_kl`` (after free nats and scale), ``kl`` (the raw
    batch-mean KL) and ``kl/above_free_nats`` (the fraction of the KL above the free nats, the part that
    trains: 0 or 1 for ``batch``, the fraction of ``[B, T]`` elements for ``step``).
    """

    @dataclass
    class _AcceptedKeys:
        """Data keys the loss reads besides the world model's inputs (see ``set_keys``)."""

        reward: NestedKey = "reward"
        terminated: NestedKey = "terminated"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(
        self,
        world_model: WorldModel,
        *,
        free_nats: float,
        kl_scale: float,
        continue_scale: float,
        reward_scale: float = 1.0,
        kl_balance: float | None = None,
        free_nats_mode: str = "batch",
        reward_transform: str = "none",
    ) -> None:
        super().__init__()
        if kl_balance is not None and not 0.0 <= kl_balance <= 1.0:
            raise ValueError(f"kl_balance={kl_balance} must be null or in [0, 1]")
        if free_nats_mode not in FREE_NATS_MODES:
            raise ValueError(f"free_nats_mode={free_nats_mode!r}; allowed: {', '.join(FREE_NATS_MODES)}")
        if reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"reward_transform={reward_transform!r}; allowed: {', '.join(REWARD_TRANSFORMS)}")
        self.reward_transform = REWARD_TRANSFORMS[reward_transform]
        self.free_nats_mode = free_nats_mode
        self.kl_balance = kl_balance
        self.world_model = world_model
        self.reward_scale = reward_scale
        self.free_nats = free_nats
        self.kl_scale = kl_scale
        self.continue_scale = continue_scale
        self.use_continue = world_model.continue_head is not None
        self._set_in_keys()
        terms = ["loss_world_model", "loss_observation", "loss_reward", "loss_kl", "kl", "kl/above_free_nats"]
        self.out_keys = terms + (["loss_continue"] if self.use_continue else [])

    def _set_in_keys(self) -> None:
        targets = [self.tensor_keys.reward] + ([self.tensor_keys.terminated] if self.use_continue else [])
        self.in_keys = list(dict.fromkeys([*self.world_model.in_keys, *targets]))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict = self.world_model(tensordict)

        def get(key: NestedKey) -> torch.Tensor:
            # The terms are computed in float32 whatever precision autocast ran the networks in.
            return tensordict.get(key).float()

        observation = sum_event_mean_batch_time(unit_gaussian_nll(get("reconstruction"), get(OBS_FLOAT_KEY)))
        reward_target = self.reward_scale * self.reward_transform(get(self.tensor_keys.reward))
        reward = sum_event_mean_batch_time(unit_gaussian_nll(get("reward_pred"), reward_target))
        posterior, prior = (get("post_mean"), get("post_std")), (get("prior_mean"), get("prior_std"))
        kl_elements = diagonal_gaussian_kl(*posterior, *prior)
        kl_term = self.kl_scale * self._clamped_kl(kl_elements, posterior, prior)
        terms = {"loss_observation": observation, "loss_reward": reward, "loss_kl": kl_term}
        if self.use_continue:
            continue_target = 1.0 - get(self.tensor_keys.terminated)
            terms["loss_continue"] = self.continue_scale * F.binary_cross_entropy_with_logits(
                get("continue_logit"), continue_target
            )
        total = sum(terms.values())
        return TensorDict(
            {
                "loss_world_model": total,
                "kl": kl_elements.detach().mean(),
                "kl/above_free_nats": self._above_free_nats(kl_elements.detach()),
                **{name: term.detach() for name, term in terms.items()},
            },
            batch_size=[],
        )

    def _free(self, kl_elements: torch.Tensor) -> torch.Tensor:
        """Free nats on a KL ``[B, T]``: the clamped batch mean (``batch``) or the mean of the clamped elements."""
        if self.free_nats_mode == "batch":
            return kl_elements.mean().clamp_min(self.free_nats)
        return kl_elements.clamp_min(self.free_nats).mean()

    def _above_free_nats(self, kl_elements: torch.Tensor) -> torch.Tensor:
        """The share of a KL ``[B, T]`` that the clamp lets through: 0 or 1 (``batch``), or a fraction (``step``)."""
        if self.free_nats_mode == "batch":
            return (kl_elements.mean() > self.free_nats).float()
        return (kl_elements > self.free_nats).float().mean()

    def _clamped_kl(
        self,
        kl_elements: torch.Tensor,
        posterior: tuple[torch.Tensor, torch.Tensor],
        prior: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The KL term before ``kl_scale``: free nats, and with ``kl_balance`` the gradient split between the sides.

        ``posterior`` and ``prior`` are ``(mean, std)`` pairs of shape ``[B, T, S]``; ``kl_elements [B, T]`` their KL.
        """
        if self.kl_balance is None:
            return self._free(kl_elements)
        detached_posterior = tuple(x.detach() for x in posterior)
        detached_prior = tuple(x.detach() for x in prior)
        kl_prior_side = diagonal_gaussian_kl(*detached_posterior, *prior)
        kl_posterior_side = diagonal_gaussian_kl(*posterior, *detached_prior)
        return self.kl_balance * self._free(kl_prior_side) + (1.0 - self.kl_balance) * self._free(kl_posterior_side)
