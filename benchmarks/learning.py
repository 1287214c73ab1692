"""Learning checks: train several seeds of a preset, then write the learning curve (CSV, PNG) and a verdict (JSON).

    python benchmarks/learning.py pendulum --seeds 0 1 2 --jobs 2
    python benchmarks/learning.py dmc_cpu --seeds 0 --out benchmarks/results/learning_dmc_cpu
    python benchmarks/learning.py pendulum --seeds 0 --target -1000 --set collector.total_frames=18000   # short form
    python benchmarks/learning.py dmc_cpu --seeds 0 1 --pack                # archive checkpoints + replay for git
    python benchmarks/learning.py dmc_cpu --seeds 0 1 2 --jobs 2 --resume   # continue (unpacking archives) or start
    python benchmarks/learning.py dmc_cpu --seeds 0 1 --report              # curve + verdict of a partial check
    python benchmarks/learning.py atari_v3 --set env.name=pong               # DreamerV3 Atari 100k (days on a CPU)

Each seed runs ``python dreamer.py experiment=<preset> env.seed=<seed>`` in ``<out>/seed<seed>`` (threads split
evenly between the parallel jobs). The curve is the evaluation return (deterministic policy) against environment
frames, mean ± std over seeds where all have evaluated (each seed's own line runs to its last evaluation), with the
check's reference lines: the target and random acting for Pendulum, the authors' published returns (Dreamer V1's or
DreamerV3's, as fits the runs) for DMC tasks and Atari games.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.results import Run, collect_runs, default_reference, load_reference, reference_method  # noqa: E402
from utils.saturation import constant_action_phase  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Check:
    """A learning check: the preset it trains, and what its final evaluation return is compared with."""

    preset: str
    description: str
    target: float | None = None
    random_return: float | None = None


CHECKS = {
    "pendulum": Check(
        preset="pendulum",
        description="Pendulum-v1 from states, reduced model: mean eval return >= -400 within 30k frames",
        target=-400.0,
        random_return=-1200.0,
    ),
    "pendulum_v3": Check(
        preset="pendulum_v3",
        description="DreamerV3, Pendulum-v1 from states, 1m model: mean eval return >= -200 within 30k frames",
        target=-200.0,
        random_return=-1200.0,
    ),
    "dmc_v3_proprio": Check(
        preset="dreamer_v3_dmc_proprio",
        description="DreamerV3 from DMC proprioceptive states (pick the task with --set env.name=... env.task=...), "
        "against the authors' DreamerV3 returns",
    ),
    "atari_v3": Check(
        preset="atari100k_v3",
        description="DreamerV3 Atari 100k, 12m model, 400k frames (pick the game with --set env.name=pong), against "
        "the authors' DreamerV3 Atari-100k returns",
    ),
    "dmc_cpu": Check(
        preset="dmc_cpu",
        description="DMC cartpole-balance from pixels, reduced model, 100k frames, against the authors' returns",
    ),
}


def run_seed(check: Check, seed: int, out: Path, overrides: list[str], threads: int, resume: bool) -> float:
    """Trains one seed (continues it from its last checkpoint with ``resume``); returns its wall-clock minutes in
    this call. Raises if the run fails."""
    run_dir = out / f"seed{seed}"
    if resume and (run_dir / "checkpoints" / "last.pt").exists():
        start_or_resume = [f"resume={run_dir}"]
    else:
        start_or_resume = [f"experiment={check.preset}", f"env.seed={seed}", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "dreamer.py", *start_or_resume, f"num_threads={threads}", *overrides]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    start = time.perf_counter()
    with open(out / f"seed{seed}.log", "a" if resume else "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment, check=True)
    return (time.perf_counter() - start) / 60


def resume_archive(out: Path, seed: int) -> Path:
    return out / f"seed{seed}.resume.tar.xz"


def pack_seed(out: Path, seed: int) -> Path:
    """Packs what a seed needs to continue (``checkpoints/last.pt`` and ``replay/``) into ``seed<N>.resume.tar.xz``.

    A session's run directories are not kept (git ignores checkpoints and replay), so a check that takes longer
    than a session commits this archive and the next session's ``--resume`` unpacks it. The memory-mapped replay is
    a sparse file of the buffer's full capacity: ``tar --sparse`` stores only its filled part, and pixels of
    DMC tasks compress well with xz (cartpole: about 1 KB per stored step; the checkpoint itself barely shrinks).
    """
    archive = resume_archive(out, seed)
    members = [f"seed{seed}/checkpoints/last.pt", f"seed{seed}/replay"]
    partial = archive.with_suffix(".partial")
    subprocess.run(["tar", "--sparse", "-C", str(out), "-cJf", str(partial), *members], check=True)
    partial.replace(archive)
    return archive


def unpack_seed(out: Path, seed: int) -> bool:
    """Restores a seed's checkpoint and replay from its archive when the run directory lacks them; True if done."""
    archive = resume_archive(out, seed)
    if (out / f"seed{seed}" / "checkpoints" / "last.pt").exists() or not archive.exists():
        return False
    subprocess.run(["tar", "--sparse", "-C", str(out), "-xJf", str(archive)], check=True)
    return True


