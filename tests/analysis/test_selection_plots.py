"""Top-K selection, image lists and figures."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cednet_pl.analysis.plots import plot_area_curves, save_comparison_panel, save_panel
from cednet_pl.analysis.quality import ImageQuality, ObjectScore, QualityReport, dataset_identity
from cednet_pl.analysis.regions import region_curve
from cednet_pl.analysis.selection import check_image_ids, read_image_ids, select_top_k, write_selection


def report(scores, name, ids_for_hash=None):
    images = []
    for iid, s in scores.items():
        objs = () if s is None else (ObjectScore(iid, 1, (0, 0, 4, 4), (0, 0, 4, 4), 1.0, s),)
        images.append(ImageQuality(iid, f"{iid}.png", objs))
    ds = dataset_identity(f"{name}.json", ids_for_hash or scores.keys())
    return QualityReport(dataset=ds, images=images, path=f"{name}_quality.json")


def test_top_k_by_largest_gain_common_ids_only():
    a = report({1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: None, 6: 0.9}, "a", range(1, 8))
    b = report({1: 0.1, 2: 0.5, 3: 0.3, 4: 0.6, 5: 0.1, 7: 0.0}, "b", range(1, 8))
    sel = select_top_k(a, b, k=3)
    assert [s.image_id for s in sel] == [1, 3, 2]
    assert sel[0].gain == pytest.approx(0.8)
    assert [s.image_id for s in select_top_k(a, b, k=4)] == [1, 3, 2, 4]


def test_top_k_ties_by_image_id():
    a = report({3: 0.5, 1: 0.5, 2: 0.5}, "a")
    b = report({3: 0.0, 1: 0.0, 2: 0.0}, "b")
    assert [s.image_id for s in select_top_k(a, b, k=2)] == [1, 2]


def test_no_common_ids_names_both_files():
    a, b = report({1: 0.5}, "runA"), report({2: 0.5}, "runB")
    with (
        pytest.warns(UserWarning, match="different image sets"),
        pytest.raises(ValueError, match=r"runA_quality.json.*runB_quality.json.*no image in common"),
    ):
        select_top_k(a, b, k=1)


def test_k_too_large_raises_or_clamps():
    a, b = report({1: 0.5, 2: 0.1}, "a"), report({1: 0.2, 2: 0.3}, "b")
    with pytest.raises(ValueError, match=r"top 5 images .* only 2 scored images in common"):
        select_top_k(a, b, k=5)
    with pytest.warns(UserWarning, match="keeping all 2"):
        assert len(select_top_k(a, b, k=5, clamp=True)) == 2
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_top_k(a, b, k=0)


def test_image_lists_round_trip_and_unknown_ids(tmp_path):
    a, b = report({1: 0.5, 2: 0.1}, "a"), report({1: 0.2, 2: 0.3}, "b")
    path = write_selection(select_top_k(a, b, k=2), tmp_path / "top.json", a, b, k=2)
    assert read_image_ids(path) == [1, 2]
    assert json.loads(path.read_text())["images"][0]["score_a"] == 0.5
    txt = tmp_path / "ids.txt"
    txt.write_text("# chosen\n5\n\n7  # second\n")
    assert read_image_ids(txt) == [5, 7]
    (tmp_path / "bad.txt").write_text("5\nfive\n")
    with pytest.raises(ValueError, match=r"bad.txt: entry 2 \('five'\)"):
        read_image_ids(tmp_path / "bad.txt")
    with pytest.raises(
        ValueError, match=r"ids.txt names 2 image id\(s\) that val.json does not contain, e.g. \[5, 7\]"
    ):
        check_image_ids([5, 7, 1], [1, 2, 3], str(txt), "val.json")
    assert check_image_ids([2, 1, 2], [1, 2, 3], "x", "y") == [2, 1]


def test_figures_are_written(tmp_path):
    entry = ImageQuality(
        7,
        "7.png",
        (
            ObjectScore(1, 1, (4, 4, 20, 20), (5, 5, 20, 18), 0.8, 0.9),
            ObjectScore(2, 1, (30, 30, 10, 10), None, 0.0, 0.0),
        ),
    )
    img = torch.rand(3, 48, 64)
    gmap = torch.rand(48, 64)
    p1 = save_panel(tmp_path / "p.png", img, entry, gmap, title="model")
    p2 = save_comparison_panel(tmp_path / "c.png", img, ("B", entry, gmap), ("A", entry, gmap * 2))
    curves = [region_curve(n, [torch.rand(8, 8) ** p], [7]) for n, p in (("A", 3), ("B", 1))]
    p3 = plot_area_curves(curves, tmp_path / "curves.png")
    for p in (p1, p2, p3):
        arr = np.asarray(Image.open(p).convert("RGB"))
        assert arr.shape[0] > 100 and arr.std() > 0
    red = np.asarray(Image.open(p1).convert("RGB")).astype(int)
    assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 60)).any()
    assert math.isfinite(curves[0].auc)
