"""mode=eval: the returns table and JSON, the dream videos, and the one-line errors for bad checkpoints or overrides.

One short debug training run makes the checkpoint. The few command-line evaluations run concurrently (each process
spends most of its time importing torch, TorchRL and MuJoCo); the other cases call ``run_evaluation`` (what
``dreamer.py mode=eval`` runs) in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tensordict import TensorDict
from torchrl.envs import ExplorationType, set_exploration_type

from modules.rssm import feature
from tests.cli import ROOT, run_dreamer
from utils.agent import build_agent
from utils.checkpoint import CheckpointError, load_checkpoint, save_atomic
from utils.config import ConfigError, compose_config
from utils.dream_video import (
    LABEL_HEIGHT,
    PANEL,
    dream_offsets,
    dream_video,
    imagine_deterministic,
    label_row,
    panel_titles,
)
from utils.envs import make_env
from utils.eval_mode import (
    RESULTS_FILE,
    EvalReport,
    atomic_output,
    load_eval_config,
    run_evaluation,
    write_dream_videos,
)
from utils.evaluation import EpisodeResult, add_rgb_frames, evaluate_policy, to_uint8_frames

# One torch thread per process: on a busy 2-core machine OpenMP's second thread makes small convolutions ~100x slower
# (measured 30 ms instead of 0.3 ms), and the command-line evaluations below run side by side anyway.
SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ROW = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(\d+)$")
MEAN_LINE = re.compile(r"mean ± std over (\d+) episodes: return (-?\d+\.\d+) ± (\d+\.\d+)")
DREAM_EPISODES = 2
# A dream video has one frame per observation: the reset observation and one per agent step.
EXTRA_FRAMES = 1


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """This module's in-process tests also use one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug run of one collection batch (100 random frames, then its 2 updates); no periodic evaluation."""
    directory = tmp_path_factory.mktemp("debug_run")
    overrides = ["collector.total_frames=100", "collector.init_random_frames=100", "logger.eval_every=100000"]
    result = run_dreamer("experiment=debug", *overrides, f"hydra.run.dir={directory}", env=SINGLE_THREAD_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return directory


def _craft_checkpoint(run_dir: Path, path: Path, edit) -> Path:
    """A copy of the run's checkpoint whose stored config is changed by ``edit(config)``."""
    payload = load_checkpoint(run_dir)
    payload.pop("path")
    payload.pop("format_version")
    edit(payload["config"])
    save_atomic(payload, path)
    return path


@pytest.fixture(scope="module")
def bad_inputs(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """name -> overrides of a bad ``mode=eval`` invocation."""
    inputs = tmp_path_factory.mktemp("inputs")
    last = run_dir / "checkpoints" / "last.pt"
    text_file = inputs / "x.pt"
    text_file.write_text("not a checkpoint\n")
    truncated = inputs / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    def shrink_model(config: dict) -> None:
        config["model"]["deter_dim"] = 8

    pendulum_env = OmegaConf.to_container(compose_config("env=pendulum").env)
    misfit = _craft_checkpoint(run_dir, inputs / "misfit.pt", shrink_model)
    pendulum = _craft_checkpoint(run_dir, inputs / "pendulum.pt", lambda config: config.update(env=pendulum_env))
    return {
        "missing": [f"checkpoint={inputs / 'nope'}"],
        "text_file": [f"checkpoint={text_file}"],
        "truncated": [f"checkpoint={truncated}"],
        "model_override": [f"checkpoint={run_dir}", "model.deter_dim=64"],
        "env_override": [f"checkpoint={run_dir}", "env.name=walker"],
        "misfit": [f"checkpoint={misfit}"],
        "pendulum_dreams": [f"checkpoint={pendulum}", "eval.dreams=true"],
        "no_checkpoint": [],
    }


# Bad inputs also run through the command line: one raising CheckpointError, one raising ConfigError.
CLI_BAD_INPUTS = ("truncated", "env_override")


@pytest.fixture(scope="module")
def cli(run_dir: Path, bad_inputs: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The command-line evaluations, run concurrently: name -> returncode, stdout, stderr, out (its output dir)."""
    commands = {
        "run_dir": [f"checkpoint={run_dir}", f"eval.episodes={DREAM_EPISODES}", "eval.dreams=true"],
        **{name: bad_inputs[name] for name in CLI_BAD_INPUTS},
    }
    outputs = tmp_path_factory.mktemp("eval_outputs")
    processes = {
        name: subprocess.Popen(
            [sys.executable, "dreamer.py", "mode=eval", *args, f"hydra.run.dir={outputs / name}"],
            cwd=ROOT,
            env=SINGLE_THREAD_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = {"returncode": process.returncode, "stdout": stdout, "stderr": stderr, "out": outputs / name}
    return results


@pytest.fixture(scope="module")
def evaluations(cli: dict[str, dict], run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """``cli`` plus ``pt_file``: the .pt file evaluated stochastically in this process (what ``evaluate`` runs)."""
    out = tmp_path_factory.mktemp("pt_file")
    overrides = ["mode=eval", f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "eval.stochastic=true"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_evaluation(compose_config(*overrides), overrides, out)
    return {**cli, "pt_file": {"returncode": 0, "stdout": stdout.getvalue(), "stderr": "", "out": out}}


def _table(stdout: str) -> tuple[list[tuple[int, float, int]], tuple[int, float, float]]:
    rows = [(int(m[1]), float(m[2]), int(m[3])) for line in stdout.splitlines() if (m := ROW.match(line))]
    mean = MEAN_LINE.search(stdout)
    assert mean is not None, stdout
    return rows, (int(mean[1]), float(mean[2]), float(mean[3]))


@pytest.mark.parametrize(("name", "episodes"), [("run_dir", DREAM_EPISODES), ("pt_file", 1)])
def test_eval_prints_the_table_and_writes_matching_json(evaluations: dict[str, dict], name: str, episodes: int) -> None:
    run = evaluations[name]
    assert run["returncode"] == 0, run["stderr"][-2000:]
    rows, (count, mean, std) = _table(run["stdout"])
    results = json.loads((run["out"] / RESULTS_FILE).read_text())
    assert [row[0] for row in rows] == list(range(episodes)) and count == episodes
    assert len(results["episodes"]) == episodes
    for (_, table_return, table_length), stored in zip(rows, results["episodes"], strict=True):
        assert table_return == pytest.approx(stored["return"], abs=0.005)
        assert table_length == stored["length"] == 50  # debug: 100 frames at action repeat 2
    returns = [stored["return"] for stored in results["episodes"]]
    expected_mean = sum(returns) / len(returns)
    expected_std = math.sqrt(sum((r - expected_mean) ** 2 for r in returns) / len(returns))
    assert results["mean_return"] == pytest.approx(expected_mean) and mean == pytest.approx(expected_mean, abs=0.005)
    assert results["std_return"] == pytest.approx(expected_std) and std == pytest.approx(expected_std, abs=0.005)
    assert results["policy"] == ("stochastic" if name == "pt_file" else "deterministic")
    assert results["checkpoint"].endswith("checkpoints/last.pt")


def test_eval_dreams_writes_one_video_frame_per_observation(cli: dict[str, dict]) -> None:
    run = cli["run_dir"]
    results = json.loads((run["out"] / RESULTS_FILE).read_text())
    titles = panel_titles(15)
    assert results["dream_panels"] == titles == ["real", "input", "recon", "dream +5", "dream +10", "dream +15"]
    assert sorted(path.name for path in (run["out"] / "dreams").iterdir()) == [
        f"episode_{index:03d}.{suffix}" for index in range(DREAM_EPISODES) for suffix in ("gif", "mp4")
    ]
    for stored in results["episodes"]:
        frames = iio.imread(stored["video_mp4"])
        assert frames.shape == (stored["length"] + EXTRA_FRAMES, LABEL_HEIGHT + PANEL, len(titles) * PANEL, 3)
        # DMC observations are the RGB render: the real and input panels show the same image (up to H.264 loss).
        real, model_input = frames[:, LABEL_HEIGHT:, :PANEL].astype(float), frames[:, LABEL_HEIGHT:, PANEL : 2 * PANEL]
        assert np.abs(real - model_input).mean() < 3.0
        assert np.abs(frames[:, :LABEL_HEIGHT].astype(float) - label_row(titles)).mean() < 8.0
        with Image.open(stored["video_gif"]) as gif:
            assert (gif.n_frames, gif.size) == (
                stored["length"] + EXTRA_FRAMES,
                (len(titles) * PANEL, LABEL_HEIGHT + PANEL),
            )
    assert "Dream video:" in run["stdout"]


def test_pt_file_without_dreams_writes_no_videos(evaluations: dict[str, dict]) -> None:
    assert not (evaluations["pt_file"]["out"] / "dreams").exists()


BAD_INPUT_MESSAGES = {
    "missing": "Checkpoint not found",
    "text_file": "not a dreamer checkpoint or truncated",
    "truncated": "not a dreamer checkpoint or truncated",
    "model_override": "Cannot change model.deter_dim (saved 16) of an existing run or checkpoint to 64",
    "env_override": "Cannot change env.name (saved 'cartpole') of an existing run or checkpoint to 'walker'",
    "misfit": "does not fit this model/env",
    "pendulum_dreams": "eval.dreams=true needs a pixel environment; Pendulum-v1 observes a state vector",
    "no_checkpoint": "mode=eval needs checkpoint=<run directory or .pt file>",
}


@pytest.mark.parametrize("name", BAD_INPUT_MESSAGES)
def test_bad_input_raises_one_line_and_writes_nothing(
    bad_inputs: dict[str, list[str]], name: str, tmp_path: Path
) -> None:
    """Each bad input stops with a ConfigError or CheckpointError, which dreamer.py prints as one line (exit 2)."""
    overrides = bad_inputs[name]
    with pytest.raises((ConfigError, CheckpointError)) as error:
        run_evaluation(compose_config("mode=eval", *overrides), overrides, tmp_path / "out")
    assert BAD_INPUT_MESSAGES[name] in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", CLI_BAD_INPUTS)
def test_bad_input_on_the_command_line_exits_2_with_one_line(cli: dict[str, dict], name: str) -> None:
    run = cli[name]
    assert run["returncode"] == 2
    lines = run["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamer: error: ") and BAD_INPUT_MESSAGES[name] in lines[0]
    assert not (run["out"] / RESULTS_FILE).exists() and not (run["out"] / "dreams").exists()


def test_bad_eval_settings_are_refused(run_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config("mode=eval", f"checkpoint={run_dir}")
    for override, message in [
        ("eval.episodes=0", "eval.episodes=0 must be a positive integer"),
        ("eval.imagination_horizon=-1", "eval.imagination_horizon=-1 must be a positive integer"),
        ("eval.dreams=maybe", "eval.dreams='maybe' must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_eval_config(cfg, [override])
    with pytest.raises(ConfigError, match="Cannot select env=pendulum"):
        load_eval_config(cfg, ["env=pendulum"])
    with pytest.raises(CheckpointError, match="carries no complete config"):
        bare = tmp_path / "bare.pt"
        save_atomic({"agent": {}}, bare)
        load_eval_config(compose_config("mode=eval", f"checkpoint={bare}"), [])


def test_eval_config_keeps_the_stored_model_and_takes_eval_overrides(run_dir: Path) -> None:
    cfg = compose_config("mode=eval", f"checkpoint={run_dir}", "eval.episodes=3")
    eval_cfg, payload = load_eval_config(cfg, ["eval.episodes=3", "env.seed=7"])
    stored = payload["config"]
    assert eval_cfg.model == stored["model"] and eval_cfg.env.name == "cartpole"  # not the composed default (cheetah)
    assert (eval_cfg.eval.episodes, eval_cfg.env.seed, eval_cfg.mode) == (3, 7, "eval")
    assert eval_cfg.checkpoint == str(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize(("horizon", "offsets"), [(15, (5, 10, 15)), (4, (2, 3, 4)), (2, (1, 2)), (1, (1,))])
def test_dream_offsets(horizon: int, offsets: tuple[int, ...]) -> None:
    assert dream_offsets(horizon) == offsets
    assert panel_titles(horizon)[3:] == [f"dream +{offset}" for offset in offsets]


def test_dream_video_panels_match_an_independent_computation(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the latent samples replaced by their means and the actor's mode by tanh(mean), every panel can be
    recomputed, one state at a time."""
    monkeypatch.setattr("modules.rssm.sample_gaussian", lambda mean, std: mean)
    torch.manual_seed(0)
    horizon = 4
    overrides = ["eval.dreams=true", "eval.actor_mode=tanh_mean"]
    cfg, payload = load_eval_config(compose_config("mode=eval", f"checkpoint={run_dir}", *overrides), overrides)
    agent = build_agent(cfg, torch.device("cpu"), None)
    agent.load_state_dict(payload["agent"])
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        (episode,) = evaluate_policy(agent, 1, seed_offset=10_000, keep_rgb_frames=True)
    video = dream_video(agent.world_model, agent.actor, episode.steps, episode.rgb_frames, horizon)
    pixels = episode.steps["pixels"]  # uint8 [T + 1, 3, 64, 64]
    assert video.shape == (episode.length + EXTRA_FRAMES, LABEL_HEIGHT + PANEL, 6 * PANEL, 3)
    assert (video[:, :LABEL_HEIGHT] == label_row(panel_titles(horizon))).all()
    panels = torch.from_numpy(video[:, LABEL_HEIGHT:]).permute(0, 3, 1, 2).split(PANEL, dim=-1)
    # DMC: the observation is the RGB render, so both panels of frame t show observation t.
    assert torch.equal(panels[0], pixels), "the dream video's real panel at frame t must be the image of observation t"
    assert torch.equal(panels[1], pixels), "the dream video's input panel at frame t must be observation t"

    world_model = agent.world_model
    observed = world_model(episode.steps.unsqueeze(0).clone())  # the TensorDict path of the training loss
    recon = to_uint8_frames(observed["reconstruction"][0])
    assert np.array_equal(panels[2].permute(0, 2, 3, 1).numpy(), recon)

    prior, actor, offsets = world_model.rssm.prior, agent.actor, dream_offsets(horizon)
    imagined = imagine_deterministic(prior, actor, observed["deter"][0], observed["stoch"][0], offsets)  # [K, T + 1, F]
    for t in (0, 17, episode.length):
        deter, stoch = observed["deter"][0, t : t + 1], observed["stoch"][0, t : t + 1]
        for step in range(1, horizon + 1):
            action = actor.mode(feature(deter, stoch))
            assert action.abs().min() > 1e-3  # the actions matter (checked through the features below)
            deter = prior.recurrent_step(deter, stoch, action)
            stoch = prior.distribution(deter)[0]
            if step in offsets:
                torch.testing.assert_close(imagined[offsets.index(step), t], feature(deter, stoch)[0])
                expected = to_uint8_frames(world_model.decoder(feature(deter, stoch)))[0]
                panel = panels[3 + offsets.index(step)][t].permute(1, 2, 0).numpy()
                # Equal but for rare float rounding across batch sizes (a swapped offset changes ~1.3% of the values).
                difference = np.abs(panel.astype(int) - expected)
                assert difference.max() <= 1 and (difference > 0).mean() < 0.002


def test_rgb_frames_of_a_grayscale_env_are_the_colour_image() -> None:
    cfg = compose_config("env=car_racing", "env.grayscale=true")
    env = make_env(cfg.env)
    add_rgb_frames(env, cfg.env.image_size)
    rollout = env.rollout(2)
    env.close()
    rgb, gray = rollout["rgb_frame"].float(), rollout["pixels"].float()  # [T, 3, 64, 64], [T, 1, 64, 64]
    assert rgb.shape == (2, 3, 64, 64) and gray.shape == (2, 1, 64, 64)
    luma = torch.einsum("tchw,c->thw", rgb, torch.tensor([0.299, 0.587, 0.114])).unsqueeze(1)
    assert (luma - gray).abs().max() <= 1.0  # rounding of the resized colour image before the conversion
    assert (rgb[:, 0] - rgb[:, 1]).abs().max() > 10  # really in colour (CarRacing: green grass, grey road)


def test_summary_statistics_and_table() -> None:
    cfg = compose_config("experiment=debug", "mode=eval")
    episodes = [EpisodeResult(r, n, TensorDict({}, [])) for r, n in [(10.0, 50), (20.0, 40), (60.0, 30)]]
    report = EvalReport(cfg, "ckpt.pt", 400, episodes, [])
    summary = report.summary()
    assert [row["return"] for row in summary["episodes"]] == [10.0, 20.0, 60.0]
    assert summary["mean_return"] == pytest.approx(30.0) and summary["mean_length"] == pytest.approx(40.0)
    assert summary["std_return"] == pytest.approx(math.sqrt((400 + 100 + 900) / 3))
    rows, (count, mean, std) = _table(report.table())
    assert rows == [(0, 10.0, 50), (1, 20.0, 40), (2, 60.0, 30)]
    assert (count, mean, std) == (3, 30.0, pytest.approx(21.60, abs=0.005))


def test_videos_and_outputs_are_written_atomically(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(5, LABEL_HEIGHT + PANEL, 2 * PANEL, 3), dtype=np.uint8)
    ((mp4, gif),) = write_dream_videos([frames], tmp_path / "dreams", fps=10)
    assert iio.imread(mp4).shape == frames.shape
    with Image.open(gif) as image:
        assert image.n_frames == 5
    target = tmp_path / "results.json"
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_text("{half")
        raise RuntimeError("crash while writing")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dreams"]
    assert sorted(path.name for path in (tmp_path / "dreams").iterdir()) == ["episode_000.gif", "episode_000.mp4"]
