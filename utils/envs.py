"""Environment factory: train and eval environments built from the env config (``cfg.env``).

Every environment comes out with the same interface, whatever the backend:

- observation: ``"pixels"`` uint8 [C, H, W] (channels first; C = 3, or 1 with grayscale; H = W = image_size) for pixel
  environments, or ``"observation"`` float32 [O] for state environments (see :func:`obs_key`);
- ``"action"`` float32 [A] in [-1, 1] (native bounds such as Pendulum's [-2, 2] are mapped by ``ActionScaling``), or
  for discrete actions (Atari) a float32 one-hot [A] (``OneHot`` spec);
- ``"reward"`` float32 [1], the sum of the rewards over the ``action_repeat`` environment frames of one agent step;
- ``"done"``, ``"terminated"``, ``"truncated"`` bool [1] and ``"step_count"`` int64 [1] (agent steps since the reset);
  an episode is truncated after ``max_episode_frames // action_repeat`` agent steps.

With ``num_envs > 1`` the copies run in a ``ParallelEnv`` (batch size [num_envs]); copy i is seeded with
``seed + seed_offset + i``, so eval environments should use a ``seed_offset`` of at least ``num_envs``.

Atari games (``backend: atari``) come from ``utils/atari.py``: the ALE screen, max-pooled over the last two frames
of each agent step, resized here like any other gymnasium image.

dm_control environments render each observation once, directly at image_size x image_size, from the task's camera.
``render_quality`` chooses the renderer's settings:

- ``paper``: dm_control's defaults (multisampled anti-aliasing, the model's shadow map), as in the paper;
- ``fast``: ``offsamples = 0`` (no multisampling) and ``shadowsize = 256``: about 3x faster software rendering at 64x64
  (measured 190 vs 60 frames/s on an idle CPU, 112 vs 34 on a loaded one), images within 1/255 of the paper setting
  on average (0.85/255 on cheetah-run).
"""

# MuJoCo picks its OpenGL backend when it is first imported (by torchrl.envs or dm_control): set it first.
import os

os.environ.setdefault("MUJOCO_GL", "egl")

from functools import partial

import dm_env
import gymnasium
import torch
import torch.nn.functional as F
from dm_control import suite
from dm_control.suite.wrappers import pixels as dmc_pixels
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.data import Bounded, Composite, OneHot, Unbounded
from torchrl.envs import (
    ActionScaling,
    DMControlWrapper,
    DoubleToFloat,
    DTypeCastTransform,
    EnvBase,
    GymWrapper,
    ParallelEnv,
    RenameTransform,
    StepCounter,
    TensorDictPrimer,
    Transform,
    TransformedEnv,
)

from utils.atari import make_atari_gym_env, validate_atari_config

PIXELS_KEY = "pixels"
STATE_KEY = "observation"
BACKENDS = ("dm_control", "gymnasium", "atari")
RENDER_QUALITIES = ("paper", "fast")
# The encoder and decoder convolutions are laid out for 64x64 images.
IMAGE_SIZE = 64
# Gymnasium environments whose observation is an image (96x96x3 for CarRacing), resized to image_size.
GYM_PIXEL_ENVS = ("CarRacing-v3",)
# Gymnasium environments known to never terminate (only truncated by the time limit).
GYM_NON_TERMINATING_ENVS = ("Pendulum-v1",)
# dm_control's flat_observation=True concatenates the state observations under this key.
_DMC_FLAT_STATE_KEY = "observations"
# Renderer settings of render_quality=fast (see the module docstring).
_FAST_OFFSAMPLES = 0
_FAST_SHADOWSIZE = 256
# ITU-R BT.601 luma weights for RGB -> grayscale.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def obs_key(env_cfg: DictConfig) -> str:
    """The observation key of the environment: ``"pixels"`` or ``"observation"``."""
    return PIXELS_KEY if env_cfg.from_pixels else STATE_KEY


def can_terminate(env_cfg: DictConfig) -> bool:
    """Whether episodes can end by termination, not only by the time limit (switches the continue head on).

    False for dm_control (its tasks only end at the time limit) and for Pendulum-v1; True for Atari (game over),
    CarRacing-v3 (off the playfield, or the lap completed) and, to be safe, for any other gymnasium environment.
    """
    if env_cfg.backend == "dm_control":
        return False
    return env_cfg.name not in GYM_NON_TERMINATING_ENVS


