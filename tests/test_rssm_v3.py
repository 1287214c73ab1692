"""DreamerV3's RSSM rollout against stepping TorchRL's prior and posterior by hand."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from modules.rssm_v3 import build_rssm_v3

SIZES = OmegaConf.create(
    dict(
        stoch_groups=4,
        stoch_classes=3,
        deter_dim=16,
        rssm_hidden_dim=8,
        blocks=4,
        unimix=0.01,
        rssm_dyn_layers=1,
        rssm_img_layers=2,
        rssm_obs_layers=1,
        norm_eps=1e-4,
    )
)
B, T, E, A = 2, 6, 5, 3


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(B, T, E, generator=generator)
    action = torch.randn(B, T, A, generator=generator)
    is_first = torch.zeros(B, T, 1, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, 3] = True  # an episode starts inside the first sequence
    return embed, action, is_first


def test_rollout_equals_stepping_the_prior_and_posterior_with_resets() -> None:
    torch.manual_seed(1)
    rssm = build_rssm_v3(SIZES, A, E)
    embed, action, is_first = inputs()
    torch.manual_seed(2)
    out = rssm(embed, action, is_first)

    torch.manual_seed(2)  # the posterior samples are the rollout's only random draws
    deter, stoch = torch.zeros(B, SIZES.deter_dim), torch.zeros(B, 12)
    for t in range(T):
        keep = (~is_first[:, t]).float()
        previous = (deter * keep, stoch * keep, action[:, t] * keep)
        deter = rssm.prior.recurrent_step(*previous)
        post_logits, _, stoch = rssm.posterior(deter, embed[:, t])
        with torch.random.fork_rng():
            _, prior_logits, _, _ = rssm.prior(*previous)  # also samples: off the checked stream
        assert torch.equal(out["deter"][:, t], deter)
        assert torch.equal(out["stoch"][:, t], stoch)
        assert torch.equal(out["post_logits"][:, t], post_logits)
        torch.testing.assert_close(out["prior_logits"][:, t], prior_logits)


def test_a_reset_inside_a_sequence_starts_from_the_zero_state() -> None:
    torch.manual_seed(1)
    rssm = build_rssm_v3(SIZES, A, E)
    embed, action, is_first = inputs()
    out = rssm(embed, action, is_first)
    zeros = (torch.zeros(1, SIZES.deter_dim), torch.zeros(1, 12), torch.zeros(1, A))
    assert torch.equal(out["deter"][0, 3], rssm.prior.recurrent_step(*zeros)[0])
    assert not torch.equal(out["deter"][1, 3], out["deter"][0, 3])  # the other sequence carries its state on


def test_latent_samples_are_one_hot_per_group() -> None:
    rssm = build_rssm_v3(SIZES, A, E)
    stoch = rssm(*inputs())["stoch"].reshape(B, T, SIZES.stoch_groups, SIZES.stoch_classes)
    assert torch.equal(stoch.sum(-1), torch.ones(B, T, SIZES.stoch_groups))
    assert set(stoch.unique().tolist()) == {0.0, 1.0}
