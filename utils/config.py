"""Config checks and the few values derived from the composed Hydra config."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from losses.behaviour_v3 import ACTOR_GRADIENTS
from losses.world_model import FREE_NATS_MODES, REWARD_TRANSFORMS
from modules.actor import MODE_ESTIMATES
from modules.init import INIT_SCHEMES
from utils.envs import validate_env_config
from utils.resume import register_resolvers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
AUTOCAST_CHOICES = {"false": None, "true": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGGER_BACKENDS = ("wandb", "tensorboard", "csv", "none")
MODES = ("train", "eval")
# Keys that fix the networks' shapes or the data they were trained on: a resume or an evaluation may not change them.
FROZEN_SECTIONS = ("model",)
FROZEN_ENV_KEYS = ("backend", "name", "task", "from_pixels", "grayscale", "image_size", "full_action_space")
CONFIG_GROUPS = ("env", "model", "optimization", "collector", "replay_buffer", "logger", "eval", "experiment")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the value and what is allowed."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else must be a device torch knows and can use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"Unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available; use device=auto or device=cpu")
    return device


def autocast_dtype(value: object) -> torch.dtype | None:
    """Maps an ``optimization.autocast`` value to the dtype it asks for (``None`` = float32)."""
    key = str(value).lower()
    if key not in AUTOCAST_CHOICES:
        raise ConfigError(
            f"Unknown optimization.autocast {value!r}; allowed: false, true (= bfloat16), bfloat16, float16"
        )
    return AUTOCAST_CHOICES[key]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively: x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes on plain AVX-512, where
    bfloat16 is emulated and slower than float32, so the CPU's feature flags decide where they can be read (Linux);
    elsewhere oneDNN's answer is taken.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_autocast(value: object, device: torch.device, native_cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype to train with on ``device`` (``None`` = float32).

    CUDA: bfloat16 (where the GPU supports it) or float16. CPU: bfloat16 where the CPU has it natively
    (``native_cpu_bf16``, default :func:`cpu_has_native_bf16`); float16, or bfloat16 on a CPU without it, falls
    back to float32 with one warning.
    """
    dtype = autocast_dtype(value)
    if dtype is None:
        return None
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError("optimization.autocast=bfloat16 is not supported by this GPU; use float16 or false")
        return dtype
    if native_cpu_bf16 is None:
        native_cpu_bf16 = cpu_has_native_bf16()
    if dtype is torch.bfloat16 and native_cpu_bf16:
        return dtype
    reason = "float16 autocast needs CUDA" if dtype is torch.float16 else "this CPU has no native bfloat16"
    warnings.warn(f"optimization.autocast={value}: {reason} (device {device}); training in float32.", stacklevel=2)
    return None


def resolve_num_threads(value: object) -> int:
    """``num_threads``: ``null`` = ``OMP_NUM_THREADS`` when set, else every core this process may use (its CPU
    affinity, which cluster schedulers restrict); else a positive integer."""
    if value is None:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
            return int(os.environ["OMP_NUM_THREADS"])
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"num_threads={value!r} must be null (every usable core) or a positive integer")
    return value


def frames_to_agent_steps(frames: int, action_repeat: int, name: str) -> int:
    """Converts an environment-frame count of the config to agent steps, refusing counts that don't divide."""
    if frames % action_repeat:
        raise ConfigError(f"{name}={frames} must be a multiple of env.action_repeat={action_repeat}")
    return frames // action_repeat


def algorithm(group: DictConfig) -> str:
    """``cfg.model.name`` or ``cfg.optimization.name``: ``dreamer_v1`` or ``dreamer_v3`` (configs saved by runs
    from before DreamerV3 have no name: Dreamer V1)."""
    return group.get("name", "dreamer_v1")


