"""A lean, hand-written plain-PyTorch Dreamer update: the baseline our update's throughput is compared with.

Same networks, sizes and math as the project's update (``utils.update.DreamerUpdate`` with ``WorldModelLoss``,
``ActorLoss`` and ``ValueLoss``), written directly on tensors: no TensorDict, no ``LossModule``, no
``torch.distributions``, a plain λ-return loop. One update:

* world model: conv encoder, GRU RSSM filtered over ``T`` steps (state and action reset where ``is_first``), decoder
  and reward head; unit-Gaussian NLLs summed over event dims and averaged over ``B, T``; KL(posterior || prior)
  averaged over ``B, T`` then clamped below at ``free_nats``;
* behaviour: ``H`` imagined steps from all ``N = B*T`` detached posterior states, the actor reading detached
  features (tanh-Gaussian, reparameterised); λ-returns bootstrapped on the last value; actor loss
  ``-mean(w · R)``, value loss ``-mean(w · log N(R; v, 1))`` on detached features, ``w`` the cumulative discounts;
* three Adams, each applying the ``torch.autograd.grad`` of its own loss on its own parameters (all gradients taken
  before any step, the world model's before imagining), clipped to ``grad_clip``; the GRU runs in float32 under
  autocast, float16 uses one gradient scaler per loss.

Only the configuration the benchmark times is covered: pixels, continuous actions, no continue head (DMC).
"""

from __future__ import annotations

import contextlib
import math

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F

from modules.mlp import build_mlp

HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
LOG_TWO = math.log(2.0)
ENCODER_MULTIPLIERS = (1, 2, 4, 8)
DECODER_LAYERS = ((4, 5), (2, 5), (1, 6))  # (depth multiplier, kernel) of the hidden transposed convolutions
DECODER_OUTPUT_KERNEL = 6


