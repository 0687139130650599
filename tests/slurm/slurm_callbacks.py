"""Callbacks injected into test jobs (`+callbacks.slow._target_=slurm_callbacks.SlowUntilRestart`, PYTHONPATH=tests/slurm)."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L


class SlowUntilRestart(L.Callback):
    """Sleep after every training batch until the job has been requeued `restarts` times (SLURM_RESTART_COUNT).

    Gives a test time to signal or requeue the job in the middle of training; the last run goes at full speed.

    Args:
        seconds: Sleep per training batch.
        restarts: Stop sleeping from this restart count on.
    """

    def __init__(self, seconds: float = 1.0, restarts: int = 1):
        self.seconds = float(seconds)
        self.restarts = int(restarts)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) < self.restarts:
            time.sleep(self.seconds)
