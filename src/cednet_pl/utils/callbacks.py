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


class SkippedImagesReport(Callback):
    """Report the images a DataModule skipped as corrupt: count per epoch, total at the end, list in the run dir.

    Works with any DataModule that has `take_skipped(split) -> list[str]` (e.g. `ImageNetDataModule`): after every
    training epoch and every validation the files skipped on all ranks are gathered; rank zero logs their number
    (`data/skipped_train`, `data/skipped_val` metrics and a log line) and appends them to
    `<run dir>/skipped_images.tsv` (`split, epoch, path`). Each file is also logged by the dataset when it is met.

    Args:
        filename: Name of the list in the run dir (`trainer.default_root_dir`).
    """

    def __init__(self, filename: str = "skipped_images.tsv") -> None:
        self.filename = filename
        self.totals = {"train": 0, "val": 0}

    def _collect(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "take_skipped", None)):
            return
        files = list(dm.take_skipped(split))
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, files)
            files = sorted({f for part in parts for f in part})
        self.totals[split] += len(files)
        pl_module.log(f"data/skipped_{split}", float(len(files)), rank_zero_only=True)
        if not files or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(f"{split}\t{trainer.current_epoch}\t{name}\n" for name in files)
        note = "replaced by other images" if split == "train" else "left out of the metrics"
        rank_log.warning(
            f"epoch {trainer.current_epoch}: {len(files)} corrupt {split} image(s) skipped ({note}); list: {path}"
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collect(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._collect(trainer, pl_module, "val")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and any(self.totals.values()):
            rank_log.warning(
                f"corrupt images skipped in this run: {self.totals['train']} in training, {self.totals['val']} in "
                f"validation (per epoch; list: {Path(trainer.default_root_dir) / self.filename})"
            )


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
