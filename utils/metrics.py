"""Run outputs: ``metrics.csv`` (always), an optional TorchRL dashboard logger, and mp4 videos on disk."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchrl.record.loggers import Logger
from torchrl.record.loggers.csv import CSVLogger
from torchrl.record.loggers.tensorboard import TensorboardLogger
from torchrl.record.loggers.wandb import WandbLogger

from utils.config import flatten
from utils.files import atomic_output


class MetricsCSV:
    """Appends one row per log step to a CSV whose columns grow as new metrics appear.

    When a row brings a column the file does not have yet, the file is rewritten once with the wider header, so
    every row of the final file lines up with its header (missing values are empty).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        if path.exists():
            with open(path, newline="") as handle:
                self.columns = next(csv.reader(handle), [])

    def append(self, row: Mapping[str, float | int | None]) -> None:
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            self._widen(self.columns + new_columns)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({key: _plain(value) for key, value in row.items()})

    def _widen(self, columns: list[str]) -> None:
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        with atomic_output(self.path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns


def _plain(value: float | int | torch.Tensor | None) -> float | int | str:
    """A number for the CSV and the dashboard; missing values (None, NaN) become ``""``."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def make_dashboard(
    logger_cfg: DictConfig, run_dir: Path, run_name: str, config: DictConfig, run_id: str | None = None
) -> Logger | None:
    """TorchRL logger for ``logger.backend``: wandb (offline by default), tensorboard, csv, or none.

    ``run_id`` (kept in the run's checkpoints) is the wandb run id, so that a resumed run continues its dashboard
    run (online, and offline after ``wandb sync``). tensorboard and csv write to ``<run dir>/<backend dir>/<run
    name>`` and so continue their files on resume.
    """
    backend = logger_cfg.backend
    if backend == "none":
        return None
    if backend == "wandb":
        logger = WandbLogger(
            exp_name=run_name,
            id=run_id,
            offline=logger_cfg.mode == "offline",
            save_dir=str(run_dir),
            project=logger_cfg.project,
            group=logger_cfg.group,
            tags=[f"seed={config.env.seed}", f"task={config.env.name}-{config.env.task}"],
            mode=logger_cfg.mode,
            video_fps=logger_cfg.video_fps,
            log_env_packages=False,
        )
    elif backend == "tensorboard":
        logger = TensorboardLogger(exp_name=run_name, log_dir=str(run_dir / "tensorboard"))
    elif backend == "csv":
        logger = CSVLogger(exp_name=run_name, log_dir=str(run_dir / "csv_logs"), video_format="mp4")
    else:
        raise ValueError(f"Unknown logger.backend {backend!r}; allowed: wandb, tensorboard, csv, none")
    # Dashboards take flat scalar hyperparameters ("model.deter_dim": 200); null and lists become strings.
    hyperparameters = flatten(OmegaConf.to_container(config, resolve=True))
    logger.log_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()})
    return logger


class RunLogger:
    """Writes every log step to ``metrics.csv`` and the dashboard; videos also go to ``<run dir>/videos/*.mp4``."""

    def __init__(self, run_dir: Path, dashboard: Logger | None, video_fps: int) -> None:
        self.run_dir = run_dir
        self.csv = MetricsCSV(run_dir / "metrics.csv")
        self.dashboard = dashboard
        self.video_fps = video_fps

    def log(self, metrics: Mapping[str, float | int | None], step: int) -> None:
        self.csv.append(metrics)
        if self.dashboard is not None:
            for name, value in metrics.items():
                value = _plain(value)
                if value != "":
                    self.dashboard.log_scalar(name, value, step=step)

    def log_video(self, name: str, frames: np.ndarray, step: int) -> Path:
        """``frames``: uint8 ``[T, H, W, C]``. Saves ``videos/<name>_<step>.mp4`` and sends it to the dashboard."""
        path = write_mp4(frames, self.run_dir / "videos" / f"{name.replace('/', '_')}_{step:09d}.mp4", self.video_fps)
        # TorchRL's CSVLogger needs torchcodec to write its own mp4 copy; the file above is the csv backend's video.
        if self.dashboard is not None and not isinstance(self.dashboard, CSVLogger):
            video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, C, H, W]
            self.dashboard.log_video(name, video, step=step)
        return path

    def close(self) -> None:
        experiment = getattr(self.dashboard, "experiment", None)
        if isinstance(self.dashboard, WandbLogger):
            experiment.finish()
        elif experiment is not None and hasattr(experiment, "flush"):
            experiment.flush()


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    """Writes uint8 ``[T, H, W, C]`` frames (C = 1 or 3) as an H.264 mp4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return path