def default_out_name(check: str, overrides: list[str]) -> str:
    """``learning_<check>``, with ``_<name>`` and ``_<task>`` appended when ``overrides`` set ``env.name`` or
    ``env.task``: the checks that take their task from ``--set`` (Atari games, DMC tasks) get one directory per
    task, so a second task's seeds never meet the first's (``learning_atari_v3_pong``,
    ``learning_dmc_v3_proprio_walker_walk``).
    """
    picked = dict(item.split("=", 1) for item in overrides if item.startswith(("env.name=", "env.task=")))
    suffix = "".join(f"_{picked[key]}" for key in ("env.name", "env.task") if key in picked)
    return f"learning_{check}{suffix}"


def train_seeds(
    check: Check, args: argparse.Namespace, out: Path, threads: int, refuse: Callable[[str], NoReturn]
) -> list[float]:
    """Trains (``args.resume``: continues) ``args.seeds``, ``args.jobs`` at a time; returns minutes per seed.

    Without ``--resume`` a seed whose directory holds an earlier run is refused (``refuse`` gets the message)
    unless ``--restart`` asks to delete it.
    """
    if args.resume:
        for seed in args.seeds:
            if unpack_seed(out, seed):
                print(f"unpacked {resume_archive(out, seed)}")
    else:
        used = [seed for seed in args.seeds if (out / f"seed{seed}").exists()]
        if used and not args.restart:
            refuse(
                f"{out} already holds seed {', '.join(map(str, used))}: continue with --resume, or replace "
                "with --restart (deletes those seeds' runs), or pick another --out"
            )
        for seed in used:  # dreamer.py refuses a run directory that holds another run
            shutil.rmtree(out / f"seed{seed}")
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda s: run_seed(check, s, out, args.overrides, threads, args.resume), args.seeds))


