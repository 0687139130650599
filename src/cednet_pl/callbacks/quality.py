"""DetectionQuality: per-image detection-quality scores after every validation (CEDNet appendix B).

After each validation (not the sanity check) the callback scores the images that were validated, from the
COCO results file the :class:`~cednet_pl.lit.detection.DetectionModule` has just written and evaluated
(``coco_results_val.json``) against the annotation file, with :func:`cednet_pl.analysis.quality.quality_from_coco`
(definition in :mod:`cednet_pl.analysis.quality`). It writes ``<run dir>/analysis/quality_val.json`` (overwritten;
``keep_history=True`` also keeps ``quality_val_step<global step>.json``) and logs the mean image score as
``val/quality_mean`` to every logger. Rank zero only; the validated image ids are gathered from all ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cednet_pl.analysis.quality import quality_from_coco, write_quality
from cednet_pl.callbacks.common import analysis_dir, log_scalars, model_name, val_dataset
from cednet_pl.lit.detection import DETECTION_TASKS
from cednet_pl.utils.logging import RankedLogger

__all__ = ["DetectionQuality"]

log = RankedLogger(__name__)


class DetectionQuality(Callback):
    """Write per-image detection-quality scores and log their mean after each validation.

    Args:
        class_agnostic: match objects to detections of any category.
        score_thresh: ignore detections below this confidence.
        max_dets: use at most this many detections per image (``None``: all the model kept).
        filename: file name under ``<run dir>/analysis/``.
        keep_history: also keep one file per validation (``quality_val_step<N>.json``).
        log_key: metric name of the mean image score.
    """

    def __init__(
        self,
        class_agnostic: bool = False,
        score_thresh: float = 0.0,
        max_dets: int | None = None,
        filename: str = "quality_val.json",
        keep_history: bool = False,
        log_key: str = "val/quality_mean",
    ) -> None:
        self.class_agnostic = bool(class_agnostic)
        self.score_thresh = float(score_thresh)
        self.max_dets = max_dets
        self.filename = filename
        self.keep_history = bool(keep_history)
        self.log_key = log_key
        self._image_ids: set[int] = set()
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "task", None) not in DETECTION_TASKS:
            raise TypeError(
                f"DetectionQuality needs a detection model (DetectionModule), got {type(pl_module).__name__}"
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._image_ids = set()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for target in batch[1]:
            self._image_ids.add(int(target["image_id"]))

    def _gathered_ids(self, trainer: L.Trainer) -> list[int]:
        ids = sorted(self._image_ids)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, ids)
            ids = sorted({i for part in parts for i in part})
        return ids

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        ids = self._gathered_ids(trainer)
        if not trainer.is_global_zero:
            return
        results = getattr(pl_module, "results_path", None)
        if results is None or not Path(results).is_file():
            log.warning("DetectionQuality: the detection module wrote no COCO results file; nothing scored")
            return
        dm = trainer.datamodule
        evaluation = dict(pl_module.hparams.get("evaluation") or {})
        ann_file = evaluation.get("annotation_file") or dm.val_annotation_file
        dataset = val_dataset(trainer, "DetectionQuality")
        report = quality_from_coco(
            ann_file,
            results,
            image_ids=ids,
            image_root=getattr(dataset, "image_dir", None),
            class_agnostic=self.class_agnostic,
            score_thresh=self.score_thresh,
            max_dets=self.max_dets,
            meta={
                "model_name": model_name(pl_module),
                "run_dir": str(Path(trainer.default_root_dir).resolve()),
                "epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "stage": str(trainer.state.fn.value if trainer.state.fn else ""),
                "ckpt_path": getattr(trainer, "ckpt_path", None),
            },
        )
        path = write_quality(report, analysis_dir(trainer, self.filename))
        if self.keep_history:
            stem = Path(self.filename).stem
            shutil.copyfile(path, path.with_name(f"{stem}_step{trainer.global_step:07d}.json"))
        self.last_path = path
        mean = report.mean_score()
        log.info(f"DetectionQuality: mean image score {mean:.4f} over {len(report.images)} images -> {path}")
        log_scalars(trainer, {self.log_key: mean})
