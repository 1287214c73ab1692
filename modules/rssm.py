"""Recurrent state-space model (RSSM) of Dreamer (Hafner et al., 2020, Sec. 3 and App. A).

The latent state has a deterministic part ``h`` (``deter``, the GRU state) and a
stochastic part ``z`` (``stoch``, a diagonal Gaussian sample):

* prior / transition:  ``h_t = f(h_{t-1}, z_{t-1}, a_{t-1})``,  ``z_t ~ p(z_t | h_t)``
* posterior / filter:  ``z_t ~ q(z_t | h_t, e_t)`` with ``e_t`` the encoder embedding.

Both distributions use ``std = softplus(raw) + min_std`` (``min_std = 0.1``), as in
the authors' code. The feature that every head reads is ``[h, z]``.

Shapes: ``D`` = deterministic size, ``S`` = stochastic size, ``A`` = action size,
``E`` = embedding size, ``B`` batch, ``T`` time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def gaussian_parameters(raw: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[*, 2S]`` into ``mean [*, S]`` and ``std = softplus(raw_std) + min_std``."""
    mean, raw_std = raw.chunk(2, dim=-1)
    return mean, F.softplus(raw_std) + min_std


def sample_gaussian(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reparameterised sample of a diagonal Gaussian (gradients flow to mean and std), in float32.

    The noise is drawn in float32 whatever precision autocast gave ``mean`` and ``std``: a bfloat16 draw would
    take other numbers from the generator (torch's CPU sampler has another code path per dtype), so runs in the
    two precisions would imagine from different noise, and the sample would lose precision before the GRU.
    """
    return mean + std * torch.randn(std.shape, dtype=torch.float32, device=std.device)


def feature(deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
    """Model state ``[h, z]``: ``[*, D]`` and ``[*, S]`` give ``[*, D + S]``."""
    return torch.cat([deter, stoch], dim=-1)


class RSSMPrior(nn.Module):
    """One step of the latent dynamics without an observation.

    ``forward(deter [*, D], stoch [*, S], action [*, A])`` returns
    ``(deter_next [*, D], prior_mean [*, S], prior_std [*, S], prior_stoch [*, S])``.
    The GRU runs in float32 even under autocast: its gates saturate and drift in
    bfloat16, and ``gru_cell`` has no float16 kernel on every device.
    """

    def __init__(
        self,
        action_dim: int,
        deter_dim: int = 200,
        stoch_dim: int = 30,
        hidden_dim: int = 200,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.deter_dim, self.stoch_dim, self.min_std = deter_dim, stoch_dim, min_std
        self.input_layer = nn.Sequential(nn.Linear(stoch_dim + action_dim, hidden_dim), nn.ELU())
        self.gru = nn.GRUCell(hidden_dim, deter_dim)
        self.output_layer = nn.Sequential(
            nn.Linear(deter_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, 2 * stoch_dim)
        )

    def recurrent_step(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``h_t = f(h_{t-1}, z_{t-1}, a_{t-1})``: ``[*, D]``, ``[*, S]``, ``[*, A]`` -> ``[*, D]``."""
        gru_input = self.input_layer(torch.cat([stoch, action.to(stoch.dtype)], dim=-1))
        with torch.autocast(device_type=deter.device.type, enabled=False):
            lead_shape = deter.shape[:-1]
            deter_next = self.gru(
                gru_input.float().reshape(-1, gru_input.shape[-1]), deter.float().reshape(-1, self.deter_dim)
            )
        return deter_next.reshape(*lead_shape, self.deter_dim)

    def distribution(self, deter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior parameters ``(mean [*, S], std [*, S])`` from ``h_t`` ``[*, D]``."""
        return gaussian_parameters(self.output_layer(deter), self.min_std)

    def forward(
        self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        deter_next = self.recurrent_step(deter, stoch, action)
        mean, std = self.distribution(deter_next)
        return deter_next, mean, std, sample_gaussian(mean, std)


class RSSMPosterior(nn.Module):
    """Filter ``q(z_t | h_t, e_t)``.

    ``forward(deter [*, D], embed [*, E])`` returns ``(post_mean [*, S], post_std [*, S], post_stoch [*, S])``.
    """

    def __init__(
        self,
        embed_dim: int,
        deter_dim: int = 200,
        stoch_dim: int = 30,
        hidden_dim: int = 200,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.min_std = min_std
        self.net = nn.Sequential(
            nn.Linear(deter_dim + embed_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, 2 * stoch_dim)
        )

    def forward(self, deter: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, std = gaussian_parameters(self.net(torch.cat([deter, embed.to(deter.dtype)], dim=-1)), self.min_std)
        return mean, std, sample_gaussian(mean, std)


class RSSMRollout(nn.Module):
    """Filters a ``[B, T]`` sequence through prior and posterior, carrying ``(h, z)`` over time.

    Inputs follow the replay convention of the authors' code: ``action[:, t]`` is the
    action that *led to* observation ``t`` (zeros at an episode's first step) and
    ``is_first[:, t]`` marks an episode start. Every sequence starts from the
    initial (zero) state, and where ``is_first`` is set inside the sequence the
    state and the previous action are reset to zero before the step.

    ``forward(embed [B, T, E], action [B, T, A], is_first [B, T, 1])`` returns a dict of
    ``[B, T, *]`` tensors: ``deter``, ``stoch`` (posterior sample), ``post_mean``,
    ``post_std``, ``prior_mean``, ``prior_std``.
    """

    output_keys = ("deter", "stoch", "post_mean", "post_std", "prior_mean", "prior_std")

    def __init__(self, prior: RSSMPrior, posterior: RSSMPosterior) -> None:
        super().__init__()
        self.prior = prior
        self.posterior = posterior

    def initial_state(self, batch_size: int, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(h [B, D], z [B, S])`` on ``reference``'s device, in float32."""
        zeros = reference.new_zeros
        return (
            zeros(batch_size, self.prior.deter_dim, dtype=torch.float32),
            zeros(batch_size, self.prior.stoch_dim, dtype=torch.float32),
        )

    def forward(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, time = embed.shape[:2]
        deter, stoch = self.initial_state(batch, embed)
        keep = 1.0 - is_first.to(torch.float32)
        outputs: dict[str, list[torch.Tensor]] = {key: [] for key in self.output_keys}
        for t in range(time):
            mask = keep[:, t]
            deter = self.prior.recurrent_step(deter * mask, stoch * mask, action[:, t] * mask)
            prior_mean, prior_std = self.prior.distribution(deter)
            post_mean, post_std, stoch = self.posterior(deter, embed[:, t])
            for key, value in zip(outputs, (deter, stoch, post_mean, post_std, prior_mean, prior_std), strict=True):
                outputs[key].append(value)
        return {key: torch.stack(values, dim=1) for key, values in outputs.items()}
