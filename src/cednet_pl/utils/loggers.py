"""Loggers that continue a resumed run's curves instead of starting new ones.

A run resumed in its own dir (`hydra.run.dir=<run dir>`, `ckpt_path=auto`) logs into the same logger run/version:

- CSV and TensorBoard: `version: 0` in the configs; `ResumableCSVLogger` keeps the rows already written (Lightning's
  `CSVLogger` deletes an existing `metrics.csv` of the same version);
- Weights & Biases: `wandb_logger` derives the run id from the run dir and resumes it (`resume="allow"`);
- MLflow: `mlflow_logger` reuses the run already in the run's tracking store, if there is one.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ResumableCSVLogger", "mlflow_logger", "run_id_of", "wandb_logger"]


class _AppendingWriter(ExperimentWriter):
    """`ExperimentWriter` that appends to an existing `metrics.csv` (keeping its columns) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose fixed `version` continues across a resume: rows already in `metrics.csv` are kept."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_id_of(path: str | os.PathLike) -> str:
    """A stable 16-hex-digit id for a run dir (the same after a resume in that dir)."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]


def wandb_logger(save_dir: str, **kwargs: Any) -> Logger:
    """Lightning's `WandbLogger` whose run id is derived from `save_dir`, resumed when it exists.

    `offline=True` writes under `save_dir/wandb/` without network (`wandb sync` uploads it later).
    """
    from lightning.pytorch.loggers import WandbLogger

    kwargs.setdefault("id", run_id_of(save_dir))
    kwargs.setdefault("resume", "allow")
    return WandbLogger(save_dir=save_dir, **kwargs)


def mlflow_logger(tracking_uri: str, **kwargs: Any) -> Logger:
    """Lightning's `MLFlowLogger`; with a local file store (`file:<dir>`) it continues the run already stored there.

    MLflow 3 keeps the file store in maintenance mode and refuses it unless `MLFLOW_ALLOW_FILE_STORE=true`; a
    `file:` URI here is an explicit choice of it, so that is set for this process.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        store = Path(tracking_uri.removeprefix("file:"))
        runs = sorted(p.parent.name for p in store.glob("*/*/meta.yaml") if p.parent.parent.name != ".trash")
        if kwargs.get("run_id") is None and len(runs) == 1:
            kwargs["run_id"] = runs[0]
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
