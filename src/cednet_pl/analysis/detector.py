"""One analysis pass of a trained detector over chosen images: gradient maps, area curves, detections.

The detector is anything with ``forward_with_loss(images, targets) -> (losses, detections)`` (see
:class:`cednet_pl.models.detection.RetinaNetDetector`): ``images`` are ``[0, 1]`` tensors at original resolution,
``losses`` a dict of batch-mean scalar losses (torchvision's RetinaNet divides by the number of images), and
``detections`` per image ``boxes`` (xyxy, original pixels), ``scores``, ``labels`` (contiguous). The dataset is a
COCO-style dataset as :class:`cednet_pl.data.coco.COCODetection` (``image_ids``, ``images``, ``__getitem__`` giving
``(image, {"boxes", "labels", "image_id"})`` at original resolution, plus ``"masks"`` for Mask R-CNN,
``label_to_category_id``). :class:`cednet_pl.models.detection.MaskRCNNDetector` works the same way (its losses:
RPN, box and mask).

The pass runs the detector in eval mode (no drop path, frozen norm statistics) and puts every submodule's mode
back afterwards; it differentiates the total loss (sum over images of their losses) with respect to the input
pixels only, so parameters, their ``.grad`` and any optimizer state are untouched. The detections come from
the same forward pass, so panels show exactly what the gradients explain.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cednet_pl.analysis.regions import (
    NORMALIZATIONS,
    area_fractions,
    default_thresholds,
    input_gradients,
    normalize_maps,
)
from cednet_pl.evaluation.coco_eval import detections_to_coco_results

__all__ = ["DetectorPass", "eval_mode", "gradient_pass", "image_index"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode and restore every submodule's own ``training`` flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def image_index(dataset: Any) -> dict[int, int]:
    """Image id -> dataset index."""
    return {int(i): k for k, i in enumerate(dataset.image_ids)}


@dataclass
class DetectorPass:
    """What one pass produced.

    Args:
        image_ids: the analysed images, in the requested order.
        fractions: ``[N, T]`` per-image area fractions at ``thresholds`` (rows in ``image_ids`` order).
        thresholds: ``[T]`` thresholds.
        results: COCO results entries of the same forward pass.
        maps: gradient maps kept on request (``keep_maps``), by image id.
        seconds: wall time of the pass.
    """

    image_ids: list[int]
    fractions: torch.Tensor
    thresholds: torch.Tensor
    results: list[dict[str, Any]]
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def gradient_pass(
    detector: nn.Module,
    dataset: Any,
    image_ids: Sequence[int],
    *,
    batch_size: int = 4,
    channel_reduce: str = "max",
    normalize: str = "image",
    thresholds: torch.Tensor | None = None,
    keep_maps: Collection[int] = (),
    device: torch.device | str | None = None,
) -> DetectorPass:
    """Gradient maps, their area curves and the detections of ``detector`` on ``image_ids`` of ``dataset``.

    Args:
        detector: model with ``forward_with_loss`` (its parameters' device is used unless ``device`` is given).
        dataset: COCO-style dataset (see the module docstring).
        image_ids: images to analyse (ids of ``dataset``).
        batch_size: images per forward pass (grouped by size).
        channel_reduce: reduction of ``|gradient|`` over RGB (see :mod:`cednet_pl.analysis.regions`).
        normalize: map normalisation for the area curves; ``"global"`` keeps every map in memory until the end.
        thresholds: area-curve thresholds (default 101 from 0 to 1).
        keep_maps: image ids whose raw maps are returned (for panels).
        device: where to run (default: the detector's device).

    Raises:
        ValueError: an id not in ``dataset``, a detector without ``forward_with_loss``.
    """
    if not callable(getattr(detector, "forward_with_loss", None)):
        raise ValueError(
            f"{type(detector).__name__} has no forward_with_loss(images, targets): not a detector built by "
            "cednet_pl.models.detection"
        )
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    index = image_index(dataset)
    missing = [int(i) for i in image_ids if int(i) not in index]
    if missing:
        raise ValueError(f"{len(missing)} image id(s) are not in the dataset, e.g. {missing[:10]}")
    if device is None:
        device = next(detector.parameters()).device
    # NOTE: Lightning runs validation hooks under inference mode, which enable_grad alone does not leave;
    # every tensor of the pass is created outside it.
    with torch.inference_mode(False), torch.enable_grad():
        return _gradient_pass(
            detector,
            dataset,
            image_ids,
            index,
            batch_size,
            channel_reduce,
            normalize,
            thresholds,
            keep_maps,
            device,
        )


def _gradient_pass(
    detector: nn.Module,
    dataset: Any,
    image_ids: Sequence[int],
    index: dict[int, int],
    batch_size: int,
    channel_reduce: str,
    normalize: str,
    thresholds: torch.Tensor | None,
    keep_maps: Collection[int],
    device: torch.device | str,
) -> DetectorPass:
    thr = default_thresholds() if thresholds is None else thresholds.clone().to(torch.float64)
    label_to_cat = list(dataset.label_to_category_id)
    keep = {int(i) for i in keep_maps}
    start = time.perf_counter()

    ids = [int(i) for i in image_ids]
    fractions = torch.zeros(len(ids), thr.numel(), dtype=torch.float64)
    results: list[dict[str, Any]] = []
    kept: dict[int, torch.Tensor] = {}
    all_maps: list[torch.Tensor] = []

    def loss_fn(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> torch.Tensor:
        # NOTE: masks (an instance-segmentation dataset) go along for Mask R-CNN's mask loss
        keys = ("boxes", "labels", "masks")
        losses, detections = detector.forward_with_loss(
            images, [{k: t[k].to(device) for k in keys if k in t} for t in targets]
        )
        results.extend(detections_to_coco_results([t["image_id"] for t in targets], detections, label_to_cat))
        # NOTE: torchvision's RetinaNet losses are means over the batch; the sum over images keeps each
        # image's gradient equal to the gradient of its own loss.
        return sum(losses.values()) * len(images)

    with eval_mode(detector):
        # NOTE: chunks of a few batches bound the memory of the loaded images; maps are reduced right away.
        chunk = max(1, batch_size) * 8
        for lo in range(0, len(ids), chunk):
            part = ids[lo : lo + chunk]
            samples = [dataset[index[i]] for i in part]
            images = [img.to(device) for img, _ in samples]
            targets = [{**t, "image_id": iid} for (_, t), iid in zip(samples, part, strict=True)]
            maps = input_gradients(
                loss_fn, images, targets, channel_reduce=channel_reduce, batch_size=batch_size
            )
            for row, (iid, gmap) in enumerate(zip(part, maps, strict=True), start=lo):
                if iid in keep:
                    kept[iid] = gmap
                if normalize == "global":
                    all_maps.append(gmap)
                else:
                    fractions[row] = area_fractions(normalize_maps([gmap], normalize)[0], thr)
    if normalize == "global":
        for row, gmap in enumerate(normalize_maps(all_maps, "global")):
            fractions[row] = area_fractions(gmap, thr)
    return DetectorPass(
        image_ids=ids,
        fractions=fractions,
        thresholds=thr,
        results=results,
        maps=kept,
        seconds=time.perf_counter() - start,
    )
