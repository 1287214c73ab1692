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


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError

    try:
        if cfg.mode == "eval":
            from utils.eval_mode import evaluate

            evaluate(cfg)
            return None
        from utils.train import train

        return train(cfg)
    except (ConfigError, CheckpointError) as error:
        # One clear line for bad input, no traceback (Hydra's own errors look the same).
        print(f"dreamer: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
