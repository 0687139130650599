"""Input-gradient maps and important-region area curves (CEDNet, arXiv 2302.06052, appendix B).

Gradient maps. The trained detector, in eval mode, computes its total detection loss against the annotations;
the loss is backpropagated to the input pixels of each image **at its original resolution** (the leaf tensor is
the ``[0, 1]`` RGB image we load; resizing, normalisation and padding happen inside the differentiable model).
The map of an image is the absolute gradient reduced over the RGB channels, by default with the maximum
(``channel_reduce="max"``: ``max_c |dL/dx_c|``; ``"l2"`` and ``"sum"`` are the alternatives).
Only the input leaves are differentiated (``torch.autograd.grad``), so parameter ``.grad`` fields stay untouched.

Batching. Images of different sizes go through the model together (a list of tensors), grouped by size so a batch
pads as little as possible. The loss callable must return the **sum** of the per-image losses (or a ``[B]``
tensor of them) so that an image's gradient is its own loss's gradient: torchvision's RetinaNet averages its loss
over the batch, so its adapter multiplies by the batch size. A detector whose outputs depend on the padded batch
(GroupNorm over padded borders, anchors on the padding) gives slightly batch-dependent maps; ``batch_size=1``
removes that dependence.

Normalisation (both axes of the Figure A2 plot are in ``[0, 1]``):

- ``normalize="image"`` (default): each map is divided by its own maximum, so its values lie in ``[0, 1]`` and the
  maximum is exactly 1. A map that is zero everywhere stays zero.
- ``normalize="global"``: every map is divided by the largest value over all maps of the set (one model).
- ``normalize="none"``: raw gradient magnitudes (thresholds are then absolute).

Area fraction. For a threshold ``t`` the important region is ``{pixels: map > t}`` (strict); its area fraction is
its pixel count over the image's pixel count (original resolution). Hence for each image the fraction is
non-increasing in ``t``, equals 1 for ``t`` below the map's minimum and 0 for ``t`` at or above its maximum (so 0 at
``t = 1`` with ``normalize="image"``). The curve of a set is the mean of the per-image fractions, each image
weighing the same whatever its size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REGIONS_FORMAT",
    "RegionCurve",
    "area_curves",
    "area_fractions",
    "default_thresholds",
    "input_gradients",
    "input_gradients_raw",
    "normalize_maps",
    "read_curve",
    "reduce_channels",
    "region_curve",
    "size_batches",
    "write_curve",
]

REGIONS_FORMAT = "cednet-regions/1"
CHANNEL_REDUCTIONS = ("max", "l2", "sum")
NORMALIZATIONS = ("image", "global", "none")

LossFn = Callable[[list[torch.Tensor], Any], torch.Tensor]


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int | None) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, similar sizes together (``None``: one batch)."""
    n = len(sizes)
    if batch_size is None or batch_size >= n:
        return [list(range(n))] if n else []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    order = sorted(range(n), key=lambda i: (sizes[i][0] / max(sizes[i][1], 1), sizes[i][0] * sizes[i][1], i))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def input_gradients_raw(
    loss_fn: LossFn,
    images: Sequence[torch.Tensor],
    targets: Sequence[Any] | None = None,
    *,
    batch_size: int | None = None,
) -> list[torch.Tensor]:
    """Signed gradients of the loss with respect to each input image.

    Args:
        loss_fn: ``loss_fn(images, targets) -> loss`` with ``images`` a list of ``[C, H, W]`` tensors (leaves we
            create, at original resolution) and ``targets`` the matching slice of ``targets`` (``None`` if not
            given). It returns the sum of the per-image losses (scalar) or the ``[B]`` per-image losses.
        images: ``[C, H, W]`` images, any sizes, on the model's device.
        targets: per-image targets passed through to ``loss_fn``.
        batch_size: images per call of ``loss_fn`` (``None``: all in one call), grouped by size.

    Returns:
        One ``[C, H, W]`` gradient per image, detached, in the input order and dtype.
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in size_batches([tuple(im.shape[-2:]) for im in images], batch_size):
        leaves = [images[i].detach().clone().requires_grad_(True) for i in idx]
        chunk_targets = None if targets is None else [targets[i] for i in idx]
        with torch.enable_grad():
            loss = loss_fn(leaves, chunk_targets)
            if loss.ndim == 1 and loss.shape[0] == len(leaves):
                loss = loss.sum()
            elif loss.ndim != 0:
                raise ValueError(
                    f"loss_fn must return a scalar or one loss per image ({len(leaves)}), got shape {tuple(loss.shape)}"
                )
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for i, leaf, g in zip(idx, leaves, grads, strict=True):
            out[i] = torch.zeros_like(leaf).detach() if g is None else g.detach()
    return [g for g in out if g is not None]


def reduce_channels(grad: torch.Tensor, channel_reduce: str = "max") -> torch.Tensor:
    """``[C, H, W]`` signed gradient -> ``[H, W]`` non-negative map (max, L2 or sum of ``|g|`` over channels)."""
    if channel_reduce not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, got {channel_reduce!r}")
    if grad.ndim == 2:
        return grad.abs()
    if grad.ndim != 3:
        raise ValueError(f"expected a [C, H, W] gradient, got shape {tuple(grad.shape)}")
    a = grad.abs()
    if channel_reduce == "max":
        return a.amax(dim=0)
    if channel_reduce == "l2":
        return a.square().sum(dim=0).sqrt()
    return a.sum(dim=0)


def input_gradients(
    loss_fn: LossFn,
    images: Sequence[torch.Tensor],
    targets: Sequence[Any] | None = None,
    *,
    channel_reduce: str = "max",
    batch_size: int | None = None,
) -> list[torch.Tensor]:
    """Absolute input-gradient maps ``[H, W]`` (float32, CPU), one per image at its original resolution.

    See :func:`input_gradients_raw` for the arguments and the module docstring for the definition.
    """
    raw = input_gradients_raw(loss_fn, images, targets, batch_size=batch_size)
    return [reduce_channels(g, channel_reduce).float().cpu() for g in raw]


def normalize_maps(maps: Sequence[torch.Tensor], normalize: str = "image") -> list[torch.Tensor]:
    """Scale maps as described in the module docstring (``image``, ``global`` or ``none``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "none":
        return list(maps)
    if normalize == "image":
        return [m / m.max() if m.numel() and m.max() > 0 else torch.zeros_like(m) for m in maps]
    top = max((float(m.max()) for m in maps if m.numel()), default=0.0)
    return [m / top if top > 0 else torch.zeros_like(m) for m in maps]


def default_thresholds(num: int = 101) -> torch.Tensor:
    """``num`` evenly spaced thresholds from 0 to 1 (float64)."""
    return torch.linspace(0.0, 1.0, num, dtype=torch.float64)


def area_fractions(gmap: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Fraction of the pixels of ``gmap`` strictly greater than each threshold (float64 ``[T]``)."""
    flat = gmap.detach().flatten().to(torch.float64)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot compute the area fractions of an empty map")
    # bucketize needs ascending boundaries: count against the sorted thresholds, answer in the caller's order
    thr, order = thresholds.to(device=flat.device, dtype=torch.float64).flatten().sort()
    # NOTE: one bucketize + bincount instead of sorting the map (3x faster at 256x256): bucket i holds the pixels
    # with thr[i-1] < x <= thr[i], so the cumulative count at j is the number of pixels <= thr[j]
    at_most = torch.empty_like(order)
    at_most[order] = torch.bincount(torch.bucketize(flat, thr), minlength=thr.numel() + 1).cumsum(0)[:-1]
    return (n - at_most).to(torch.float64) / n


def area_curves(
    maps: Sequence[torch.Tensor], thresholds: torch.Tensor | None = None, normalize: str = "image"
) -> torch.Tensor:
    """Per-image area fractions ``[N, T]`` of (normalised) maps."""
    thr = default_thresholds() if thresholds is None else thresholds
    if not maps:
        return torch.zeros(0, thr.numel(), dtype=torch.float64)
    return torch.stack([area_fractions(m, thr) for m in normalize_maps(maps, normalize)])


@dataclass
class RegionCurve:
    """Mean important-region area fraction of one model over a set of images.

    Args:
        name: model name shown in the legend.
        thresholds: ``[T]`` thresholds.
        area_fraction: ``[T]`` mean area fraction over the images.
        area_fraction_std: ``[T]`` standard deviation over the images.
        image_ids: the images the curve averages.
        normalize: the normalisation of the maps.
        channel_reduce: the reduction of the gradient over RGB.
        meta: provenance (checkpoint, epoch, run dir, timing).
    """

    name: str
    thresholds: list[float]
    area_fraction: list[float]
    area_fraction_std: list[float]
    image_ids: list[int]
    normalize: str = "image"
    channel_reduce: str = "max"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def auc(self) -> float:
        """Area under the mean curve (trapezoid over the thresholds): the mean important-region size."""
        x, y = self.thresholds, self.area_fraction
        return math.fsum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def region_curve(
    name: str,
    maps: Sequence[torch.Tensor],
    image_ids: Sequence[int],
    *,
    thresholds: torch.Tensor | None = None,
    normalize: str = "image",
    channel_reduce: str = "max",
    meta: dict[str, Any] | None = None,
) -> RegionCurve:
    """Average the per-image area fractions of ``maps`` into a :class:`RegionCurve`."""
    if len(maps) != len(image_ids):
        raise ValueError(f"got {len(maps)} maps but {len(image_ids)} image ids")
    if not maps:
        raise ValueError("cannot build an area curve from zero images")
    thr = default_thresholds() if thresholds is None else thresholds.to(torch.float64)
    per_image = area_curves(maps, thr, normalize)
    return RegionCurve(
        name=name,
        thresholds=thr.tolist(),
        area_fraction=per_image.mean(dim=0).tolist(),
        area_fraction_std=per_image.std(dim=0, correction=0).tolist(),
        image_ids=[int(i) for i in image_ids],
        normalize=normalize,
        channel_reduce=channel_reduce,
        meta=dict(meta or {}),
    )


def write_curve(curve: RegionCurve, path: str | Path) -> Path:
    """Write a curve as ``cednet-regions/1`` JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": REGIONS_FORMAT,
        "name": curve.name,
        "normalize": curve.normalize,
        "channel_reduce": curve.channel_reduce,
        "num_images": len(curve.image_ids),
        "auc": curve.auc,
        "thresholds": curve.thresholds,
        "area_fraction": curve.area_fraction,
        "area_fraction_std": curve.area_fraction_std,
        "image_ids": curve.image_ids,
        "meta": curve.meta,
    }
    path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    return path


def read_curve(path: str | Path) -> RegionCurve:
    """Read a ``cednet-regions/1`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"area-curve file {path} does not exist")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != REGIONS_FORMAT:
        raise ValueError(f"{path} is not an area-curve file (expected format={REGIONS_FORMAT!r})")
    return RegionCurve(
        name=doc["name"],
        thresholds=list(doc["thresholds"]),
        area_fraction=list(doc["area_fraction"]),
        area_fraction_std=list(doc["area_fraction_std"]),
        image_ids=[int(i) for i in doc["image_ids"]],
        normalize=doc["normalize"],
        channel_reduce=doc["channel_reduce"],
        meta=dict(doc.get("meta") or {}),
    )
