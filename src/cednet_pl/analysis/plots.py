"""Figures of the analysis (CEDNet, arXiv 2302.06052, appendix B), drawn with matplotlib's Agg canvas.

- Figure A2 style, :func:`plot_area_curves`: the important-region area fraction against the threshold for several
  models in one plot; both axes run over ``[0, 1]`` (normalised thresholds, fraction of the image area).
- Figure A1 style, :func:`save_panel` / :func:`save_comparison_panel`: the image with the annotated boxes in red and
  each object's matched detection in blue with ``(IoU, confidence)`` above it (virtual matches have no box), the
  image score in the top-left corner, and the gradient map beside it (grey scale, brighter = larger gradient;
  the map is divided by its 99.5th percentile and clipped at 1 so a few extreme pixels do not darken the rest).
  A comparison panel shows model B on the left and model A on the right.

No pyplot state is used, so the functions are safe in callbacks and worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cednet_pl.analysis.quality import ImageQuality
from cednet_pl.analysis.regions import RegionCurve

__all__ = ["draw_detections", "draw_gradient", "plot_area_curves", "save_comparison_panel", "save_panel"]

GT_COLOR = "red"
DET_COLOR = "blue"
DISPLAY_QUANTILE = 0.995


def _to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return np.clip(arr, 0.0, 1.0)


def draw_detections(
    ax, image: torch.Tensor | np.ndarray, entry: ImageQuality, title: str | None = None
) -> None:
    """Draw ``image`` with red annotated boxes, blue matched detections with ``(iou, conf)``, the image score."""
    img = _to_numpy_image(image)
    h, w = img.shape[:2]
    ax.imshow(img, cmap=None if img.ndim == 3 else "gray", interpolation="nearest")
    fontsize = max(6.0, min(10.0, 0.03 * min(h, w)))
    for o in entry.objects:
        x, y, bw, bh = o.gt_box
        ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=GT_COLOR, linewidth=1.5))
    for o in entry.objects:
        if o.det_box is None:
            continue
        x, y, bw, bh = o.det_box
        ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=DET_COLOR, linewidth=1.5))
        # NOTE: the label goes above the box, or below it when the box touches the top edge.
        above = y > 2.0 * fontsize
        # NOTE: near the right edge the label is right-aligned with the box so it stays inside the image.
        right = x > 0.7 * w
        ax.text(
            x + bw if right else x,
            y - 1.0 if above else y + bh + 1.0,
            f"({o.iou:.2f}, {o.conf:.2f})",
            color="white",
            fontsize=fontsize,
            va="bottom" if above else "top",
            ha="right" if right else "left",
            bbox={"facecolor": DET_COLOR, "alpha": 0.75, "pad": 1.0, "linewidth": 0},
            clip_on=True,
        )
    score = entry.score
    ax.text(
        2,
        2,
        "no objects" if math.isnan(score) else f"{score:.3f}",
        color="black",
        fontsize=fontsize + 1,
        fontweight="bold",
        va="top",
        ha="left",
        bbox={"facecolor": "yellow", "alpha": 0.85, "pad": 1.5, "linewidth": 0},
    )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def draw_gradient(ax, gmap: torch.Tensor | np.ndarray, title: str | None = None) -> None:
    """Draw a gradient map in grey scale, brighter = larger (scaled by its 99.5th percentile, clipped)."""
    arr = (
        gmap.detach().float().cpu().numpy()
        if isinstance(gmap, torch.Tensor)
        else np.asarray(gmap, np.float32)
    )
    top = float(np.quantile(arr, DISPLAY_QUANTILE)) if arr.size else 0.0
    if top <= 0:
        top = float(arr.max()) if arr.size and arr.max() > 0 else 1.0
    ax.imshow(np.clip(arr / top, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _panel_figure(image_hw: tuple[int, int], columns: int) -> Figure:
    h, w = image_hw
    cell = 3.2
    aspect = h / max(w, 1)
    return Figure(figsize=(cell * columns, cell * aspect + 0.5), dpi=120, layout="constrained")


def save_panel(
    path: str | Path,
    image: torch.Tensor | np.ndarray,
    entry: ImageQuality,
    gmap: torch.Tensor | np.ndarray,
    title: str | None = None,
) -> Path:
    """One model's Figure A1 panel: detections left, gradient map right."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _to_numpy_image(image)
    fig = _panel_figure(img.shape[:2], 2)
    ax_img, ax_grad = fig.subplots(1, 2)
    draw_detections(ax_img, img, entry, title=title)
    draw_gradient(ax_grad, gmap, title="input gradient")
    fig.savefig(path)
    return path


def save_comparison_panel(
    path: str | Path,
    image: torch.Tensor | np.ndarray,
    b: tuple[str, ImageQuality, torch.Tensor | np.ndarray],
    a: tuple[str, ImageQuality, torch.Tensor | np.ndarray],
) -> Path:
    """Figure A1 comparison for one image: model B (name, quality, map) on the left, model A on the right."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _to_numpy_image(image)
    fig = _panel_figure(img.shape[:2], 4)
    axes = fig.subplots(1, 4)
    for role, (name, entry, gmap), (ax_img, ax_grad) in zip("BA", (b, a), (axes[:2], axes[2:]), strict=True):
        draw_detections(ax_img, img, entry, title=f"{role}: {name}")
        draw_gradient(ax_grad, gmap, title=f"{role}: {name}, input gradient")
    fig.suptitle(f"image {a[1].image_id} ({a[1].file_name})", fontsize=9)
    fig.savefig(path)
    return path


def plot_area_curves(
    curves: Sequence[RegionCurve], path: str | Path, title: str | None = None, log_panel: bool = True
) -> Path:
    """Figure A2: mean important-region area fraction vs normalised threshold, one line per model.

    With ``log_panel`` a second panel shows the same curves on a logarithmic area axis: gradient maps are
    peaked, so most of a linear plot sits near zero area once ``t`` exceeds a few percent of the maximum.
    """
    if not curves:
        raise ValueError("plot_area_curves needs at least one curve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8.4 if log_panel else 4.6, 3.6), dpi=150, layout="constrained")
    axes = fig.subplots(1, 2 if log_panel else 1, squeeze=False)[0]
    norms = {c.normalize for c in curves}
    xlabel = "gradient threshold t (map / its max)" if norms == {"image"} else "gradient threshold t"
    positive = [v for c in curves for v in c.area_fraction if v > 0]
    for k, ax in enumerate(axes):
        for c in curves:
            ax.plot(c.thresholds, c.area_fraction, linewidth=1.8, label=f"{c.name} (area {c.auc:.4f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("important-region area (fraction of image)")
        if norms <= {"image", "global"}:
            ax.set_xlim(0.0, 1.0)
        if k == 0:
            ax.set_ylim(0.0, 1.0)
        else:
            ax.set_yscale("log")
            ax.set_ylim(max(min(positive, default=1e-6) * 0.5, 1e-7), 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    n = {len(c.image_ids) for c in curves}
    fig.suptitle(title or f"important regions over {'/'.join(map(str, sorted(n)))} images", fontsize=9)
    fig.savefig(path)
    return path
