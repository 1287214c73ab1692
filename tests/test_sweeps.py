"""Multirun sweeps (one run directory per job), the launcher configs, and ``python -m utils.results``."""

from __future__ import annotations

import csv
import dataclasses
import os
import pickle
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from tests.cli import ROOT, run_dreamer
from utils.config import compose_config
from utils.results import (
    ATARI_FRAMES,
    DEFAULT_FRAMES,
    DEFAULT_REFERENCE,
    DEFAULT_V3_ATARI_REFERENCE,
    DEFAULT_V3_REFERENCE,
    ResultsError,
    Run,
    config_differences,
    default_frames,
    default_reference,
    eval_points,
    frames_label,
    load_reference,
    main,
    markdown_table,
    pick_reference,
    reference_key,
    summarize,
    value_at,
)

SEEDS = (0, 1)
RUN_NAMES = [f"{seed}_cartpole-balance_seed{seed}" for seed in SEEDS]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-seed multirun of the debug preset (evaluations at 200 and 400 frames)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = run_dreamer("-m", "experiment=debug", "env.seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_value(metrics: Path, frames: int) -> float | None:
    """Independent reading: the last evaluation row (no agent_steps) at or before ``frames``, file order."""
    rows = read_rows(metrics)
    if max(int(row["frames"]) for row in rows) < frames:
        return None
    value = None
    for row in rows:
        if not row["agent_steps"] and row["eval/return"] and int(row["frames"]) <= frames:
            value = float(row["eval/return"])
    return value


def copy_run(source: Path, target: Path, **config_changes: object) -> Path:
    """Copies a run's config.yaml and metrics.csv, applying ``{"section__key": value}`` changes to the config."""
    target.mkdir(parents=True)
    shutil.copy(source / "metrics.csv", target / "metrics.csv")
    config = yaml.safe_load((source / "config.yaml").read_text())
    for name, value in config_changes.items():
        section, key = name.split("__")
        config[section][key] = value
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def run_results(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


# --- the multirun itself -------------------------------------------------------------------------------------------


def test_multirun_gives_one_complete_run_directory_per_job(sweep: Path) -> None:
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == RUN_NAMES
    assert (sweep / "multirun.yaml").is_file()
    for seed, name in zip(SEEDS, RUN_NAMES, strict=True):
        run = sweep / name
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["env"]["name"], config["env"]["task"], config["env"]["seed"]) == ("cartpole", "balance", seed)
        assert f"env.seed={seed}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert (run / "checkpoints" / "last.pt").is_file()
        evals = [row for row in read_rows(run / "metrics.csv") if not row["agent_steps"] and row["eval/return"]]
        assert [int(row["frames"]) for row in evals] == [200, 400]
        # The dashboard (csv backend in the debug preset) has its own directory per job, named after the run.
        dashboard = run / "csv_logs" / name / "scalars" / "eval" / "return.csv"
        logged = {int(step): float(value) for step, value in csv.reader(dashboard.open())}
        assert all(logged[int(row["frames"])] == pytest.approx(float(row["eval/return"])) for row in evals)


def test_results_table_csv_and_plot_match_the_metrics_files(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    frames = [200, 300, 400, 500]
    reference = tmp_path / "reference.csv"
    reference.write_text("task,return_at_400_frames\ncartpole_balance,123\nwalker_walk,456\n")
    out_dir = tmp_path / "out"
    argv = [
        str(sweep),
        "--frames",
        "500",
        "200",
        "400",
        "300",
        "200",
        "--out",
        str(out_dir),
        "--reference",
        str(reference),
    ]
    code, out, err = run_results(capsys, *argv)
    assert code == 0, err

    table = {int(row["frames"]): row for row in read_rows(out_dir / "results.csv")}
    assert sorted(table) == frames
    for count in frames[:3]:
        values = [expected_value(sweep / name / "metrics.csv", count) for name in RUN_NAMES]
        row = table[count]
        assert row["task"] == "cartpole-balance" and (row["runs"], row["seeds"]) == ("2", "0 1")
        assert float(row["mean"]) == pytest.approx(statistics.mean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
        assert f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" in out
    # 300 frames uses the evaluation at 200; nobody reached 500.
    assert table[300]["mean"] == table[200]["mean"]
    assert (table[500]["runs"], table[500]["mean"]) == ("0", "")
    assert [table[count]["paper"] for count in frames] == ["", "", "123.0", ""]
    assert out.startswith("| task | seeds | 200 frames | 300 frames | 400 frames | paper 400 | 500 frames |")
    assert "| cartpole-balance | 0, 1 |" in out and out.rstrip().endswith("| — |")
    assert [line for line in err if "has no value at 500 frames" in line] and len(err) == 3  # 2 runs + "wrote"

    markdown = (out_dir / "results.md").read_text()
    assert markdown.startswith(out) and "![curve_cartpole-balance.png](curve_cartpole-balance.png)" in markdown
    image = imread(out_dir / "curve_cartpole-balance.png")
    assert image.shape == (400, 640, 4) and image[..., :3].std() > 0.05


def test_mismatched_configs_are_refused_unless_allowed(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy_run(sweep / RUN_NAMES[0], tmp_path / "a")
    copy_run(sweep / RUN_NAMES[1], tmp_path / "b", logger__log_every=7, collector__total_frames=800)  # ignored keys
    code, _, err = run_results(capsys, str(tmp_path), "--frames", "400", "--out", str(tmp_path / "out"))
    assert code == 0, err

    copy_run(sweep / RUN_NAMES[1], tmp_path / "c", optimization__actor_lr=0.001, model__deter_dim=32)
    code, out, err = run_results(capsys, str(tmp_path), "--frames", "400", "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert err == [
        "results: error: runs of cartpole-balance differ in model.deter_dim (16 vs 32), "
        "optimization.actor_lr (8e-05 vs 0.001); pass --allow-mismatch to pool them anyway"
    ]

    code, out, err = run_results(
        capsys, str(tmp_path), "--frames", "400", "--out", str(tmp_path / "out"), "--allow-mismatch"
    )
    assert code == 0 and "| cartpole-balance | 0, 1 |" in out
    assert any(line.startswith("results: warning: pooling runs of cartpole-balance") for line in err)
    assert any("seed 1 used by more than one run" in line for line in err)


def test_missing_seeds_are_named(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in RUN_NAMES:
        copy_run(sweep / name, tmp_path / name)
    copy_run(sweep / RUN_NAMES[0], tmp_path / "swingup0", env__task="swingup")
    code, out, err = run_results(capsys, str(tmp_path), "--frames", "400", "--out", str(tmp_path / "out"))
    assert code == 0
    assert "results: warning: missing seeds: cartpole-swingup has seed 0 but not 1 (all tasks together: 0, 1)" in err
    assert "| cartpole-swingup | 0 |" in out
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == [
        "curve_cartpole-balance.png",
        "curve_cartpole-swingup.png",
    ]


@pytest.mark.parametrize("case", ["missing", "empty", "no_metrics", "no_eval_rows"])
def test_bad_input_gives_one_line_and_status_2(
    case: str, sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "sweep"
    target.mkdir()
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no_metrics":
        (target / "0").mkdir()
        shutil.copy(sweep / RUN_NAMES[0] / "config.yaml", target / "0" / "config.yaml")
    elif case == "no_eval_rows":
        run = copy_run(sweep / RUN_NAMES[0], target / "0")
        rows = [row for row in read_rows(run / "metrics.csv") if row["agent_steps"]]
        for row in rows:
            row["eval/return"] = ""
        with open(run / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    code, out, err = run_results(capsys, str(target))
    expected = {
        "missing": f"{target} is not a directory",
        "empty": f"no runs (directories with a Dreamer config.yaml) under {target}",
        "no_metrics": f"run {target / '0'} has no metrics.csv",
        "no_eval_rows": "has no evaluation rows (eval/return) yet",
    }[case]
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("results: error: ") and expected in err[0]


def test_command_line_exit_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "utils.results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"results: error: no runs (directories with a Dreamer config.yaml) under {tmp_path}"


# --- pure functions --------------------------------------------------------------------------------------------------


def test_value_at_is_the_last_evaluation_at_or_before() -> None:
    frames, returns = np.array([200, 400, 600]), np.array([1.0, 2.0, 3.0])
    assert value_at(frames, returns, 700, 100) is None  # before the first evaluation
    assert [value_at(frames, returns, 700, count) for count in (200, 399, 400, 700)] == [1.0, 1.0, 2.0, 3.0]
    assert value_at(frames, returns, 650, 700) is None  # the run stopped at 650 frames


def test_eval_points_skip_training_rows_and_keep_the_latest_duplicate() -> None:
    import pandas as pd

    metrics = pd.DataFrame(
        {
            "frames": [200, 200, 300, 400, 400, 300, 400],  # a resume from 300 frames logged 400 again
            "agent_steps": [100, None, 150, 200, None, 150, None],
            "eval/return": [None, 5.0, 5.0, 5.0, 7.0, 5.0, 9.0],
        }
    )
    frames, returns = eval_points(metrics)
    assert frames.tolist() == [200, 400] and returns.tolist() == [5.0, 9.0]
    assert eval_points(metrics.drop(columns="eval/return"))[0].size == 0


def test_config_differences_skip_ignored_keys_and_name_missing_ones() -> None:
    base = {"env.seed": 0, "env.name": "walker", "logger.backend": "csv", "eval.episodes": 5, "model.deter_dim": 200}
    other = {**base, "env.seed": 1, "logger.backend": "wandb", "eval.episodes": 1}
    assert config_differences([base, other]) == {}
    assert config_differences([base, {**other, "model.deter_dim": 100, "model.extra": 1}]) == {
        "model.deter_dim": [200, 100],
        "model.extra": ["<missing>", 1],
    }


def test_reference_file_and_task_names(tmp_path: Path) -> None:
    path = tmp_path / "reference.csv"
    path.write_text("task,return_at_100k_frames,return_at_1m_frames\ncup_catch,73,967\nwalker_walk,137,\n")
    assert load_reference(path) == {"cup_catch": {100_000: 73.0, 1_000_000: 967.0}, "walker_walk": {100_000: 137.0}}
    assert reference_key({"backend": "dm_control", "name": "ball_in_cup", "task": "catch"}) == "cup_catch"
    assert reference_key({"backend": "gymnasium", "name": "Pendulum-v1", "task": None}) is None
    assert [frames_label(count) for count in (400, 100_000, 1_000_000, 1_500)] == ["400", "100k", "1M", "1500"]


def test_dreamer_v3_reference_rows_are_picked_by_observation_kind(tmp_path: Path) -> None:
    path = tmp_path / "reference.csv"
    path.write_text("task,observation,return_at_100k\nwalker_walk,proprio,461\nwalker_walk,vision,300\n")
    assert load_reference(path, "proprio") == {"walker_walk": {100_000: 461.0}}
    assert load_reference(path, "vision") == {"walker_walk": {100_000: 300.0}}
    with pytest.raises(ResultsError, match="needs an observation kind"):
        load_reference(path)


def test_dreamer_v3_runs_default_to_the_authors_v3_scores_of_their_observation_kind() -> None:
    def run(config: dict) -> Run:
        return dataclasses.replace(make_run(0, [100], [1.0], 100), config=config)

    v3_states = {"model.name": "dreamer_v3", "env.from_pixels": False}
    assert default_reference({"a": [run(v3_states)]}) == (DEFAULT_V3_REFERENCE, "proprio")
    assert default_reference({"a": [run({**v3_states, "env.from_pixels": True})]}) == (DEFAULT_V3_REFERENCE, "vision")
    # Runs saved before DreamerV3 have no model.name: Dreamer V1, whose reference has no observation column.
    assert default_reference({"a": [run({"env.from_pixels": True}), run(v3_states)]})[0] == DEFAULT_REFERENCE


def test_atari_runs_default_to_the_authors_v3_atari100k_scores_and_v1_atari_runs_to_none() -> None:
    def run(config: dict) -> Run:
        return dataclasses.replace(make_run(0, [100], [1.0], 100), config=config)

    assert reference_key({"backend": "atari", "name": "ms_pacman", "task": None}) == "ms_pacman"
    v3_atari = {"model.name": "dreamer_v3", "env.backend": "atari", "env.from_pixels": True}
    v1_atari = {**v3_atari, "model.name": "dreamer_v1"}
    assert default_reference({"boxing": [run(v3_atari)], "pong": [run(v3_atari)]}) == (
        DEFAULT_V3_ATARI_REFERENCE,
        "vision",
    )
    assert default_frames({"boxing": [run(v3_atari)]}) == ATARI_FRAMES
    assert default_frames({"boxing": [run(v3_atari)], "a": [run({"env.backend": "dm_control"})]}) == DEFAULT_FRAMES
    scores, label = pick_reference({"boxing": [run(v3_atari)]}, None, warnings := [])
    assert label == "DreamerV3" and scores["boxing"][400_000] == 79.4 and not warnings
    assert default_reference({"boxing": [run(v1_atari)]}) == (None, "vision")
    assert pick_reference({"boxing": [run(v1_atari)]}, None, warnings) == ({}, "")
    assert warnings == [
        "no paper values: the authors published no Dreamer V1 Atari scores (their score file covers DMC only); "
        "pass --reference to compare with other scores"
    ]


def make_run(seed: int, frames: list[int], returns: list[float], last_frame: int) -> Run:
    return Run(
        path=Path(f"run{seed}"),
        task="walker-walk",
        reference_key="walker_walk",
        seed=seed,
        config={},
        eval_frames=np.array(frames),
        eval_returns=np.array(returns),
        last_frame=last_frame,
    )


def test_summary_and_markdown_table() -> None:
    groups = {
        "walker-walk": [
            make_run(0, [50_000, 100_000], [10.0, 20.0], 200_000),
            make_run(1, [50_000, 100_000], [30.0, 50.0], 200_000),
            make_run(2, [50_000], [60.0], 80_000),
        ]
    }
    reference = {"walker_walk": {100_000: 137.0, 500_000: 886.0}}
    summary = summarize(groups, [50_000, 100_000, 150_000], reference)
    assert summary["mean"].tolist() == pytest.approx([statistics.mean([10, 30, 60]), 35.0, 35.0])
    assert summary["std"].tolist() == pytest.approx([statistics.stdev([10, 30, 60])] + [statistics.stdev([20, 50])] * 2)
    assert summary["runs"].tolist() == [3, 2, 2] and summary["seeds"].tolist() == ["0 1 2", "0 1", "0 1"]
    assert summary["paper"].tolist()[1] == 137.0 and np.isnan(summary["paper"].tolist()[0])

    table = markdown_table(summary, groups, paper_frames={100_000, 500_000})
    assert table.splitlines() == [
        "| task | seeds | 50k frames | 100k frames | paper 100k | 150k frames |",
        "|---|---|---|---|---|---|",
        f"| walker-walk | 0, 1, 2 | 33.3 ± {statistics.stdev([10, 30, 60]):.1f} | 35.0 ± 21.2 (n=2) | 137 "
        "| 35.0 ± 21.2 (n=2) |",
    ]


# --- launchers -------------------------------------------------------------------------------------------------------


def test_default_and_joblib_launchers_compose() -> None:
    assert compose_config(return_hydra_config=True).hydra.launcher._target_.endswith("BasicLauncher")
    joblib = compose_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", return_hydra_config=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


def test_slurm_preset_selects_the_launcher_and_bfloat16_autocast() -> None:
    cfg = compose_config("experiment=slurm", "env.name=walker", "env.task=walk", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.dreamer_launchers.DreamerSlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.nodes, launcher.tasks_per_node) == ("gpu", 1, 1, 1)
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min) == (8, 32, 1440)
    assert (launcher.array_parallelism, launcher.max_num_timeout, launcher.signal_delay_s) == (16, 10, 120)
    assert "signal" not in launcher.additional_parameters  # submitit's own USR2, which requeues
    assert cfg.optimization.autocast == "bfloat16"
    assert (cfg.env.name, cfg.env.task) == ("walker", "walk")
    # The launcher alone keeps the config's autocast.
    assert compose_config("hydra/launcher=dreamer_slurm", return_hydra_config=True).optimization.autocast is False


def test_slurm_sweep_submits_one_array_job_with_our_parameters(tmp_path: Path) -> None:
    """Runs the real submission side with fake sbatch/srun executables: checks the sbatch script and the jobs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: no cluster here" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "submitted.sh"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_COPY": str(script)}
    result = subprocess.run(
        [
            sys.executable,
            "dreamer.py",
            "-m",
            "experiment=slurm",
            "env.seed=0,1,2",
            "hydra.launcher.array_parallelism=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "sbatch: no cluster here" in result.stderr

    lines = script.read_text().splitlines()
    sbatch = [line.removeprefix("#SBATCH ").partition("=") for line in lines if line.startswith("#SBATCH --")]
    flags = {key: value for key, _, value in sbatch}
    assert flags["--partition"] == "gpu" and flags["--gpus-per-node"] == "1"
    assert (flags["--cpus-per-task"], flags["--mem"], flags["--time"]) == ("8", "32GB", "1440")
    assert (flags["--nodes"], flags["--ntasks-per-node"]) == ("1", "1")
    assert flags["--array"] == "0-2%2"  # three runs, at most two at once
    assert flags["--signal"] == "USR2@120"
    assert flags["--output"].startswith(f"{sweep_dir}/.submitit/")

    jobs = sorted(pickle.loads(path.read_bytes()).args[:3] for path in (sweep_dir / ".submitit").glob("*.pkl"))
    assert [(overrides, number) for overrides, _, number in jobs] == [
        (["experiment=slurm", f"env.seed={seed}", "resume=auto"], seed) for seed in range(3)
    ]
