"""Per-image detection-quality scores (CEDNet, arXiv 2302.06052, appendix B).

Definition (what this module computes, exactly):

- The *objects* of an image are its annotations with ``iscrowd == 0`` (a missing ``iscrowd`` counts as 0).
  Crowd annotations are not objects and never matched.
- For every object the *match* is the detection with the largest IoU with it, among the detections of the same
  category (``class_agnostic=False``, the default) or among all detections (``class_agnostic=True``).
  Ties in IoU are broken by the higher confidence, then by the earlier detection in the input order.
- If no candidate detection overlaps the object (largest IoU is 0, or there is no candidate), the match is a
  *virtual* detection with IoU 0 and confidence 0 (written with ``det_bbox: null``).
- Object score = IoU x confidence of its match. Image score = mean of its objects' scores.
- An image without objects (none annotated, or only crowd) has no score: ``None`` in the file, ``NaN`` in memory.
  Such images are excluded from the mean image score and from comparisons.
- Boxes are COCO ``[x, y, w, h]`` in original-image pixels; IoU is computed as pycocotools does for boxes
  (no +1), in float64, with the formula of :func:`torchvision.ops.box_iou`, for every (object, detection)
  pair of the dataset in one vectorised pass. Detections below ``score_thresh`` are dropped and
  ``max_dets`` (if given) keeps the highest-scoring detections of each image, as ``COCOeval``'s ``maxDets`` does.

The per-image file (JSON, ``format: cednet-quality/1``) carries a header identifying the dataset (annotation
file, image root, number of images and a SHA-1 of the sorted image-id set) so comparisons can detect quality
files computed on different datasets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cednet_pl.evaluation.coco_eval import load_coco_json, load_coco_results

__all__ = [
    "QUALITY_FORMAT",
    "DatasetIdentity",
    "ImageQuality",
    "ObjectScore",
    "QualityReport",
    "compute_quality",
    "dataset_identity",
    "finite_or_none",
    "match_objects",
    "quality_from_coco",
    "read_quality",
    "write_quality",
]

QUALITY_FORMAT = "cednet-quality/1"
TIE_BREAK = "largest IoU, then higher confidence, then earlier detection in the input order"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ObjectScore:
    """One annotated object and its match.

    Args:
        gt_id: COCO annotation id.
        category_id: COCO category id of the annotation.
        gt_box: annotated box, ``[x, y, w, h]``.
        det_box: matched detection box ``[x, y, w, h]``, ``None`` for the virtual match.
        iou: IoU of the match (0 for the virtual match).
        conf: confidence of the match (0 for the virtual match).
    """

    gt_id: int
    category_id: int
    gt_box: Box
    det_box: Box | None
    iou: float
    conf: float

    @property
    def score(self) -> float:
        return self.iou * self.conf


@dataclass(frozen=True)
class ImageQuality:
    """Quality of the detections of one image.

    Args:
        image_id: COCO image id.
        file_name: image file name relative to the image root.
        objects: the image's non-crowd objects with their matches.
        width: image width in pixels if known.
        height: image height in pixels if known.
    """

    image_id: int
    file_name: str
    objects: tuple[ObjectScore, ...]
    width: int | None = None
    height: int | None = None

    @property
    def score(self) -> float:
        """Mean object score, ``NaN`` for an image without objects."""
        if not self.objects:
            return math.nan
        return math.fsum(o.score for o in self.objects) / len(self.objects)


@dataclass(frozen=True)
class DatasetIdentity:
    """Which dataset a quality file was computed on.

    Args:
        ann_file: annotation file path as given.
        num_images: number of images in the annotation file.
        image_ids_sha1: SHA-1 of the sorted image ids of the annotation file (see :func:`dataset_identity`).
        image_root: directory holding the images (``file_name`` is relative to it), if known.
    """

    ann_file: str
    num_images: int
    image_ids_sha1: str
    image_root: str | None = None

    def same_dataset(self, other: DatasetIdentity) -> bool:
        return self.image_ids_sha1 == other.image_ids_sha1


@dataclass
class QualityReport:
    """Per-image quality of one model's detections on one dataset.

    Args:
        dataset: identity of the dataset.
        images: one entry per scored image, sorted by image id.
        class_agnostic: whether matches ignored categories.
        score_thresh: detections below this confidence were dropped.
        max_dets: at most this many detections per image were used (``None``: all).
        meta: free-form provenance (results file, checkpoint, epoch, global step, model name).
        path: the file this report was read from, if any.
    """

    dataset: DatasetIdentity
    images: list[ImageQuality]
    class_agnostic: bool = False
    score_thresh: float = 0.0
    max_dets: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def scores(self) -> dict[int, float]:
        """Image id -> image score (``NaN`` for images without objects)."""
        return {im.image_id: im.score for im in self.images}

    def by_id(self) -> dict[int, ImageQuality]:
        return {im.image_id: im for im in self.images}

    def mean_score(self) -> float:
        """Mean image score over the images that have objects (``NaN`` if none has)."""
        vals = [s for s in (im.score for im in self.images) if not math.isnan(s)]
        return math.fsum(vals) / len(vals) if vals else math.nan

    @property
    def name(self) -> str:
        return str(self.path or self.meta.get("results_file") or "<in-memory quality report>")


def dataset_identity(ann_file: str | Path, image_ids: Iterable[int], image_root: str | Path | None = None):
    """Identity of a dataset: its annotation file and a SHA-1 of its sorted image ids (``"1,2,3"``)."""
    ids = sorted(int(i) for i in image_ids)
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()
    return DatasetIdentity(
        ann_file=str(ann_file),
        num_images=len(ids),
        image_ids_sha1=digest,
        image_root=None if image_root is None else str(image_root),
    )


def _xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _pair_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of the box pairs ``a[i]``, ``b[i]`` (``xyxy``), as :func:`torchvision.ops.box_iou` computes it."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return (inter / (area_a + area_b - inter)).nan_to_num(0.0)


def _match_segments(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    det_start: torch.Tensor,
    det_count: torch.Tensor,
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    det_labels: torch.Tensor,
    class_agnostic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match objects of many images at once: object ``g`` may match detections ``det_start[g] + [0, det_count[g])``.

    Every (object, candidate) pair of the whole dataset is scored in one vectorised pass; the per-object
    maxima use ``scatter_reduce``. Returns ``(iou, conf, index)`` as :func:`match_objects` does, with ``index``
    into ``det_boxes``.
    """
    g = gt_boxes.shape[0]
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64)
    pair_gt = torch.repeat_interleave(torch.arange(g), det_count)
    first = torch.cumsum(det_count, 0) - det_count
    pair_det = det_start[pair_gt] + torch.arange(pair_gt.numel()) - first[pair_gt]
    iou = _pair_iou(gt_boxes.to(f64)[pair_gt], det_boxes.to(f64)[pair_det])
    if not class_agnostic:
        iou = torch.where(gt_labels[pair_gt] == det_labels[pair_det], iou, zero)
    best = torch.zeros(g, dtype=f64).scatter_reduce(0, pair_gt, iou, "amax")
    cand = (iou == best[pair_gt]) & (iou > 0)
    conf = torch.where(cand, det_scores.to(f64)[pair_det], torch.full((), -math.inf, dtype=f64))
    best_conf = torch.full((g,), -math.inf, dtype=f64).scatter_reduce(0, pair_gt, conf, "amax")
    cand &= conf == best_conf[pair_gt]
    sentinel = det_boxes.shape[0]
    index = torch.full((g,), sentinel).scatter_reduce(
        0, pair_gt, torch.where(cand, pair_det, torch.full((), sentinel)), "amin"
    )
    matched = best > 0
    safe = torch.where(matched, index, torch.zeros((), dtype=index.dtype))
    conf_out = torch.where(matched, det_scores.to(f64)[safe] if sentinel else zero, zero)
    return best, conf_out, torch.where(matched, index, torch.full((), -1))


