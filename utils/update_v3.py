"""One DreamerV3 gradient update (the authors' ``Agent.train``): one loss, one optimiser, then the slow critic.

The world-model, actor, critic and replay-critic losses are summed (each already scaled) and one optimiser
(``utils/v3_optimizer.py``: adaptive gradient clipping, LaProp, warm-up) steps every parameter of the world model,
actor and critic. Gradients cannot leak between the parts: imagination starts from detached states, the actor
reads detached features (REINFORCE) or detached world-model parameters (``dynamics``), and the critic reads
detached imagined features; only the replay critic trains the representation, as in the authors' code
(``repval_grad``). After the step the slow critic moves towards the critic by ``slow_critic_rate`` every
``slow_critic_every`` updates.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from tensordict import TensorDictBase
from torch import nn

from losses.behaviour_v3 import BehaviourLossV3
from losses.world_model_v3 import WorldModelLossV3
from utils.update import autocast_context, scalar_entries
from utils.v3_optimizer import make_v3_optimizer


def make_slow_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` (the slow critic starts equal to the critic)."""
    slow = copy.deepcopy(module)
    slow.requires_grad_(False)
    return slow


class DreamerV3Update:
    """Applies one update to the world model, actor and critic from a replay batch ``[B, T]``."""

    def __init__(
        self,
        *,
        modules: dict[str, nn.Module],
        slow_value: nn.Module,
        world_model_loss: WorldModelLossV3,
        behaviour_loss: BehaviourLossV3,
        opt_cfg: DictConfig,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if autocast_dtype is torch.float16:
            raise ValueError("optimization.autocast=float16 is not supported for DreamerV3; use bfloat16")
        self.modules = modules
        self.parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
        self.optimizer = make_v3_optimizer(self.parameters, opt_cfg)
        self.world_model_loss, self.behaviour_loss = world_model_loss, behaviour_loss
        self.value, self.slow_value = modules["value"], slow_value
        self.slow_rate, self.slow_every = opt_cfg.slow_critic_rate, opt_cfg.slow_critic_every
        self.updates = 0
        self.device, self.autocast_dtype = device, autocast_dtype

    def step(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One update from ``batch [B, T]``; returns detached scalar metrics (losses, diagnostics, grad norm)."""
        with autocast_context(self.device, self.autocast_dtype):
            world_model_terms = self.world_model_loss(batch)
            behaviour_terms = self.behaviour_loss(batch)
        loss = world_model_terms["loss_world_model"] + sum(
            behaviour_terms[key] for key in ("loss_actor", "loss_value", "loss_repval")
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in self.parameters if p.grad is not None])
        )
        self.optimizer.step()
        self._update_slow_critic()
        metrics = {**scalar_entries(world_model_terms), **scalar_entries(behaviour_terms)}
        metrics["loss/total"] = loss.detach()
        metrics["grad_norm/all"] = grad_norm
        return metrics

    @torch.no_grad()
    def _update_slow_critic(self) -> None:
        """``slow = rate · critic + (1 - rate) · slow`` every ``slow_every`` updates (counted from 0)."""
        if self.updates % self.slow_every == 0:
            for slow, online in zip(self.slow_value.parameters(), self.value.parameters(), strict=True):
                slow.lerp_(online, self.slow_rate)
        self.updates += 1

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "slow_value": self.slow_value.state_dict(),
            "return_norm": self.behaviour_loss.return_norm.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.slow_value.load_state_dict(state["slow_value"])
        self.behaviour_loss.return_norm.load_state_dict(state["return_norm"])
        self.updates = state["updates"]
