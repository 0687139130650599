"""Choosing images for the analysis: the top-K comparison and image-list files.

Top-K (CEDNet appendix B): among the images both quality files score (common image ids whose image score is
defined in both, i.e. the image has at least one non-crowd object), keep the K with the largest
``score_A - score_B``; ties are broken by the smaller image id. Asking for more images than there are common ones
is an error unless ``clamp=True``, which keeps all of them and warns.

Image lists. :func:`write_selection` writes a JSON file (``format: cednet-images/1``) with the selected ids, their
scores and the identity of both quality files. :func:`read_image_ids` reads that file, a JSON list of ids, a JSON
object with an ``image_ids`` list, or a text file with one id per line (blank lines and ``#`` comments ignored).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cednet_pl.analysis.quality import QualityReport, finite_or_none

__all__ = [
    "IMAGES_FORMAT",
    "Selected",
    "check_image_ids",
    "read_image_ids",
    "select_top_k",
    "write_selection",
]

IMAGES_FORMAT = "cednet-images/1"


@dataclass(frozen=True)
class Selected:
    """One selected image.

    Args:
        image_id: COCO image id.
        file_name: its file name.
        score_a: image score of model A.
        score_b: image score of model B.
    """

    image_id: int
    file_name: str
    score_a: float
    score_b: float

    @property
    def gain(self) -> float:
        return self.score_a - self.score_b


def select_top_k(a: QualityReport, b: QualityReport, k: int = 1000, *, clamp: bool = False) -> list[Selected]:
    """The ``k`` common images where A's image score exceeds B's the most, largest gain first.

    Args:
        a: quality of model A (the model expected to be better).
        b: quality of model B.
        k: number of images.
        clamp: if fewer than ``k`` images are common, return them all with a warning instead of raising.

    Raises:
        ValueError: no common scored image (different datasets), ``k`` larger than the common images
            (without ``clamp``), or ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not a.dataset.same_dataset(b.dataset):
        warnings.warn(
            f"quality files {a.name} and {b.name} come from different image sets "
            f"({a.dataset.ann_file}, {a.dataset.num_images} images vs {b.dataset.ann_file}, "
            f"{b.dataset.num_images} images); comparing their common images only",
            stacklevel=2,
        )
    sa, sb = a.scores(), b.scores()
    ids_a = {i for i, s in sa.items() if not math.isnan(s)}
    ids_b = {i for i, s in sb.items() if not math.isnan(s)}
    common = ids_a & ids_b
    if not common:
        raise ValueError(
            f"quality files {a.name} ({len(ids_a)} scored images of {a.dataset.ann_file}) and {b.name} "
            f"({len(ids_b)} scored images of {b.dataset.ann_file}) have no image in common: "
            "were they computed on different datasets?"
        )
    if k > len(common):
        msg = (
            f"asked for the top {k} images but {a.name} and {b.name} have only {len(common)} scored images "
            "in common; lower K (or pass clamp / --clamp to keep all of them)"
        )
        if not clamp:
            raise ValueError(msg)
        warnings.warn(msg + f"; keeping all {len(common)}", stacklevel=2)
        k = len(common)
    files = {im.image_id: im.file_name for im in a.images}
    ranked = sorted(common, key=lambda i: (-(sa[i] - sb[i]), i))[:k]
    return [Selected(i, files[i], sa[i], sb[i]) for i in ranked]


def write_selection(
    selected: Sequence[Selected], path: str | Path, a: QualityReport, b: QualityReport, **meta: Any
) -> Path:
    """Write the selection (ids, file names, both scores and gains) with both files' identity."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": IMAGES_FORMAT,
        "rule": "top-K of score_a - score_b over common scored images, ties by smaller image id",
        "a": {
            "quality_file": a.name,
            "ann_file": a.dataset.ann_file,
            "image_ids_sha1": a.dataset.image_ids_sha1,
        },
        "b": {
            "quality_file": b.name,
            "ann_file": b.dataset.ann_file,
            "image_ids_sha1": b.dataset.image_ids_sha1,
        },
        "meta": meta,
        "image_ids": [s.image_id for s in selected],
        "images": [
            {
                "image_id": s.image_id,
                "file_name": s.file_name,
                "score_a": finite_or_none(s.score_a),
                "score_b": finite_or_none(s.score_b),
            }
            for s in selected
        ],
    }
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def read_image_ids(path: str | Path) -> list[int]:
    """Image ids from a selection file, a JSON list / ``{"image_ids": [...]}``, or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist")
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"image list {path} is not valid JSON: {err}") from err
        ids = doc.get("image_ids") if isinstance(doc, dict) else doc
        if not isinstance(ids, list):
            raise ValueError(
                f"image list {path}: expected a JSON list of ids or an object with an 'image_ids' list"
            )
        raw: list[Any] = ids
    else:
        raw = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        raw = [r for r in raw if r]
    out = []
    for n, r in enumerate(raw, 1):
        try:
            out.append(int(r))
        except (TypeError, ValueError):
            raise ValueError(f"image list {path}: entry {n} ({r!r}) is not an integer image id") from None
    return out


def check_image_ids(
    requested: Iterable[int], available: Iterable[int], source: str, dataset: str
) -> list[int]:
    """Return ``requested`` (order kept, duplicates dropped) or raise naming the ids ``dataset`` lacks."""
    avail = set(available)
    req = list(dict.fromkeys(int(i) for i in requested))
    unknown = [i for i in req if i not in avail]
    if unknown:
        raise ValueError(
            f"{source} names {len(unknown)} image id(s) that {dataset} does not contain, e.g. {unknown[:10]} "
            f"(it has {len(avail)} images)"
        )
    if not req:
        raise ValueError(f"{source} names no image")
    return req
