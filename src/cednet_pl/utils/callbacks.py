"""Task-agnostic training callbacks (conf/callbacks/run.yaml): finite-loss guard, run report, per-epoch reseeding,
config-in-checkpoint; and the progress bar choice."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from cednet_pl.utils.checkpoint import CONFIG_KEY
from cednet_pl.utils.ranks import rank_log
from cednet_pl.utils.run import plain


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class FiniteLossGuard(Callback):
    """Stop training as soon as the loss is not finite, before backward and the optimizer step.

    The error names the global step, epoch and batch, and the last checkpoint on disk, which is left untouched
    (nothing is saved on the way out). In distributed runs the ranks agree first, so all of them stop together.
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        saved = [
            Path(p)
            for cb in trainer.checkpoint_callbacks
            for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
            if p and Path(p).is_file()
        ]
        last = max(saved, key=lambda p: p.stat().st_mtime) if saved else None
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.batch_idx})"
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.detach().float().item()}) at {where}; {keep}"
        )


class EpochSeed(Callback):
    """Reseed python/numpy/torch at the start of every training epoch with `seed + epoch`.

    Everything random inside an epoch (augmentation in the main process, mixup, drop path) then depends only on the
    seed and the epoch, so a run resumed from an end-of-epoch checkpoint repeats the uninterrupted run exactly
    (data-loader shuffling is made epoch-deterministic by the samplers' `set_epoch`). Worker processes are seeded
    from the main process at loader start, so non-persistent workers follow too.

    Args:
        seed: Base seed; None disables reseeding.
    """

    def __init__(self, seed: int | None = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:
            return
        from lightning.fabric.utilities.seed import seed_everything

        seed_everything(
            int(self.seed) + 1000 * trainer.current_epoch + trainer.global_rank, workers=True, verbose=False
        )


class ConfigInCheckpoint(Callback):
    """Store the run's model/data configs (plain, resolved) in every checkpoint under `cednet_config`.

    `cednet-eval ckpt=...` rebuilds the model and the data from them.

    Args:
        config: A plain dict with at least `model` and `data` (each with a `_target_`).
    """

    def __init__(self, config: Any):
        self.config = plain(config)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config


class DistributedRunReport(Callback):
    """Log the distributed layout and the training progress in a form that survives requeues.

    Rank zero logs where fitting (re)starts (`fit start: epoch E global_step G ...`) and each epoch this process finished
    (`epoch E done: global_step G`). The epoch line is written once all of the epoch's hooks have run, checkpoint
    saving included (at the next epoch's start, or at the end of training), so a job log shows which epochs a
    requeued run may skip and that it continued instead of repeating them.
    """

    def __init__(self) -> None:
        self._finished: tuple[int, int] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finished = None
        if trainer.is_global_zero:
            rank_log.info(
                f"fit start: epoch {trainer.current_epoch} global_step {trainer.global_step} "
                f"world_size {trainer.world_size} restart {os.environ.get('SLURM_RESTART_COUNT', '0')} "
                f"ckpt {trainer.ckpt_path or '-'}"
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finished = (trainer.current_epoch, trainer.global_step)

    def _report_finished(self, trainer: Trainer) -> None:
        if self._finished is not None and trainer.is_global_zero:
            rank_log.info(f"epoch {self._finished[0]} done: global_step {self._finished[1]}")
        self._finished = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_finished(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_finished(trainer)


def is_interactive() -> bool:
    """Whether stdout is a terminal (not a log file, a pipe or a batch job)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(refresh_rate: int = 1, log_refresh_rate: int = 50) -> ProgressBar:
    """A rich progress bar in a terminal, a slow-refreshing tqdm bar otherwise (keeps Slurm logs small).

    Args:
        refresh_rate: Refresh rate of the rich bar (in batches).
        log_refresh_rate: Refresh rate of the tqdm bar when stdout is not a terminal.
    """
    if is_interactive():
        return RichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=log_refresh_rate)
