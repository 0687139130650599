"""The embedded synthetic detection set: deterministic, exact boxes, COCO format, cached by manifest."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cednet_pl.data.synthetic_det import category_id, generate_synthetic_det

SMALL = dict(num_train=5, num_val=3, image_size=96, num_digits=(2, 3), digit_size=(16, 32), empty_prob=0.0)


def _read(root, split):
    data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    pixels = [np.asarray(Image.open(root / split / im["file_name"])) for im in data["images"]]
    return data, pixels


def test_same_seed_same_set_other_seed_other_set(tmp_path):
    a = generate_synthetic_det(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic_det(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic_det(tmp_path / "c", seed=4, **SMALL)
    for split in ("train", "val"):
        (ja, pa), (jb, pb), (jc, pc) = _read(a, split), _read(b, split), _read(c, split)
        assert ja == jb
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
        assert ja["annotations"] != jc["annotations"]
        assert not all(np.array_equal(x, y) for x, y in zip(pa, pc, strict=True))


def test_boxes_are_the_mask_extent_and_ids_are_coco_like(tmp_path):
    root = generate_synthetic_det(tmp_path / "s", seed=0, **SMALL)
    data, pixels = _read(root, "train")
    assert (
        [c["id"] for c in data["categories"]] == [category_id(d) for d in range(10)] == list(range(1, 20, 2))
    )
    assert len(data["annotations"]) >= 2 * SMALL["num_train"]
    for ann in data["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert ann["area"] == int(m.sum()) and ann["iscrowd"] == 0
    assert pixels[0].shape == (96, 96, 3) and pixels[0].dtype == np.uint8
    val, _ = _read(root, "val")
    assert {im["id"] for im in val["images"]}.isdisjoint(im["id"] for im in data["images"])


def test_cached_unless_parameters_change(tmp_path):
    root = generate_synthetic_det(tmp_path / "s", seed=0, **SMALL)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    generate_synthetic_det(root, seed=0, **SMALL)
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    generate_synthetic_det(root, seed=0, **{**SMALL, "num_val": 2})
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 2
    assert json.loads((root / "manifest.json").read_text())["num_val"] == 2


def test_grid_layout_puts_one_grey_digit_in_each_chosen_cell(tmp_path):
    root = generate_synthetic_det(tmp_path / "g", seed=0, grid=2, **{**SMALL, "digit_size": (40, 60)})
    data, pixels = _read(root, "train")
    free, _ = _read(generate_synthetic_det(tmp_path / "f", seed=0, **SMALL), "train")
    assert data["annotations"] != free["annotations"]
    cell = SMALL["image_size"] // 2
    for im, px in zip(data["images"], pixels, strict=True):
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert SMALL["num_digits"][0] <= len(anns) <= SMALL["num_digits"][1]
        # grey ink on black: equal channels, black wherever no digit is
        assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
        union = np.zeros(px.shape[:2], dtype=bool)
        cells = set()
        for ann in anns:
            x, y, w, h = ann["bbox"]
            row, col = y // cell, x // cell
            # the digit stays inside its cell (capped at the cell side), one digit per cell
            assert (y + h - 1) // cell == row and (x + w - 1) // cell == col and (row, col) not in cells
            cells.add((row, col))
            union |= mask_utils.decode(ann["segmentation"]).astype(bool)
        assert px[~union].max(initial=0) == 0 and px[union].min() > 0
    assert json.loads((root / "manifest.json").read_text())["grid"] == 2
    assert "grid" not in json.loads((tmp_path / "f" / "manifest.json").read_text())


def test_grid_layout_rejects_more_digits_than_cells(tmp_path):
    with pytest.raises(ValueError, match="num_digits max <= n \\* n"):
        generate_synthetic_det(tmp_path / "g", grid=1, **SMALL)
