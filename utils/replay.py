"""Replay storage for Dreamer: one stored step per observation, sequences that never cross an episode.

Collectors return transitions ``(o_t, a_t, r_{t+1}, o_{t+1})``: storing them as they are keeps every image twice
(root and ``("next", ...)``). TorchRL's ``compact_obs`` drops the ``next`` copy but with it the last frame of each
episode, which carries the terminal reward and the continue target. We therefore store the authors' step format
instead, where each observation appears exactly once:

    step = (observation o_t, action a_{t-1} that led to it, reward r_t received on arrival, terminated_t, is_first_t)

An episode's reset observation becomes a step with zero action and reward and ``is_first=True``; every transition
then adds the step of the observation it reached. Sequences are sampled with TorchRL's ``SliceSampler`` in
``fragmented`` mode keyed on ``(episode, step)``, so parallel environments may interleave in storage while a
sampled sequence never crosses an episode boundary or mixes environments.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, Storage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import SliceSampler

from utils.config import ConfigError

STEP_KEYS = ("action", "reward", "terminated", "is_first", "episode", "step")


class StepRecorder:
    """Turns collector batches into stored steps, tracking episode ids and step indices per environment.

    ``convert(batch)`` takes a collector batch of shape ``[T]`` (one env) or ``[E, T]`` and returns a flat
    TensorDict ``[N]`` with ``N = E*T + (number of episode starts)``, ordered environment by environment, with keys
    ``obs_key`` (same dtype as collected), ``action [A]``, ``reward [1]``, ``terminated [1]``, ``is_first [1]``,
    ``episode`` (int64, unique per episode) and ``step`` (int64, index of the step in its episode).
    """

    def __init__(self, obs_key: str, num_envs: int) -> None:
        self.obs_key = obs_key
        self.needs_reset = torch.ones(num_envs, dtype=torch.bool)
        self.episode = torch.full((num_envs,), -1, dtype=torch.long)
        self.step = torch.zeros(num_envs, dtype=torch.long)
        self.next_episode_id = 0

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {
            "needs_reset": self.needs_reset.clone(),
            "episode": self.episode.clone(),
            "step": self.step.clone(),
            "next_episode_id": self.next_episode_id,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.needs_reset = state["needs_reset"].clone()
        self.episode = state["episode"].clone()
        self.step = state["step"].clone()
        self.next_episode_id = int(state["next_episode_id"])

    def expect_reset(self) -> None:
        """The environments restart (a new collector, e.g. on resume): their next batch begins new episodes."""
        self.needs_reset.fill_(True)

    def convert(self, batch: TensorDict) -> TensorDict:
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(0)
        return torch.cat([self._convert_env(env, batch[env]) for env in range(batch.shape[0])])

    def _convert_env(self, env: int, transitions: TensorDict) -> TensorDict:
        """``transitions [T]`` of one environment -> steps ``[T + starts]``."""
        done = transitions["next", "done"].reshape(-1).bool()
        starts = torch.cat([self.needs_reset[env : env + 1], done[:-1]])
        self.needs_reset[env] = done[-1]
        length = done.shape[0]

        # Episode ids and in-episode step indices, continuing the previous batch's episode when no start.
        new_ids = self.next_episode_id + torch.cumsum(starts.long(), 0) - 1
        episode = torch.where(starts.cumsum(0) > 0, new_ids, self.episode[env])
        self.next_episode_id += int(starts.sum())
        steps_since_start = _steps_since_last_start(starts, self.step[env])
        self.episode[env] = episode[-1]
        self.step[env] = steps_since_start[-1] + 1

        # Interleave: a start at t contributes its reset step right before the step reached by transition t.
        position_next = torch.arange(length) + torch.cumsum(starts.long(), 0)
        position_first = position_next[starts] - 1
        total = length + int(starts.sum())

        obs_next = transitions["next", self.obs_key]
        out = TensorDict(
            {
                self.obs_key: obs_next.new_zeros((total, *obs_next.shape[1:])),
                "action": transitions["action"].new_zeros((total, *transitions["action"].shape[1:])),
                "reward": torch.zeros(total, 1),
                "terminated": torch.zeros(total, 1, dtype=torch.bool),
                "is_first": torch.zeros(total, 1, dtype=torch.bool),
                "episode": torch.zeros(total, dtype=torch.long),
                "step": torch.zeros(total, dtype=torch.long),
            },
            batch_size=[total],
        )
        out[self.obs_key][position_next] = obs_next
        out["action"][position_next] = transitions["action"]
        out["reward"][position_next] = transitions["next", "reward"].reshape(length, 1).float()
        out["terminated"][position_next] = transitions["next", "terminated"].reshape(length, 1).bool()
        out["episode"][position_next] = episode
        out["step"][position_next] = steps_since_start + 1

        out[self.obs_key][position_first] = transitions[self.obs_key][starts]
        out["is_first"][position_first] = True
        out["episode"][position_first] = episode[starts]
        return out


def _steps_since_last_start(starts: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """Index of each transition's root observation in its episode: 0 at a start, else previous + 1.

    ``carried`` is the index of the first root observation when the batch continues an episode.
    """
    index = torch.arange(starts.shape[0])
    last_start = torch.cummax(torch.where(starts, index, torch.full_like(index, -1)), 0).values
    return torch.where(last_start >= 0, index - last_start, carried + index)


SAMPLER_SEED_OFFSET = 20_000
PREFETCH_DEFAULTS = {"cpu": 0, "cuda": 1}
PREFETCH_FILE = "prefetch.pkl"


def resolve_prefetch(value: object, device: torch.device) -> int:
    """``replay_buffer.prefetch``: ``null`` = the device's default (:data:`PREFETCH_DEFAULTS`), else batches >= 0.

    On a CPU the background sampling thread competes with the update for the same cores and sampling is about 1%
    of an update (``benchmarks/throughput.py``), so nothing is prefetched by default; on CUDA one batch is sampled
    and pinned while the GPU computes. TorchRL runs one sampling thread per prefetched batch: with more than one,
    the threads draw from the sampler's generator in whatever order they get to it, so the batches (and the run)
    are no longer reproducible.
    """
    if value is None:
        return PREFETCH_DEFAULTS.get(device.type, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"replay_buffer.prefetch={value!r} must be null (device default) or an integer >= 0")
    return value


def make_replay_buffer(
    buffer_size: int,
    batch_length: int,
    storage: str | Storage,
    replay_dir: Path | None,
    *,
    batch_size: int | None = None,
    prefetch: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> TensorDictReplayBuffer:
    """Sequence replay: ``storage`` is ``memmap`` (on disk under ``replay_dir``), ``memory``, or the storage of
    another buffer to sample the same steps differently (``benchmarks/throughput.py``).

    The memory map lives in ``<replay_dir>/storage``, where TorchRL's ``buffer.dumps(replay_dir)`` writes a
    storage: a checkpoint then only refreshes the metadata in place instead of copying the whole buffer
    (12 GB for a million 64x64x3 images).

    ``prefetch`` batches of ``batch_size`` sequences are sampled ahead in a background thread (TorchRL's
    ``prefetch``; needs ``batch_size``), and ``pin_memory`` pins each sampled batch (CUDA training: the copy to the
    GPU can then be non-blocking). Sequences are drawn with the buffer's own generator, seeded by ``seed``: the
    background thread and the update never share a random stream, so a run is reproducible with or without
    prefetching, and the generator's state is saved with the buffer.
    """
    if isinstance(storage, Storage):
        backing = storage
    elif storage == "memmap":
        backing = LazyMemmapStorage(buffer_size, scratch_dir=str(replay_dir / "storage"), existsok=True)
    elif storage == "memory":
        backing = LazyTensorStorage(buffer_size)
    else:
        raise ValueError(f"Unknown replay_buffer.storage {storage!r}; allowed: memmap, memory")
    if prefetch and batch_size is None:
        raise ValueError("make_replay_buffer: prefetch needs batch_size (sequences per sampled batch)")
    return TensorDictReplayBuffer(
        storage=backing,
        sampler=_sequence_sampler(batch_length),
        batch_size=None if batch_size is None else batch_size * batch_length,
        prefetch=prefetch or None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(SAMPLER_SEED_OFFSET + seed),
    )


def _sequence_sampler(batch_length: int) -> SliceSampler:
    """Slices of ``batch_length`` consecutive steps of one episode (``(episode, step)`` keys, any storage order)."""
    return SliceSampler(
        slice_len=batch_length,
        traj_key="episode",
        step_key="step",
        fragmented=True,
        strict_length=True,
        # Our steps carry their own is_first flags; the RSSM rollout starts every sequence from the zero state.
        init_key=None,
        truncated_key=None,
    )


# TorchRL's SliceSampler raises this when no stored episode has ``slice_len`` consecutive steps.
NO_LONG_EPISODE = "sufficient length"


def sample_sequences(buffer: TensorDictReplayBuffer, batch_size: int, batch_length: int) -> TensorDict | None:
    """Samples ``batch_size`` sequences of ``batch_length`` steps: a TensorDict ``[B, T]`` (the oldest prefetched
    batch when the buffer prefetches, which :func:`make_replay_buffer` sized to the same ``batch_size``).

    Episodes with fewer than ``batch_length`` stored steps are never sampled (a sequence may not cross into another
    episode). When no stored episode is long enough yet (a terminating env's first episodes) there is nothing to
    sample and this returns ``None`` instead of failing.
    """
    try:
        flat = buffer.sample(batch_size * batch_length)
    except RuntimeError as error:
        if NO_LONG_EPISODE in str(error):
            return None
        raise
    return flat.reshape(batch_size, batch_length)


def add_steps(buffer: TensorDictReplayBuffer, steps: TensorDict) -> None:
    """Stores ``steps [N]`` after any batch being prefetched is drawn: prefetched batches then always come from the
    buffer as it was before, whatever the threads' timing (reproducible runs)."""
    buffer.synchronize()
    buffer.extend(steps)


def load_replay(buffer: TensorDictReplayBuffer, path: Path) -> None:
    """``buffer.loads(path)``; batches prefetched by a run saved with another ``prefetch`` count are dropped (they
    are redrawn) instead of failing the resume, as TorchRL refuses a queue of another capacity."""
    queue_file = path / PREFETCH_FILE
    if queue_file.exists():
        with open(queue_file, "rb") as file:
            saved = pickle.load(file)  # written by this run's own TorchRL buffer
        if saved.get("capacity") != getattr(buffer, "_prefetch_cap", 0):  # TorchRL keeps the count private
            queue_file.unlink()
    buffer.loads(path)
