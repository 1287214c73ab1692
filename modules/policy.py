"""Acting policy for TorchRL collectors and evaluation: filter the observation into the latent state, then act.

At each environment step (authors' ``Dreamer.policy``)::

    h_t = f(h_{t-1}, z_{t-1}, a_{t-1}),   z_t ~ q(z_t | h_t, e_t),   a_t ~ actor([h_t, z_t])

The recurrent state travels through the collector's TensorDict: the policy reads ``"deter"``, ``"stoch"`` and
``"prev_action"`` (zeros at every reset, put there by the env's ``TensorDictPrimer``) and writes
``("next", "deter")``, ``("next", "stoch")``, ``("next", "prev_action")`` = ``(h_t, z_t, a_t)``, which the env
keeps in its ``"next"`` entry and ``step_mdp`` moves to the root for the next step.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torch.nn import functional as F
from torchrl.envs.utils import ExplorationType, exploration_type

from modules.actor import Actor
from modules.encoder import normalize_pixels
from modules.rssm import RSSMPosterior, RSSMPrior, feature

DETERMINISTIC_TYPES = (
    ExplorationType.DETERMINISTIC,
    ExplorationType.MODE,
    ExplorationType.MEAN,
    ExplorationType.MEDIAN,
)
STATE_KEYS = ("deter", "stoch", "prev_action")


def observation_to_float(observation: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[*, C, H, W]`` to float in ``[-0.5, 0.5]``; float observations are returned unchanged."""
    return normalize_pixels(observation) if observation.dtype == torch.uint8 else observation


def gaussian_exploration(action: torch.Tensor, std: float) -> torch.Tensor:
    """Adds ``N(0, std^2)`` noise to a continuous action ``[*, A]`` and clips it to ``[-1, 1]`` (authors)."""
    return (action + std * torch.randn_like(action)).clamp(-1.0, 1.0)


def epsilon_greedy(action: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Replaces a one-hot action ``[*, A]`` by a uniformly random one-hot action with probability ``epsilon``."""
    num_actions = action.shape[-1]
    random_action = F.one_hot(torch.randint_like(action[..., 0], num_actions).long(), num_actions).to(action.dtype)
    replace = torch.rand_like(action[..., :1]) < epsilon
    return torch.where(replace, random_action, action)


def _flatten_batch(tensor: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """``[*batch_shape, *event]`` to ``[N, *event]``."""
    return tensor.reshape(-1, *tensor.shape[len(batch_shape) :])


class DreamerPolicy(TensorDictModuleBase):
    """Recurrent acting policy; TensorDict batch ``[num_envs]`` or ``[]``.

    Reads ``observation_key`` (``"pixels"`` uint8 ``[*, C, 64, 64]`` or ``"observation"`` float ``[*, O]``),
    ``"deter" [*, D]``, ``"stoch" [*, S]``, ``"prev_action" [*, A]`` and, if present, ``"is_init" [*, 1]`` (where it
    is set, the state and previous action are zeroed first; the env's zero primer already does this at resets).
    Writes ``"action" [*, A]`` and ``("next", "deter" | "stoch" | "prev_action")``.

    The action depends on TorchRL's exploration type (``torchrl.envs.utils.set_exploration_type``):
    ``DETERMINISTIC`` / ``MODE`` / ``MEAN`` / ``MEDIAN`` take the actor's mode without noise (evaluation);
    otherwise (``RANDOM``, the collectors' default, or no type set) the actor's sample plus exploration noise:
    Gaussian with std ``exploration_noise`` then clipped to ``[-1, 1]``, or epsilon-greedy with
    ``epsilon = exploration_noise`` for one-hot actions. Runs without gradients.
    """

    def __init__(
        self,
        encoder: nn.Module,
        prior: RSSMPrior,
        posterior: RSSMPosterior,
        actor: Actor,
        *,
        observation_key: str = "pixels",
        exploration_noise: float = 0.3,
    ) -> None:
        super().__init__()
        self.encoder, self.prior, self.posterior, self.actor = encoder, prior, posterior, actor
        self.observation_key = observation_key
        self.exploration_noise = exploration_noise
        self.in_keys = [observation_key, *STATE_KEYS]
        self.out_keys = ["action", *(("next", key) for key in STATE_KEYS)]

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch_shape = tensordict.batch_size
        # The env batch is flattened to one leading dimension N ([] -> [1], [E1, E2] -> [E1 * E2]).
        observation = observation_to_float(_flatten_batch(tensordict.get(self.observation_key), batch_shape))
        deter, stoch, prev_action = (_flatten_batch(tensordict.get(key), batch_shape) for key in STATE_KEYS)
        is_init = tensordict.get("is_init", None)
        if is_init is not None:
            keep = (~_flatten_batch(is_init, batch_shape)).to(deter.dtype)
            deter, stoch, prev_action = deter * keep, stoch * keep, prev_action * keep

        deter = self.prior.recurrent_step(deter, stoch, prev_action)
        _, _, stoch = self.posterior(deter, self.encoder(observation))
        action = self._act(feature(deter, stoch))

        tensordict.set("action", action.reshape(*batch_shape, -1))
        for key, value in zip(STATE_KEYS, (deter, stoch, action), strict=True):
            tensordict.set(("next", key), value.reshape(*batch_shape, -1))
        return tensordict

    def _act(self, model_feature: torch.Tensor) -> torch.Tensor:
        """Action ``[N, A]`` from ``feature [N, F]`` in the current exploration mode."""
        if exploration_type() in DETERMINISTIC_TYPES:
            return self.actor.mode(model_feature)
        action = self.actor.distribution(model_feature).sample()
        if self.actor.discrete:
            return epsilon_greedy(action, self.exploration_noise)
        return gaussian_exploration(action, self.exploration_noise)
