"""One-command GPU check: update speed at paper size, then a paper-configuration learning run; JSON and tables.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu/                 # both parts, each under 8 minutes
    python benchmarks/gpu_check.py --out benchmarks/results/gpu/ --part speed    # speed only
    python benchmarks/gpu_check.py --out benchmarks/results/gpu/ --part learn    # learning run only
    python benchmarks/gpu_check.py --out benchmarks/results/gpu/ --part learn --resume --learn-budget-s 420
                                                                  # continue the learning run towards 100k frames
    python benchmarks/gpu_check.py --out /tmp/gpu_check --tiny    # CPU, debug sizes, under a minute (CI)

``--part speed`` (``speed.json``, ``speed.md``) reuses ``benchmarks/throughput.py``: full-update time and updates/s
of ours, TorchRL's components and plain PyTorch at 50 x 50, in the variants ``eager``, ``bf16``, ``fp16``
(autocast), ``compile_step`` (``torch.compile`` of each implementation's whole update step) and
``compile_step+bf16``, with the peak GPU memory of one update, and replay sampling exposed to the training loop
with and without prefetching. Variants run in that order and those not started within ``--speed-budget-s`` are
reported as skipped (compiling the unrolled 50-step RSSM and 15-step imagination takes minutes).

What ``compile_step`` compiles: ``DreamerUpdate.step`` is split by ``torch.compile`` into several graphs, at each
``torch.autograd.grad`` (it consumes the graph of tensors the compiled frame still holds) and at each Adam step
(``torch.optim`` inserts a graph break); float16's ``GradScaler`` cannot be traced and splits it further. The losses
and the optimiser steps themselves are compiled.

``--part learn`` (``learn.json``, ``learn.md``, the run in ``learn_run/``) trains ``python dreamer.py`` on DMC
cartpole-balance in the paper's configuration (model, 50 x 50 batches, 100 updates per 1000 frames after 5000
random frames, evaluation every 10k frames) towards 100k frames; the authors' five seeds scored 419-529 there. A run
still going after ``--learn-budget-s`` seconds is stopped (SIGTERM: it saves its checkpoint) and the output says so;
``--resume`` continues it in a later call; a ``learn_run/`` left by an earlier call is kept unless ``--resume`` or
``--restart`` (which deletes it) says what to do with it. The JSON holds the evaluation returns, frames/s and updates/s.

CUDA-only measures (peak memory, synchronisation) are guarded, so ``--tiny`` exercises everything else on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project runs from its checkout
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks import throughput  # noqa: E402

SPEED_VARIANTS = ("eager", "bf16", "fp16", "compile_step", "compile_step+bf16")
TINY_SPEED_VARIANTS = ("eager", "channels_last")  # compiling, even traced only, takes minutes on a CPU
PART_BUDGET_S = 420.0  # each part stays under 8 minutes with start-up and the last variant's tail
STOP_GRACE_S = 120.0  # a stopped run's time to save its checkpoint
TARGET_FRAMES = 100_000
AUTHORS_RETURNS_100K = (419, 529)  # DMC cartpole-balance at 100k frames, the authors' five seeds (min, max)
LEARN_OVERRIDES = (
    "env.name=cartpole",
    "env.task=balance",
    f"collector.total_frames={TARGET_FRAMES}",
    "logger.backend=csv",
    "logger.eval_every=10000",
    "logger.eval_episodes=5",
)
TINY_LEARN_OVERRIDES = ("experiment=debug", "device=cpu", "num_threads=1", "logger.eval_episodes=1")


@dataclasses.dataclass
class Options:
    """What to check (from the command line)."""

    out: Path
    parts: tuple[str, ...]
    tiny: bool
    device: torch.device
    speed_budget_s: float
    learn_budget_s: float
    resume: bool
    restart: bool
    seed: int


def speed_settings(options: Options) -> throughput.Settings:
    """``throughput.Settings`` for the speed part: paper size on the GPU, debug sizes with ``--tiny``."""
    device = options.device
    if options.tiny:
        variants = list(TINY_SPEED_VARIANTS)
        sizes = dict(batch_size=2, batch_length=3, repeats=1, warmup=0, replay_frames=600, policy_steps=2)
        overrides, backend = ["experiment=debug"], "eager"
    else:
        variants = [v for v in SPEED_VARIANTS if not throughput.variant_problem([v], device)]
        sizes = dict(batch_size=50, batch_length=50, repeats=10, warmup=3, replay_frames=20_000, policy_steps=100)
        overrides, backend = [], "inductor"
    return throughput.Settings(
        device=device, variants=variants, quick=options.tiny, overrides=overrides, compile_backend=backend, **sizes
    )


def run_speed(options: Options) -> dict[str, Any]:
    """The speed part: throughput records of every variant started within the budget; writes speed.json/.md."""
    settings = speed_settings(options)
    start = time.perf_counter()
    records = throughput.run(settings, deadline=start + options.speed_budget_s)
    skipped = sorted({r["variant"] for r in records if r.get("error") == throughput.SKIPPED})
    result = {
        "part": "speed",
        "tiny": options.tiny,
        "device": str(settings.device),
        "batch": [settings.batch_size, settings.batch_length],
        "variants": settings.variants,
        "skipped_variants": skipped,
        "budget_s": options.speed_budget_s,
        "elapsed_s": time.perf_counter() - start,
        "records": records,
    }
    lines = [throughput.format_table(records)]
    ours = next(r for r in records if r["impl"] == "ours" and "replay_sample_s" in r)
    lines += throughput.replay_lines(ours, settings) + throughput.summary_lines(records, settings)
    if skipped:
        lines.append(f"not measured within the {options.speed_budget_s:.0f} s budget: {', '.join(skipped)}")
    write_outputs(options.out, "speed", result, lines)
    return result


def learn_command(options: Options, run_dir: Path) -> list[str]:
    """``dreamer.py`` in the paper's configuration on cartpole-balance (a tiny CPU run with ``--tiny``)."""
    if options.resume and (run_dir / "checkpoints" / "last.pt").exists():
        return [sys.executable, "dreamer.py", f"resume={run_dir}"]
    overrides = TINY_LEARN_OVERRIDES if options.tiny else (*LEARN_OVERRIDES, f"device={options.device}")
    return [sys.executable, "dreamer.py", *overrides, f"env.seed={options.seed}", f"hydra.run.dir={run_dir}"]


