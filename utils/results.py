"""Reproduction table and learning curves of a sweep: ``python -m utils.results <sweep dir> [...]``.

Finds every run directory under the given directories (one holding a Dreamer ``config.yaml``; hidden directories
such as ``.hydra`` and ``.submitit`` are skipped), reads its ``metrics.csv``, groups the runs by task
(``env.name``-``env.task``) and writes to ``--out`` (default ``<first dir>/results``):

- ``results.csv``: one row per task and frame count: mean, std, number of runs and their seeds, the paper's value;
- ``results.md``: the same as a markdown table (also printed to stdout), with the plots linked below it;
- ``curve_<task>.png``: eval return against environment frames, mean ± std over the runs, every run thin, and the
  paper's values as points.

The paper's values: the authors' Dreamer V1 scores (DMC), or their DreamerV3 scores for DreamerV3 runs (DMC from states
or pixels; Atari 100k: ``benchmarks/reference/dreamer_v3_atari100k_scores.csv``). The authors published no Dreamer V1
Atari scores. Tables of Atari runs default to 100k, 200k and 400k frames (the Atari-100k budget).

Definitions:

- Evaluation rows of ``metrics.csv`` are the rows with ``eval/return`` and no ``agent_steps`` (training rows repeat
  the latest evaluation return). When a resumed run logged the same frame count twice, the later row counts.
- The value of a run at F frames is the return of its last evaluation at or before F (no interpolation). A run whose
  last logged frame count is below F, or whose first evaluation comes after F, has no value at F.
- Mean and sample standard deviation (ddof = 1) over the runs that have a value; no std for a single run.

Runs of one task must have the same config apart from the keys in ``IGNORED_KEYS`` (seed, output and logging
settings, run length); otherwise the command stops, naming the differing keys, unless ``--allow-mismatch``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.config import flatten

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
DEFAULT_REFERENCE = REFERENCE_DIR / "dreamer_v1_dmc_scores.csv"
# DreamerV3 runs are compared with the authors' DreamerV3 scores, from states (proprio) or pixels (vision).
DEFAULT_V3_REFERENCE = REFERENCE_DIR / "dreamer_v3_dmc_scores.csv"
# DreamerV3 Atari runs: the authors' Atari-100k scores, kept in this repository (benchmarks/atari100k_reference.py).
REPOSITORY_REFERENCE_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"
DEFAULT_V3_ATARI_REFERENCE = REPOSITORY_REFERENCE_DIR / "dreamer_v3_atari100k_scores.csv"
DEFAULT_FRAMES = (100_000, 500_000, 1_000_000)
ATARI_FRAMES = (100_000, 200_000, 400_000)
EVAL_RETURN = "eval/return"
# Config keys (and sections) that may differ between the runs of one task: the seed, where outputs go and how they
# are logged, how long a run lasts, mode=eval settings, and switches that do not change what is computed.
IGNORED_KEYS = (
    "env.seed",
    "mode",
    "device",
    "resume",
    "checkpoint",
    "checkpoint_every",
    "collector.total_frames",
    "replay_buffer.storage",
    "optimization.compile",
    "optimization.compile_backend",
    "logger.backend",
    "logger.mode",
    "logger.project",
    "logger.group",
    "logger.log_every",
    "logger.video",
    "logger.video_fps",
    "eval",
)
# dm_control domains that the reference file names differently.
REFERENCE_DOMAINS = {"ball_in_cup": "cup"}
REFERENCE_COLUMN = re.compile(r"return_at_(\d+)([km]?)(?:_frames)?")


class ResultsError(Exception):
    """Bad input; the message is one line."""


@dataclass(frozen=True)
class Run:
    """One training run. ``eval_frames`` [K] (increasing) and ``eval_returns`` [K] are its evaluations."""

    path: Path
    task: str
    reference_key: str | None
    seed: int
    config: dict[str, object]
    eval_frames: np.ndarray
    eval_returns: np.ndarray
    last_frame: int

    def value_at(self, frames: int) -> float | None:
        return value_at(self.eval_frames, self.eval_returns, self.last_frame, frames)


def value_at(eval_frames: np.ndarray, eval_returns: np.ndarray, last_frame: int, frames: int) -> float | None:
    """The return of the last evaluation at or before ``frames``; ``None`` if the run stopped before ``frames``."""
    if last_frame < frames:
        return None
    index = int(np.searchsorted(eval_frames, frames, side="right")) - 1
    return None if index < 0 else float(eval_returns[index])


def eval_points(metrics: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Frames [K] (increasing, int) and returns [K] of the evaluation rows of a ``metrics.csv`` table."""
    if EVAL_RETURN not in metrics:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    is_eval = metrics[EVAL_RETURN].notna()
    if "agent_steps" in metrics:
        is_eval &= metrics["agent_steps"].isna()
    evals = metrics.loc[is_eval, ["frames", EVAL_RETURN]].drop_duplicates("frames", keep="last").sort_values("frames")
    return evals["frames"].to_numpy(dtype=np.int64), evals[EVAL_RETURN].to_numpy(dtype=np.float64)


