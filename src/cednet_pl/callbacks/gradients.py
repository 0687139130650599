"""GradientRegions: important-region area curves from input gradients (CEDNet appendix B, Figure A2).

On the chosen validation images (``image_ids``, else an ``image_list`` file such as the top-K list written by
``cednet-compare``, else the first ``num_images``), the detector in eval mode computes its total loss against the
annotations, which is backpropagated to the input pixels at original resolution
(:func:`cednet_pl.analysis.detector.gradient_pass`; normalisation and area definitions in
:mod:`cednet_pl.analysis.regions`). The mean area-vs-threshold curve is written to
``<run dir>/analysis/regions/<tag>.json`` and plotted to ``<tag>.png``; ``analysis/region_area`` (the area under
the curve, i.e. the mean important-region size) goes to the loggers.

Default schedule: once at the end of fitting and once in a validate-only run (``cednet-eval``); never every epoch
unless ``every_n_validations`` is set (see :mod:`cednet_pl.callbacks.common`).
"""

from __future__ import annotations

import lightning as L

from cednet_pl.analysis.detector import gradient_pass
from cednet_pl.analysis.plots import plot_area_curves
from cednet_pl.analysis.regions import (
    CHANNEL_REDUCTIONS,
    NORMALIZATIONS,
    RegionCurve,
    default_thresholds,
    write_curve,
)
from cednet_pl.callbacks.common import (
    ScheduledAnalysis,
    analysis_dir,
    detector_of,
    log_scalars,
    model_name,
    resolve_image_ids,
    val_dataset,
)
from cednet_pl.utils.logging import RankedLogger

__all__ = ["GradientRegions"]

log = RankedLogger(__name__)


class GradientRegions(ScheduledAnalysis):
    """Input-gradient important-region curves of the model on chosen validation images.

    Args:
        image_ids: ids of the images to analyse.
        image_list: file naming the images (text, one id per line, or JSON such as a top-K selection).
        num_images: otherwise, the first N validation images (``None``: all).
        batch_size: images per forward/backward pass.
        channel_reduce: ``max`` / ``l2`` / ``sum`` of ``|gradient|`` over RGB.
        normalize: ``image`` (each map by its max) / ``global`` / ``none``.
        num_thresholds: thresholds evenly spaced in ``[0, 1]``.
        name: legend name (default: the backbone's name).
        every_n_validations: also run after every N-th validation of a fit (0: never).
        at_fit_end: run once when fitting ends.
    """

    def __init__(
        self,
        image_ids: list[int] | None = None,
        image_list: str | None = None,
        num_images: int | None = 16,
        batch_size: int = 4,
        channel_reduce: str = "max",
        normalize: str = "image",
        num_thresholds: int = 101,
        name: str | None = None,
        every_n_validations: int = 0,
        at_fit_end: bool = True,
    ) -> None:
        super().__init__(every_n_validations, at_fit_end)
        if channel_reduce not in CHANNEL_REDUCTIONS:
            raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, got {channel_reduce!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.image_ids = list(image_ids) if image_ids else None
        self.image_list = image_list
        self.num_images = num_images
        self.batch_size = int(batch_size)
        self.channel_reduce = channel_reduce
        self.normalize = normalize
        self.num_thresholds = int(num_thresholds)
        self.name = name
        self.last_curve: RegionCurve | None = None

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        detector_of(pl_module, "GradientRegions")

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        dataset = val_dataset(trainer, "GradientRegions")
        ids = resolve_image_ids(dataset, self.image_ids, self.image_list, self.num_images)
        result = gradient_pass(
            detector_of(pl_module, "GradientRegions"),
            dataset,
            ids,
            batch_size=self.batch_size,
            channel_reduce=self.channel_reduce,
            normalize=self.normalize,
            thresholds=default_thresholds(self.num_thresholds),
            device=pl_module.device,
        )
        curve = RegionCurve(
            name=self.name or model_name(pl_module),
            thresholds=result.thresholds.tolist(),
            area_fraction=result.fractions.mean(dim=0).tolist(),
            area_fraction_std=result.fractions.std(dim=0, correction=0).tolist(),
            image_ids=ids,
            normalize=self.normalize,
            channel_reduce=self.channel_reduce,
            meta={
                "tag": tag,
                "epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "seconds": result.seconds,
                "images_per_second": len(ids) / max(result.seconds, 1e-9),
                "batch_size": self.batch_size,
                "ann_file": str(getattr(dataset, "ann_file", "")),
            },
        )
        out = analysis_dir(trainer, "regions")
        write_curve(curve, out / f"{tag}.json")
        plot_area_curves([curve], out / f"{tag}.png")
        self.last_curve = curve
        log.info(
            f"GradientRegions[{tag}]: {len(ids)} images in {result.seconds:.1f} s, "
            f"region area {curve.auc:.4f} -> {out / tag}.json"
        )
        log_scalars(trainer, {"analysis/region_area": curve.auc})
