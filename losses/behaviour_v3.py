"""DreamerV3's behaviour learning (Hafner et al., 2023, Sec. 3; the authors' ``imag_loss`` and ``repl_loss``).

From every posterior state of a ``[B, T]`` replay batch (``N = B * T`` starts, detached) the prior imagines ``H``
steps with actions sampled from the actor, giving ``H + 1`` states per start (the start first). On them:

* rewards: the reward head's two-hot mean; continue probabilities ``c``: the continue head's (it was trained on
  ``(1 - terminated) · (1 - 1/horizon)``, so it carries the discount; without a continue head ``c = 1 - 1/horizon``);
  weights ``w = cumprod(c)`` (stopped);
* returns ``R``: :func:`lambda_return_v3` bootstrapped with the critic (``slowtar: False``);
* actor (``reinforce``, the authors'): ``-w · (log π(a|s) · sg((R - v) / S) + η · H[π])`` with ``S`` the percentile
  return scale (TorchRL's ``PercentileValueNorm``: EMA of the 5th-95th percentile span, at least 1) and
  ``η`` = ``actor_entropy``; (``dynamics``): ``-w · (R / S + η · H[π])`` with the gradient through the imagined
  dynamics into the actor only (world model and critic parameters are read detached);
* critic: ``w · (CE(v, sg(R)) + slowreg · CE(v, sg(v_slow)))`` with two-hot cross-entropies and ``v_slow`` the
  slow critic (an EMA of the critic, kept by the update);
* replay critic (``repval``): the same regression on the replay sequence's own λ-returns, bootstrapped with the
  imagined returns of each replay state, with the posterior features *not* detached (``repval_grad``): it also
  trains the representation.

TorchRL's ``DreamerV3ActorLoss`` and ``DreamerV3ValueLoss`` imagine by stepping a ``DreamerEnv`` (a TorchRL
environment step per imagined step) and read TorchRL's transition keys; our imagination is a plain tensor loop
over the world model's prior, as for V1, so this module composes TorchRL's pieces (two-hot coding,
``PercentileValueNorm``) around it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.modules import PercentileValueNorm
from torchrl.modules.models.model_based import two_hot_cross_entropy, two_hot_decode

from losses.lambda_return import lambda_return_v3
from modules.actor import Actor
from modules.rssm import feature
from modules.rssm_v3 import PriorV3

ACTOR_GRADIENTS = ("reinforce", "dynamics")


def detached_parameters(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``module`` as a function of its inputs only: gradients flow to the inputs, never to its parameters."""
    parameters = {name: parameter.detach() for name, parameter in module.named_parameters()}
    return lambda *inputs: torch.func.functional_call(module, parameters, inputs)


def replay_last(is_first: torch.Tensor, terminated: torch.Tensor) -> torch.Tensor:
    """``is_last [B, T]``: the step ends its episode (the next step is a first step, or it is terminal)."""
    next_first = torch.cat([is_first[:, 1:], torch.zeros_like(is_first[:, :1])], dim=1)
    return (next_first | terminated).float()


