"""Behaviour learning in imagination (Hafner et al., 2020, Sec. 3, Eq. 5-8; authors' ``Dreamer._train``).

From every posterior state of a replay batch, the prior imagines ``H`` steps ahead with actions sampled from the
actor. The actor maximises the λ-return of the imagined rewards, bootstrapped with the value model; the value
model regresses the same (stopped-gradient) λ-returns.

Gradient routing: the actor loss is differentiable through the imagined dynamics (prior, reward head, continue
head, and the value model's bootstrap) into the actor, through its sampled actions only: the actor's input
feature and the start states are detached. The actor-loss graph therefore also reaches world-model and value
parameters; only the actor's gradient must be applied from it (``utils/update.py`` takes each optimiser's
gradient with ``torch.autograd.grad`` on its own parameters). The value loss reads detached features and
targets and reaches only the value model.

One update imagines once: :class:`ActorLoss` returns, besides ``loss_actor`` and diagnostics, the detached
trajectory and targets that :class:`ValueLoss` consumes (``value_loss(actor_loss(batch))``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.distributions import Normal
from torchrl.objectives import LossModule

from losses.lambda_return import discount_weights, lambda_return
from modules.actor import Actor
from modules.rssm import RSSMPrior, feature

# An action component with |a| above this counts as saturated (at the tanh's bound).
SATURATION = 0.99
SATURATION_KEYS = ("actor/mean_abs", "actor/std_median", "actor/saturated_fraction")


def imagine(
    prior: RSSMPrior, actor: Actor, start_deter: torch.Tensor, start_stoch: torch.Tensor, horizon: int
) -> dict[str, torch.Tensor]:
    """Rolls the prior ``horizon`` steps from ``start_deter [N, D]``, ``start_stoch [N, S]`` (both detached).

    At each step the actor reads the *detached* current feature and samples ``a_t`` (reparameterised or
    straight-through), and the prior samples the next state from ``(h_t, z_t, a_t)``. Returns time-major tensors
    of the ``H`` imagined states after the start (the start is not included): ``deter [H, N, D]``,
    ``stoch [H, N, S]``, ``feature [H, N, F]``, ``action [H, N, A]`` (``action[t]`` led to state ``t``, as in the
    replay convention) and ``action_log_prob [H, N]`` (detached; for the sample-based entropy estimate). A
    continuous (tanh-Gaussian) actor also gives its detached pre-tanh ``action_mean [H, N, A]`` and
    ``action_std [H, N, A]``, for the saturation diagnostics.
    """
    deter, stoch = start_deter.detach(), start_stoch.detach()
    keys = ("deter", "stoch", "action", "action_log_prob") + (() if actor.discrete else ("action_mean", "action_std"))
    steps: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for _ in range(horizon):
        policy = actor.distribution(feature(deter, stoch).detach())
        action = policy.rsample()
        with torch.no_grad():
            steps["action_log_prob"].append(policy.log_prob(action))
            if not actor.discrete:
                mean, std = actor.pre_tanh_gaussian(policy)
                steps["action_mean"].append(mean)
                steps["action_std"].append(std)
        deter, _, _, stoch = prior(deter, stoch, action)
        steps["deter"].append(deter)
        steps["stoch"].append(stoch)
        steps["action"].append(action)
    trajectory = {key: torch.stack(values) for key, values in steps.items()}
    trajectory["feature"] = feature(trajectory["deter"], trajectory["stoch"])
    return trajectory


class ActorLoss(LossModule):
    """Actor objective ``-mean_t,n(w_t · R_t)`` over imagined trajectories (Eq. 6-7).

    ``forward(tensordict)`` reads the posterior states ``"deter" [B, T, D]`` and ``"stoch" [B, T, S]``; each
    starts an imagination of ``horizon`` steps: all ``N = B*T`` of them, or with a continue head all but the last
    step of each sequence (``N = B*(T-1)``; the authors' code drops it because it could be terminal). Rewards
    are the reward
    head's mean, discounts ``γ_t = discount · sigmoid(continue_logit)`` (or ``discount`` without continue head),
    values the value model's mean; ``R_t`` are λ-returns (``losses.lambda_return``) and ``w_t`` the
    stopped-gradient cumulative discounts.

    Returns a TensorDict (batch size ``[]``) with

    * ``"loss_actor"``: scalar, differentiable (see the module docstring for the gradient routing);
    * diagnostics (detached scalars): ``"imagined_reward"`` (mean imagined reward), ``"imagined_return"`` (mean
      λ-return), ``"actor_entropy"`` (sample-based: minus the mean log-probability of the imagined actions);
    * saturation diagnostics of a continuous actor (detached scalars, over the imagined states):
      ``"actor/mean_abs"`` (mean |pre-tanh mean|), ``"actor/std_median"`` (median pre-tanh std) and
      ``"actor/saturated_fraction"`` (fraction of imagined action components with ``|a| > SATURATION``);
    * the value model's training data (detached): ``"imagined_feature" [H-1, N, F]`` (the states the returns start
      from), ``"target_return" [H-1, N, 1]`` and ``"discount_weight" [H-1, N, 1]``.
    """

    def __init__(
        self,
        prior: RSSMPrior,
        actor: Actor,
        value: nn.Module,
        reward_head: nn.Module,
        continue_head: nn.Module | None = None,
        *,
        horizon: int = 15,
        discount: float = 0.99,
        lambda_: float = 0.95,
    ) -> None:
        super().__init__()
        if horizon < 2:
            raise ValueError(f"imagination horizon must be at least 2, got {horizon}")
        self.prior, self.actor, self.value = prior, actor, value
        self.reward_head, self.continue_head = reward_head, continue_head
        self.horizon, self.discount, self.lambda_ = horizon, discount, lambda_
        self.in_keys = ["deter", "stoch"]
        self.out_keys = [
            "loss_actor",
            "imagined_reward",
            "imagined_return",
            "actor_entropy",
            "imagined_feature",
            "target_return",
            "discount_weight",
            *(() if actor.discrete else SATURATION_KEYS),
        ]

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        start_deter, start_stoch = tensordict.get("deter"), tensordict.get("stoch")
        if self.continue_head is not None:
            start_deter, start_stoch = start_deter[:, :-1], start_stoch[:, :-1]
        trajectory = imagine(
            self.prior, self.actor, start_deter.flatten(0, -2), start_stoch.flatten(0, -2), self.horizon
        )
        features = trajectory["feature"]
        reward = self.reward_head(features).float()
        discount = self.discount * self._continue_probability(features)
        value = self.value(features).float()
        returns = lambda_return(reward, value, discount, self.lambda_)
        weight = discount_weights(discount)
        return TensorDict(
            {
                "loss_actor": -(weight * returns).mean(),
                "imagined_reward": reward.detach().mean(),
                "imagined_return": returns.detach().mean(),
                "actor_entropy": -trajectory["action_log_prob"].mean(),
                **_saturation_diagnostics(trajectory),
                "imagined_feature": features[:-1].detach(),
                "target_return": returns.detach(),
                "discount_weight": weight,
            },
            batch_size=[],
        )

    def _continue_probability(self, features: torch.Tensor) -> torch.Tensor:
        """``sigmoid(continue_logit) [H, N, 1]``, or ones when there is no continue head."""
        if self.continue_head is None:
            return features.new_ones(*features.shape[:-1], 1, dtype=torch.float32)
        return torch.sigmoid(self.continue_head(features).float())


def _saturation_diagnostics(trajectory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How close a tanh-Gaussian actor is to its bounds over an imagined trajectory (none for a one-hot actor).

    In the constant-action phase the pre-tanh mean runs to ``±mean_scale``, the std collapses and nearly every
    action sits at ``±1``; leaving it shows as all three moving back.
    """
    if "action_mean" not in trajectory:
        return {}
    return {
        "actor/mean_abs": trajectory["action_mean"].abs().mean(),
        "actor/std_median": trajectory["action_std"].float().median(),
        "actor/saturated_fraction": (trajectory["action"].detach().abs() > SATURATION).float().mean(),
    }


class ValueLoss(LossModule):
    """Value regression on the λ-returns (Eq. 8), as a unit-variance Gaussian negative log-likelihood.

    ``forward(tensordict)`` reads the output of :class:`ActorLoss`: ``"imagined_feature" [H-1, N, F]``,
    ``"target_return" [H-1, N, 1]`` and ``"discount_weight" [H-1, N, 1]``; features and targets are detached here,
    so the loss reaches only the value model. Returns ``"loss_value"``
    ``= -mean_t,n(w_t · log N(R_t; v(s_t), 1))`` (averaged, not summed, over time) and ``"value_mean"`` (detached).
    """

    def __init__(self, value: nn.Module) -> None:
        super().__init__()
        self.value = value
        self.in_keys = ["imagined_feature", "target_return", "discount_weight"]
        self.out_keys = ["loss_value", "value_mean"]

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        prediction = self.value(tensordict.get("imagined_feature").detach()).float()
        target = tensordict.get("target_return").detach()
        log_likelihood = Normal(prediction, 1.0, validate_args=False).log_prob(target)
        weight = tensordict.get("discount_weight").detach()
        return TensorDict(
            {"loss_value": -(weight * log_likelihood).mean(), "value_mean": prediction.detach().mean()},
            batch_size=[],
        )