def validate_env_config(env_cfg: DictConfig) -> None:
    """Checks the env config without building anything; raises a one-line ``ValueError`` naming the bad value.

    image_size is only checked for pixel environments (state environments ignore it). Whether a gymnasium id other
    than the supported ones has a Box observation can only be seen once it is built: :func:`make_env` checks that.
    """
    if env_cfg.backend not in BACKENDS:
        raise ValueError(f"Unknown env backend {env_cfg.backend!r}; available: {', '.join(BACKENDS)}")
    if env_cfg.render_quality not in RENDER_QUALITIES:
        raise ValueError(f"Unknown render_quality {env_cfg.render_quality!r}; available: {', '.join(RENDER_QUALITIES)}")
    if not isinstance(env_cfg.action_repeat, int) or env_cfg.action_repeat < 1:
        raise ValueError(f"action_repeat must be an integer >= 1, got {env_cfg.action_repeat!r}")
    if not isinstance(env_cfg.num_envs, int) or env_cfg.num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {env_cfg.num_envs!r}")
    if env_cfg.max_episode_frames < env_cfg.action_repeat:
        raise ValueError(
            f"max_episode_frames={env_cfg.max_episode_frames} is shorter than one agent step "
            f"(action_repeat={env_cfg.action_repeat}); it must be >= action_repeat"
        )
    if env_cfg.grayscale and not env_cfg.from_pixels:
        raise ValueError("grayscale=true needs from_pixels=true (state observations have no colour channels)")
    if env_cfg.from_pixels and env_cfg.image_size != IMAGE_SIZE:
        raise ValueError(
            f"image_size={env_cfg.image_size} is not supported; allowed: {IMAGE_SIZE} "
            f"(the convolutional encoder and decoder are built for {IMAGE_SIZE}x{IMAGE_SIZE} images)"
        )
    if env_cfg.backend == "dm_control":
        _validate_dm_control_names(env_cfg)
    elif env_cfg.backend == "atari":
        validate_atari_config(env_cfg)
    else:
        _validate_gymnasium_names(env_cfg)


def _validate_dm_control_names(env_cfg: DictConfig) -> None:
    domains = suite.TASKS_BY_DOMAIN
    if env_cfg.name not in domains:
        raise ValueError(f"Unknown dm_control domain {env_cfg.name!r}; available: {', '.join(sorted(domains))}")
    tasks = domains[env_cfg.name]
    if env_cfg.task not in tasks:
        raise ValueError(
            f"Unknown task {env_cfg.task!r} for dm_control domain {env_cfg.name!r}; available: {', '.join(tasks)}"
        )


def _validate_gymnasium_names(env_cfg: DictConfig) -> None:
    allowed = (
        f"{', '.join(GYM_PIXEL_ENVS)} (from_pixels=true), Pendulum-v1 or any registered gymnasium id with a Box "
        "observation (from_pixels=false)"
    )
    if env_cfg.name not in gymnasium.registry:
        raise ValueError(f"Unknown gymnasium env id {env_cfg.name!r}; supported: {allowed}")
    if env_cfg.from_pixels != (env_cfg.name in GYM_PIXEL_ENVS):
        raise ValueError(
            f"Gymnasium env {env_cfg.name!r} is not supported with from_pixels={env_cfg.from_pixels}; "
            f"supported: {allowed}"
        )
    if env_cfg.task is not None:
        raise ValueError(f"Gymnasium envs take no task, got task={env_cfg.task!r}; allowed: null")


def make_env(env_cfg: DictConfig, *, seed_offset: int = 0, device: torch.device | str = "cpu") -> EnvBase:
    """Builds ``env_cfg.num_envs`` seeded copies of the configured environment (see the module docstring).

    Args:
        env_cfg: the env config (``cfg.env``).
        seed_offset: added to ``env_cfg.seed``; copy i gets ``env_cfg.seed + seed_offset + i``.
        device: device of the returned tensors.

    Returns:
        A single environment (batch size []) when num_envs == 1, else a ``ParallelEnv`` (batch size [num_envs]).
    """
    validate_env_config(env_cfg)
    seed = env_cfg.seed + seed_offset
    if env_cfg.num_envs == 1:
        return _make_single_env(env_cfg, seed, device)
    # Resolved here: the worker processes get cfg.env alone, where interpolations into the full config cannot resolve.
    cfg = OmegaConf.create(OmegaConf.to_container(env_cfg, resolve=True))
    make_fns = [partial(_make_single_env, cfg, seed + index, "cpu") for index in range(env_cfg.num_envs)]
    return ParallelEnv(env_cfg.num_envs, make_fns, device=device)


