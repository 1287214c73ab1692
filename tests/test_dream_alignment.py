"""The training video's open-loop dream lines up in time: frame k shows observation k, its model image and error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from modules.rssm import feature
from tests.test_world_model import tiny_world_model
from utils.evaluation import DREAM_CONTEXT, open_loop_dream, to_uint8_frames

LENGTH, PANEL = 9, 64


def episode_steps() -> TensorDict:
    """An episode in replay format whose every observation is a different uniform image (value 20 k + 10)."""
    generator = torch.Generator().manual_seed(0)
    values = (20 * torch.arange(LENGTH) + 10).to(torch.uint8)
    is_first = torch.zeros(LENGTH, 1, dtype=torch.bool)
    is_first[0] = True
    return TensorDict(
        {
            "pixels": values.view(LENGTH, 1, 1, 1).expand(LENGTH, 3, 64, 64).clone(),
            "action": (torch.rand(LENGTH, 2, generator=generator) * 2 - 1).masked_fill(is_first, 0.0),
            "is_first": is_first,
        },
        batch_size=[LENGTH],
    )


class SensitiveDecoder(torch.nn.Module):
    """Images ``[*, 3, 64, 64]`` in ``[-0.4, 0.4]`` that change by many grey levels for small feature changes.

    An untrained decoder's images barely depend on the model state (within one grey level of each other), so a model
    panel one step out of line would pass; this one makes every imagined step's image distinct."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(feature_dim, 3 * PANEL * PANEL)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return 0.4 * torch.sin(20 * self.linear(features)).unflatten(-1, (3, PANEL, PANEL))


def test_open_loop_dream_panels_line_up_with_the_observations(monkeypatch: pytest.MonkeyPatch) -> None:
    """truth | model | error at frame k: observation k; the decoded posterior (k < context) or the prior rolled
    open-loop with the actions up to k; and their difference. Latent samples are replaced by their means."""
    monkeypatch.setattr("modules.rssm.sample_gaussian", lambda mean, std: mean)
    world_model = tiny_world_model((3, 64, 64), from_pixels=True)
    world_model.decoder = SensitiveDecoder(world_model.feature_dim)
    steps = episode_steps()
    video = open_loop_dream(world_model, steps)
    assert video.shape == (LENGTH, PANEL, 3 * PANEL, 3)
    truth, model, error = (video[..., i * PANEL : (i + 1) * PANEL, :] for i in range(3))
    observations = steps["pixels"].permute(0, 2, 3, 1).numpy()
    for k in range(LENGTH):
        assert np.array_equal(truth[k], observations[k]), (
            f"the dream's truth panel at frame {k} must be observation {k}"
        )

    with torch.no_grad():
        batch = steps.unsqueeze(0)
        context = DREAM_CONTEXT
        observed = world_model.rssm(
            world_model.embed(batch["pixels"][:, :context]),
            batch["action"][:, :context],
            batch["is_first"][:, :context],
        )
        features = [feature(observed["deter"][0, k], observed["stoch"][0, k]) for k in range(context)]
        deter, stoch = observed["deter"][:, -1], observed["stoch"][:, -1]
        for k in range(context, LENGTH):
            deter = world_model.rssm.prior.recurrent_step(deter, stoch, batch["action"][:, k])
            stoch = world_model.rssm.prior.distribution(deter)[0]
            features.append(feature(deter, stoch)[0])
        images = world_model.decoder(torch.stack(features)).clamp(-0.5, 0.5)
    expected_model = to_uint8_frames(images)
    truth_float = steps["pixels"].float() / 255 - 0.5
    expected_error = to_uint8_frames((images - truth_float + 1.0) / 2.0 - 0.5)
    for k in range(LENGTH):
        assert np.abs(model[k].astype(int) - expected_model[k]).max() <= 1, (
            f"the model panel at frame {k} must decode the model state of step {k} (observed, or imagined with the "
            f"actions up to step {k})"
        )
        assert np.abs(error[k].astype(int) - expected_error[k]).max() <= 1, (
            f"the error panel at frame {k} must be the difference of the model and truth panels of step {k}"
        )
