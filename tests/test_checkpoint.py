"""Checkpoint files: atomic writes, safe loading, one-line errors and RNG round trips."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic


def test_round_trip_and_run_directory_resolution(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"counters": {"frames": 7}, "weights": torch.arange(3)}, path)
    for location in (path, tmp_path):
        payload = load_checkpoint(location)
        assert payload["counters"] == {"frames": 7} and torch.equal(payload["weights"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"counters": {"frames": 1}}, path)

    def crash(obj: object, handle) -> None:
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"counters": {"frames": 2}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["counters"] == {"frames": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_pickled_objects_are_refused_by_the_safe_loader(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "object": Path("/etc/passwd")}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "Checkpoint not found"), (b"garbage", "not a dreamer checkpoint or truncated")],
)
def test_missing_or_foreign_files_give_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and "x.pt" in str(error.value)


def test_a_plain_torch_file_is_not_a_dreamer_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format version missing"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
