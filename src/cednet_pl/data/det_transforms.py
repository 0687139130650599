"""Detection augmentation on torchvision.transforms.v2 tv_tensors: large-scale jitter and copy-paste.

Samples are ``(image, target)`` with ``image`` a uint8 ``tv_tensors.Image`` and ``target`` a dict holding
``boxes`` (``tv_tensors.BoundingBoxes``, XYXY), ``labels`` and, when copy-paste is on, ``masks``
(``tv_tensors.Mask``, one channel per object). v2 transforms move boxes and masks with the image, and
``SanitizeBoundingBoxes`` drops boxes (with their labels and masks) that a crop made degenerate.

With instance masks (Mask R-CNN), :func:`boxes_from_masks` then recomputes every box from its transformed mask
and drops the objects whose mask the crop emptied.

Test-time resizing (shorter side 800, longer <= 1333, padding to a multiple of 128) is not here: the
detector's own transform does it, so that detections come back in original image coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

__all__ = ["IMAGENET_FILL", "boxes_from_masks", "build_train_transforms", "copy_paste", "mask_boxes"]

#: Padding colour of LSJ canvases: the ImageNet mean, i.e. zero after the model's normalisation.
IMAGENET_FILL = (124, 116, 104)


def build_train_transforms(
    size: int = 1024,
    scale_range: Sequence[float] = (0.1, 2.0),
    hflip_prob: float = 0.5,
    fill: Sequence[int] = IMAGENET_FILL,
) -> v2.Compose:
    """Large-scale jitter: random resize of the ``size x size`` fit by a factor in ``scale_range``,
    random crop (padding where the image is smaller) to ``size x size``, horizontal flip.

    Args:
        size: Output side in pixels (1024 in the COCO recipe).
        scale_range: Range of the random scale factor relative to the fit into ``size x size``.
        hflip_prob: Probability of a horizontal flip.
        fill: Padding colour of the image (masks are padded with 0).
    """
    return v2.Compose(
        [
            v2.ScaleJitter(target_size=(size, size), scale_range=tuple(scale_range), antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: tuple(fill), "others": 0}),
            v2.RandomHorizontalFlip(hflip_prob),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (xyxy pixel edges, float32) of non-empty masks (N, H, W)."""
    # NOTE: masks_to_boxes gives inclusive pixel indices; boxes are pixel edges, hence + 1 on x2/y2.
    boxes = masks_to_boxes(masks.bool()).float()
    boxes[:, 2:] += 1
    return boxes


def boxes_from_masks(target: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Recompute every box from its mask and drop objects whose mask is empty (e.g. cropped away).

    Args:
        target: ``boxes`` (``BoundingBoxes``), ``labels``, ``masks`` (N, H, W) and possibly other per-image keys.

    Returns:
        The new target (boxes on the same canvas) and the number of objects dropped.
    """
    masks = target["masks"]
    visible = masks.flatten(1).bool().any(1)
    out = dict(target)
    out["masks"] = tv_tensors.Mask(masks[visible])
    out["labels"] = target["labels"][visible]
    out["boxes"] = tv_tensors.BoundingBoxes(
        mask_boxes(masks[visible]),
        format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=tuple(masks.shape[-2:]),
    )
    return out, int((~visible).sum())


def copy_paste(
    image: torch.Tensor,
    target: dict[str, Any],
    src_image: torch.Tensor,
    src_target: dict[str, Any],
    max_objects: int = 7,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Paste a random non-empty subset (at most ``max_objects``) of ``src``'s objects onto ``image``.

    The pasted pixels are those of the chosen objects' masks. Objects of the base image lose the pasted
    pixels from their masks; where that changes a mask, its box is recomputed from what stays visible,
    and objects left with no visible pixel are removed. Both samples must have the same size (the
    fixed-size LSJ output); otherwise the base sample is returned unchanged.

    Args:
        image: Base image (C, H, W).
        target: Base target with ``boxes``, ``labels``, ``masks``.
        src_image: Source image, same size.
        src_target: Source target with ``boxes``, ``labels``, ``masks``.
        max_objects: Most objects pasted (7 in the original recipe).
        generator: Random generator for the subset choice.

    Returns:
        The augmented ``(image, target)``; ``boxes`` stay a ``BoundingBoxes`` on the same canvas.
    """
    n_src = len(src_target["labels"])
    if n_src == 0 or image.shape[-2:] != src_image.shape[-2:]:
        return image, target
    count = int(torch.randint(1, min(n_src, max_objects) + 1, (1,), generator=generator))
    keep = torch.zeros(n_src, dtype=torch.bool)
    keep[torch.randperm(n_src, generator=generator)[:count]] = True
    src_masks = src_target["masks"][keep].bool()
    pasted = src_masks.any(0)

    out_image = torch.where(pasted, src_image, image)
    masks = target["masks"].bool() & ~pasted
    boxes = target["boxes"].as_subclass(torch.Tensor).clone()
    changed = (target["masks"].bool() & pasted).flatten(1).any(1)
    visible = masks.flatten(1).any(1)
    recompute = changed & visible
    if recompute.any():
        boxes[recompute] = mask_boxes(masks[recompute]).to(boxes.dtype)
    boxes, labels, masks = boxes[visible], target["labels"][visible], masks[visible]

    canvas = target["boxes"].canvas_size
    src_boxes = src_target["boxes"].as_subclass(torch.Tensor)[keep].to(boxes.dtype)
    out_target = dict(target)
    out_target["boxes"] = tv_tensors.BoundingBoxes(
        torch.cat([boxes, src_boxes]), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=canvas
    )
    out_target["labels"] = torch.cat([labels, src_target["labels"][keep]])
    out_target["masks"] = tv_tensors.Mask(torch.cat([masks, src_masks]).to(target["masks"].dtype))
    return tv_tensors.Image(out_image), out_target