def match_objects(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    det_labels: torch.Tensor,
    class_agnostic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match every object of one image to its largest-IoU detection.

    Args:
        gt_boxes: ``[G, 4]`` object boxes, ``xyxy``.
        gt_labels: ``[G]`` object categories.
        det_boxes: ``[D, 4]`` detection boxes, ``xyxy``.
        det_scores: ``[D]`` detection confidences.
        det_labels: ``[D]`` detection categories.
        class_agnostic: match across categories.

    Returns:
        ``(iou, conf, index)``, each ``[G]``: the match's IoU and confidence (0 for the virtual match) and the
        index of the matched detection (-1 for the virtual match). See the module docstring for tie-breaking.
    """
    g, d = gt_boxes.shape[0], det_boxes.shape[0]
    return _match_segments(
        gt_boxes,
        gt_labels,
        torch.zeros(g, dtype=torch.long),
        torch.full((g,), d, dtype=torch.long),
        det_boxes,
        det_scores,
        det_labels,
        class_agnostic,
    )


def _as_box(values: Sequence[float]) -> Box:
    x, y, w, h = (float(v) for v in values)
    return (x, y, w, h)


def compute_quality(
    images: Sequence[Mapping[str, Any]],
    annotations: Iterable[Mapping[str, Any]],
    detections: Iterable[Mapping[str, Any]],
    *,
    class_agnostic: bool = False,
    score_thresh: float = 0.0,
    max_dets: int | None = None,
) -> list[ImageQuality]:
    """Score the images of a COCO-style dataset (all images in one vectorised pass).

    Args:
        images: COCO ``images`` entries to score (``id``, ``file_name``; ``width``/``height`` optional).
        annotations: COCO ``annotations`` entries (``id``, ``image_id``, ``category_id``, ``bbox`` xywh,
            ``iscrowd``). Entries of images not in ``images`` are ignored.
        detections: COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
            Entries of images not in ``images`` are ignored.
        class_agnostic: match across categories.
        score_thresh: drop detections with a lower confidence.
        max_dets: keep at most this many detections per image (highest confidence first).

    Returns:
        One :class:`ImageQuality` per image, sorted by image id.
    """
    images = sorted(images, key=lambda m: int(m["id"]))
    slot = {int(im["id"]): k for k, im in enumerate(images)}
    anns = [a for a in annotations if int(a["image_id"]) in slot and not a.get("iscrowd", 0)]
    dets = [r for r in detections if int(r["image_id"]) in slot and float(r["score"]) >= score_thresh]

    # Detections: their image slots; max_dets keeps the highest scores of each image (input order on ties).
    det_img = np.array([slot[int(r["image_id"])] for r in dets], dtype=np.int64)
    det_score = np.array([float(r["score"]) for r in dets], dtype=np.float64)
    if max_dets is not None and len(dets):
        order = np.lexsort((np.arange(len(dets)), -det_score, det_img))
        rank = np.empty(len(dets), dtype=np.int64)
        starts = np.searchsorted(det_img[order], det_img[order], side="left")
        rank[order] = np.arange(len(dets)) - starts
        keep = np.flatnonzero(rank < max_dets)
        dets = [dets[i] for i in keep]
        det_img, det_score = det_img[keep], det_score[keep]
    # Candidates of an object: the detections of its image (and of its category unless class-agnostic),
    # contiguous after a stable sort by that key, so the input order survives within a segment.
    det_cat = np.array([int(r["category_id"]) for r in dets], dtype=np.int64)
    ann_img = np.array([slot[int(a["image_id"])] for a in anns], dtype=np.int64)
    ann_cat = np.array([int(a["category_id"]) for a in anns], dtype=np.int64)
    if class_agnostic:
        det_key, ann_key = det_img, ann_img
    else:
        cats, dense = np.unique(np.concatenate([det_cat, ann_cat]), return_inverse=True)
        det_key = det_img * len(cats) + dense[: len(dets)]
        ann_key = ann_img * len(cats) + dense[len(dets) :]
    order = np.argsort(det_key, kind="stable")
    dets = [dets[i] for i in order]
    det_key, det_score, det_cat = det_key[order], det_score[order], det_cat[order]
    det_xywh = torch.tensor([r["bbox"] for r in dets], dtype=torch.float64).reshape(-1, 4)

    # Objects: in image order, then annotation order.
    ann_order = np.argsort(ann_img, kind="stable")
    anns = [anns[i] for i in ann_order]
    ann_img, ann_key, ann_cat = ann_img[ann_order], ann_key[ann_order], ann_cat[ann_order]
    gt_xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
    first = np.searchsorted(det_key, ann_key, side="left").astype(np.int64)
    last = np.searchsorted(det_key, ann_key, side="right").astype(np.int64)
    iou, conf, index = _match_segments(
        _xywh_to_xyxy(gt_xywh),
        torch.from_numpy(ann_cat),
        torch.from_numpy(first),
        torch.from_numpy(last - first),
        _xywh_to_xyxy(det_xywh),
        torch.from_numpy(det_score),
        torch.from_numpy(det_cat),
        class_agnostic,
    )

    objects: list[list[ObjectScore]] = [[] for _ in images]
    for a, k, u, c, j in zip(
        anns, ann_img.tolist(), iou.tolist(), conf.tolist(), index.tolist(), strict=True
    ):
        objects[k].append(
            ObjectScore(
                gt_id=int(a.get("id", -1)),
                category_id=int(a["category_id"]),
                gt_box=_as_box(a["bbox"]),
                det_box=None if j < 0 else _as_box(dets[j]["bbox"]),
                iou=u,
                conf=c,
            )
        )
    return [
        ImageQuality(
            image_id=int(im["id"]),
            file_name=str(im.get("file_name", "")),
            objects=tuple(objs),
            width=None if im.get("width") is None else int(im["width"]),
            height=None if im.get("height") is None else int(im["height"]),
        )
        for im, objs in zip(images, objects, strict=True)
    ]


def quality_from_coco(
    ann_file: str | Path,
    results: str | Path | Sequence[Mapping[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    image_root: str | Path | None = None,
    class_agnostic: bool = False,
    score_thresh: float = 0.0,
    max_dets: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> QualityReport:
    """Quality report from a COCO annotation file and a COCO results JSON (or list).

    Args:
        ann_file: COCO annotation file.
        results: COCO results file path or the list of detections.
        image_ids: score only these images (default: every image of the annotation file). Use the ids that were
            actually evaluated, or the objects of unevaluated images would all score 0.
        image_root: directory of the images, recorded in the header for panels.
        class_agnostic: match across categories.
        score_thresh: drop detections with a lower confidence.
        max_dets: keep at most this many detections per image.
        meta: provenance written to the file.

    Raises:
        ValueError: results naming images or categories absent from the annotation file, unknown ``image_ids``.
    """
    data = load_coco_json(ann_file)
    dets = load_coco_results(results)
    all_images = {int(im["id"]): im for im in data["images"]}
    categories = {int(c["id"]) for c in data.get("categories", [])}
    bad_images = sorted({int(d["image_id"]) for d in dets} - all_images.keys())
    if bad_images:
        raise ValueError(
            f"results name {len(bad_images)} image id(s) absent from {ann_file}, e.g. {bad_images[:10]}: "
            "were they computed on another dataset?"
        )
    if categories:
        bad_cats = sorted({int(d["category_id"]) for d in dets} - categories)
        if bad_cats:
            raise ValueError(
                f"results use category id(s) {bad_cats[:10]} absent from the categories of {ann_file}"
            )
    if image_ids is None:
        chosen = list(all_images.values())
    else:
        ids = [int(i) for i in image_ids]
        unknown = sorted(set(ids) - all_images.keys())
        if unknown:
            raise ValueError(f"{len(unknown)} image id(s) absent from {ann_file}, e.g. {unknown[:10]}")
        chosen = [all_images[i] for i in sorted(set(ids))]
    images = compute_quality(
        chosen,
        data["annotations"],
        dets,
        class_agnostic=class_agnostic,
        score_thresh=score_thresh,
        max_dets=max_dets,
    )
    info = dict(meta or {})
    if isinstance(results, str | Path):
        info.setdefault("results_file", str(results))
    return QualityReport(
        dataset=dataset_identity(ann_file, all_images.keys(), image_root),
        images=images,
        class_agnostic=class_agnostic,
        score_thresh=score_thresh,
        max_dets=max_dets,
        meta=info,
    )


def finite_or_none(x: float) -> float | None:
    """A score for JSON: NaN (no objects to score) becomes null."""
    return None if math.isnan(x) else x


def write_quality(report: QualityReport, path: str | Path) -> Path:
    """Write a report as ``cednet-quality/1`` JSON (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_obj = sum(len(im.objects) for im in report.images)
    doc = {
        "format": QUALITY_FORMAT,
        "dataset": {
            "ann_file": report.dataset.ann_file,
            "image_root": report.dataset.image_root,
            "num_images": report.dataset.num_images,
            "image_ids_sha1": report.dataset.image_ids_sha1,
        },
        "settings": {
            "class_agnostic": report.class_agnostic,
            "score_thresh": report.score_thresh,
            "max_dets": report.max_dets,
            "tie_break": TIE_BREAK,
        },
        "meta": report.meta,
        "summary": {
            "mean_image_score": finite_or_none(report.mean_score()),
            "num_images": len(report.images),
            "num_scored_images": sum(1 for im in report.images if im.objects),
            "num_objects": n_obj,
        },
        "images": [
            {
                "image_id": im.image_id,
                "file_name": im.file_name,
                "width": im.width,
                "height": im.height,
                "score": finite_or_none(im.score),
                "objects": [
                    {
                        "gt_id": o.gt_id,
                        "category_id": o.category_id,
                        "gt_bbox": list(o.gt_box),
                        "det_bbox": None if o.det_box is None else list(o.det_box),
                        "iou": o.iou,
                        "conf": o.conf,
                        "score": o.score,
                    }
                    for o in im.objects
                ],
            }
            for im in report.images
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, allow_nan=False))
    tmp.replace(path)
    return path


def read_quality(path: str | Path) -> QualityReport:
    """Read a ``cednet-quality/1`` file, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quality file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"quality file {path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != QUALITY_FORMAT:
        raise ValueError(
            f"{path} is not a per-image quality file (expected a JSON object with format={QUALITY_FORMAT!r}; "
            "write one with the DetectionQuality callback or cednet-compare)"
        )
    ds, st = doc["dataset"], doc["settings"]
    images = [
        ImageQuality(
            image_id=int(im["image_id"]),
            file_name=im["file_name"],
            width=im.get("width"),
            height=im.get("height"),
            objects=tuple(
                ObjectScore(
                    gt_id=int(o["gt_id"]),
                    category_id=int(o["category_id"]),
                    gt_box=_as_box(o["gt_bbox"]),
                    det_box=None if o["det_bbox"] is None else _as_box(o["det_bbox"]),
                    iou=float(o["iou"]),
                    conf=float(o["conf"]),
                )
                for o in im["objects"]
            ),
        )
        for im in doc["images"]
    ]
    return QualityReport(
        dataset=DatasetIdentity(
            ann_file=ds["ann_file"],
            num_images=int(ds["num_images"]),
            image_ids_sha1=ds["image_ids_sha1"],
            image_root=ds.get("image_root"),
        ),
        images=images,
        class_agnostic=bool(st["class_agnostic"]),
        score_thresh=float(st["score_thresh"]),
        max_dets=st.get("max_dets"),
        meta=dict(doc.get("meta") or {}),
        path=str(path),
    )
