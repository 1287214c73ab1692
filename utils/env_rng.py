"""The training environment's random stream, saved in checkpoints so that a resumed run's episodes continue it.

Without this a resumed run rebuilds its environment seeded with ``env.seed`` and its next episodes start from the
same states as the run's first ones. The state is kept as tensors and plain containers (checkpoints are read with
``weights_only=True``):

* Gymnasium: the unwrapped env's ``np_random`` (a NumPy ``Generator``): its bit generator's state dict; for Atari
  also ALE's own generator (sticky actions), saved inside ALE's serialised system state (uint8 tensor): restoring it
  also puts back the emulator, which the collector's reset then restarts;
* dm_control: the task's ``random`` (a NumPy ``RandomState``), which draws every episode's initial state.

A collector resets an environment as soon as its episode ends, which already draws the next episode's start: the
state to save is the one *before* that reset, which :class:`EnvRngSnapshot` records after every step.

Several environments (``env.num_envs > 1``) run in worker processes of a ``ParallelEnv``, whose streams are not
reachable from here: they restart from their seeds after a resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase, GymWrapper, Transform, TransformedEnv
from torchrl.envs.batched_envs import BatchedEnvBase

from utils.atari import import_ale


def _library_env(env: EnvBase) -> Any | None:
    """The Gymnasium or dm_control environment under TorchRL's transforms and wrapper (``None``: a ``ParallelEnv``)."""
    base = env_base(env)
    return None if isinstance(base, BatchedEnvBase) else base._env


def capture_env_rng(env: EnvBase) -> dict[str, Any] | None:
    """The random state of the single environment ``env`` (``None`` when it cannot be read)."""
    library_env = _library_env(env)
    if library_env is None:
        return None
    if isinstance(env_base(env), GymWrapper):
        state = {"gymnasium": library_env.unwrapped.np_random.bit_generator.state}
        ale = getattr(library_env.unwrapped, "ale", None)
        if ale is not None:
            state["ale"] = torch.frombuffer(bytearray(ale.cloneState(include_rng=True).serialize()), dtype=torch.uint8)
        return state
    _, keys, position, has_gauss, cached_gaussian = library_env.task.random.get_state()
    return {
        "dm_control": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    }


def restore_env_rng(env: EnvBase, state: dict[str, Any] | None) -> None:
    """Puts back a state from :func:`capture_env_rng` (nothing to do for ``None``)."""
    library_env = _library_env(env)
    if state is None or library_env is None:
        return
    if "gymnasium" in state:
        library_env.unwrapped.np_random.bit_generator.state = state["gymnasium"]
        if "ale" in state:
            library_env.unwrapped.ale.restoreState(import_ale().ALEState(state["ale"].numpy().tobytes()))
        return
    saved = state["dm_control"]
    keys = saved["keys"].numpy().astype(np.uint32)
    library_env.task.random.set_state(
        ("MT19937", keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )


def env_base(env: EnvBase) -> EnvBase:
    """The TorchRL environment under every ``TransformedEnv`` layer."""
    while isinstance(env, TransformedEnv):
        env = env.base_env
    return env


class EnvRngSnapshot(Transform):
    """A no-op transform that records its environment's random state after every step and at the start.

    ``state`` is what :func:`capture_env_rng` read before any automatic reset that follows the step, so a resumed
    run's first episode starts where the uninterrupted run's next episode would.
    """

    def __init__(self) -> None:
        super().__init__(in_keys=[], out_keys=[])
        self.state: dict[str, Any] | None = None

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        self.state = capture_env_rng(self.parent)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset
