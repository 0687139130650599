"""Shared plumbing of the analysis callbacks: when to run, which images, where the detector and data are.

All analysis callbacks are read-only: they never touch the optimizer, the schedulers, the parameters or their
gradients; they run the model in eval mode and restore every submodule's mode. Files are written under the run
dir (``trainer.default_root_dir``, i.e. ``${paths.output_dir}``) on global rank zero only.

Scheduling (:class:`ScheduledAnalysis`): ``every_n_validations=N`` runs after every N-th validation of a fit
(sanity checks excluded); ``0`` (the default) never during a fit. ``at_fit_end=True`` (default) runs once when
fitting ends, and a validate-only run (``cednet-eval``, ``trainer.validate``) always runs once after validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from cednet_pl.analysis.selection import check_image_ids, read_image_ids
from cednet_pl.utils.logging import RankedLogger

__all__ = [
    "ScheduledAnalysis",
    "detector_of",
    "log_scalars",
    "model_name",
    "resolve_image_ids",
    "val_dataset",
]

log = RankedLogger(__name__)


def detector_of(pl_module: L.LightningModule, who: str) -> torch.nn.Module:
    """The detector (``forward_with_loss``) inside a LightningModule, or a clear error."""
    for cand in (pl_module, getattr(pl_module, "net", None)):
        if cand is not None and callable(getattr(cand, "forward_with_loss", None)):
            return cand
    raise TypeError(
        f"{who} needs a detection model (DetectionModule, whose `net` has forward_with_loss); "
        f"got {type(pl_module).__name__}"
    )


def val_dataset(trainer: L.Trainer, who: str) -> Any:
    """The datamodule's COCO-style validation dataset (original-resolution images)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "val_dataset"):
        raise TypeError(f"{who} needs a COCO datamodule with a `val_dataset` (COCODataModule or a subclass)")
    if dm.val_dataset is None:
        dm.setup("validate")
    return dm.val_dataset


def model_name(pl_module: L.LightningModule) -> str:
    """A short model name for legends: the backbone's timm name if known."""
    hp = getattr(pl_module, "hparams", {}) or {}
    backbone = hp.get("backbone") if hasattr(hp, "get") else None
    if isinstance(backbone, dict) and backbone.get("model_name"):
        return str(backbone["model_name"])
    return type(pl_module).__name__


def resolve_image_ids(
    dataset: Any, image_ids: list[int] | None, image_list: str | None, num_images: int | None
) -> list[int]:
    """Images to analyse: ``image_ids``, else the ids in ``image_list``, else the first ``num_images``."""
    ann = str(getattr(dataset, "ann_file", "the validation set"))
    available = [int(i) for i in dataset.image_ids]
    if image_ids:
        return check_image_ids(image_ids, available, "image_ids", ann)
    if image_list:
        return check_image_ids(read_image_ids(image_list), available, f"image list {image_list}", ann)
    n = len(available) if num_images is None else int(num_images)
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return available[:n]


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send scalars to every logger (allowed in any hook) and expose them in ``trainer.callback_metrics``."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))


class ScheduledAnalysis(Callback):
    """Base class running :meth:`analyse` on the schedule described in the module docstring.

    Args:
        every_n_validations: run after every N-th validation of a fit (0: never during a fit).
        at_fit_end: run once when fitting ends.
    """

    def __init__(self, every_n_validations: int = 0, at_fit_end: bool = True) -> None:
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations must be >= 0, got {every_n_validations}")
        self.every_n_validations = int(every_n_validations)
        self.at_fit_end = bool(at_fit_end)
        self._validations = 0

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        raise NotImplementedError

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fail early (at setup) on a model or datamodule this callback cannot analyse."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        if trainer.is_global_zero:
            self.analyse(trainer, pl_module, tag)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._run(trainer, pl_module, "validate")
            return
        self._validations += 1
        if self.every_n_validations and self._validations % self.every_n_validations == 0:
            self._run(trainer, pl_module, f"val{self._validations:03d}_step{trainer.global_step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end:
            self._run(trainer, pl_module, "final")

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))


def analysis_dir(trainer: L.Trainer, *parts: str) -> Path:
    """``<run dir>/analysis/<parts...>``."""
    return Path(trainer.default_root_dir).joinpath("analysis", *parts)