def train_within_budget(command: list[str], log_path: Path, budget_s: float) -> tuple[bool, float, int]:
    """Runs ``command`` (output to ``log_path``); after ``budget_s`` seconds it is sent SIGTERM, which makes a
    training run save its checkpoint and exit. Returns (stopped by the budget, seconds, exit code)."""
    start = time.perf_counter()
    environment = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            code = process.wait(timeout=budget_s)
            stopped = False
        except subprocess.TimeoutExpired:
            stopped = True
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
    return stopped, time.perf_counter() - start, code


def read_metrics(path: Path) -> list[dict[str, float]]:
    """``metrics.csv`` rows with their non-empty cells as floats."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def summarize_run(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Evaluation returns by frame, the last training return, and the last logged frames/s and updates/s."""
    evaluations = [(int(r["frames"]), r["eval/return"]) for r in rows if "eval/return" in r]
    trained = [r for r in rows if "updates_per_second" in r]
    last = trained[-1] if trained else {}
    return {
        "frames": int(max((r.get("frames", 0) for r in rows), default=0)),
        "updates": int(max((r.get("updates", 0) for r in rows), default=0)),
        "eval_returns": [{"frames": frames, "return": value} for frames, value in evaluations],
        "last_eval_return": evaluations[-1][1] if evaluations else None,
        "last_train_return": last.get("train/return"),
        "frames_per_second": last.get("frames_per_second"),
        "updates_per_second": last.get("updates_per_second"),
    }


def learn_run_dir(out: Path) -> Path:
    """The learning part's run directory under ``out``."""
    return (out / "learn_run").resolve()