class BehaviourLossV3(nn.Module):
    """Actor, critic and replay-critic losses of one update (see the module docstring).

    ``forward(batch)`` reads the world model's outputs on the replay batch ``[B, T]``: ``"deter"``, ``"stoch"``,
    ``"feature"`` (with its graph, for the replay critic) and ``"reward"``, ``"terminated"``, ``"is_first"``.
    ``slow_value`` is the slow critic (updated by the caller). Returns (batch size ``[]``): ``loss_actor``,
    ``loss_value``, ``loss_repval`` (scaled, differentiable) and detached diagnostics.
    """

    def __init__(
        self,
        prior: PriorV3,
        actor: Actor,
        value: nn.Module,
        slow_value: nn.Module,
        reward_head: nn.Module,
        continue_head: nn.Module | None,
        *,
        bins: torch.Tensor,
        horizon: int,
        discount_horizon: float,
        lambda_: float,
        actor_entropy: float,
        slowreg_scale: float,
        actor_scale: float,
        value_scale: float,
        repval_scale: float,
        actor_grad: str,
        return_norm: PercentileValueNorm,
    ) -> None:
        super().__init__()
        if actor_grad not in ACTOR_GRADIENTS:
            raise ValueError(f"optimization.actor_grad={actor_grad!r}; allowed: {', '.join(ACTOR_GRADIENTS)}")
        if actor_grad == "dynamics" and actor.discrete:
            raise ValueError("optimization.actor_grad=dynamics needs continuous actions; use reinforce")
        self.prior, self.actor, self.value, self.slow_value = prior, actor, value, slow_value
        self.reward_head, self.continue_head = reward_head, continue_head
        self.register_buffer("bins", bins)
        self.horizon, self.lambda_, self.actor_grad = horizon, lambda_, actor_grad
        self.discount = 1.0 - 1.0 / discount_horizon
        self.actor_entropy, self.slowreg_scale = actor_entropy, slowreg_scale
        self.actor_scale, self.value_scale, self.repval_scale = actor_scale, value_scale, repval_scale
        self.return_norm = return_norm

    def _decode(self, logits: torch.Tensor) -> torch.Tensor:
        return two_hot_decode(logits.float(), self.bins)

    def imagine(self, start_deter: torch.Tensor, start_stoch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[N, H + 1, F]`` (the start first) and the actions taken in them ``[N, H + 1, A]``.

        With ``reinforce`` nothing here is differentiated; with ``dynamics`` the features depend on the sampled
        actions through the prior, whose parameters are read detached. The actor reads detached features either
        way (the authors' DreamerV1/V2 ``policy(stop_gradient(feat))``, and our V1 ``imagine``): the gradient
        reaches the actor through its sampled actions only.
        """
        dynamics = self.actor_grad == "dynamics"
        prior = detached_parameters(self.prior) if dynamics else self.prior
        deter, stoch = start_deter.detach(), start_stoch.detach()
        features, actions = [], []
        with torch.set_grad_enabled(dynamics and torch.is_grad_enabled()):
            for step in range(self.horizon + 1):
                state = feature(deter, stoch)
                policy = self.actor.distribution(state.detach())
                action = policy.rsample() if dynamics else policy.sample()
                features.append(state)
                actions.append(action)
                if step < self.horizon:
                    deter, _, _, stoch = prior(deter, stoch, action)
        return torch.stack(features, 1), torch.stack(actions, 1)

    def forward(self, batch: TensorDictBase) -> TensorDict:
        features, actions = self.imagine(batch.get("deter").flatten(0, 1), batch.get("stoch").flatten(0, 1))
        dynamics = self.actor_grad == "dynamics"
        read = detached_parameters if dynamics else (lambda module: module)
        reward = self._decode(read(self.reward_head)(features))  # [N, H + 1]
        if self.continue_head is None:
            cont = torch.full_like(reward, self.discount)
        else:
            cont = torch.sigmoid(read(self.continue_head)(features).float()).squeeze(-1)
        weight = torch.cumprod(cont, 1).detach()
        value_logits = self.value(features.detach())
        value = self._decode(read(self.value)(features) if dynamics else value_logits.detach())
        returns = lambda_return_v3(torch.zeros_like(cont), 1.0 - cont, reward, value, 1.0, self.lambda_)  # [N, H]
        if self.training:
            self.return_norm.update(returns.detach().unsqueeze(-1))
        scale = self.return_norm.scale().squeeze(-1)

        policy = self.actor.distribution(features[:, :-1].detach())
        entropy = policy.entropy()
        if dynamics:
            objective = returns / scale
        else:
            advantage = ((returns - value[:, :-1]) / scale).detach()
            objective = policy.log_prob(actions[:, :-1].detach()) * advantage
        loss_actor = -(weight[:, :-1] * (objective + self.actor_entropy * entropy)).mean()

        slow_value = self._decode(self.slow_value(features.detach())).detach()
        loss_value = (weight[:, :-1] * self._critic_terms(value_logits[:, :-1], returns, slow_value[:, :-1])).mean()
        loss_repval = self._replay_value(batch, returns[:, 0])
        return TensorDict(
            {
                "loss_actor": self.actor_scale * loss_actor,
                "loss_value": self.value_scale * loss_value,
                "loss_repval": self.repval_scale * loss_repval,
                "imagined_reward": reward.detach().mean(),
                "imagined_return": returns.detach().mean(),
                "imagined_continue": cont.detach().mean(),
                "value_mean": value.detach().mean(),
                "actor_entropy": entropy.detach().mean(),
                "return_scale": scale.detach(),
                **self._action_diagnostics(policy),
            },
            batch_size=[],
        )

    def _critic_terms(self, logits: torch.Tensor, returns: torch.Tensor, slow_value: torch.Tensor) -> torch.Tensor:
        """``CE(v, sg(R)) + slowreg · CE(v, sg(v_slow))`` per state: logits ``[*, bins]``, targets ``[*]``."""
        return two_hot_cross_entropy(logits.float(), returns.detach(), self.bins) + (
            self.slowreg_scale * two_hot_cross_entropy(logits.float(), slow_value.detach(), self.bins)
        )

    def _replay_value(self, batch: TensorDictBase, imagined_returns: torch.Tensor) -> torch.Tensor:
        """The replay critic loss from the replay features ``[B, T, F]`` and the imagined returns ``[B * T]``."""
        features = batch.get("feature")
        shape = features.shape[:2]
        terminated = batch.get("terminated").reshape(shape)
        last = replay_last(batch.get("is_first").reshape(shape), terminated)
        reward = batch.get("reward").reshape(shape).float()
        bootstrap = imagined_returns.detach().reshape(shape)
        returns = lambda_return_v3(last, terminated.float(), reward, bootstrap, self.discount, self.lambda_)
        logits = self.value(features)[:, :-1]
        slow_value = self._decode(self.slow_value(features.detach()))[:, :-1]
        return ((1.0 - last[:, :-1]) * self._critic_terms(logits, returns, slow_value)).mean()

    def _action_diagnostics(self, policy) -> dict[str, torch.Tensor]:
        """A continuous actor's mean |mean| and median std over the imagined states (none for discrete actions)."""
        if self.actor.discrete:
            return {}
        return {"actor/mean_abs": policy.loc.detach().abs().mean(), "actor/std_median": policy.scale.detach().median()}
