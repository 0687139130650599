"""Callbacks injected into test jobs (`+callbacks.slow._target_=slurm_callbacks.SlowFirstRun`, PYTHONPATH=tests/slurm)."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L


class SlowFirstRun(L.Callback):
    """Sleep after every training batch of a Slurm job's first run (restart count 0), none after a requeue.

    Injected with `+callbacks.slow._target_=slurm_callbacks.SlowFirstRun`; gives a test time to requeue or signal
    the job in the middle of training.

    Args:
        seconds: Sleep per training batch.
    """

    def __init__(self, seconds: float = 1.0):
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(self.seconds)