def run_learn(options: Options) -> dict[str, Any]:
    """The learning part: trains within the budget, then summarises the run's metrics; writes learn.json/.md."""
    run_dir = learn_run_dir(options.out)
    if options.restart:
        shutil.rmtree(run_dir, ignore_errors=True)  # dreamer.py refuses a directory that holds a run
    options.out.mkdir(parents=True, exist_ok=True)
    command = learn_command(options, run_dir)
    print(f"[gpu_check] learn: {' '.join(command[1:])} (budget {options.learn_budget_s:.0f} s)", flush=True)
    stopped, seconds, code = train_within_budget(command, options.out / "learn.log", options.learn_budget_s)
    summary = summarize_run(read_metrics(run_dir / "metrics.csv"))
    target = 400 if options.tiny else TARGET_FRAMES
    finished = summary["frames"] >= target
    result = {
        "part": "learn",
        "tiny": options.tiny,
        "command": command[1:],
        "exit_code": code,
        "stopped_by_budget": stopped,
        "budget_s": options.learn_budget_s,
        "wall_clock_s": seconds,
        "target_frames": target,
        "reached_target": finished,
        "authors_returns_100k": list(AUTHORS_RETURNS_100K),
        **summary,
    }
    write_outputs(options.out, "learn", result, learn_lines(result))
    return result


def learn_lines(result: dict[str, Any]) -> list[str]:
    """The learning part's outcome in words, saying when the budget stopped it early."""
    rate = throughput._fmt(result["frames_per_second"], 1), throughput._fmt(result["updates_per_second"], 2)
    lines = [
        f"learn: {result['frames']} frames, {result['updates']} updates in {result['wall_clock_s']:.0f} s "
        f"(exit code {result['exit_code']}); {rate[0]} frames/s, {rate[1]} updates/s",
        "| frames | eval return |",
        "|---|---|",
        *(f"| {point['frames']} | {point['return']:.1f} |" for point in result["eval_returns"]),
    ]
    if result["stopped_by_budget"]:
        lines.append(
            f"STOPPED EARLY by the {result['budget_s']:.0f} s wall-clock budget at {result['frames']} of "
            f"{result['target_frames']} frames; continue with --part learn --resume"
        )
    low, high = result["authors_returns_100k"]
    lines.append(f"authors' Dreamer V1 at 100k frames: {low}-{high} (five seeds)")
    return lines


def write_outputs(out: Path, part: str, result: dict[str, Any], lines: list[str]) -> None:
    """``<out>/<part>.json`` and ``<out>/<part>.md`` (the table), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{part}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = "\n".join(lines)
    (out / f"{part}.md").write_text(f"```\n{text}\n```\n" if part == "speed" else text + "\n")
    print(text)
    print(f"[gpu_check] wrote {out / f'{part}.json'} and {out / f'{part}.md'}", flush=True)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--part", choices=("speed", "learn", "all"), default="all")
    parser.add_argument("--tiny", action="store_true", help="CPU, debug sizes, a few updates and frames (CI)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    parser.add_argument("--speed-budget-s", type=float, default=None, help=f"default {PART_BUDGET_S:.0f}")
    parser.add_argument("--learn-budget-s", type=float, default=None, help=f"default {PART_BUDGET_S:.0f}")
    earlier_run = parser.add_mutually_exclusive_group()
    earlier_run.add_argument("--resume", action="store_true", help="continue the learning run in <out>/learn_run")
    earlier_run.add_argument("--restart", action="store_true", help="delete <out>/learn_run and train afresh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; tiny: 1)")
    args = parser.parse_args(argv)
    parts = ("speed", "learn") if args.part == "all" else (args.part,)
    earlier = learn_run_dir(args.out)
    if "learn" in parts and earlier.exists() and not (args.resume or args.restart):
        parser.error(f"{earlier} holds an earlier learning run: continue it with --resume, or delete it with --restart")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; the CPU form is --tiny")
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    budget = 90.0 if args.tiny else PART_BUDGET_S
    return Options(
        out=args.out,
        parts=parts,
        tiny=args.tiny,
        device=device,
        speed_budget_s=args.speed_budget_s or budget,
        learn_budget_s=args.learn_budget_s or budget,
        resume=args.resume,
        restart=args.restart,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    results = {}
    if "speed" in options.parts:
        results["speed"] = run_speed(options)
    if "learn" in options.parts:
        results["learn"] = run_learn(options)
    learn = results.get("learn")
    return 1 if learn is not None and learn["exit_code"] not in (0, -signal.SIGTERM) else 0


if __name__ == "__main__":
    sys.exit(main())