def validate_config(cfg: DictConfig) -> None:
    """Checks the values that are not the environment's (see ``utils.envs.validate_env_config``)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"Unknown mode {cfg.mode!r}; allowed: {', '.join(MODES)}")
    if cfg.logger.backend not in LOGGER_BACKENDS:
        raise ConfigError(f"Unknown logger.backend {cfg.logger.backend!r}; allowed: {', '.join(LOGGER_BACKENDS)}")
    autocast_dtype(cfg.optimization.autocast)
    resolve_num_threads(cfg.num_threads)
    model, optimization = algorithm(cfg.model), algorithm(cfg.optimization)
    v3 = model == "dreamer_v3"
    if model != optimization:
        raise ConfigError(f"model={model} needs optimization={model} (got optimization={optimization})")
    choices = {"eval.actor_mode": (cfg.eval.actor_mode, MODE_ESTIMATES)}
    if v3:
        choices["optimization.actor_grad"] = (cfg.optimization.actor_grad, ACTOR_GRADIENTS)
        choices["model.size"] = (cfg.model.size, tuple(cfg.model.sizes))
    else:
        choices["model.init"] = (cfg.model.init, INIT_SCHEMES)
        choices["optimization.free_nats_mode"] = (cfg.optimization.free_nats_mode, FREE_NATS_MODES)
        choices["optimization.reward_transform"] = (cfg.optimization.reward_transform, tuple(REWARD_TRANSFORMS))
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"Unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    positive = {
        "replay_buffer.batch_size": cfg.replay_buffer.batch_size,
        "replay_buffer.batch_length": cfg.replay_buffer.batch_length,
        "optimization.imagination_horizon": cfg.optimization.imagination_horizon,
        "collector.frames_per_batch": cfg.collector.frames_per_batch,
    }
    if not v3:
        positive["optimization.train_steps"] = cfg.optimization.train_steps
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if v3:
        _validate_v3(cfg)
    else:
        kl_balance = cfg.optimization.kl_balance
        if kl_balance is not None and not (isinstance(kl_balance, (int, float)) and 0 <= kl_balance <= 1):
            raise ConfigError(f"optimization.kl_balance={kl_balance!r} must be null (Dreamer V1) or a number in [0, 1]")
    if cfg.optimization.imagination_horizon < 2:
        raise ConfigError(
            f"optimization.imagination_horizon={cfg.optimization.imagination_horizon} must be at least 2 "
            "(lambda-returns need one bootstrap step)"
        )


# DreamerV3 settings of the authors' code that have one implementation here: key -> the supported value.
V3_FIXED_SETTINGS = {
    "model.bin_range": 20,  # TorchRL's two-hot support is fixed at symexp(linspace(-20, 20))
    "model.latent_outscale": 1.0,
    "model.decoder_outscale": 1.0,
    "model.norm": "rms",
    "model.act": "silu",
    "optimization.contdisc": True,
    "optimization.slow_target": False,
    "optimization.reward_grad": True,
    "optimization.repval_grad": True,
}


def _validate_v3(cfg: DictConfig) -> None:
    """DreamerV3's own checks: the settings implemented here, a positive train ratio, GRU blocks that divide."""
    for key, supported in V3_FIXED_SETTINGS.items():
        group, name = key.split(".")
        if cfg[group][name] != supported:
            raise ConfigError(f"{key}={cfg[group][name]!r} is not supported for DreamerV3; allowed: {supported!r}")
    ratio = cfg.optimization.train_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ConfigError(f"optimization.train_ratio={ratio!r} must be a positive number (replayed steps per step)")
    if cfg.model.deter_dim % cfg.model.blocks:
        raise ConfigError(
            f"model.deter_dim={cfg.model.deter_dim} must be a multiple of model.blocks={cfg.model.blocks}"
        )


def check_config(cfg: DictConfig) -> None:
    """All config checks, before any heavy work: one-line ``ConfigError`` on a bad value."""
    validate_config(cfg)
    try:
        validate_env_config(cfg.env)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides this invocation was given (empty outside Hydra)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def config_group_choices() -> dict[str, str | None]:
    """The option this invocation selected in each config group (``{"env": "pendulum", ...}``; empty outside
    Hydra). Kept with a run, so that resuming it with its own command line (``resume=auto``) is accepted."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {group: choices.get(group) for group in CONFIG_GROUPS if group in choices}


def apply_overrides(
    saved: DictConfig, overrides: list[str], ignore: tuple[str, ...], saved_choices: dict | None = None
) -> DictConfig:
    """``saved`` with command-line overrides on top (parsed by Hydra's own override grammar).

    Refuses to select config groups (except the option the run was composed with, in ``saved_choices``) or to
    change the network or environment identity of a saved run.
    """
    merged = saved.copy()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in ignore or key.startswith("hydra"):
            continue
        value = override.value()
        if key in CONFIG_GROUPS:
            _accept_own_group_choice(key, value, saved_choices or {})
            continue
        section, _, leaf = key.partition(".")
        old = OmegaConf.select(saved, key)
        if (section in FROZEN_SECTIONS or (section == "env" and leaf in FROZEN_ENV_KEYS)) and old != value:
            raise ConfigError(f"Cannot change {key} (saved {old!r}) of an existing run or checkpoint to {value!r}")
        with open_dict(merged):
            OmegaConf.update(merged, key, value, force_add=True)
    return merged


def _accept_own_group_choice(group: str, value: object, saved_choices: dict) -> None:
    """A saved run accepts the config group option it was composed with (its own command line), no other."""
    if group in saved_choices and saved_choices[group] == value:
        return
    composed = f" (it was composed with {group}={saved_choices[group]})" if group in saved_choices else ""
    raise ConfigError(
        f"Cannot select {group}={value} for a saved run or checkpoint{composed}; override its keys instead"
    )


def restore_config(
    current: DictConfig, saved: dict, overrides: list[str], ignore: tuple[str, ...], saved_choices: dict | None = None
) -> DictConfig:
    """A saved run's config for this invocation: ``saved``, plus the current defaults of keys added to the code
    since it was written, plus this invocation's command-line ``overrides`` (see :func:`apply_overrides`).

    Defaults come only from the same algorithm: a DreamerV3 run resumed by a command that composes Dreamer V1's
    ``model`` and ``optimization`` groups (``resume=<run dir>`` alone) takes none of V1's keys into its config.
    """
    defaults = OmegaConf.to_container(current)
    for group in ("model", "optimization"):
        if algorithm(OmegaConf.create(saved.get(group, {}))) != algorithm(current[group]):
            defaults[group] = {}
    merged = OmegaConf.merge(defaults, saved)
    return apply_overrides(merged, overrides, ignore, saved_choices)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config dict -> ``{"section.key": value}``."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def compose_config(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The project's composed config with ``overrides``, outside the command line (tests, benchmarks)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
