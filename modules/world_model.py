"""Dreamer's world model (Hafner et al., 2020, Sec. 4): encoder, RSSM, decoder, reward and continue heads.

``WorldModel`` holds the parts as plain tensor modules (``encoder``, ``rssm`` with ``.prior`` and
``.posterior``, ``decoder``, ``reward_head``, ``continue_head`` or ``None``) and composes them as
TensorDictModules with explicit keys in ``observe``; calling the world model on a ``[B, T]``
TensorDict runs ``observe``, which writes into it:

* preprocess: ``obs_key`` (``"pixels"`` uint8 or ``"observation"``) -> ``"obs_float"``
* encoder: ``"obs_float"`` -> ``"embed"``
* rollout (``RSSMRollout``): ``"embed"``, ``"action"``, ``"is_first"`` -> ``"deter"``, ``"stoch"``,
  ``"post_mean"``, ``"post_std"``, ``"prior_mean"``, ``"prior_std"`` (its ``output_keys``; DreamerV3's rollout,
  ``modules/rssm_v3.py``, writes ``"post_logits"`` and ``"prior_logits"`` instead of the Gaussian parameters)
* feature: ``"deter"``, ``"stoch"`` -> ``"feature"``
* decoder: ``"feature"`` -> ``"reconstruction"``
* reward: ``"feature"`` -> ``"reward_pred"``
* continue (only with a continue head): ``"feature"`` -> ``"continue_logit"``

``"obs_float"`` is the observation as the networks read it and the decoder's target: pixels as
float32 in ``[-0.5, 0.5]`` (``[B, T, C, H, W]``), state vectors as float32 ``[B, T, O]``. The time
loop runs inside ``RSSMRollout`` on plain tensors, so the TensorDict composition costs a handful of
key look-ups per update.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from omegaconf import DictConfig
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torch import nn

from modules.decoder import build_decoder
from modules.encoder import build_encoder, normalize_pixels
from modules.heads import build_continue_head, build_reward_head
from modules.rssm import RSSMPosterior, RSSMPrior, RSSMRollout, feature

PIXELS_KEY = "pixels"
STATE_KEY = "observation"
OBS_FLOAT_KEY = "obs_float"
ROLLOUT_KEYS = RSSMRollout.output_keys


class ObservationPreprocessor(nn.Module):
    """Raw observation to the networks' float input: uint8 pixels to ``[-0.5, 0.5]``, states to float32."""

    def __init__(self, from_pixels: bool) -> None:
        super().__init__()
        self.from_pixels = from_pixels

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(observation) if self.from_pixels else observation.float()


class WorldModel(TensorDictModuleBase):
    """The world model; ``world_model(td)`` fills the model keys of a ``[B, T]`` TensorDict in place.

    Attributes: ``preprocess`` (raw ``[*, obs]`` -> float), ``encoder`` (float ``[*, obs]`` -> ``[*, E]``),
    ``rssm`` (``RSSMRollout``; ``rssm.prior``, ``rssm.posterior``), ``decoder`` (``[*, F]`` -> ``[*, obs]``),
    ``reward_head`` and ``continue_head`` (``[*, F]`` -> ``[*, 1]``; ``continue_head`` is ``None`` when off),
    ``obs_key``, ``from_pixels``, ``feature_dim`` (``F``), ``observe`` (the ``TensorDictSequential``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        rssm: RSSMRollout,
        decoder: nn.Module,
        reward_head: nn.Module,
        continue_head: nn.Module | None,
        *,
        from_pixels: bool,
    ) -> None:
        super().__init__()
        self.from_pixels = from_pixels
        self.preprocess = ObservationPreprocessor(from_pixels)
        self.obs_key = PIXELS_KEY if from_pixels else STATE_KEY
        self.feature_dim = rssm.prior.deter_dim + rssm.prior.stoch_dim
        self.encoder, self.rssm, self.decoder = encoder, rssm, decoder
        self.reward_head, self.continue_head = reward_head, continue_head
        observe = self._compose()
        # Stored outside the module registry: it wraps the parts above, whose parameters must appear
        # once in ``parameters()`` and ``state_dict()``. The wrappers have no state of their own.
        self.__dict__["observe"] = observe
        self.in_keys, self.out_keys = observe.in_keys, observe.out_keys

    def _compose(self) -> TensorDictSequential:
        steps = OrderedDict(
            preprocess=TensorDictModule(self.preprocess, [self.obs_key], [OBS_FLOAT_KEY]),
            encoder=TensorDictModule(self.encoder, [OBS_FLOAT_KEY], ["embed"]),
            rollout=TensorDictModule(self.rssm, ["embed", "action", "is_first"], list(self.rssm.output_keys)),
            feature=TensorDictModule(feature, ["deter", "stoch"], ["feature"]),
            decoder=TensorDictModule(self.decoder, ["feature"], ["reconstruction"]),
            reward=TensorDictModule(self.reward_head, ["feature"], ["reward_pred"]),
        )
        if self.continue_head is not None:
            steps["continue"] = TensorDictModule(self.continue_head, ["feature"], ["continue_logit"])
        return TensorDictSequential(steps)

    def embed(self, observation: torch.Tensor) -> torch.Tensor:
        """Raw observation ``[*, obs]`` (uint8 pixels or float states) to its embedding ``[*, E]``."""
        return self.encoder(self.preprocess(observation))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.observe(tensordict)


def build_world_model(
    model_cfg: DictConfig,
    *,
    obs_shape: tuple[int, ...],
    from_pixels: bool,
    action_dim: int,
    use_continue: bool,
) -> WorldModel:
    """The world model sized by ``cfg.model`` for observations of ``obs_shape`` (``(C, H, W)`` or ``(O,)``)."""
    encoder, embed_dim = build_encoder(model_cfg, obs_shape, from_pixels)
    sizes = dict(
        deter_dim=model_cfg.deter_dim,
        stoch_dim=model_cfg.stoch_dim,
        hidden_dim=model_cfg.rssm_hidden_dim,
        min_std=model_cfg.min_std,
    )
    rssm = RSSMRollout(RSSMPrior(action_dim, **sizes), RSSMPosterior(embed_dim, **sizes))
    feature_dim = model_cfg.deter_dim + model_cfg.stoch_dim
    return WorldModel(
        encoder,
        rssm,
        build_decoder(model_cfg, feature_dim, obs_shape, from_pixels),
        build_reward_head(model_cfg, feature_dim),
        build_continue_head(model_cfg, feature_dim) if use_continue else None,
        from_pixels=from_pixels,
    )
