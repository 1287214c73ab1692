"""DreamerV3's RSSM (Hafner et al., 2023): a block GRU and discrete latents, from TorchRL's ``RSSMPriorV3`` and
``RSSMPosteriorV3``, behind the interface of our Dreamer V1 RSSM (``modules/rssm.py``).

The latent state is ``h`` (``deter``, the block-GRU state) and ``z`` (``stoch``, ``G`` one-hot categoricals of
``K`` classes, flattened to ``[*, G * K]``, sampled with straight-through gradients from the logits mixed with
``unimix`` uniform probability). The adapters give the acting policy, imagination, dream videos and open-loop
predictions the same calls as V1:

* ``prior.recurrent_step(deter, stoch, action) -> deter_next``
* ``prior(deter, stoch, action) -> (deter_next, prior_logits [*, G, K], None, prior_stoch)``
* ``posterior(deter, embed) -> (post_logits, None, post_stoch)``

(the logits describe the categoricals whole: ``None`` stands where V1 returns its Gaussians' std, and no caller
reads it.)
* ``rollout(embed [B, T, E], action [B, T, A], is_first [B, T, 1])`` -> ``deter``, ``stoch``, ``post_logits``,
  ``prior_logits`` (``[B, T, *]``).

TorchRL's modules take ``(state, belief, action)`` in that order and return ``(logits, state, belief)``; its
``RSSMRolloutV3`` reads TorchRL's transition keys (``("next", ...)``, ``is_init``), whereas our replay holds the
authors' step layout (``action[t]`` led to observation ``t``, ``is_first``). The rollout below therefore is our
own loop, with the reset semantics of the V1 rollout, around TorchRL's step modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrl.modules import RSSMPosteriorV3, RSSMPriorV3


class PriorV3(nn.Module):
    """One step of the V3 dynamics without an observation (TorchRL's ``RSSMPriorV3`` with a block GRU).

    ``deter_dim`` = ``D``, ``stoch_dim`` = ``G * K``; the GRU and prior head run in the activations' precision.
    """

    def __init__(self, core: RSSMPriorV3) -> None:
        super().__init__()
        self.core = core
        self.deter_dim = core.rnn_hidden_dim
        self.stoch_dim = core.num_categoricals * core.num_classes

    def recurrent_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``h_t = f(h_{t-1}, z_{t-1}, a_{t-1})``: ``[*, D]``, ``[*, G K]``, ``[*, A]`` -> ``[*, D]``."""
        return self.core._update_belief(stoch, deter, action.to(stoch.dtype))

    def forward(
        self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]:
        logits, stoch_next, deter_next = self.core(stoch, deter, action.to(stoch.dtype))
        return deter_next, logits, None, stoch_next


class PosteriorV3(nn.Module):
    """``q(z_t | h_t, e_t)`` (TorchRL's ``RSSMPosteriorV3`` with RMSNorm layers, as the authors')."""

    def __init__(self, core: RSSMPosteriorV3) -> None:
        super().__init__()
        self.core = core

    def forward(self, deter: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        logits, stoch = self.core(deter, embed.to(deter.dtype))
        return logits, None, stoch


class RSSMRolloutV3(nn.Module):
    """Filters a ``[B, T]`` sequence through prior and posterior (the V1 rollout's reset semantics, V3 outputs).

    ``forward(embed [B, T, E], action [B, T, A], is_first [B, T, 1])`` returns ``deter [B, T, D]``,
    ``stoch [B, T, G K]`` (posterior samples), ``post_logits`` and ``prior_logits`` ``[B, T, G, K]``.
    """

    output_keys = ("deter", "stoch", "post_logits", "prior_logits")

    def __init__(self, prior: PriorV3, posterior: PosteriorV3) -> None:
        super().__init__()
        self.prior = prior
        self.posterior = posterior

    def forward(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, time = embed.shape[:2]
        deter = embed.new_zeros(batch, self.prior.deter_dim, dtype=torch.float32)
        stoch = embed.new_zeros(batch, self.prior.stoch_dim, dtype=torch.float32)
        keep = 1.0 - is_first.to(torch.float32)
        deters, stochs, post_logits = [], [], []
        for t in range(time):
            mask = keep[:, t]
            deter = self.prior.recurrent_step(deter * mask, stoch * mask, action[:, t] * mask)
            logits, _, stoch = self.posterior(deter, embed[:, t])
            for values, value in zip((deters, stochs, post_logits), (deter, stoch, logits), strict=True):
                values.append(value)
        deter_sequence = torch.stack(deters, dim=1)
        post_sequence = torch.stack(post_logits, dim=1)
        # The prior's logits feed only the KL, not the recurrence: one batched pass over all B * T states.
        prior_sequence = self.prior.core.rnn_to_prior_projector(deter_sequence).view(post_sequence.shape)
        return dict(
            deter=deter_sequence,
            stoch=torch.stack(stochs, dim=1),
            post_logits=post_sequence,
            prior_logits=prior_sequence,
        )


def build_rssm_v3(model_cfg, action_dim: int, embed_dim: int) -> RSSMRolloutV3:
    """The V3 RSSM sized by ``cfg.model`` (``deter_dim``, ``rssm_hidden_dim``, ``stoch_groups``,
    ``stoch_classes``, ``blocks``, ``rssm_*_layers``, ``norm_eps``, ``unimix``)."""
    sizes = dict(num_categoricals=model_cfg.stoch_groups, num_classes=model_cfg.stoch_classes)
    prior = RSSMPriorV3(
        hidden_dim=model_cfg.rssm_hidden_dim,
        rnn_hidden_dim=model_cfg.deter_dim,
        action_dim=action_dim,
        action_shape=(action_dim,),
        recurrent_model="block_gru",
        num_blocks=model_cfg.blocks,
        num_layers=model_cfg.rssm_dyn_layers,
        prior_num_layers=model_cfg.rssm_img_layers,
        norm_eps=model_cfg.norm_eps,
        unimix=model_cfg.unimix,
        **sizes,
    )
    posterior = RSSMPosteriorV3(
        hidden_dim=model_cfg.rssm_hidden_dim,
        rnn_hidden_dim=model_cfg.deter_dim,
        obs_embed_dim=embed_dim,
        use_rms_norm=True,
        num_layers=model_cfg.rssm_obs_layers,
        norm_eps=model_cfg.norm_eps,
        unimix=model_cfg.unimix,
        **sizes,
    )
    return RSSMRolloutV3(PriorV3(prior), PosteriorV3(posterior))