def add_recurrent_primer(env: EnvBase, deter_dim: int, stoch_dim: int, action_dim: int) -> TransformedEnv:
    """Puts zeros under the acting policy's recurrent keys at every reset: "deter" [D], "stoch" [S], "prev_action" [A].

    A recurrent policy in a collector then starts each episode (including auto-resets in the middle of a batch, and
    per copy in a batched env) from the zero state and a zero previous action; between resets the policy's values are
    carried from one step to the next. Appends to ``env`` in place when it already is a ``TransformedEnv``.
    """
    primer = TensorDictPrimer(
        primers={
            "deter": Unbounded(shape=(deter_dim,)),
            "stoch": Unbounded(shape=(stoch_dim,)),
            "prev_action": Unbounded(shape=(action_dim,)),
        },
        default_value=0.0,
        expand_specs=True,
    )
    if isinstance(env, TransformedEnv):
        env.append_transform(primer)
        return env
    return TransformedEnv(env, primer)


def _make_single_env(env_cfg: DictConfig, seed: int, device: torch.device | str) -> TransformedEnv:
    """One environment with the whole transform pipeline (batch size [])."""
    if env_cfg.backend == "dm_control":
        base_env = _make_dm_control_env(env_cfg, seed, device)
    elif env_cfg.backend == "atari":
        base_env = _make_atari_env(env_cfg, seed, device)
    else:
        base_env = _make_gymnasium_env(env_cfg, seed, device)
    env = TransformedEnv(base_env)
    if env_cfg.from_pixels:
        env.append_transform(ChannelsFirstPixels(env_cfg.image_size, grayscale=env_cfg.grayscale))
    elif env_cfg.backend == "dm_control":
        env.append_transform(RenameTransform(in_keys=[_DMC_FLAT_STATE_KEY], out_keys=[STATE_KEY]))
    env.append_transform(DoubleToFloat())
    action_spec = env.action_spec
    if isinstance(action_spec, OneHot):
        # GymWrapper's one-hot actions are int64; the networks and replay take float one-hots (cast back going in).
        env.append_transform(DTypeCastTransform(action_spec.dtype, torch.float32, in_keys=[], in_keys_inv=["action"]))
    elif not (torch.all(action_spec.space.low == -1) and torch.all(action_spec.space.high == 1)):
        env.append_transform(ActionScaling())
    env.append_transform(StepCounter(max_steps=env_cfg.max_episode_frames // env_cfg.action_repeat))
    return env


class _DMControlEnv(DMControlWrapper):
    """TorchRL's ``DMControlWrapper`` that also accepts a ``dm_env.Environment`` wrapper (our action repeat).

    The parent only accepts a raw ``control.Environment`` or a ``pixels.Wrapper``; seeding still reaches the task
    through the wrappers' attribute forwarding (``env.task``).
    """

    def _check_kwargs(self, kwargs: dict) -> None:
        if not isinstance(kwargs.get("env"), dm_env.Environment):
            raise TypeError(f"Expected a dm_env.Environment, got {type(kwargs.get('env'))}")


class ActionRepeat(dm_env.Environment):
    """Repeats each action ``repeat`` environment steps and sums the rewards (stops early at the episode's end).

    Sits BELOW the pixel rendering (``pixels.Wrapper(ActionRepeat(env))``), so the pixels are rendered once per agent
    step. TorchRL's ``frame_skip`` repeats the step of the wrapped dm_env, i.e. of the pixel wrapper, which renders
    after every repeated frame: ``action_repeat`` times the rendering work for frames nobody looks at.
    """

    def __init__(self, env: dm_env.Environment, repeat: int):
        self._env = env
        self._repeat = repeat

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()

    def step(self, action) -> dm_env.TimeStep:
        reward = 0.0
        for _ in range(self._repeat):
            time_step = self._env.step(action)
            reward += time_step.reward
            if time_step.last():
                break
        return time_step._replace(reward=reward)

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    def reward_spec(self):
        return self._env.reward_spec()

    def discount_spec(self):
        return self._env.discount_spec()

    def __getattr__(self, name: str):
        return getattr(self._env, name)


def _dm_control_camera(env_cfg: DictConfig) -> int:
    """The camera of dm_control pixels: env.camera if set, else the authors' choice (2 for quadruped, 0 otherwise)."""
    if env_cfg.camera is not None:
        return env_cfg.camera
    return 2 if env_cfg.name == "quadruped" else 0


def _make_dm_control_env(env_cfg: DictConfig, seed: int, device: torch.device | str) -> DMControlWrapper:
    # time_limit=inf: the episode limit is max_episode_frames, applied by the StepCounter (in agent steps).
    env = suite.load(
        env_cfg.name,
        env_cfg.task,
        task_kwargs={"random": seed, "time_limit": float("inf")},
        environment_kwargs={"flat_observation": not env_cfg.from_pixels},
    )
    env = ActionRepeat(env, env_cfg.action_repeat)
    if env_cfg.from_pixels:
        if env_cfg.render_quality == "fast":
            # Set before the first render: the wrapper below creates the rendering context with these settings.
            env.physics.model.vis.quality.offsamples = _FAST_OFFSAMPLES
            env.physics.model.vis.quality.shadowsize = _FAST_SHADOWSIZE
        size = env_cfg.image_size
        render_kwargs = {"height": size, "width": size, "camera_id": _dm_control_camera(env_cfg)}
        env = dmc_pixels.Wrapper(env, pixels_only=True, render_kwargs=render_kwargs)
    return _DMControlEnv(env, device=device)


def _make_gymnasium_env(env_cfg: DictConfig, seed: int, device: torch.device | str) -> GymWrapper:
    # gymnasium's time limit counts environment frames; the StepCounter ends the episode at the same frame or earlier.
    gym_env = gymnasium.make(env_cfg.name, max_episode_steps=env_cfg.max_episode_frames)
    if not env_cfg.from_pixels and not isinstance(gym_env.observation_space, gymnasium.spaces.Box):
        raise ValueError(
            f"Gymnasium env {env_cfg.name!r} has a {type(gym_env.observation_space).__name__} observation; "
            "supported: Box (a state vector)"
        )
    if not isinstance(gym_env.action_space, gymnasium.spaces.Box):
        raise ValueError(
            f"Gymnasium env {env_cfg.name!r} has a {type(gym_env.action_space).__name__} action space; "
            "supported: Box (continuous)"
        )
    # frame_skip repeats gym_env.step with summed rewards. With render_mode=None nothing is rendered for display;
    # CarRacing draws its 96x96 observation inside every step (that is its observation), which cannot be skipped.
    env = GymWrapper(gym_env, frame_skip=env_cfg.action_repeat, device=device)
    env.set_seed(seed)
    return env


def _make_atari_env(env_cfg: DictConfig, seed: int, device: torch.device | str) -> GymWrapper:
    # Action repeat, max-pooling and the episode limit in frames are the ALE wrapper's (utils/atari.py).
    env = GymWrapper(make_atari_gym_env(env_cfg), device=device)
    env.set_seed(seed)
    return env


class ChannelsFirstPixels(Transform):
    """Image [H, W, 3] uint8 -> [C, size, size] uint8: channels first, resized, optionally grayscale (C = 1).

    Resizing is bilinear with antialiasing (``torch.nn.functional.interpolate``); images that already have the size
    (dm_control renders at it) are not resized. TorchRL's ``Resize``, ``GrayScale`` and ``ToTensorImage`` need
    torchvision (not installable here) or turn the pixels into floats; we keep uint8 to store them compactly.
    """

    def __init__(self, size: int, grayscale: bool = False, in_key: str = PIXELS_KEY):
        super().__init__(in_keys=[in_key], out_keys=[in_key])
        self.size = size
        self.grayscale = grayscale

    def _apply_transform(self, image: torch.Tensor) -> torch.Tensor:
        """[*, H, W, 3] uint8 -> [*, C, size, size] uint8."""
        image = image.movedim(-1, -3)
        if image.shape[-2:] == (self.size, self.size) and not self.grayscale:
            return image.contiguous()
        leading = image.shape[:-3]
        image = image.reshape(-1, *image.shape[-3:]).float()
        if image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", antialias=True)
        if self.grayscale:
            weights = torch.tensor(_LUMA_WEIGHTS, dtype=image.dtype, device=image.device)
            image = torch.einsum("nchw,c->nhw", image, weights).unsqueeze(1)
        image = image.round().clamp(0, 255).to(torch.uint8)
        return image.reshape(*leading, *image.shape[-3:])

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        spec = observation_spec[self.in_keys[0]]
        channels = 1 if self.grayscale else spec.shape[-1]
        observation_spec[self.out_keys[0]] = Bounded(
            low=0,
            high=255,
            shape=(*spec.shape[:-3], channels, self.size, self.size),
            dtype=torch.uint8,
            device=spec.device,
        )
        return observation_spec
