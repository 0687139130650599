"""LightningModule for COCO instance segmentation with Mask R-CNN (CEDNet two-stage pyramid or timm + FPN).

:class:`InstanceSegmentationModule` is :class:`~cednet_pl.lit.detection.DetectionModule` with a different
detector (:func:`~cednet_pl.models.detection.build_maskrcnn`) and masks in the targets and results; training,
the optimiser (layer decay over the trunk, head weight decay), the schedule and the gathering of validation
outputs are the detection module's. ``net.forward_with_loss`` gives the RPN, box and mask losses and the
detections (with masks) from one pass, so the appendix-B analysis runs on it as on RetinaNet.

Validation writes, in the run dir, ``coco_results_val.json`` (boxes, as RetinaNet) and
``coco_segm_results_val.json`` (``image_id``, ``category_id``, compressed-RLE ``segmentation`` of the mask
probabilities > 0.5, ``score``; no ``bbox``, so that pycocotools' ``loadRes`` keeps the masks), evaluates
both against the annotation file with pycocotools ``COCOeval`` (or faster-coco-eval) and logs the 12 numbers
of each: ``val/map`` ... ``val/mar_large`` (boxes) and ``val/mask_map`` ... ``val/mask_mar_large`` (masks),
also written to ``coco_metrics_val.json``.
"""

from __future__ import annotations

from typing import Any

import torch

from cednet_pl.evaluation.coco_eval import encode_masks, masks_to_coco_results
from cednet_pl.lit.detection import DetectionModule
from cednet_pl.models.detection import build_maskrcnn

__all__ = ["InstanceSegmentationModule"]


class InstanceSegmentationModule(DetectionModule):
    """Mask R-CNN training and COCO box + mask evaluation (arguments as :class:`DetectionModule`; ``detector``
    holds :func:`~cednet_pl.models.detection.build_maskrcnn` arguments; the data module must yield masks,
    ``data.with_masks=true``)."""

    task = "instance_segmentation"
    head_prefix = "net.roi_heads."
    head_name = "Mask R-CNN RoI heads"
    target_keys = ("boxes", "labels", "masks")
    loss_names = ("objectness", "rpn_box_reg", "classifier", "box_reg", "mask")

    @staticmethod
    def build_detector(backbone: torch.nn.Module, num_classes: int, **detector: Any) -> torch.nn.Module:
        return build_maskrcnn(backbone, num_classes, **detector)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(dm, "hparams", {}) if dm is not None else {}
        if dm is not None and "with_masks" in hparams and not hparams["with_masks"]:
            raise ValueError(
                f"{type(self).__name__} (Mask R-CNN) needs instance masks, but the data module "
                f"{type(dm).__name__} has with_masks=false; set data.with_masks=true"
            )
        super().setup(stage)

    def _keep_detections(self, det: dict[str, torch.Tensor]) -> dict[str, Any]:
        kept = super()._keep_detections(det)
        # NOTE: RLE right away: full-size mask probabilities of 100 detections per image would not fit a val epoch
        kept["rles"] = encode_masks(det["masks"])
        return kept

    def _coco_results(self, outputs: list[tuple[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        results = super()._coco_results(outputs)
        ids, dets = [o[0] for o in outputs], [o[1] for o in outputs]
        results["segm"] = masks_to_coco_results(ids, dets, self.category_ids)
        return results
