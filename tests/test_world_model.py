"""World-model modules: shapes and sizes, the TensorDict composition, and how the RSSM carries state over time."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import nn

from modules.decoder import PixelDecoder
from modules.encoder import PixelEncoder, normalize_pixels
from modules.heads import build_value_head
from modules.world_model import ROLLOUT_KEYS, WorldModel, build_world_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
ACTION_DIM = 2


def paper_model_cfg() -> DictConfig:
    return OmegaConf.load(CONFIG_DIR / "model" / "dreamer_v1.yaml")


def tiny_model_cfg() -> DictConfig:
    """The paper's model config with the debug experiment's tiny sizes."""
    return OmegaConf.merge(paper_model_cfg(), OmegaConf.load(CONFIG_DIR / "experiment" / "debug.yaml").model)


def replay_batch(batch: int, time: int, obs_shape: tuple[int, ...], from_pixels: bool, seed: int = 0) -> TensorDict:
    """A random ``[B, T]`` batch in the replay convention, one episode start at ``t = 0``."""
    generator = torch.Generator().manual_seed(seed)
    if from_pixels:
        observation = {
            "pixels": torch.randint(0, 256, (batch, time, *obs_shape), dtype=torch.uint8, generator=generator)
        }
    else:
        observation = {"observation": torch.randn(batch, time, *obs_shape, generator=generator)}
    is_first = torch.zeros(batch, time, 1, dtype=torch.bool)
    is_first[:, 0] = True
    action = torch.rand(batch, time, ACTION_DIM, generator=generator) * 2 - 1
    reward = torch.rand(batch, time, 1, generator=generator)
    terminated = torch.zeros(batch, time, 1, dtype=torch.bool)
    terminated[0, -1] = True
    return TensorDict(
        {
            **observation,
            "action": action.masked_fill(is_first, 0.0),
            "reward": reward.masked_fill(is_first, 0.0),
            "terminated": terminated,
            "is_first": is_first,
        },
        batch_size=[batch, time],
    )


def tiny_world_model(obs_shape: tuple[int, ...], from_pixels: bool, use_continue: bool = True) -> WorldModel:
    torch.manual_seed(0)
    return build_world_model(
        tiny_model_cfg(), obs_shape=obs_shape, from_pixels=from_pixels, action_dim=ACTION_DIM, use_continue=use_continue
    )


def test_normalize_pixels_maps_uint8_to_centered_unit_range() -> None:
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    normalized = normalize_pixels(pixels)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, torch.tensor([-0.5, 51 / 255 - 0.5, 0.5]))


def test_paper_encoder_gives_1024_embedding_for_any_leading_dims() -> None:
    torch.manual_seed(0)
    encoder = PixelEncoder(in_channels=3, cnn_depth=32)
    assert encoder.output_dim((64, 64)) == 1024
    assert [layer.out_channels for layer in encoder.convs if isinstance(layer, nn.Conv2d)] == [32, 64, 128, 256]
    pixels = torch.rand(2, 3, 3, 64, 64) - 0.5
    embedding = encoder(pixels)
    assert embedding.shape == (2, 3, 1024) and embedding.dtype == torch.float32
    torch.testing.assert_close(encoder(pixels.flatten(0, 1)), embedding.flatten(0, 1))


def test_paper_decoder_maps_features_to_64x64_images() -> None:
    torch.manual_seed(0)
    decoder = PixelDecoder(feature_dim=230, out_channels=3, cnn_depth=32)
    deconvs = [layer for layer in decoder.deconvs if isinstance(layer, nn.ConvTranspose2d)]
    assert [layer.kernel_size[0] for layer in deconvs] == [5, 5, 6, 6]
    assert [layer.out_channels for layer in deconvs] == [128, 64, 32, 3]
    assert decoder.linear.out_features == 1024
    assert not isinstance(decoder.deconvs[-1], nn.ReLU)
    feature_batch = torch.randn(2, 3, 230)
    image = decoder(feature_batch)
    assert image.shape == (2, 3, 3, 64, 64) and image.dtype == torch.float32
    torch.testing.assert_close(decoder(feature_batch.flatten(0, 1)), image.flatten(0, 1))


def test_heads_have_the_papers_layer_counts() -> None:
    cfg = paper_model_cfg()
    world_model = build_world_model(cfg, obs_shape=(3, 64, 64), from_pixels=True, action_dim=6, use_continue=True)
    feature_dim = cfg.deter_dim + cfg.stoch_dim

    def linear_widths(head: nn.Module) -> list[tuple[int, int]]:
        return [(layer.in_features, layer.out_features) for layer in head if isinstance(layer, nn.Linear)]

    hidden = cfg.dense_units
    assert linear_widths(world_model.reward_head) == [(feature_dim, hidden), (hidden, hidden), (hidden, 1)]
    assert linear_widths(world_model.continue_head) == [(feature_dim, hidden), *[(hidden, hidden)] * 2, (hidden, 1)]
    assert linear_widths(build_value_head(cfg, feature_dim)) == [
        (feature_dim, hidden),
        *[(hidden, hidden)] * 2,
        (hidden, 1),
    ]
    assert all(isinstance(layer, nn.ELU) for layer in world_model.reward_head[1:-1:2])


@pytest.mark.parametrize(
    ("obs_shape", "from_pixels"),
    [((3, 64, 64), True), ((1, 64, 64), True), ((5,), False)],
    ids=["rgb", "gray", "state"],
)
def test_world_model_fills_every_key_with_its_shape(obs_shape: tuple[int, ...], from_pixels: bool) -> None:
    cfg = tiny_model_cfg()
    world_model = tiny_world_model(obs_shape, from_pixels)
    batch, time = 3, 4
    td = replay_batch(batch, time, obs_shape, from_pixels)
    out = world_model(td)
    assert out is td
    embed_dim = 32 * cfg.cnn_depth if from_pixels else cfg.mlp_embed_dim
    deter, stoch = cfg.deter_dim, cfg.stoch_dim
    expected = {
        "obs_float": obs_shape,
        "embed": (embed_dim,),
        "deter": (deter,),
        "stoch": (stoch,),
        "post_mean": (stoch,),
        "post_std": (stoch,),
        "prior_mean": (stoch,),
        "prior_std": (stoch,),
        "feature": (deter + stoch,),
        "reconstruction": obs_shape,
        "reward_pred": (1,),
        "continue_logit": (1,),
    }
    for key, shape in expected.items():
        assert td[key].shape == (batch, time, *shape), key
        assert td[key].dtype == torch.float32, key
    assert world_model.in_keys == [world_model.obs_key, "action", "is_first"]
    assert set(world_model.out_keys) == set(expected)
    assert (td["post_std"] >= cfg.min_std).all() and (td["prior_std"] >= cfg.min_std).all()


def test_world_model_without_continue_head_writes_no_continue_logit() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True, use_continue=False)
    td = world_model(replay_batch(2, 3, (3, 64, 64), from_pixels=True))
    assert world_model.continue_head is None
    assert "continue_logit" not in td and "continue_logit" not in world_model.out_keys


def test_composition_equals_the_plain_tensor_pipeline() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    td = replay_batch(2, 5, (3, 64, 64), from_pixels=True)
    torch.manual_seed(1)
    world_model(td)
    torch.manual_seed(1)
    obs_float = td["pixels"].float() / 255 - 0.5
    states = world_model.rssm(world_model.encoder(obs_float), td["action"], td["is_first"])
    features = torch.cat([states["deter"], states["stoch"]], dim=-1)
    torch.testing.assert_close(td["obs_float"], obs_float)
    torch.testing.assert_close(world_model.embed(td["pixels"]), td["embed"])
    for key in ROLLOUT_KEYS:
        torch.testing.assert_close(td[key], states[key], msg=key)
    torch.testing.assert_close(td["feature"], features)
    torch.testing.assert_close(td["reconstruction"], world_model.decoder(features))
    torch.testing.assert_close(td["reward_pred"], world_model.reward_head(features))
    torch.testing.assert_close(td["continue_logit"], world_model.continue_head(features))


def test_parameters_are_registered_once_and_the_model_copies() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    parts = ("encoder", "rssm", "decoder", "reward_head", "continue_head")
    assert {name.split(".")[0] for name in world_model.state_dict()} == set(parts)
    assert sum(p.numel() for p in world_model.parameters()) == sum(
        p.numel() for part in parts for p in getattr(world_model, part).parameters()
    )
    clone = copy.deepcopy(world_model)
    assert clone.observe.module["encoder"].module is clone.encoder
    td = replay_batch(2, 3, (3, 64, 64), from_pixels=True)
    torch.manual_seed(2)
    expected = world_model(td.clone())["reconstruction"]
    torch.manual_seed(2)
    torch.testing.assert_close(clone(td.clone())["reconstruction"], expected)


def observe(world_model: WorldModel, td: TensorDict, seed: int = 3) -> TensorDict:
    """Runs the world model on a copy of ``td`` with the sampling noise fixed by ``seed``."""
    torch.manual_seed(seed)
    return world_model(td.clone())


def test_changing_observation_k_changes_posterior_from_k_on_only() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    td = replay_batch(2, 6, (3, 64, 64), from_pixels=True)
    k = 3
    changed = td.clone()
    changed["pixels"][:, k] = 255 - changed["pixels"][:, k]
    before, after = observe(world_model, td), observe(world_model, changed)
    for key in ("post_mean", "post_std", "stoch"):
        torch.testing.assert_close(after[key][:, :k], before[key][:, :k], rtol=0, atol=0)
        for t in range(k, td.shape[1]):
            assert not torch.allclose(after[key][:, t], before[key][:, t]), (key, t)
    torch.testing.assert_close(after["deter"][:, : k + 1], before["deter"][:, : k + 1], rtol=0, atol=0)
    assert not torch.allclose(after["deter"][:, k + 1], before["deter"][:, k + 1])


def test_deterministic_state_moves_away_from_the_first_step() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    deter = observe(world_model, replay_batch(2, 5, (3, 64, 64), from_pixels=True))["deter"]
    for t in range(1, 5):
        assert not torch.allclose(deter[:, t], deter[:, 0]), t


def test_is_first_inside_the_sequence_resets_the_state() -> None:
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    batch, time, k = 2, 7, 4
    td = replay_batch(batch, time, (3, 64, 64), from_pixels=True)
    td["is_first"][:, k] = True
    td["action"][:, k] = 0.0
    full = observe(world_model, td)

    other_history = td.clone()
    other_history["pixels"][:, 1:k] = 255 - other_history["pixels"][:, 1:k]
    other_history["action"][:, 1:k] = -other_history["action"][:, 1:k]
    other = observe(world_model, other_history)
    assert not torch.allclose(other["deter"][:, k - 1], full["deter"][:, k - 1])
    for key in ROLLOUT_KEYS:
        torch.testing.assert_close(other[key][:, k:], full[key][:, k:], rtol=0, atol=0, msg=key)

    # A fresh rollout from step k (zero initial state) with the same noise: skip the k posterior draws before it.
    torch.manual_seed(3)
    for _ in range(k):
        torch.randn(batch, world_model.rssm.prior.stoch_dim)
    fresh = world_model(td[:, k:].clone())
    for key in ROLLOUT_KEYS:
        torch.testing.assert_close(fresh[key], full[key][:, k:], msg=key)


def test_is_first_masks_a_nonzero_previous_action() -> None:
    """Where ``is_first`` is set (at the sequence start and inside it) the previous action is zeroed before the step,
    whatever action the data holds there."""
    world_model = tiny_world_model((5,), from_pixels=False)
    td = replay_batch(2, 6, (5,), from_pixels=False)
    k = 3
    td["is_first"][:, k] = True
    td["action"][:, 0] = torch.tensor([0.9, -0.7])
    td["action"][:, k] = torch.tensor([-0.8, 0.6])
    zeroed = td.clone()
    zeroed["action"][:, 0] = 0.0
    zeroed["action"][:, k] = 0.0
    with_actions, without = observe(world_model, td), observe(world_model, zeroed)
    for key in ROLLOUT_KEYS:
        torch.testing.assert_close(
            with_actions[key],
            without[key],
            rtol=0,
            atol=0,
            msg=f"the RSSM must mask the previous action at is_first ({key})",
        )
