"""Dreamer (Hafner et al., ICLR 2020) on TorchRL. Entry point: ``python dreamer.py [overrides]``.

Examples::

    python dreamer.py env.name=walker env.task=walk          # train on DMC walker-walk from pixels
    python dreamer.py experiment=debug                       # tiny end-to-end run on CPU
    python dreamer.py resume=outputs/2026-11-23/12-00-00     # continue a run
    python dreamer.py mode=eval checkpoint=<run dir or .pt>  # evaluate a trained agent
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

import hydra
from omegaconf import DictConfig

from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.resume import check_resume_overrides, register_resolvers


def fail(error: Exception) -> None:
    """One clear line for bad input, no traceback (Hydra's own errors look the same), and exit status 2."""
    print(f"dreamer: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()  # already done on import; the reference makes worker processes import utils.resume
    try:
        if cfg.mode == "eval":
            from utils.eval_mode import evaluate

            evaluate(cfg)
            return None
        from utils.train import train

        return train(cfg)
    except (ConfigError, CheckpointError) as error:
        fail(error)


def check_command_line() -> None:
    """Checks ``resume=`` before Hydra runs, so that a mistyped path creates no output directory."""
    from hydra._internal.utils import get_args_parser

    arguments, _ = get_args_parser().parse_known_args()
    try:
        check_resume_overrides(arguments.overrides)
    except CheckpointError as error:
        fail(error)


if __name__ == "__main__":
    check_command_line()
    main()
