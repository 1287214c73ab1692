"""The GPU check's CPU form (``--tiny``): both parts run, write their JSON and tables, and say what they measured.

No wall-clock assertions; the CUDA-only measures (peak memory) are checked to be absent on a CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.throughput import IMPLS


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    return out


def test_the_speed_part_times_every_implementation_and_variant_with_replay_prefetch(tiny_out: Path) -> None:
    result = json.loads((tiny_out / "speed.json").read_text())
    assert result["skipped_variants"] == []
    measured = {(r["impl"], r["variant"]) for r in result["records"]}
    assert measured == {(impl, v) for impl in IMPLS for v in gpu_check.TINY_SPEED_VARIANTS}
    for record in result["records"]:
        assert "error" not in record, record["error"]
        assert record["full_update_s"] > 0 and math.isclose(record["full_updates_per_s"], 1 / record["full_update_s"])
        assert record["peak_memory_bytes"] is None, "peak GPU memory is a CUDA measure"
    ours = next(r for r in result["records"] if r["impl"] == "ours" and "replay_sample_exposed_s" in r)
    assert set(ours["replay_sample_exposed_s"]) == {"0", "2"} and set(ours["replay_step_s"]) == {"0", "2"}
    table = (tiny_out / "speed.md").read_text()
    assert "channels_last" in table and "replay in the loop" in table


def test_the_learn_part_trains_and_reports_returns_and_rates(tiny_out: Path) -> None:
    result = json.loads((tiny_out / "learn.json").read_text())
    assert result["exit_code"] == 0 and not result["stopped_by_budget"] and result["reached_target"]
    assert result["frames"] == 400 and result["updates"] > 0
    assert result["eval_returns"] and result["eval_returns"][-1]["frames"] == 400
    assert result["frames_per_second"] > 0 and result["updates_per_second"] > 0
    assert "STOPPED EARLY" not in (tiny_out / "learn.md").read_text()


def test_a_run_past_its_budget_is_stopped_and_says_so(tmp_path: Path) -> None:
    """SIGTERM at the budget; the summary then names the budget and how far the run got."""
    stopped, _, code = gpu_check.train_within_budget(
        ["python", "-c", "import time; time.sleep(30)"], tmp_path / "log", budget_s=0.5
    )
    assert stopped and code != 0
    result = {
        "frames": 1200, "updates": 30, "wall_clock_s": 0.5, "exit_code": 0, "frames_per_second": 10.0,
        "updates_per_second": 1.0, "eval_returns": [{"frames": 1000, "return": 12.5}], "stopped_by_budget": True,
        "budget_s": 0.5, "target_frames": 100_000, "authors_returns_100k": [419, 529],
    }  # fmt: skip
    text = "\n".join(gpu_check.learn_lines(result))
    assert "STOPPED EARLY" in text and "1200 of 100000 frames" in text and "| 1000 | 12.5 |" in text


def test_metrics_are_summarised_from_the_csv_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "frames,updates,train/return,frames_per_second,updates_per_second,eval/return\n"
        "1000,10,5.0,100.0,1.0,\n2000,20,,,,7.5\n3000,30,6.0,90.0,0.9,\n"
    )
    summary = gpu_check.summarize_run(gpu_check.read_metrics(path))
    assert summary["frames"] == 3000 and summary["updates"] == 30
    assert summary["eval_returns"] == [{"frames": 2000, "return": 7.5}]
    assert (summary["frames_per_second"], summary["updates_per_second"], summary["last_train_return"]) == (
        90.0, 0.9, 6.0,
    )  # fmt: skip


def test_an_earlier_learning_run_is_kept_unless_resumed_or_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Nothing is lost: a second call refuses to replace ``learn_run/`` unless ``--restart`` says so."""
    earlier = tmp_path / "learn_run" / "metrics.csv"
    earlier.parent.mkdir()
    earlier.write_text("frames,updates\n1000,10\n")
    with pytest.raises(SystemExit) as refused:
        gpu_check.main(["--tiny", "--part", "learn", "--out", str(tmp_path)])
    assert refused.value.code == 2
    message = "learn_run holds an earlier learning run: continue it with --resume, or delete it with --restart"
    assert message in capsys.readouterr().err
    assert earlier.exists()

    def train(command: list[str], log_path: Path, budget_s: float) -> tuple[bool, float, int]:
        assert not earlier.parent.exists(), "--restart must delete the earlier run before training"
        earlier.parent.mkdir()
        earlier.write_text(
            "frames,updates,train/return,frames_per_second,updates_per_second,eval/return\n400,2,1.0,50.0,0.5,1.5\n"
        )
        return False, 1.0, 0

    monkeypatch.setattr(gpu_check, "train_within_budget", train)
    assert gpu_check.main(["--tiny", "--part", "learn", "--out", str(tmp_path), "--restart"]) == 0
    assert json.loads((tmp_path / "learn.json").read_text())["frames"] == 400
