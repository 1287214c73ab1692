"""Atomic checkpoint files, loaded safely with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects): model and optimiser
state dicts, gradient-scaler state, counters, RNG states and the composed config as a plain container.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import atomic_output

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, unreadable or incompatible checkpoint; one line naming the file and the problem."""


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Writes ``payload`` to a temporary file beside ``path``, flushes it to disk, then renames it over ``path``.

    A crash or Ctrl-C at any point leaves either the previous file or the new one, never a truncated file.
    """
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())


def resolve_checkpoint_path(location: str | os.PathLike) -> Path:
    """A ``.pt`` file, or a run directory whose ``checkpoints/last.pt`` is used."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    return path


def load_checkpoint(location: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_atomic` (tensors and plain containers only)."""
    path = resolve_checkpoint_path(location)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"Cannot read checkpoint {path}: not a dreamer checkpoint or truncated ({reason})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"Cannot read checkpoint {path}: not a dreamer checkpoint (format version missing)")
    payload["path"] = str(path)
    return payload


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain containers (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
