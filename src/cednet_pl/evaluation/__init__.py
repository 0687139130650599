"""Evaluation helpers (COCO box and mask AP via pycocotools or faster-coco-eval)."""

from cednet_pl.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    detections_to_coco_results,
    encode_masks,
    evaluate_coco,
    load_coco_json,
    load_coco_results,
    masks_to_coco_results,
    write_results_json,
)

__all__ = [
    "COCO_STAT_NAMES",
    "detections_to_coco_results",
    "encode_masks",
    "evaluate_coco",
    "load_coco_json",
    "load_coco_results",
    "masks_to_coco_results",
    "write_results_json",
]
