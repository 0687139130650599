"""COCO box and mask evaluation: results JSON in, the 12 standard COCOeval numbers out.

The number of record is what pycocotools' ``COCOeval`` computes from two files, the annotation file
and a results JSON (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``). Validation
therefore always writes the results JSON first and evaluates that file, so that running pycocotools
by hand on the same two files gives the same numbers to the last digit.

Instance masks (``iou_type="segm"``) go in a separate results file whose entries hold a compressed RLE
``segmentation`` and no ``bbox`` (pycocotools' ``loadRes`` would otherwise replace the masks by box polygons):
:func:`encode_masks` + :func:`masks_to_coco_results`.

``backend="faster_coco_eval"`` runs the same evaluation with faster-coco-eval's C++ ``COCOeval_faster``;
``scripts/bench_coco_eval.py`` measures its speed and whether it agrees with pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

log = logging.getLogger(__name__)

COCO_STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
BACKENDS = ("pycocotools", "faster_coco_eval")
IOU_TYPES = ("bbox", "segm")
_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO instances annotation file and check that it has the COCO layout.

    Args:
        path: Path to the JSON file (e.g. ``annotations/instances_val2017.json``).

    Returns:
        The parsed dictionary.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not JSON, or lacks ``images``/``annotations``/``categories`` lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file not found: {path} (expected a COCO instances JSON such as "
            "annotations/instances_val2017.json)"
        )
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a COCO annotation file: it is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} is not a COCO annotation file: expected a JSON object with keys {list(_REQUIRED_KEYS)}, "
            f"got a JSON {type(data).__name__}"
        )
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(
            f"{path} is not a COCO instances annotation file: missing list(s) {missing} "
            f"(expected keys {list(_REQUIRED_KEYS)})"
        )
    return data


def load_coco_results(
    results: str | Path | Sequence[Mapping[str, Any]], iou_type: str = "bbox"
) -> list[Mapping[str, Any]]:
    """Read a COCO results JSON (a list of ``{image_id, category_id, bbox, score}``, or with ``segmentation``
    in place of ``bbox`` for ``iou_type="segm"``) or pass a list through.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not JSON, not a list, or a detection without the four keys.
    """
    if isinstance(results, str | Path):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"COCO results file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"COCO results file {path} is not valid JSON: {err}") from err
        where = str(path)
    else:
        data, where = list(results), "results"
    if not isinstance(data, list):
        raise ValueError(f"{where} is not a COCO results file: expected a JSON list of detections")
    need = {"image_id", "category_id", "segmentation" if iou_type == "segm" else "bbox", "score"}
    for i, det in enumerate(data):
        if not isinstance(det, Mapping) or not need <= det.keys():
            raise ValueError(f"{where}: detection {i} must have keys {sorted(need)}, got {det!r}")
    return data


def detections_to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, torch.Tensor]],
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """Convert detections (xyxy boxes, contiguous labels) to COCO results entries.

    Args:
        image_ids: The original COCO image id of each image.
        detections: Per image, ``boxes`` (N, 4) xyxy in original image pixels, ``scores`` (N,), ``labels``
            (N,) contiguous labels.
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id.

    Returns:
        One dict per detection with ``image_id``, ``category_id``, ``bbox`` (xywh) and ``score``.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection sets")
    results = []
    for image_id, det in zip(image_ids, detections, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_category_id[label]),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(score, 5),
                }
            )
    return results


def encode_masks(masks: torch.Tensor, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (``counts`` as text) of mask probabilities (N, 1, H, W) or (N, H, W) at ``threshold``."""
    from pycocotools import mask as mask_utils

    binary = (masks.detach().reshape(-1, *masks.shape[-2:]) > threshold).cpu().numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def masks_to_coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Any]],
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """Segmentation results entries (``image_id``, ``category_id``, ``segmentation`` RLE, ``score``).

    Args:
        image_ids: The original COCO image id of each image.
        detections: Per image ``rles`` (from :func:`encode_masks`), ``scores``, ``labels`` (contiguous).
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection sets")
    results = []
    for image_id, det in zip(image_ids, detections, strict=True):
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        for rle, score, label in zip(det["rles"], scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_category_id[label]),
                    "segmentation": rle,
                    "score": round(score, 5),
                }
            )
    return results


def write_results_json(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write COCO results entries to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(results, f)
    return path


def _import_backend(backend: str) -> tuple[Any, Any]:
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as err:
            raise ImportError(
                "evaluation backend 'faster_coco_eval' needs the faster-coco-eval package "
                "(pip install 'cednet-pl[fast]')"
            ) from err
        return COCO, COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {list(BACKENDS)}")


def evaluate_coco(
    annotation_file: str | Path,
    results: str | Path | list[dict[str, Any]],
    backend: str = "pycocotools",
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
) -> tuple[dict[str, float], str]:
    """Run COCO box or mask evaluation and return the 12 standard numbers.

    Args:
        annotation_file: The ground-truth COCO instances JSON.
        results: A results JSON path (the number of record) or the list of results entries.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
        image_ids: Evaluate only these images (default: every image in the annotation file, as COCO does).
        iou_type: ``"bbox"`` (entries with ``bbox``) or ``"segm"`` (entries with an RLE ``segmentation``).

    Returns:
        ``({name: value for name in COCO_STAT_NAMES}, summary_text)``, values in [0, 1] or -1 where
        COCOeval has nothing to measure (e.g. no large objects).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown COCO iou_type {iou_type!r}; expected one of {list(IOU_TYPES)}")
    coco_cls, eval_cls = _import_backend(backend)
    data = load_coco_json(annotation_file)
    entries = load_coco_results(results, iou_type)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if backend == "faster_coco_eval":
            gt = coco_cls(data, print_function=log.debug)
        else:
            gt = coco_cls()
            gt.dataset = data
            gt.createIndex()
        if entries:
            dt = gt.loadRes(str(results) if isinstance(results, str | Path) else entries)
        else:
            # pycocotools' loadRes cannot read an empty list; an empty result set scores 0 on every image.
            dt = coco_cls()
            dt.dataset = {
                "images": list(data["images"]),
                "categories": list(data["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        kwargs = {"print_function": log.debug} if backend == "faster_coco_eval" else {}
        evaluator = eval_cls(gt, dt, iou_type, **kwargs)
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[: len(COCO_STAT_NAMES)]]
    return dict(zip(COCO_STAT_NAMES, stats, strict=True)), buf.getvalue()
