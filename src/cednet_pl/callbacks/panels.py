"""Panels: Figure A1 style pictures of chosen validation images (CEDNet appendix B).

For each chosen image (``image_ids``, else an ``image_list`` file, else the first ``num_images``) one forward pass
of the detector in eval mode gives its detections and the input-gradient map
(:func:`cednet_pl.analysis.detector.gradient_pass`); the detections are scored as in
:mod:`cednet_pl.analysis.quality` and :func:`cednet_pl.analysis.plots.save_panel` draws annotated boxes in red,
each object's matched detection in blue with ``(IoU, confidence)``, the image score in the top-left corner and the
gradient map beside it. Files: ``<run dir>/analysis/panels/<tag>/<image id>.png``. Same schedule as
:class:`~cednet_pl.callbacks.gradients.GradientRegions`.
"""

from __future__ import annotations

import lightning as L

from cednet_pl.analysis.detector import gradient_pass, image_index
from cednet_pl.analysis.plots import save_panel
from cednet_pl.analysis.quality import quality_from_coco
from cednet_pl.callbacks.common import (
    ScheduledAnalysis,
    analysis_dir,
    detector_of,
    model_name,
    resolve_image_ids,
    val_dataset,
)
from cednet_pl.utils.logging import RankedLogger

__all__ = ["Panels"]

log = RankedLogger(__name__)


class Panels(ScheduledAnalysis):
    """Detections + gradient map pictures of a few validation images.

    Args:
        image_ids: ids of the images to draw.
        image_list: file naming the images (text or JSON, e.g. a top-K selection).
        num_images: otherwise, the first N validation images.
        batch_size: images per forward/backward pass.
        channel_reduce: ``max`` / ``l2`` / ``sum`` of ``|gradient|`` over RGB.
        class_agnostic: match objects to detections of any category.
        every_n_validations: also run after every N-th validation of a fit (0: never).
        at_fit_end: run once when fitting ends.
    """

    def __init__(
        self,
        image_ids: list[int] | None = None,
        image_list: str | None = None,
        num_images: int = 4,
        batch_size: int = 4,
        channel_reduce: str = "max",
        class_agnostic: bool = False,
        every_n_validations: int = 0,
        at_fit_end: bool = True,
    ) -> None:
        super().__init__(every_n_validations, at_fit_end)
        self.image_ids = list(image_ids) if image_ids else None
        self.image_list = image_list
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.channel_reduce = channel_reduce
        self.class_agnostic = bool(class_agnostic)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        detector_of(pl_module, "Panels")

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        dataset = val_dataset(trainer, "Panels")
        ids = resolve_image_ids(dataset, self.image_ids, self.image_list, self.num_images)
        result = gradient_pass(
            detector_of(pl_module, "Panels"),
            dataset,
            ids,
            batch_size=self.batch_size,
            channel_reduce=self.channel_reduce,
            keep_maps=ids,
            device=pl_module.device,
        )
        quality = quality_from_coco(
            dataset.ann_file, result.results, image_ids=ids, class_agnostic=self.class_agnostic
        ).by_id()
        out = analysis_dir(trainer, "panels", tag)
        index = image_index(dataset)
        name = model_name(pl_module)
        for iid in ids:
            image, _ = dataset[index[iid]]
            save_panel(
                out / f"{iid}.png", image, quality[iid], result.maps[iid], title=f"{name}: image {iid}"
            )
        log.info(f"Panels[{tag}]: {len(ids)} panels -> {out}")
