"""Test set-up: run from the checkout (the project is not installed) and render MuJoCo headlessly."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel test workers (pytest-xdist) share the cores: one torch thread per worker and per training run it
    # starts, since more threads than free cores made updates 2-5x slower at random.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """One torch thread for the test (bit-exact comparisons; a busy 2-core machine), then the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow-marked tests first (the order is otherwise kept): with pytest-xdist's ``--dist loadfile`` one worker
    starts the longest test at once while the others take the remaining files."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
