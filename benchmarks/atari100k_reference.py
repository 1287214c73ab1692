"""The authors' DreamerV3 Atari-100k scores as a reference CSV for ``utils.results`` and ``benchmarks/learning.py``.

    git -C <dreamerv3 checkout> show HEAD:scores/atari100k-dreamerv3.json.gz > /tmp/atari100k-dreamerv3.json.gz
    python benchmarks/atari100k_reference.py /tmp/atari100k-dreamerv3.json.gz

The score file (``.json`` or ``.json.gz``) is a list of runs ``{task: atari_<game>, method, seed, xs, ys}``: ``xs``
the environment frames at which a training episode ended (action repeat 4, so 400k frames = 100k agent steps), ``ys``
its return. Each seed's value at F frames is the mean of its episode returns in the window (F - 40k, F], or its last
return before the window when no episode ended in it (noted on stderr); the CSV gives the mean, lowest and highest
seed per game (``benchmarks/reference/README.md`` says why 40k). Games are named by our ``env.name`` (the ALE id:
``atari_ms_pacman`` -> ``ms_pacman``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project runs from its checkout
    sys.path.insert(0, str(ROOT))

from utils.results import frames_label  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "reference" / "dreamer_v3_atari100k_scores.csv"
FRAMES = (100_000, 200_000, 400_000)
WINDOW = 40_000
METHOD = "dreamerv3"
TASK_PREFIX = "atari_"
OBSERVATION = "vision"


class ReferenceError(Exception):
    """Bad score file or window; the message is one line."""


def read_scores(path: Path) -> list[dict]:
    """The runs of a score file (gzip-compressed when its name ends in ``.gz``)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        runs = json.loads(raw)
    except (OSError, EOFError, gzip.BadGzipFile, json.JSONDecodeError) as error:
        raise ReferenceError(f"cannot read score file {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ReferenceError(f"score file {path} must hold a list of runs, got {type(runs).__name__}")
    return runs


def game_name(task: str) -> str:
    """``atari_ms_pacman`` -> ``ms_pacman`` (our ``env.name``)."""
    if not task.startswith(TASK_PREFIX):
        raise ReferenceError(f"task {task!r} is not an Atari task ({TASK_PREFIX}<game>)")
    return task[len(TASK_PREFIX) :]


def window_mean(xs: Sequence[float], ys: Sequence[float], frames: int, window: int = WINDOW) -> float | None:
    """Mean of the returns ``ys`` of the episodes that ended in ``(frames - window, frames]``; ``None`` if none did."""
    ends, returns = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    inside = (ends > frames - window) & (ends <= frames)
    return float(returns[inside].mean()) if inside.any() else None


def runs_by_game(runs: list[dict], method: str = METHOD) -> dict[str, list[dict]]:
    """Game -> its runs of ``method`` sorted by seed; refuses a file without them or with a seed twice."""
    games: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("method") == method:
            games.setdefault(game_name(str(run["task"])), []).append(run)
    if not games:
        methods = sorted({str(run.get("method")) for run in runs})
        raise ReferenceError(f"no runs of method {method!r} in the score file (methods: {', '.join(methods)})")
    for game, game_runs in games.items():
        seeds = [run["seed"] for run in game_runs]
        if len(set(seeds)) != len(seeds):
            raise ReferenceError(f"{game}: a seed appears twice in {sorted(seeds)}")
    return {game: sorted(game_runs, key=lambda run: run["seed"]) for game, game_runs in sorted(games.items())}


def last_return(xs: Sequence[float], ys: Sequence[float], frames: int) -> float | None:
    """The return of the last episode that ended at or before ``frames``; ``None`` if none did."""
    ended = [y for x, y in zip(xs, ys, strict=True) if x <= frames]
    return float(ended[-1]) if ended else None


def seed_values(
    game: str, runs: list[dict], frames: int, window: int = WINDOW, notes: list[str] | None = None
) -> list[float]:
    """Each run's window mean at ``frames``. A run with no episode ending in the window (one episode can last 100k
    frames) gets its last return before it instead, with a line in ``notes``; a run with none before is refused."""
    values = []
    for run in runs:
        value = window_mean(run["xs"], run["ys"], frames, window)
        if value is None:
            value = last_return(run["xs"], run["ys"], frames)
            if value is None:
                raise ReferenceError(f"{game} seed {run['seed']}: no episode ended by {frames} frames")
            if notes is not None:
                notes.append(
                    f"{game} seed {run['seed']} at {frames_label(frames)}: no episode ended in the window; "
                    f"its last return before it, {value:g}"
                )
        values.append(value)
    return values


def reference_rows(
    runs: list[dict], frames: Sequence[int] = FRAMES, window: int = WINDOW, notes: list[str] | None = None
) -> list[dict]:
    """One row per game: ``task``, ``observation``, ``seeds``, then ``return_at_<N>k``, ``min_<N>k``, ``max_<N>k``
    per frame count (the mean, lowest and highest seed value, rounded to 0.1); fallbacks go to ``notes``."""
    rows = []
    for game, game_runs in runs_by_game(runs).items():
        row: dict[str, object] = {"task": game, "observation": OBSERVATION, "seeds": len(game_runs)}
        for count in frames:
            values = seed_values(game, game_runs, count, window, notes)
            label = frames_label(count).lower()
            row[f"return_at_{label}"] = round(float(np.mean(values)), 1)
            row[f"min_{label}"] = round(min(values), 1)
            row[f"max_{label}"] = round(max(values), 1)
        rows.append(row)
    return rows


def format_value(value: object) -> str:
    """A CSV cell: floats with one decimal at most (1.0 -> ``1``, -20.4 -> ``-20.4``, -0.0 -> ``0``)."""
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV, in their column order (:func:`format_value`)."""
    columns = list(rows[0])
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(format_value(row[column]) for column in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="the authors' atari100k-dreamerv3.json(.gz)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to write (default: {DEFAULT_OUT})")
    parser.add_argument("--window", type=int, default=WINDOW, help="frames averaged up to each point")
    args = parser.parse_args(argv)
    try:
        if args.window <= 0:
            raise ReferenceError(f"--window must be positive, got {args.window}")
        notes: list[str] = []
        rows = reference_rows(read_scores(args.scores), FRAMES, args.window, notes)
    except ReferenceError as error:
        print(f"atari100k_reference: error: {error}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    for line in notes:
        print(f"atari100k_reference: note: {line}", file=sys.stderr)
    print(f"wrote {len(rows)} games to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
