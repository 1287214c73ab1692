"""DreamerV3's world-model loss (Hafner et al., 2023, Eq. 5; the authors' ``Agent.loss``, world-model part).

Per step of a ``[B, T]`` replay batch, with scales from ``cfg.optimization``::

    rec_scale · reconstruction + reward_scale · two-hot CE(reward) + continue_scale · BCE(continue)
        + dyn_scale · max(free_nats, KL[sg(q) || p]) + rep_scale · max(free_nats, KL[q || sg(p)])

* reconstruction: squared error summed over the observation; pixels in ``[-0.5, 0.5]`` (the authors' ``x / 255``
  up to a shift that the difference removes), state vectors in symlog space (the decoder predicts ``symlog(x)``);
* reward: two-hot cross-entropy over ``bins`` (TorchRL's ``two_hot_cross_entropy``);
* continue: binary cross-entropy against ``(1 - terminated) · (1 - 1 / horizon)`` (the authors' ``contdisc``: the
  continue head also carries the discount, so imagination needs no separate γ);
* KL: both terms per step (``modules/v3_distributions.separate_kl_losses``, TorchRL's ``categorical_kl_terms``
  without its batch mean), summed over the latent groups before the free nats, with ``unimix`` uniform probability
  mixed into both sides.

TorchRL's ``DreamerV3ModelLoss`` computes the same terms but reads every entry from TorchRL's transition layout
(``("next", key)``) and runs the world model itself on it; our replay holds the authors' step layout (see
``utils/replay.py``), so this module composes the same TorchRL functions on our keys.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch.nn import functional as F
from torchrl.modules.models.model_based import symlog, two_hot_cross_entropy
from torchrl.objectives import LossModule

from modules.v3_distributions import separate_kl_losses
from modules.world_model import OBS_FLOAT_KEY, WorldModel


class WorldModelLossV3(LossModule):
    """Runs the V3 world model on a ``[B, T]`` batch (writing its keys into it) and returns the loss terms.

    ``forward(td)`` returns (batch size ``[]``): ``loss_world_model`` (the scaled sum, differentiable) and,
    detached, ``loss_observation``, ``loss_reward``, ``loss_continue`` (with a continue head), ``loss_dynamics``,
    ``loss_representation`` (scaled, after free nats), ``kl`` (raw mean KL) and ``kl/above_free_nats`` (the fraction
    of steps whose KL exceeds the free nats).
    """

    def __init__(
        self,
        world_model: WorldModel,
        *,
        bins: torch.Tensor,
        free_nats: float,
        unimix: float,
        rec_scale: float,
        reward_scale: float,
        continue_scale: float,
        dyn_scale: float,
        rep_scale: float,
        horizon: float,
    ) -> None:
        super().__init__()
        self.world_model = world_model
        self.register_buffer("bins", bins)
        self.free_nats, self.unimix = free_nats, unimix
        self.rec_scale, self.reward_scale, self.continue_scale = rec_scale, reward_scale, continue_scale
        self.dyn_scale, self.rep_scale = dyn_scale, rep_scale
        self.continue_target = 1.0 - 1.0 / horizon
        self.use_continue = world_model.continue_head is not None
        self.in_keys = list(dict.fromkeys([*world_model.in_keys, "reward", "terminated"]))

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        tensordict = self.world_model(tensordict)

        def get(key: str) -> torch.Tensor:
            # The terms are computed in float32 whatever precision autocast ran the networks in.
            return tensordict.get(key).float()

        reconstruction, target = get("reconstruction"), get(OBS_FLOAT_KEY)
        if not self.world_model.from_pixels:
            target = symlog(target)
        error = (reconstruction - target).pow(2).flatten(2).sum(-1)  # [B, T]
        reward = two_hot_cross_entropy(get("reward_pred"), get("reward"), self.bins)  # [B, T]
        post_logits, prior_logits = get("post_logits"), get("prior_logits")
        dynamics, representation = separate_kl_losses(post_logits, prior_logits, self.free_nats, self.unimix)
        terms = {
            "loss_observation": self.rec_scale * error.mean(),
            "loss_reward": self.reward_scale * reward.mean(),
            "loss_dynamics": self.dyn_scale * dynamics.mean(),
            "loss_representation": self.rep_scale * representation.mean(),
        }
        if self.use_continue:
            continue_target = (1.0 - get("terminated")) * self.continue_target
            terms["loss_continue"] = self.continue_scale * F.binary_cross_entropy_with_logits(
                get("continue_logit"), continue_target
            )
        kl, _ = separate_kl_losses(post_logits.detach(), prior_logits.detach(), 0.0, self.unimix)  # [B, T]
        return TensorDict(
            {
                "loss_world_model": sum(terms.values()),
                "kl": kl.mean(),
                "kl/above_free_nats": (kl > self.free_nats).float().mean(),
                **{name: term.detach() for name, term in terms.items()},
            },
            batch_size=[],
        )