def curve_table(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation frames ``[K]`` common to all runs and the returns ``[seeds, K]`` there."""
    common = sorted(set.intersection(*(set(run.eval_frames.tolist()) for run in runs)))
    returns = np.array([[run.eval_returns[run.eval_frames.tolist().index(f)] for f in common] for run in runs])
    return np.array(common), returns


def write_curve(path: Path, frames: np.ndarray, returns: np.ndarray, seeds: list[int]) -> None:
    header = "frames,mean,std," + ",".join(f"seed{seed}" for seed in seeds)
    std = returns.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(frames))
    rows = np.column_stack([frames, returns.mean(axis=0), std, returns.T])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.6g")


def reference_points(paper: dict[int, float], last_frame: int) -> list[tuple[int, float]]:
    """The authors' ``(frames, return)`` points up to ``last_frame``, or their first one if none is that early.

    Points far beyond the run (500k and 1M frames for a 100k-frame check) would squash its curve.
    """
    horizon = max(last_frame, min(paper, default=0))
    return [(frames, value) for frames, value in sorted(paper.items()) if frames <= horizon]


def plot_curve(
    path: Path,
    title: str,
    frames: np.ndarray,
    returns: np.ndarray,
    check: Check,
    paper: dict[int, float],
    paper_label: str = "Dreamer V1",
    seed_curves: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> None:
    """Mean ± std of ``returns [seeds, K]`` at ``frames [K]``; thin lines: each seed, to its own last evaluation
    (``seed_curves``: frames [K_i] and returns [K_i] per seed; default: the rows of ``returns``)."""
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    for seed_frames, seed_returns in seed_curves or [(frames, run_returns) for run_returns in returns]:
        axes.plot(seed_frames, seed_returns, color="tab:blue", alpha=0.3, linewidth=0.8)
    mean = returns.mean(axis=0)
    seeds = f"{len(returns)} seed{'s' if len(returns) > 1 else ''}"
    axes.plot(frames, mean, color="tab:blue", linewidth=2, label=f"mean over {seeds}")
    if len(returns) > 1:
        std = returns.std(axis=0, ddof=1)
        axes.fill_between(frames, mean - std, mean + std, color="tab:blue", alpha=0.2)
    if check.target is not None:
        axes.axhline(check.target, color="tab:green", linestyle="--", label=f"target {check.target:g}")
    if check.random_return is not None:
        axes.axhline(check.random_return, color="tab:gray", linestyle=":", label=f"random ≈ {check.random_return:g}")
    last_frame = max(int(seed_frames[-1]) for seed_frames, _ in seed_curves or [(frames, None)])
    points = reference_points(paper, last_frame)
    if points:
        axes.plot(*zip(*points, strict=True), "D", color="tab:red", label=f"{paper_label} (authors)")
    axes.set(xlabel="environment frames", ylabel="eval return")
    axes.set_title(textwrap.fill(title, 80), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def constant_action_phases(runs: list[Run]) -> dict[str, dict] | None:
    """Per seed, when the actor entered and left its constant-action phase and the diagnostics at the exit
    (:mod:`utils.saturation`); ``None`` for runs that do not log the saturation (DreamerV3)."""
    phases = {run.seed: constant_action_phase(pd.read_csv(run.path / "metrics.csv")) for run in runs}
    if any(phase is None for phase in phases.values()):
        return None
    return {str(seed): dataclasses.asdict(phase) for seed, phase in phases.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: benchmarks/results/learning_<check>, plus _<name>[_<task>] when --set picks env.name/env.task",
    )
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--target", type=float, default=None, help="pass mark for the final return (a short form's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per seed (default: cores / jobs)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each seed from its last checkpoint, unpacking seed<N>.resume.tar.xz where the run directory "
        "has none (start seeds that have neither)",
    )
    parser.add_argument(
        "--restart", action="store_true", help="delete the seeds' earlier runs in --out and train them afresh"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: write the curve and verdict from the seeds' metrics as they are (partial until all end)",
    )
    parser.add_argument(
        "--pack", action="store_true", help="only pack each seed's checkpoint and replay into seed<N>.resume.tar.xz"
    )
    args = parser.parse_args(argv)
    check = CHECKS[args.check]
    if args.target is not None:
        check = dataclasses.replace(check, target=args.target)
    out = (args.out or ROOT / "benchmarks" / "results" / default_out_name(args.check, args.overrides)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.pack:
        for seed in args.seeds:
            print(f"packed {pack_seed(out, seed)}")
        return 0
    minutes = [] if args.report else train_seeds(check, args, out, threads, refuse=parser.error)

    (task, runs), *_ = collect_runs([out]).items()
    # Only the seeds trained now: ``out`` may hold other seeds' directories from earlier runs.
    runs = sorted((run for run in runs if run.seed in args.seeds), key=lambda run: run.seed)
    frames, returns = curve_table(runs)
    key = runs[0].reference_key
    reference, observation = default_reference({task: runs})  # the authors' V1 or V3 scores, as fits the runs
    found = key is not None and reference is not None and reference.exists()
    paper = load_reference(reference, observation).get(key, {}) if found else {}
    write_curve(out / "curve.csv", frames, returns, args.seeds)
    title = f"{task}: {check.description}"
    seed_curves = [(run.eval_frames, run.eval_returns) for run in runs]
    plot_curve(out / "curve.png", title, frames, returns, check, paper, reference_method({task: runs}), seed_curves)
    final = returns[:, -1]
    verdict = {
        "check": args.check,
        "description": check.description,
        "task": task,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "final_frames": int(frames[-1]),
        "final_return_per_seed": final.tolist(),
        "final_return_mean": float(final.mean()),
        "last_eval_frames_per_seed": [int(run.eval_frames[-1]) for run in runs],
        # A report on seeds that all ran their whole length (over several sessions, say) is a finished check.
        "partial": any(run.last_frame < int(run.config["collector.total_frames"]) for run in runs),
        "target": check.target,
        "passed": None if check.target is None else bool(final.mean() >= check.target),
        "minutes_per_seed": minutes,
        "jobs": args.jobs,
        "threads_per_job": threads,
        "paper": {str(f): v for f, v in paper.items()},
        "constant_action_phase": constant_action_phases(runs),
    }
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    timing = f"{', '.join(f'{m:.1f}' for m in minutes)} min per seed" if minutes else "a report: nothing trained"
    print(
        f"{task}: final eval return {final.mean():.1f} ± {final.std():.1f} at {frames[-1]} frames "
        f"({timing}); curve: {out / 'curve.png'}"
    )
    for seed, phase in (verdict["constant_action_phase"] or {}).items():
        print(f"seed {seed}: constant-action phase entered at {phase['entered']}, left at {phase['left']} frames")
    return 0 if verdict["passed"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