def _split_gaussian(raw: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[*, 2S]`` -> ``(mean [*, S], softplus(raw_std) + min_std)``."""
    mean, raw_std = raw.float().chunk(2, dim=-1)
    return mean, F.softplus(raw_std) + min_std


def _sample(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return mean + std * torch.randn_like(std)


def _unit_gaussian_nll(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (target - mean).square() + HALF_LOG_TWO_PI


class PlainDreamerNets(nn.Module):
    """Every network of the agent, sized by ``cfg.model`` for ``C``-channel 64x64 pixels and ``A`` actions."""

    def __init__(self, model_cfg: DictConfig, action_dim: int, channels: int) -> None:
        super().__init__()
        depth, deter, stoch = model_cfg.cnn_depth, model_cfg.deter_dim, model_cfg.stoch_dim
        hidden, dense = model_cfg.rssm_hidden_dim, model_cfg.dense_units
        feature_dim, embed_dim = deter + stoch, 32 * depth
        encoder: list[nn.Module] = []
        width = channels
        for multiplier in ENCODER_MULTIPLIERS:
            encoder += [nn.Conv2d(width, multiplier * depth, 4, 2), nn.ReLU()]
            width = multiplier * depth
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        decoder: list[nn.Module] = [nn.Linear(feature_dim, embed_dim), nn.Unflatten(-1, (embed_dim, 1, 1))]
        width = embed_dim
        for multiplier, kernel in DECODER_LAYERS:
            decoder += [nn.ConvTranspose2d(width, multiplier * depth, kernel, 2), nn.ReLU()]
            width = multiplier * depth
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(width, channels, DECODER_OUTPUT_KERNEL, 2))
        self.prior_input = nn.Sequential(nn.Linear(stoch + action_dim, hidden), nn.ELU())
        self.gru = nn.GRUCell(hidden, deter)
        self.prior_output = build_mlp(deter, 2 * stoch, hidden, 1)
        self.posterior = build_mlp(deter + embed_dim, 2 * stoch, hidden, 1)
        self.reward = build_mlp(feature_dim, 1, dense, model_cfg.reward_layers)
        self.actor = build_mlp(feature_dim, 2 * action_dim, dense, model_cfg.actor_layers)
        self.value = build_mlp(feature_dim, 1, dense, model_cfg.value_layers)

    def world_model_parameters(self) -> list[nn.Parameter]:
        parts = (self.encoder, self.decoder, self.prior_input, self.gru, self.prior_output, self.posterior, self.reward)
        return [parameter for part in parts for parameter in part.parameters()]


class PlainDreamer:
    """The baseline update. ``step(pixels, action, reward, is_first)`` on ``[B, T, *]`` replay tensors;
    ``world_model_step`` and ``behaviour_step`` apply its two halves alone."""

    def __init__(
        self,
        model_cfg: DictConfig,
        opt_cfg: DictConfig,
        *,
        action_dim: int,
        channels: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        self.nets = PlainDreamerNets(model_cfg, action_dim, channels).to(device)
        self.deter_dim, self.stoch_dim, self.min_std = model_cfg.deter_dim, model_cfg.stoch_dim, model_cfg.min_std
        self.mean_scale, self.actor_min_std = model_cfg.mean_scale, model_cfg.actor_min_std
        self.raw_init_std = math.log(math.expm1(model_cfg.init_std))
        self.free_nats, self.kl_scale = opt_cfg.free_nats, opt_cfg.kl_scale
        self.horizon, self.discount, self.lambda_ = opt_cfg.imagination_horizon, opt_cfg.discount, opt_cfg.return_lambda
        self.grad_clip = opt_cfg.grad_clip
        self.device, self.autocast_dtype = device, autocast_dtype
        self.parameters = {
            "world_model": self.nets.world_model_parameters(),
            "actor": list(self.nets.actor.parameters()),
            "value": list(self.nets.value.parameters()),
        }
        rates = {"world_model": opt_cfg.world_model_lr, "actor": opt_cfg.actor_lr, "value": opt_cfg.value_lr}
        self.optimizers = {
            name: torch.optim.Adam(params, lr=rates[name], eps=opt_cfg.adam_eps)
            for name, params in self.parameters.items()
        }
        # One float16 loss scaler per loss, as ours (the world-model loss overflows at the others' scales).
        self.scalers = {
            name: torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16) for name in self.parameters
        }
        self.world_model_loss = torch.compile(self._world_model_loss) if compile else self._world_model_loss
        # Compiled apart, as ours: two losses from one compiled graph would share one backward node.
        self.actor_loss = torch.compile(self._actor_loss) if compile else self._actor_loss
        self.value_loss = torch.compile(self._value_loss) if compile else self._value_loss

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _recurrent(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``h' = GRU(ELU(W [z, a]), h)`` ``[N, D]``, the GRU in float32."""
        gru_input = self.nets.prior_input(torch.cat([stoch, action], dim=-1))
        with torch.autocast(self.device.type, enabled=False):
            return self.nets.gru(gru_input.float(), deter.float())

    def observe(self, obs: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor) -> list[torch.Tensor]:
        """Filters float ``obs [B, T, C, H, W]``: ``[deter, stoch, post_mean, post_std, prior_mean, prior_std]``,
        each ``[B, T, *]``."""
        batch, time = obs.shape[:2]
        embed = self.nets.encoder(obs.flatten(0, 1)).unflatten(0, (batch, time))
        keep = 1.0 - is_first.float()
        deter = obs.new_zeros(batch, self.deter_dim)
        stoch = obs.new_zeros(batch, self.stoch_dim)
        steps: list[tuple[torch.Tensor, ...]] = []
        for t in range(time):
            mask = keep[:, t]
            deter = self._recurrent(deter * mask, stoch * mask, action[:, t] * mask)
            prior_mean, prior_std = _split_gaussian(self.nets.prior_output(deter), self.min_std)
            post_mean, post_std = _split_gaussian(
                self.nets.posterior(torch.cat([deter, embed[:, t]], -1)), self.min_std
            )
            stoch = _sample(post_mean, post_std)
            steps.append((deter, stoch, post_mean, post_std, prior_mean, prior_std))
        return [torch.stack(values, 1) for values in zip(*steps, strict=True)]

    def _world_model_loss(
        self, pixels: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, deter [B, T, D], stoch [B, T, S])`` from uint8 ``pixels [B, T, C, 64, 64]``."""
        obs = pixels.float() / 255.0 - 0.5
        deter, stoch, post_mean, post_std, prior_mean, prior_std = self.observe(obs, action, is_first)
        ratio = (post_std / prior_std).square()
        kl = 0.5 * (ratio + ((post_mean - prior_mean) / prior_std).square() - 1.0 - ratio.log()).sum(-1)
        feature = torch.cat([deter, stoch], -1)
        reconstruction = self.nets.decoder(feature.flatten(0, 1)).unflatten(0, feature.shape[:2]).float()
        obs_loss = _unit_gaussian_nll(reconstruction, obs).flatten(2).sum(-1).mean()
        reward_loss = _unit_gaussian_nll(self.nets.reward(feature).float(), reward).sum(-1).mean()
        loss = obs_loss + reward_loss + self.kl_scale * kl.mean().clamp_min(self.free_nats)
        return loss, deter, stoch

    def imagine(self, deter: torch.Tensor, stoch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``H`` prior steps from ``[N, D]``, ``[N, S]`` (detached): ``(feature [H, N, F], log_prob [H, N])``."""
        deter, stoch = deter.detach(), stoch.detach()
        deters, stochs, log_probs = [], [], []
        for _ in range(self.horizon):
            raw_mean, raw_std = self.nets.actor(torch.cat([deter, stoch], -1).detach()).float().chunk(2, -1)
            mean = self.mean_scale * torch.tanh(raw_mean / self.mean_scale)
            std = F.softplus(raw_std + self.raw_init_std) + self.actor_min_std
            noise = torch.randn_like(std)
            pre_tanh = mean + std * noise
            action = torch.tanh(pre_tanh)
            with torch.no_grad():
                log_det = 2.0 * (LOG_TWO - pre_tanh - F.softplus(-2.0 * pre_tanh))
                log_probs.append((-0.5 * noise.square() - std.log() - HALF_LOG_TWO_PI - log_det).sum(-1))
            deter = self._recurrent(deter, stoch, action)
            stoch = _sample(*_split_gaussian(self.nets.prior_output(deter), self.min_std))
            deters.append(deter)
            stochs.append(stoch)
        return torch.cat([torch.stack(deters), torch.stack(stochs)], -1), torch.stack(log_probs)

    def lambda_returns(self, reward: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``R_t = r_t + γ((1-λ) v_{t+1} + λ R_{t+1})``, ``R_{H-1} = v_{H-1}``: ``[H-1, N, 1]``."""
        returns = [value[-1]]
        for t in reversed(range(reward.shape[0] - 1)):
            returns.append(
                reward[t] + self.discount * ((1.0 - self.lambda_) * value[t + 1] + self.lambda_ * returns[-1])
            )
        return torch.stack(returns[:0:-1])

    def _actor_loss(self, deter: torch.Tensor, stoch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Imagines from every start state ``[*, D]``, ``[*, S]``: ``(actor loss, feature [H-1, N, F],
        returns [H-1, N, 1], weight [H-1, 1, 1])``, the last three detached for the value loss."""
        feature, _ = self.imagine(deter.flatten(0, -2), stoch.flatten(0, -2))
        returns = self.lambda_returns(self.nets.reward(feature).float(), self.nets.value(feature).float())
        weight = self.discount ** torch.arange(returns.shape[0], device=returns.device, dtype=returns.dtype)
        weight = weight.view(-1, 1, 1)
        return -(weight * returns).mean(), feature[:-1].detach(), returns.detach(), weight

    def _value_loss(self, feature: torch.Tensor, returns: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (weight * _unit_gaussian_nll(self.nets.value(feature).float(), returns)).mean()

    def behaviour_losses(self, deter: torch.Tensor, stoch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(actor loss, value loss)`` imagining from every start state ``[*, D]``, ``[*, S]``."""
        actor_loss, *value_inputs = self.actor_loss(deter, stoch)
        return actor_loss, self.value_loss(*value_inputs)

    def _gradient(self, name: str, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.scalers[name].scale(loss), self.parameters[name])

    def _apply(self, gradients: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Clips each group's gradient and applies it with the group's own Adam."""
        for name, grads in gradients.items():
            for parameter, gradient in zip(self.parameters[name], grads, strict=True):
                parameter.grad = gradient
            scaler = self.scalers[name]
            scaler.unscale_(self.optimizers[name])
            nn.utils.clip_grad_norm_(self.parameters[name], self.grad_clip)
            scaler.step(self.optimizers[name])
            scaler.update()

    def _world_model_gradient(
        self, pixels: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, is_first: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """The world model's gradient (its graph freed) and the detached posterior states."""
        with self._autocast():
            loss, deter, stoch = self.world_model_loss(pixels, action, reward, is_first)
        # Detached outside the (possibly compiled) function: its graph must not link back to the world model's.
        return self._gradient("world_model", loss), deter.detach(), stoch.detach()

    def _behaviour_gradients(self, deter: torch.Tensor, stoch: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        with self._autocast():
            actor_loss, value_loss = self.behaviour_losses(deter, stoch)
        return {"actor": self._gradient("actor", actor_loss), "value": self._gradient("value", value_loss)}

    def step(self, pixels: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, is_first: torch.Tensor) -> None:
        """One full update from a replay batch ``[B, T, *]``: every gradient from the same parameters, then the
        steps; the world model's gradient is taken before imagining, as ours."""
        world_model_gradient, deter, stoch = self._world_model_gradient(pixels, action, reward, is_first)
        self._apply({"world_model": world_model_gradient, **self._behaviour_gradients(deter, stoch)})

    def world_model_step(
        self, pixels: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, is_first: torch.Tensor
    ) -> None:
        self._apply({"world_model": self._world_model_gradient(pixels, action, reward, is_first)[0]})

    def behaviour_step(self, deter: torch.Tensor, stoch: torch.Tensor) -> None:
        """Actor and value update from posterior states ``[B, T, D]``, ``[B, T, S]``."""
        self._apply(self._behaviour_gradients(deter.detach(), stoch.detach()))

    @torch.no_grad()
    def act(
        self, pixels: torch.Tensor, deter: torch.Tensor, stoch: torch.Tensor, prev_action: torch.Tensor, noise: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One acting step on ``[N, *]``: ``(action, deter, stoch)``, the sampled action plus Gaussian noise."""
        with self._autocast():
            deter = self._recurrent(deter, stoch, prev_action)
            embed = self.nets.encoder(pixels.float() / 255.0 - 0.5)
            stoch = _sample(*_split_gaussian(self.nets.posterior(torch.cat([deter, embed], -1)), self.min_std))
            raw_mean, raw_std = self.nets.actor(torch.cat([deter, stoch], -1)).float().chunk(2, -1)
            mean = self.mean_scale * torch.tanh(raw_mean / self.mean_scale)
            std = F.softplus(raw_std + self.raw_init_std) + self.actor_min_std
            action = torch.tanh(_sample(mean, std))
        return (action + noise * torch.randn_like(action)).clamp(-1.0, 1.0), deter, stoch