def is_ignored(key: str) -> bool:
    return any(key == ignored or key.startswith(f"{ignored}.") for ignored in IGNORED_KEYS)


def config_differences(configs: Sequence[dict[str, object]]) -> dict[str, list[object]]:
    """Flattened keys outside ``IGNORED_KEYS`` whose values differ between ``configs`` -> their distinct values."""
    differences = {}
    for key in sorted(set().union(*configs)):
        if is_ignored(key):
            continue
        distinct: list[object] = []
        for config in configs:
            value = config.get(key, "<missing>")
            if value not in distinct:
                distinct.append(value)
        if len(distinct) > 1:
            differences[key] = distinct
    return differences


def task_name(env: dict) -> str:
    """``<env.name>-<env.task>`` (the dashboard group), or ``env.name`` alone for environments without tasks."""
    return str(env["name"]) if env.get("task") is None else f"{env['name']}-{env['task']}"


def reference_key(env: dict) -> str | None:
    """The task's name in the reference file: ``walker_walk``, ``cup_catch`` (dm_control), the game (Atari:
    ``boxing``); ``None`` for other environments."""
    if env.get("backend") == "atari":
        return str(env["name"])
    if env.get("backend") != "dm_control":
        return None
    return f"{REFERENCE_DOMAINS.get(env['name'], env['name'])}_{env['task']}"


def frames_label(frames: int) -> str:
    """1000000 -> ``1M``, 100000 -> ``100k``, 400 -> ``400``."""
    if frames >= 1_000_000 and frames % 1_000_000 == 0:
        return f"{frames // 1_000_000}M"
    if frames >= 1000 and frames % 1000 == 0:
        return f"{frames // 1000}k"
    return str(frames)


def read_run_config(path: Path) -> dict | None:
    """The resolved config of a run's ``config.yaml``, or ``None`` if the file is not a Dreamer config."""
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError):
        return None
    plain = OmegaConf.to_container(config, resolve=False) if OmegaConf.is_dict(config) else None
    env = plain.get("env") if isinstance(plain, dict) else None
    if not (isinstance(env, dict) and {"name", "seed"} <= env.keys() and "optimization" in plain):
        return None
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        raise ResultsError(f"cannot resolve {path}: {str(error).splitlines()[0]}") from error


def find_run_configs(root: Path) -> dict[Path, dict]:
    """Run directory -> config, for every run directory under ``root`` (itself included)."""
    if not root.is_dir():
        raise ResultsError(f"{root} is not a directory")
    found = {}
    for directory, subdirectories, files in os.walk(root):
        config = read_run_config(Path(directory) / "config.yaml") if "config.yaml" in files else None
        if config is not None:
            found[Path(directory)] = config
            subdirectories.clear()  # a run directory holds no other runs
        else:
            subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
    return found


