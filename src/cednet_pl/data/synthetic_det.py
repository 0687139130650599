"""Embedded detection set: scikit-learn digits pasted on synthetic canvases, written in COCO format.

Nothing is downloaded. :func:`generate_synthetic_det` renders the set once into a cache dir::

    root/
      manifest.json                    generation parameters (the set is regenerated when they change)
      train/000001.png ...             RGB canvases
      val/100001.png ...
      annotations/instances_train.json COCO instances (boxes, areas, RLE masks, iscrowd=0)
      annotations/instances_val.json

Each canvas has a gradient, smooth-noise or striped/checkered background and a few digits (the 8x8
scikit-learn images, upscaled) of varied size, position and colour. Digits never overlap, so every
box is exact: it is the bounding box of the digit's mask, and the mask itself is stored as a COCO RLE
(so copy-paste augmentation can cut digits out). Train and val digits come from disjoint halves of the
scikit-learn images. Category ids are deliberately non-contiguous (digit ``d`` has id ``2 d + 1``),
as in COCO, so the label mapping is exercised. Everything is a function of the seed. With ``grid=n`` the
digits are grey ink on black instead, one per cell of an n x n grid (the ``seg_demo`` layout).

:class:`SyntheticDetDataModule` is the COCO data module on top of it (the ``det_demo`` default).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cednet_pl.data.coco import COCODataModule

__all__ = [
    "MANIFEST_VERSION",
    "SyntheticDetDataModule",
    "category_id",
    "generate_synthetic_det",
    "manifest_matches",
]

MANIFEST_VERSION = 2
_VAL_ID_OFFSET = 100000
_ALPHA_LOW, _ALPHA_HIGH = 0.25, 0.5


def manifest_matches(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the generation manifest at ``path`` exists and equals ``manifest`` (the cached set is current)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == manifest
    except json.JSONDecodeError:
        return False


def category_id(digit: int) -> int:
    """COCO category id of a digit (non-contiguous on purpose, like COCO's)."""
    return 2 * int(digit) + 1


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient between two colours
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == 1:  # smooth colour noise
        g = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, (g, g, 3)).astype(np.float32)
        img = np.stack(
            [
                np.asarray(Image.fromarray(grid[..., c], mode="F").resize((w, h), Image.BICUBIC))
                for c in range(3)
            ],
            axis=-1,
        )
    else:  # stripes or checkerboard
        period = rng.uniform(6, 40)
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        if rng.random() < 0.5:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
        else:
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    # muted: the background keeps 30-70% of its contrast, so that the digits stand out as objects
    mean = img.reshape(-1, 3).mean(0)
    img = mean + (img - mean) * rng.uniform(0.3, 0.7)
    img = img + rng.normal(0, rng.uniform(0.0, 0.04), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _upscale(digit: np.ndarray, h: int, w: int) -> np.ndarray:
    """An 8x8 digit (0..16) as intensities 0..1, bilinearly upscaled to h x w."""
    return np.asarray(
        Image.fromarray((digit / 16.0).astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    )


def _digit_alpha(digit: np.ndarray, h: int, w: int) -> np.ndarray:
    """Upscale an 8x8 digit (0..16) to h x w and turn it into an opacity map (0 outside the mask)."""
    return np.clip((_upscale(digit, h, w) - _ALPHA_LOW) / (_ALPHA_HIGH - _ALPHA_LOW), 0, 1)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    mean = under.reshape(-1, 3).mean(0)
    for _ in range(20):
        c = rng.uniform(0, 1, 3)
        if np.abs(c - mean).sum() > 1.2:
            return c
    return np.where(mean > 0.5, 0.0, 1.0)


def _ink_alpha(digit: np.ndarray, h: int, w: int) -> np.ndarray:
    """Upscale an 8x8 digit (0..16) to h x w as grey ink: its intensity where above the mask threshold, else 0."""
    a = _upscale(digit, h, w)
    return np.where(a > _ALPHA_LOW, np.clip(a, 0, 1), 0.0)


def _digit_count(rng: np.random.Generator, num_digits: tuple[int, int], empty_prob: float) -> int:
    """Digits on one canvas: 0 with probability ``empty_prob``, else uniform in the inclusive ``num_digits``."""
    return 0 if rng.random() < empty_prob else int(rng.integers(num_digits[0], num_digits[1] + 1))


def _render_grid(
    rng: np.random.Generator,
    pool: np.ndarray,
    digits: np.ndarray,
    targets: np.ndarray,
    size: int,
    k: int,
    digit_size: tuple[int, int],
    grid: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Grey digits (the scikit-learn look: ink on black), one in each of ``k`` random cells of a grid x grid
    layout, square, ``digit_size`` high (capped at the cell) and placed anywhere inside their cell."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    cell = size // grid
    objects = []
    for index in sorted(rng.choice(grid * grid, size=min(k, grid * grid), replace=False).tolist()):
        src = int(rng.choice(pool))
        h = min(int(rng.integers(digit_size[0], digit_size[1] + 1)), cell)
        alpha = _ink_alpha(digits[src], h, h)
        ys, xs = np.nonzero(alpha > 0)
        if len(ys) == 0:
            continue
        y0 = (index // grid) * cell + int(rng.integers(0, cell - h + 1))
        x0 = (index % grid) * cell + int(rng.integers(0, cell - h + 1))
        img[y0 : y0 + h, x0 : x0 + h] = alpha[..., None]
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y0 : y0 + h, x0 : x0 + h] = alpha > 0
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        objects.append({"digit": int(targets[src]), "box": box, "mask": mask})
    return (img * 255).round().astype(np.uint8), objects


def _render_image(
    rng: np.random.Generator,
    pool: np.ndarray,
    digits: np.ndarray,
    targets: np.ndarray,
    size: int,
    num_digits: tuple[int, int],
    digit_size: tuple[int, int],
    empty_prob: float,
    grid: int = 0,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if grid:
        return _render_grid(
            rng, pool, digits, targets, size, _digit_count(rng, num_digits, empty_prob), digit_size, grid
        )
    img = _background(rng, size, size)  # (drawn before the count: the free layout's random stream as before)
    k = _digit_count(rng, num_digits, empty_prob)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(k):
        src = int(rng.choice(pool))
        h = int(rng.integers(digit_size[0], digit_size[1] + 1))
        w = max(4, round(h * rng.uniform(0.75, 1.0)))
        alpha = _digit_alpha(digits[src], h, w)
        ys, xs = np.nonzero(alpha > 0)
        if len(ys) == 0:
            continue
        for _attempt in range(50):
            y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if all(
                box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2
                for b in boxes
            ):
                break
        else:
            continue
        region = img[y0 : y0 + h, x0 : x0 + w]
        colour = _contrasting_colour(rng, region)
        img[y0 : y0 + h, x0 : x0 + w] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y0 : y0 + h, x0 : x0 + w] = alpha > 0
        boxes.append(box)
        objects.append({"digit": int(targets[src]), "box": box, "mask": mask})
    return (img * 255).round().astype(np.uint8), objects


def _split_json(
    split: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "info": {
            "description": f"cednet-pl synthetic digit detection set ({split})",
            "version": MANIFEST_VERSION,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id(d), "name": str(d), "supercategory": "digit"} for d in range(10)],
    }


def generate_synthetic_det(
    root: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    num_digits: Sequence[int] = (3, 6),
    digit_size: Sequence[int] = (24, 72),
    empty_prob: float = 0.02,
    seed: int = 0,
    grid: int = 0,
) -> Path:
    """Render the synthetic detection set into ``root`` unless it is already there with the same parameters.

    Args:
        root: Cache directory (``${paths.data_dir}/synthetic_det`` in the configs).
        num_train: Number of training canvases.
        num_val: Number of validation canvases.
        image_size: Canvas side in pixels (square canvases).
        num_digits: Inclusive range of digits per canvas.
        digit_size: Inclusive range of digit heights in pixels.
        empty_prob: Probability that a canvas has no digit (images without objects are valid COCO).
        seed: Seed of everything (pool split, backgrounds, digits, placement, colours).
        grid: 0 (default): coloured digits placed freely on synthetic backgrounds. ``n > 0``: the canvas is an
            ``n x n`` grid of cells and ``num_digits`` of them (chosen at random) hold one grey, square digit
            (ink on black, as the scikit-learn images) placed anywhere inside its cell, ``digit_size`` high
            (capped at the cell side): digits sit near fixed positions (the ``seg_demo`` set).

    Returns:
        ``root`` as a Path.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    num_digits = (int(num_digits[0]), int(num_digits[1]))
    digit_size = (int(digit_size[0]), int(digit_size[1]))
    if not 0 <= num_digits[0] <= num_digits[1]:
        raise ValueError(
            f"num_digits must be an inclusive range [min, max] with 0 <= min <= max, got {num_digits}"
        )
    if not 8 <= digit_size[0] <= digit_size[1] <= image_size:
        raise ValueError(f"digit_size must be a range within [8, image_size={image_size}], got {digit_size}")
    grid = int(grid)
    if grid < 0 or (grid and (image_size // grid < 8 or num_digits[1] > grid * grid)):
        raise ValueError(
            f"grid={grid}: expected 0 (free placement) or n >= 1 with cells of at least 8 px "
            f"(image_size={image_size}) and num_digits max <= n * n (got {num_digits})"
        )
    manifest = {
        "version": MANIFEST_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "num_digits": list(num_digits),
        "digit_size": list(digit_size),
        "empty_prob": float(empty_prob),
        "seed": int(seed),
    }
    if grid:  # (free-placement manifests stay as they were: their cached sets remain valid)
        manifest["grid"] = grid
    if manifest_matches(root / "manifest.json", manifest):
        return root

    data = load_digits()
    digits, targets = data.images, data.target
    order = np.random.default_rng(seed).permutation(len(digits))
    pools = {"train": order[: len(order) // 2], "val": order[len(order) // 2 :]}

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    for split_index, (split, count, offset) in enumerate(
        (("train", num_train, 0), ("val", num_val, _VAL_ID_OFFSET))
    ):
        (tmp / split).mkdir()
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            pixels, objects = _render_image(
                rng, pools[split], digits, targets, image_size, num_digits, digit_size, empty_prob, grid
            )
            image_id = offset + i + 1
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(tmp / split / file_name, compress_level=1)
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append(
                    {
                        "id": len(annotations) + 1 + offset,
                        "image_id": image_id,
                        "category_id": category_id(obj["digit"]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(obj["mask"].sum()),
                        "iscrowd": 0,
                        "segmentation": rle,
                    }
                )
        with (tmp / "annotations" / f"instances_{split}.json").open("w") as f:
            json.dump(_split_json(split, images, annotations), f)
    with (tmp / "manifest.json").open("w") as f:
        json.dump(manifest, f, indent=1)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


class SyntheticDetDataModule(COCODataModule):
    """COCO data module on the embedded synthetic digit set (generated in ``prepare_data``).

    Args:
        root: Cache directory of the generated set.
        num_train: Training canvases.
        num_val: Validation canvases.
        image_size: Canvas side in pixels.
        num_digits: Inclusive range of digits per canvas.
        digit_size: Inclusive range of digit heights.
        empty_prob: Probability of a canvas without digits.
        seed: Generation seed.
        **kwargs: Passed to :class:`~cednet_pl.data.coco.COCODataModule` (batch sizes, augmentation, sizes).
    """

    def __init__(
        self,
        root: str,
        num_train: int = 1000,
        num_val: int = 200,
        image_size: int = 256,
        num_digits: Sequence[int] = (3, 6),
        digit_size: Sequence[int] = (24, 72),
        empty_prob: float = 0.02,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_images", "train")
        kwargs.setdefault("val_images", "val")
        kwargs.setdefault("train_annotations", "annotations/instances_train.json")
        kwargs.setdefault("val_annotations", "annotations/instances_val.json")
        super().__init__(root=root, **kwargs)
        self.generator_kwargs = dict(
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            num_digits=tuple(num_digits),
            digit_size=tuple(digit_size),
            empty_prob=empty_prob,
            seed=seed,
        )

    def prepare_data(self) -> None:
        generate_synthetic_det(self.root, **self.generator_kwargs)
