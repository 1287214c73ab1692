"""The Dreamer update built from TorchRL's library components, at our sizes: the benchmark's ``torchrl`` column.

Networks: ``torchrl.modules.models.model_based`` ``ObsEncoder``, ``ObsDecoder``, ``RSSMPrior``, ``RSSMPosterior``,
``RSSMRollout``, ``DreamerActor`` (tanh-Gaussian through TorchRL's ``TanhNormal``) and ``MLP`` reward/value heads;
losses: ``torchrl.objectives.dreamer`` ``DreamerModelLoss``, ``DreamerActorLoss`` (imagining with a ``DreamerEnv``
rollout) and ``DreamerValueLoss``; three Adams with gradient clipping, used the way TorchRL's Dreamer example uses
them (each loss: forward, ``backward``, clip, step, in turn).

Where TorchRL's components cannot do exactly our computation (same sizes and the same amount of work otherwise):

* ``RSSMRollout`` has no ``is_first`` reset: every sequence starts from the zero state and never resets inside;
* ``ObsDecoder`` applies a ReLU after its first linear layer (ours has none);
* reconstruction and reward losses are squared errors (``l2``), not unit-Gaussian NLLs (a factor 2 and a constant);
  the KL is clamped after averaging (``delayed_clamp=True``), as ours;
* imagination: the actor reads the *non-detached* model state (the actor gradient also flows back through the
  actor's inputs), the prior computes its distribution at every imagined step, the value is evaluated on the next
  states inside ``DreamerActorLoss`` and again on the states in ``DreamerValueLoss``; λ-returns (TorchRL's
  ``TDLambdaEstimator``) cover all ``H`` steps with a constant discount, and the actor loss sums over time;
* the update is sequential: the actor loss is computed after the world-model step (ours computes all three losses
  from the same parameters, then steps). The world-model and value networks are held out of the actor's graph with
  ``hold_out_net``, so no unused weight gradient is computed, as in ours.
"""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs.model_based.dreamer import DreamerEnv
from torchrl.modules import MLP, TanhNormal, WorldModelWrapper
from torchrl.modules.models.model_based import (
    DreamerActor,
    ObsDecoder,
    ObsEncoder,
    RSSMPosterior,
    RSSMPrior,
    RSSMRollout,
)
from torchrl.objectives import ValueEstimators
from torchrl.objectives.dreamer import DreamerActorLoss, DreamerModelLoss, DreamerValueLoss

NEXT = "next"
ENCODER_LAYERS = 4


class _NormalizePixels(nn.Module):
    """uint8 pixels to float in ``[-0.5, 0.5]`` (TorchRL's example does this in env transforms)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float() / 255.0 - 0.5


class _GaussianExploration(nn.Module):
    """Adds ``N(0, std^2)`` to the action and clips it to ``[-1, 1]``."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return (action + self.std * torch.randn_like(action)).clamp(-1.0, 1.0)


def _head(in_features: int, depth: int, cells: int) -> MLP:
    return MLP(in_features=in_features, out_features=1, depth=depth, num_cells=cells, activation_class=nn.ELU)