def load_run(path: Path, config: dict) -> Run:
    """Reads a run's ``metrics.csv``; refuses a run without one or without any evaluation row."""
    metrics_path = path / "metrics.csv"
    if not metrics_path.is_file():
        raise ResultsError(f"run {path} has no metrics.csv (did it start training?)")
    try:
        metrics = pd.read_csv(metrics_path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ResultsError(f"cannot read {metrics_path}: {str(error).strip().splitlines()[0]}") from error
    if "frames" not in metrics:
        raise ResultsError(f"{metrics_path} has no 'frames' column")
    frames, returns = eval_points(metrics)
    if len(frames) == 0:
        raise ResultsError(f"{metrics_path} has no evaluation rows ({EVAL_RETURN}) yet")
    env = config["env"]
    return Run(
        path=path,
        task=task_name(env),
        reference_key=reference_key(env),
        seed=int(env["seed"]),
        config=flatten(config),
        eval_frames=frames,
        eval_returns=returns,
        last_frame=int(metrics["frames"].max()),
    )


def collect_runs(roots: Sequence[Path]) -> dict[str, list[Run]]:
    """Task -> its runs (sorted by seed, then path), from every run directory under ``roots``."""
    groups: dict[str, list[Run]] = {}
    for root in roots:
        configs = find_run_configs(root)
        if not configs:
            raise ResultsError(f"no runs (directories with a Dreamer config.yaml) under {root}")
        for path, config in configs.items():
            run = load_run(path, config)
            groups.setdefault(run.task, []).append(run)
    return {task: sorted(runs, key=lambda run: (run.seed, str(run.path))) for task, runs in sorted(groups.items())}


def check_configs(groups: dict[str, list[Run]], allow_mismatch: bool) -> list[str]:
    """Refuses tasks whose runs differ in config (one line naming the keys); warnings when they may."""
    warnings = []
    for task, runs in groups.items():
        differences = config_differences([run.config for run in runs])
        if not differences:
            continue
        listed = ", ".join(f"{key} ({' vs '.join(map(str, values))})" for key, values in differences.items())
        if not allow_mismatch:
            raise ResultsError(f"runs of {task} differ in {listed}; pass --allow-mismatch to pool them anyway")
        warnings.append(f"pooling runs of {task} that differ in {listed}")
    return warnings


def _join(values: object) -> str:
    return ", ".join(str(value) for value in values)


def seed_warnings(groups: dict[str, list[Run]]) -> list[str]:
    """Seeds used by more than one run of a task, and seeds that some tasks have and others lack."""
    warnings = []
    seeds = {task: [run.seed for run in runs] for task, runs in groups.items()}
    for task, task_seeds in seeds.items():
        repeated = sorted({seed for seed in task_seeds if task_seeds.count(seed) > 1})
        if repeated:
            warnings.append(f"{task}: seed {_join(repeated)} used by more than one run; they are all averaged")
    every_seed = sorted(set().union(*seeds.values()))
    for task, task_seeds in seeds.items():
        missing = sorted(set(every_seed) - set(task_seeds))
        if missing:
            warnings.append(
                f"missing seeds: {task} has seed {_join(sorted(set(task_seeds)))} but not {_join(missing)} "
                f"(all tasks together: {_join(every_seed)})"
            )
    return warnings


def frame_warnings(groups: dict[str, list[Run]], frames: Sequence[int]) -> list[str]:
    """One line per run that has no value at some of the frame counts."""
    warnings = []
    for runs in groups.values():
        for run in runs:
            missing = [count for count in frames if run.value_at(count) is None]
            if missing:
                warnings.append(
                    f"{run.task} seed {run.seed} ({run.path}) has no value at {_join(map(frames_label, missing))} "
                    f"frames: evaluated from {run.eval_frames[0]} to {run.eval_frames[-1]}, "
                    f"logged up to {run.last_frame} frames"
                )
    return warnings


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of ``values``; NaN where undefined (no values; std of one value)."""
    if not values:
        return float("nan"), float("nan")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std


def summarize(
    groups: dict[str, list[Run]], frames: Sequence[int], reference: dict[str, dict[int, float]]
) -> pd.DataFrame:
    """One row per task and frame count: task, frames, mean, std, runs, seeds, paper (NaN where none)."""
    rows = []
    for task, runs in groups.items():
        paper = reference.get(runs[0].reference_key, {})
        for count in frames:
            reached = [(run.seed, value) for run in runs if (value := run.value_at(count)) is not None]
            mean, std = mean_std([value for _, value in reached])
            rows.append(
                {
                    "task": task,
                    "frames": count,
                    "mean": mean,
                    "std": std,
                    "runs": len(reached),
                    "seeds": " ".join(str(seed) for seed, _ in reached),
                    "paper": paper.get(count, float("nan")),
                }
            )
    return pd.DataFrame(rows, columns=["task", "frames", "mean", "std", "runs", "seeds", "paper"])


def _cell(mean: float, std: float, runs: int, task_runs: int) -> str:
    if runs == 0:
        return "—"
    text = f"{mean:.1f}" if runs == 1 else f"{mean:.1f} ± {std:.1f}"
    return text if runs == task_runs else f"{text} (n={runs})"


def markdown_table(summary: pd.DataFrame, groups: dict[str, list[Run]], paper_frames: set[int]) -> str:
    """Wide table: a row per task, a column per frame count (and the paper's value where the reference has one)."""
    frames = list(dict.fromkeys(summary["frames"]))
    header = ["task", "seeds"]
    for count in frames:
        header.append(f"{frames_label(count)} frames")
        if count in paper_frames:
            header.append(f"paper {frames_label(count)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, rows in summary.groupby("task", sort=False):
        runs = groups[task]
        cells = [task, _join(sorted({run.seed for run in runs}))]
        for row in rows.itertuples():
            cells.append(_cell(row.mean, row.std, row.runs, len(runs)))
            if row.frames in paper_frames:
                cells.append("—" if np.isnan(row.paper) else f"{row.paper:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_reference(path: Path, observation: str | None = None) -> dict[str, dict[int, float]]:
    """Reference task name -> {frames: return} from a CSV with a ``task`` column and ``return_at_<N>[k|m]_frames``.

    A CSV with an ``observation`` column (DreamerV3's: ``proprio``, ``vision``) holds one row per task and
    observation; ``observation`` picks the rows.
    """
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ResultsError(f"cannot read reference {path}: {str(error).strip().splitlines()[0]}") from error
    if "observation" in table:
        kinds = sorted(set(table["observation"]))
        if observation not in kinds:
            raise ResultsError(f"reference {path} needs an observation kind ({', '.join(kinds)}), got {observation!r}")
        table = table[table["observation"] == observation]
    scale = {"": 1, "k": 1000, "m": 1_000_000}
    columns = {}
    for column in table.columns:
        match = REFERENCE_COLUMN.fullmatch(str(column).lower())
        if match:
            columns[column] = int(match.group(1)) * scale[match.group(2)]
    if "task" not in table or not columns:
        raise ResultsError(f"reference {path} needs a 'task' column and return_at_<N>[k|m][_frames] columns")
    return {
        str(row["task"]): {frames: float(row[column]) for column, frames in columns.items() if pd.notna(row[column])}
        for _, row in table.iterrows()
    }


def curve(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames [G] (every run's evaluation frames), mean [G] and std [G] (0 where one run) of the runs' values there."""
    grid = np.unique(np.concatenate([run.eval_frames for run in runs]))
    # [R, G]; every grid point has a value of at least the run that evaluated there.
    values = np.array([[np.nan if (v := run.value_at(int(f))) is None else v for f in grid] for run in runs])
    statistics = np.array([mean_std(column[~np.isnan(column)].tolist()) for column in values.T])  # [G, 2]
    return grid, statistics[:, 0], np.nan_to_num(statistics[:, 1])


def plot_task(
    task: str, runs: Sequence[Run], paper: dict[int, float], path: Path, paper_label: str = "Dreamer V1"
) -> None:
    """Learning curve PNG: every run thin, mean ± std band, the paper's values (``paper_label``: whose) as points
    (those within the runs)."""
    frames, mean, std = curve(runs)
    figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    axes = figure.subplots()
    for index, run in enumerate(runs):
        label = "single runs" if index == 0 else None
        axes.plot(run.eval_frames, run.eval_returns, color="tab:blue", alpha=0.35, linewidth=0.8, label=label)
    axes.plot(frames, mean, color="tab:blue", linewidth=2, label=f"mean ± std over {len(runs)} runs")
    axes.fill_between(frames, mean - std, mean + std, color="tab:blue", alpha=0.2, linewidth=0)
    if paper:
        shown = {count: value for count, value in sorted(paper.items()) if count <= frames[-1]}
        listed = ", ".join(f"{value:g} at {frames_label(count)}" for count, value in sorted(paper.items()))
        axes.plot(list(shown), list(shown.values()), "D--", color="tab:red", label=f"paper ({paper_label}): {listed}")
    axes.set_title(f"{task} (seeds {_join(sorted({run.seed for run in runs}))})")
    axes.set_xlabel("environment frames")
    axes.set_ylabel("eval return")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m utils.results",
        description="Table of eval return per task at given frame counts (mean ± std over seeds) and learning curves.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep directories (or run directories) to search")
    parser.add_argument(
        "--frames",
        nargs="+",
        type=int,
        help=f"frame counts of the table (default: {_join(DEFAULT_FRAMES)}; Atari runs: {_join(ATARI_FRAMES)})",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: <first dir>/results)")
    parser.add_argument(
        "--reference",
        type=Path,
        help=f"reference scores CSV (default: {DEFAULT_REFERENCE}, or {DEFAULT_V3_REFERENCE} for DreamerV3 runs, "
        f"{DEFAULT_V3_ATARI_REFERENCE} for DreamerV3 Atari runs)",
    )
    parser.add_argument("--allow-mismatch", action="store_true", help="pool runs of a task whose configs differ")
    return parser.parse_args(argv)


def is_atari(groups: dict[str, list[Run]]) -> bool:
    """Whether every run plays an Atari game."""
    return all(run.config.get("env.backend") == "atari" for runs in groups.values() for run in runs)


def reference_method(groups: dict[str, list[Run]]) -> str:
    """Whose scores :func:`default_reference` picks: ``DreamerV3`` when every run is DreamerV3, else ``Dreamer V1``."""
    v3 = all(run.config.get("model.name") == "dreamer_v3" for runs in groups.values() for run in runs)
    return "DreamerV3" if v3 else "Dreamer V1"


def default_reference(groups: dict[str, list[Run]]) -> tuple[Path | None, str]:
    """The authors' scores to compare with and the observation kind of the runs (``vision`` from pixels, else
    ``proprio``): DreamerV3's when every run is DreamerV3 (their Atari-100k scores when every run is Atari), else
    Dreamer V1's; ``None`` for Dreamer V1 Atari runs (the authors published no Dreamer V1 Atari scores)."""
    runs = [run for task_runs in groups.values() for run in task_runs]
    v3 = reference_method(groups) == "DreamerV3"
    observation = "vision" if all(run.config.get("env.from_pixels", True) for run in runs) else "proprio"
    if is_atari(groups):
        return (DEFAULT_V3_ATARI_REFERENCE if v3 else None), observation
    return (DEFAULT_V3_REFERENCE if v3 else DEFAULT_REFERENCE), observation


def default_frames(groups: dict[str, list[Run]]) -> tuple[int, ...]:
    """The table's frame counts when ``--frames`` is not given: the Atari-100k budget's for Atari runs."""
    return ATARI_FRAMES if is_atari(groups) else DEFAULT_FRAMES


def pick_reference(
    groups: dict[str, list[Run]], path: Path | None, warnings: list[str]
) -> tuple[dict[str, dict[int, float]], str]:
    """The reference scores (``path``, else :func:`default_reference`'s) and their label for the plots; a line in
    ``warnings`` when there are none."""
    default, observation = default_reference(groups)
    if path is not None:
        return load_reference(path, observation), path.stem
    if default is None:
        warnings.append(
            "no paper values: the authors published no Dreamer V1 Atari scores (their score file covers DMC only); "
            "pass --reference to compare with other scores"
        )
        return {}, ""
    if not default.is_file():
        warnings.append(f"no reference scores at {default} (pass --reference): no paper values")
        return {}, ""
    return load_reference(default, observation), reference_method(groups)


def report(args: argparse.Namespace) -> tuple[str, list[str], Path]:
    """Writes the table, CSV and plots; returns the markdown table, the warnings and the output directory."""
    if args.frames is not None and min(args.frames) <= 0:
        raise ResultsError(f"--frames must be positive, got {_join(args.frames)}")
    groups = collect_runs(args.dirs)
    frames = sorted(set(args.frames or default_frames(groups)))
    warnings = check_configs(groups, args.allow_mismatch)
    warnings += seed_warnings(groups) + frame_warnings(groups, frames)
    reference, label = pick_reference(groups, args.reference, warnings)
    paper_frames = {count for values in reference.values() for count in values}

    out = args.out if args.out is not None else args.dirs[0] / "results"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(groups, frames, reference)
    summary.to_csv(out / "results.csv", index=False)
    table = markdown_table(summary, groups, paper_frames)
    plots = []
    for task, runs in groups.items():
        plots.append(f"curve_{task.replace('/', '_')}.png")
        plot_task(task, runs, reference.get(runs[0].reference_key, {}), out / plots[-1], label)
    (out / "results.md").write_text(table + "\n" + "".join(f"![{name}]({name})\n" for name in plots))
    return table, warnings, out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table, warnings, out = report(args)
    except ResultsError as error:
        print(f"results: error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    for line in warnings:
        print(f"results: warning: {line}", file=sys.stderr)
    print(f"results: wrote results.csv, results.md and curve_<task>.png to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
