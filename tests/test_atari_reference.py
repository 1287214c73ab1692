"""The authors' DreamerV3 Atari-100k reference (``benchmarks/atari100k_reference.py``): windowed means on a small
synthetic score list against a hand computation, the fallback and errors, and the committed CSV."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.atari100k_reference import (
    ReferenceError,
    main,
    reference_rows,
    seed_values,
    window_mean,
)
from utils.results import DEFAULT_V3_ATARI_REFERENCE, load_reference

# Two Pong seeds (listed out of order) and a run of another method, which is ignored.
SCORES = [
    {
        "task": "atari_pong",
        "method": "dreamerv3",
        "seed": 1,
        "xs": [30_000, 60_000, 70_000, 90_000, 100_000, 150_000],
        "ys": [-21, -100, -19, -15, -12, -5],
    },
    {
        "task": "atari_pong",
        "method": "dreamerv3",
        "seed": 0,
        "xs": [55_000, 60_001, 99_999, 130_000],
        "ys": [-20, -18, -16, -8],
    },
    {"task": "atari_pong", "method": "ppo", "seed": 0, "xs": [100_000], "ys": [21]},
]
SHARED_DMC_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dreamer_v3_dmc_scores.csv"


def test_the_window_mean_takes_episodes_ending_after_its_start_up_to_its_end() -> None:
    # Seed 1 at 100k: the episodes ending in (60k, 100k] are those at 70k, 90k and 100k; the one at exactly 60k is out.
    assert window_mean(SCORES[0]["xs"], SCORES[0]["ys"], 100_000, 40_000) == pytest.approx((-19 - 15 - 12) / 3)
    # Seed 0: 60_001 and 99_999 are in, 55_000 is out.
    assert window_mean(SCORES[1]["xs"], SCORES[1]["ys"], 100_000, 40_000) == pytest.approx((-18 - 16) / 2)
    assert window_mean(SCORES[1]["xs"], SCORES[1]["ys"], 50_000, 40_000) is None


def test_rows_give_the_mean_lowest_and_highest_seed_per_frame_count() -> None:
    (row,) = reference_rows(SCORES, frames=(100_000, 150_000), window=40_000)
    # By hand: at 100k the seeds have -46/3 = -15.33 and -17, mean -16.17; at 150k (window (110k, 150k]) -5 and -8.
    assert row == {
        "task": "pong",
        "observation": "vision",
        "seeds": 2,
        "return_at_100k": -16.2,
        "min_100k": -17.0,
        "max_100k": -15.3,
        "return_at_150k": -6.5,
        "min_150k": -8.0,
        "max_150k": -5.0,
    }


def test_a_seed_without_an_episode_in_the_window_keeps_its_last_return_and_is_noted() -> None:
    notes: list[str] = []
    runs = sorted(SCORES[:2], key=lambda run: run["seed"])
    # Nothing ends in (160k, 200k]: seed 0's last return is -8 (at 130k), seed 1's -5 (at 150k).
    assert seed_values("pong", runs, 200_000, 40_000, notes) == [-8.0, -5.0]
    assert notes == [
        "pong seed 0 at 200k: no episode ended in the window; its last return before it, -8",
        "pong seed 1 at 200k: no episode ended in the window; its last return before it, -5",
    ]
    with pytest.raises(ReferenceError, match="pong seed 0: no episode ended by 50000 frames"):
        seed_values("pong", runs, 50_000, 40_000)


def test_bad_score_files_are_one_line_errors() -> None:
    with pytest.raises(ReferenceError, match=r"no runs of method 'dreamerv3' .*\(methods: ppo\)"):
        reference_rows(SCORES[2:])
    with pytest.raises(ReferenceError, match="'dmc_walker_walk' is not an Atari task"):
        reference_rows([{**SCORES[0], "task": "dmc_walker_walk"}])
    with pytest.raises(ReferenceError, match=r"pong: a seed appears twice in \[1, 1\]"):
        reference_rows([SCORES[0], SCORES[0]])


def test_the_command_reads_a_gzip_file_and_writes_a_csv_the_results_table_reads(tmp_path: Path, capsys) -> None:
    scores, out = tmp_path / "scores.json.gz", tmp_path / "reference.csv"
    scores.write_bytes(gzip.compress(json.dumps(SCORES).encode()))
    assert main([str(scores), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[1].startswith("pong,vision,2,-16.2,-17,-15.3,")
    assert "pong seed 0 at 400k: no episode ended in the window" in capsys.readouterr().err
    assert load_reference(out, "vision")["pong"][100_000] == -16.2
    assert main([str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "cannot read score file" in capsys.readouterr().err


def test_the_committed_csv_has_the_26_games_in_the_dmc_files_layout() -> None:
    table = pd.read_csv(DEFAULT_V3_ATARI_REFERENCE)
    assert len(table) == 26 and set(table["seeds"]) == {5} and set(table["observation"]) == {"vision"}
    assert {"boxing", "pong", "ms_pacman", "kung_fu_master", "jamesbond"} <= set(table["task"])
    triples = [f"{name}_{frames}" for frames in ("100k", "200k", "400k") for name in ("return_at", "min", "max")]
    assert list(table.columns) == ["task", "observation", "seeds", *triples]
    if SHARED_DMC_REFERENCE.is_file():  # the DMC file's first columns and its column naming
        assert list(pd.read_csv(SHARED_DMC_REFERENCE).columns)[:6] == list(table.columns)[:6]
    reference = load_reference(DEFAULT_V3_ATARI_REFERENCE, "vision")
    assert reference["boxing"] == {100_000: 26.4, 200_000: 47.0, 400_000: 79.4}
    assert reference["pong"][400_000] == -4.2