class TorchRLDreamer:
    """TorchRL's Dreamer components sized by ``cfg.model`` / ``cfg.optimization``, updated from our replay batches.

    ``step(batch)``, ``world_model_step(batch)`` take a replay-format TensorDict ``[B, T]`` (uint8 ``"pixels"``,
    ``"action"``, ``"reward"``); ``behaviour_step(start)`` takes ``start_states(batch)``; ``act(td)`` is the acting
    policy on a ``[N]`` TensorDict with ``"pixels"``, ``"state"``, ``"belief"``, ``"prev_action"``.
    """

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
        exploration_noise: float = 0.3,
    ) -> None:
        self.deter_dim, self.stoch_dim = model_cfg.deter_dim, model_cfg.stoch_dim
        self.device, self.autocast_dtype, self.grad_clip = device, autocast_dtype, opt_cfg.grad_clip
        feature_dim = self.deter_dim + self.stoch_dim
        depth, dense = model_cfg.cnn_depth, model_cfg.dense_units
        action_spec = Bounded(-1.0, 1.0, (action_dim,), device=device)
        sizes = dict(hidden_dim=model_cfg.rssm_hidden_dim, state_dim=self.stoch_dim, scale_lb=model_cfg.min_std)
        encoder = ObsEncoder(channels=depth, num_layers=ENCODER_LAYERS, in_channels=channels)
        decoder = ObsDecoder(channels=depth, num_layers=ENCODER_LAYERS, latent_dim=feature_dim, out_channels=channels)
        prior = RSSMPrior(action_spec, rnn_hidden_dim=self.deter_dim, action_dim=action_dim, **sizes)
        posterior = RSSMPosterior(rnn_hidden_dim=self.deter_dim, obs_embed_dim=32 * depth, **sizes)
        reward = _head(feature_dim, model_cfg.reward_layers, dense)
        value = _head(feature_dim, model_cfg.value_layers, dense)
        actor_net = DreamerActor(
            action_dim,
            depth=model_cfg.actor_layers,
            num_cells=dense,
            std_bias=model_cfg.init_std,
            std_min_val=model_cfg.actor_min_std,
        )

        state_keys = [(NEXT, "state"), (NEXT, "belief")]
        world_model = WorldModelWrapper(
            TensorDictSequential(
                TensorDictModule(encoder, [(NEXT, "pixels")], [(NEXT, "encoded_latents")]),
                RSSMRollout(
                    TensorDictModule(
                        prior,
                        ["state", "belief", "action"],
                        [(NEXT, "prior_mean"), (NEXT, "prior_std"), "_", (NEXT, "belief")],
                    ),
                    TensorDictModule(
                        posterior,
                        [(NEXT, "belief"), (NEXT, "encoded_latents")],
                        [(NEXT, "posterior_mean"), (NEXT, "posterior_std"), (NEXT, "state")],
                    ),
                ),
                TensorDictModule(decoder, state_keys, [(NEXT, "reco_pixels")]),
            ),
            TensorDictModule(reward, state_keys, [(NEXT, "reward")]),
        ).to(device)
        self.actor = ProbabilisticTensorDictSequential(
            TensorDictModule(actor_net, ["state", "belief"], ["loc", "scale"]),
            ProbabilisticTensorDictModule(
                ["loc", "scale"],
                ["action"],
                distribution_class=TanhNormal,
                distribution_kwargs={"upscale": model_cfg.mean_scale, "tanh_loc": True},
                default_interaction_type=InteractionType.RANDOM,
            ),
        ).to(device)
        self.value = TensorDictModule(value, ["state", "belief"], ["state_value"]).to(device)
        # DreamerActor's MLP has a lazy first layer: materialise it before building the optimiser.
        self.actor(TensorDict(state=torch.zeros(1, self.stoch_dim), belief=torch.zeros(1, self.deter_dim)).to(device))

        imagination = DreamerEnv(
            world_model=WorldModelWrapper(
                TensorDictModule(prior, ["state", "belief", "action"], ["_", "_", "state", "belief"]),
                TensorDictModule(reward, ["state", "belief"], ["reward"]),
            ),
            prior_shape=(self.stoch_dim,),
            belief_shape=(self.deter_dim,),
            device=device,
        )
        latent = {
            "state": Unbounded((self.stoch_dim,), device=device),
            "belief": Unbounded((self.deter_dim,), device=device),
        }
        imagination.observation_spec = Composite(latent, device=device)
        imagination.state_spec = Composite(latent, device=device)
        imagination.action_spec = action_spec
        imagination.reward_spec = Unbounded((1,), device=device)

        model_loss = DreamerModelLoss(
            world_model, free_nats=opt_cfg.free_nats, lambda_kl=opt_cfg.kl_scale, delayed_clamp=True
        )
        actor_loss = DreamerActorLoss(
            self.actor, self.value, imagination, imagination_horizon=opt_cfg.imagination_horizon
        )
        actor_loss.make_value_estimator(ValueEstimators.TDLambda, gamma=opt_cfg.discount, lmbda=opt_cfg.return_lambda)
        value_loss = DreamerValueLoss(self.value, gamma=opt_cfg.discount)
        losses = (model_loss.to(device), actor_loss.to(device), value_loss.to(device))
        if compile:
            losses = tuple(torch.compile(loss) for loss in losses)
        self.model_loss, self.actor_loss, self.value_loss = losses

        self.parameters = {
            "world_model": list(world_model.parameters()),
            "actor": list(self.actor.parameters()),
            "value": list(self.value.parameters()),
        }
        rates = {"world_model": opt_cfg.world_model_lr, "actor": opt_cfg.actor_lr, "value": opt_cfg.value_lr}
        self.optimizers = {
            name: torch.optim.Adam(params, lr=rates[name], eps=opt_cfg.adam_eps)
            for name, params in self.parameters.items()
        }
        self.scalers = {
            name: torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16) for name in self.parameters
        }
        self.policy = TensorDictSequential(
            TensorDictModule(_NormalizePixels(), ["pixels"], ["pixels_float"]),
            TensorDictModule(encoder, ["pixels_float"], ["encoded_latents"]),
            TensorDictModule(prior, ["state", "belief", "prev_action"], ["_", "_", "_", "belief"]),
            TensorDictModule(posterior, ["belief", "encoded_latents"], ["_", "_", "state"]),
            self.actor,
            TensorDictModule(_GaussianExploration(exploration_noise), ["action"], ["action"]),
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_torchrl(self, batch: TensorDictBase) -> TensorDict:
        """Our replay batch ``[B, T]`` in TorchRL's layout: ``o_t`` under ``("next", "pixels")`` as floats,
        the action that led to it under ``"action"``, zero initial ``"state"`` / ``"belief"``."""
        batch_size, time = batch.shape
        zeros = batch["action"].new_zeros
        return TensorDict(
            {
                "state": zeros(batch_size, time, self.stoch_dim),
                "belief": zeros(batch_size, time, self.deter_dim),
                "action": batch["action"],
                NEXT: {"pixels": batch["pixels"].float() / 255.0 - 0.5, "reward": batch["reward"]},
            },
            batch_size=batch.shape,
            device=batch.device,
        )

    def _apply(self, name: str, loss: torch.Tensor) -> None:
        """``backward``, clip and step one group (float16: with that loss's own scaler, as ours)."""
        scaler, optimizer = self.scalers[name], self.optimizers[name]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(self.parameters[name], self.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def _world_model_update(self, batch: TensorDictBase) -> TensorDict:
        with self._autocast():
            terms, model_output = self.model_loss(self.to_torchrl(batch))
            loss = terms["loss_model_kl"] + terms["loss_model_reco"] + terms["loss_model_reward"]
        self._apply("world_model", loss.squeeze())
        return model_output

    def _behaviour_update(self, start: TensorDictBase) -> None:
        with self._autocast():
            actor_terms, imagined = self.actor_loss(start)
        self._apply("actor", actor_terms["loss_actor"])
        with self._autocast():
            value_terms, _ = self.value_loss(imagined)
        self._apply("value", value_terms["loss_value"])

    def start_states(self, model_output: TensorDictBase) -> TensorDict:
        """The posterior states of a world-model output ``[B, T]`` as ``N = B*T`` imagination starts."""
        return TensorDict(
            state=model_output[NEXT, "state"].reshape(-1, self.stoch_dim),
            belief=model_output[NEXT, "belief"].reshape(-1, self.deter_dim),
            batch_size=[model_output.numel()],
            device=self.device,
        )

    def posterior_states(self, batch: TensorDictBase) -> TensorDict:
        """``start_states`` of ``batch`` without gradients or parameter updates."""
        with torch.no_grad(), self._autocast():
            return self.start_states(self.model_loss(self.to_torchrl(batch))[1])

    def step(self, batch: TensorDictBase) -> None:
        self._behaviour_update(self.start_states(self._world_model_update(batch)))

    def world_model_step(self, batch: TensorDictBase) -> None:
        self._world_model_update(batch)

    def behaviour_step(self, start: TensorDictBase) -> None:
        self._behaviour_update(start)

    @torch.no_grad()
    def act(self, tensordict: TensorDictBase) -> TensorDictBase:
        with self._autocast():
            return self.policy(tensordict)
