"""Config composition, overrides and the one-line errors for bad values."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from tests.cli import run_dreamer
from utils.config import (
    ConfigError,
    apply_overrides,
    check_config,
    compose_config,
    cpu_has_native_bf16,
    resolve_autocast,
    resolve_device,
    resolve_num_threads,
    restore_config,
)


def test_defaults_are_the_papers() -> None:
    cfg = compose_config()
    assert (cfg.env.backend, cfg.env.name, cfg.env.task) == ("dm_control", "cheetah", "run")
    assert (cfg.env.image_size, cfg.env.action_repeat, cfg.env.max_episode_frames) == (64, 2, 1000)
    assert cfg.env.from_pixels and not cfg.env.grayscale
    assert (cfg.collector.frames_per_batch, cfg.collector.init_random_frames) == (1000, 5000)
    assert cfg.optimization.train_steps == 100
    assert (cfg.replay_buffer.batch_size, cfg.replay_buffer.batch_length) == (50, 50)
    assert (cfg.model.deter_dim, cfg.model.stoch_dim, cfg.model.cnn_depth) == (200, 30, 32)
    assert (cfg.optimization.world_model_lr, cfg.optimization.actor_lr, cfg.optimization.value_lr) == (6e-4, 8e-5, 8e-5)
    assert (cfg.optimization.free_nats, cfg.optimization.imagination_horizon) == (3.0, 15)
    assert (cfg.optimization.discount, cfg.optimization.return_lambda) == (0.99, 0.95)
    assert cfg.logger.backend == "wandb" and cfg.logger.mode == "offline"
    assert cfg.device == "auto" and cfg.mode == "train"
    assert (cfg.model.init, cfg.optimization.free_nats_mode, cfg.eval.actor_mode) == ("keras", "batch", "sample_max")
    check_config(cfg)


@pytest.mark.parametrize("env", ["dmc", "car_racing", "pendulum"])
def test_every_env_config_composes_and_validates(env: str) -> None:
    check_config(compose_config(f"env={env}"))


def test_overrides_and_the_debug_preset() -> None:
    cfg = compose_config("env.name=walker", "env.task=walk", "optimization.autocast=bfloat16")
    assert (cfg.env.name, cfg.env.task, cfg.optimization.autocast) == ("walker", "walk", "bfloat16")
    debug = compose_config("experiment=debug")
    assert debug.collector.total_frames < 1000 and debug.model.deter_dim < 200
    check_config(debug)


@pytest.mark.parametrize(
    ("env", "backend", "name"),
    [
        ("dmc", "dm_control", "cartpole"),
        ("car_racing", "gymnasium", "CarRacing-v3"),
        ("pendulum", "gymnasium", "Pendulum-v1"),
        ("atari", "atari", "boxing"),
    ],
)
def test_the_debug_preset_composes_with_any_env(env: str, backend: str, name: str) -> None:
    """``experiment=debug`` shrinks everything but keeps the chosen env (cartpole only stands in for DMC's default)."""
    for overrides in ((f"env={env}", "experiment=debug"), ("experiment=debug", f"env={env}")):
        cfg = compose_config(*overrides)
        assert (cfg.env.backend, cfg.env.name, cfg.env.max_episode_frames, cfg.model.deter_dim) == (
            backend,
            name,
            100,
            16,
        )
        check_config(cfg)
    assert compose_config("experiment=debug", "env.name=walker", "env.task=walk").env.name == "walker"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("env.name=nope", "Unknown dm_control domain 'nope'"),
        ("env.task=fly", "'fly'"),
        ("env.backend=mujoco", "Unknown env backend 'mujoco'"),
        ("logger.backend=mlflow", "Unknown logger.backend 'mlflow'; allowed: wandb, tensorboard, csv, none"),
        ("optimization.autocast=int8", "Unknown optimization.autocast 'int8'"),
        ("replay_buffer.batch_size=0", "replay_buffer.batch_size=0 must be a positive integer"),
        ("mode=play", "Unknown mode 'play'"),
        ("optimization.kl_balance=1.5", "optimization.kl_balance=1.5 must be null (Dreamer V1) or a number in [0, 1]"),
        ("model.init=he", "Unknown model.init 'he'; allowed: keras, torch"),
        ("optimization.free_nats_mode=episode", "Unknown optimization.free_nats_mode 'episode'; allowed: batch, step"),
        ("optimization.reward_transform=clip", "Unknown optimization.reward_transform 'clip'; allowed: none, tanh"),
        ("eval.actor_mode=mean", "Unknown eval.actor_mode 'mean'; allowed: sample_max, tanh_mean"),
        ("num_threads=0", "num_threads=0 must be null (every usable core) or a positive integer"),
    ],
)
def test_bad_values_give_one_line_naming_them(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(override))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_autocast_on_cpu_bfloat16_where_native_else_float32_with_one_warning() -> None:
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="float16 autocast needs CUDA"):
        assert resolve_autocast("float16", cpu, native_cpu_bf16=True) is None
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert resolve_autocast("bfloat16", cpu, native_cpu_bf16=False) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_autocast(False, cpu) is None
        assert resolve_autocast("bfloat16", cpu, native_cpu_bf16=True) is torch.bfloat16
        assert resolve_autocast(True, cpu, native_cpu_bf16=True) is torch.bfloat16


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("flags\t\t: fpu sse2 avx512f avx512bw avx512_bf16 avx512_vnni", True),
        ("flags\t\t: fpu sse2 amx_tile amx_bf16", True),
        ("Features\t: fp asimd bf16 i8mm", True),
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq", False),
        ("Features\t: fp asimd", False),
    ],
)
def test_native_bf16_detection_reads_the_cpu_flags(tmp_path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_num_threads_default_is_omp_num_threads_or_every_usable_core(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_num_threads(None) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert resolve_num_threads(None) == 7
    assert resolve_num_threads(3) == 3
    for bad in (0, -2, 1.5, "four", True):
        with pytest.raises(ConfigError, match=r"num_threads=.* must be null"):
            resolve_num_threads(bad)


def test_device_auto_and_unavailable_cuda() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_resume_overrides_apply_on_top_but_cannot_change_the_model() -> None:
    saved = compose_config("experiment=debug")
    merged = apply_overrides(saved, ["collector.total_frames=800", "resume=/tmp/run"], ignore=("resume",))
    assert merged.collector.total_frames == 800 and merged.model == saved.model
    with pytest.raises(ConfigError, match=r"Cannot change model.deter_dim"):
        apply_overrides(saved, ["model.deter_dim=32"], ignore=())
    with pytest.raises(ConfigError, match=r"Cannot change env.name"):
        apply_overrides(saved, ["env.name=walker"], ignore=())


def test_cli_prints_the_composed_config() -> None:
    result = run_dreamer("--cfg", "job", "env.name=walker", "env.task=walk")
    assert result.returncode == 0, result.stderr
    assert "name: walker" in result.stdout and "task: walk" in result.stdout


def test_cli_fails_fast_on_an_unknown_domain() -> None:
    result = run_dreamer("env.name=nope", "hydra.run.dir=/tmp/dreamer-test-nope")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Unknown dm_control domain 'nope'; available: acrobot" in lines[0]


def test_a_resumed_dreamer_v3_run_takes_no_dreamer_v1_defaults() -> None:
    """``resume=<run dir>`` alone composes V1's groups; the V3 run's config must not gain V1's keys from them."""
    saved = OmegaConf.to_container(compose_config("experiment=debug_v3", "env=pendulum"))
    restored = restore_config(compose_config("env=pendulum"), saved, [], ignore=())
    assert restored.model == saved["model"] and restored.optimization == saved["optimization"]
    # A V1 run still gains the current defaults of keys added since it was saved.
    saved_v1 = OmegaConf.to_container(compose_config("experiment=debug", "env=pendulum"))
    del saved_v1["optimization"]["reward_transform"]
    assert restore_config(compose_config(), saved_v1, [], ignore=()).optimization.reward_transform == "none"
