"""Detection-quality scores: hand-computed cases, file round trip, COCO inputs."""

import json
import math

import pytest
import torch
from torchvision.ops import box_iou

from cednet_pl.analysis.quality import (
    compute_quality,
    match_objects,
    quality_from_coco,
    read_quality,
    write_quality,
)

IMAGES = [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}]


def ann(aid, bbox, cat=1, crowd=0, image_id=1):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd}


def det(bbox, score, cat=1, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def one(images, anns, dets, **kw):
    (im,) = compute_quality(images, anns, dets, **kw)
    return im


def test_object_without_detection_scores_zero():
    im = one(IMAGES, [ann(1, [0, 0, 10, 10])], [])
    (o,) = im.objects
    assert (o.iou, o.conf, o.score, o.det_box) == (0.0, 0.0, 0.0, None)
    assert im.score == 0.0


def test_non_overlapping_detection_is_a_virtual_match():
    im = one(IMAGES, [ann(1, [0, 0, 10, 10])], [det([50, 50, 10, 10], 0.9)])
    assert im.objects[0].det_box is None and im.objects[0].conf == 0.0


def test_max_iou_match_beats_higher_confidence():
    # gt [0,0,10,10]; det1 IoU = 50/100 = 0.5 with conf 0.95; det2 IoU = 80/100 = 0.8 with conf 0.3.
    im = one(IMAGES, [ann(1, [0, 0, 10, 10])], [det([0, 0, 10, 5], 0.95), det([0, 0, 10, 8], 0.3)])
    (o,) = im.objects
    assert o.iou == pytest.approx(0.8)
    assert o.conf == pytest.approx(0.3)
    assert o.score == pytest.approx(0.24)
    assert o.det_box == (0.0, 0.0, 10.0, 8.0)


def test_equal_iou_tie_broken_by_confidence_then_order():
    gt = [ann(1, [0, 0, 10, 10])]
    im = one(IMAGES, gt, [det([0, 0, 10, 5], 0.4), det([0, 5, 10, 5], 0.7)])
    assert im.objects[0].conf == pytest.approx(0.7)
    im = one(IMAGES, gt, [det([0, 5, 10, 5], 0.7), det([0, 0, 10, 5], 0.7)])
    assert im.objects[0].det_box == (0.0, 5.0, 10.0, 5.0)


def test_image_score_is_mean_over_objects():
    anns = [ann(1, [0, 0, 10, 10]), ann(2, [20, 20, 10, 10]), ann(3, [60, 60, 10, 10])]
    dets = [det([0, 0, 10, 10], 0.8), det([20, 20, 10, 5], 0.6)]
    im = one(IMAGES, anns, dets)
    assert [o.score for o in im.objects] == pytest.approx([0.8, 0.3, 0.0])
    assert im.score == pytest.approx((0.8 + 0.3 + 0.0) / 3)


def test_other_category_ignored_by_default_used_when_class_agnostic():
    anns = [ann(1, [0, 0, 10, 10], cat=1)]
    dets = [det([0, 0, 10, 10], 0.9, cat=2), det([0, 0, 10, 5], 0.5, cat=1)]
    im = one(IMAGES, anns, dets)
    assert im.objects[0].iou == pytest.approx(0.5) and im.objects[0].conf == pytest.approx(0.5)
    im = one(IMAGES, anns, dets, class_agnostic=True)
    assert im.objects[0].iou == pytest.approx(1.0) and im.objects[0].conf == pytest.approx(0.9)
    only_other = one(IMAGES, anns, dets[:1])
    assert only_other.score == 0.0


def test_crowd_annotations_are_not_objects():
    im = one(IMAGES, [ann(1, [0, 0, 10, 10]), ann(2, [0, 0, 50, 50], crowd=1)], [])
    assert [o.gt_id for o in im.objects] == [1]
    crowd_only = one(IMAGES, [ann(2, [0, 0, 50, 50], crowd=1)], [det([0, 0, 50, 50], 1.0)])
    assert crowd_only.objects == () and math.isnan(crowd_only.score)


def test_score_thresh_and_max_dets():
    anns = [ann(1, [0, 0, 10, 10])]
    dets = [det([0, 0, 10, 10], 0.04), det([0, 0, 10, 5], 0.9)]
    assert one(IMAGES, anns, dets).objects[0].iou == pytest.approx(1.0)
    assert one(IMAGES, anns, dets, score_thresh=0.05).objects[0].iou == pytest.approx(0.5)
    assert one(IMAGES, anns, dets, max_dets=1).objects[0].conf == pytest.approx(0.9)


def test_match_objects_vectorised_shapes():
    gt = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    iou, conf, idx = match_objects(
        gt, torch.tensor([1, 1]), torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.5]), torch.tensor([1])
    )
    assert iou.tolist() == [1.0, 0.0] and conf.tolist() == [0.5, 0.0] and idx.tolist() == [0, -1]


@pytest.fixture
def coco_files(tmp_path):
    gt = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3)],
        "annotations": [
            ann(1, [0, 0, 10, 10], image_id=1),
            ann(2, [5, 5, 20, 20], cat=2, image_id=2),
            ann(3, [0, 0, 64, 64], crowd=1, image_id=3),
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    res = [det([0, 0, 10, 10], 0.5, image_id=1), det([5, 5, 20, 10], 0.8, cat=2, image_id=2)]
    gpath, rpath = tmp_path / "gt.json", tmp_path / "res.json"
    gpath.write_text(json.dumps(gt))
    rpath.write_text(json.dumps(res))
    return gpath, rpath


def test_quality_from_coco_and_round_trip(coco_files, tmp_path):
    gpath, rpath = coco_files
    rep = quality_from_coco(gpath, rpath, image_root=tmp_path)
    assert [im.image_id for im in rep.images] == [1, 2, 3]
    assert rep.scores()[1] == pytest.approx(0.5)
    assert rep.scores()[2] == pytest.approx(0.5 * 0.8)
    assert math.isnan(rep.scores()[3])
    assert rep.mean_score() == pytest.approx((0.5 + 0.4) / 2)
    back = read_quality(write_quality(rep, tmp_path / "q" / "quality.json"))
    assert back.scores()[2] == pytest.approx(0.4) and math.isnan(back.scores()[3])
    assert back.dataset == rep.dataset and back.dataset.num_images == 3
    assert back.images == rep.images
    doc = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert doc["images"][2]["score"] is None and doc["summary"]["num_scored_images"] == 2


def test_quality_from_coco_subset_and_bad_inputs(coco_files, tmp_path):
    gpath, rpath = coco_files
    sub = quality_from_coco(gpath, rpath, image_ids=[2])
    assert [im.image_id for im in sub.images] == [2]
    assert sub.dataset == quality_from_coco(gpath, rpath).dataset
    with pytest.raises(ValueError, match=r"absent from .*gt.json, e.g. \[99\]"):
        quality_from_coco(gpath, [det([0, 0, 1, 1], 0.5, image_id=99)])
    with pytest.raises(ValueError, match=r"category id\(s\) \[7\]"):
        quality_from_coco(gpath, [det([0, 0, 1, 1], 0.5, cat=7)])
    with pytest.raises(ValueError, match="not a per-image quality file"):
        read_quality(rpath)
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        quality_from_coco(rpath, rpath)


def reference_image_score(anns, dets, class_agnostic=False):
    """Brute-force per-image reference with torchvision's box_iou and Python loops."""
    objs = [a for a in anns if not a["iscrowd"]]
    if not objs:
        return math.nan
    total = 0.0
    for a in objs:
        best = (0.0, 0.0)
        for d in dets:
            if not class_agnostic and d["category_id"] != a["category_id"]:
                continue
            xyxy = [
                torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]]], dtype=torch.float64)
                for b in (a["bbox"], d["bbox"])
            ]
            iou = box_iou(*xyxy).item()
            if iou > 0 and (iou, d["score"]) > best:
                best = (iou, d["score"])
        total += best[0] * best[1]
    return total / len(objs)


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_vectorised_scores_equal_brute_force(class_agnostic):
    gen = torch.Generator().manual_seed(0)
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(40)]

    def rand_box():
        x, y, w, h = (torch.rand(4, generator=gen) * torch.tensor([40, 40, 20, 20])).tolist()
        return [round(x), round(y), round(w) + 1, round(h) + 1]  # integer boxes make IoU ties likely

    anns, dets = [], []
    for i in range(40):
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            crowd = int(torch.rand(1, generator=gen) < 0.15)
            anns.append(
                ann(
                    len(anns),
                    rand_box(),
                    cat=int(torch.randint(1, 3, (1,), generator=gen)),
                    crowd=crowd,
                    image_id=i,
                )
            )
        for _ in range(int(torch.randint(0, 6, (1,), generator=gen))):
            dets.append(
                det(
                    rand_box(),
                    round(float(torch.rand(1, generator=gen)), 1),
                    cat=int(torch.randint(1, 3, (1,), generator=gen)),
                    image_id=i,
                )
            )
    got = compute_quality(images[::-1], anns[::-1], dets, class_agnostic=class_agnostic)
    assert [im.image_id for im in got] == list(range(40))
    for im in got:
        want = reference_image_score(
            [a for a in anns if a["image_id"] == im.image_id],
            [d for d in dets if d["image_id"] == im.image_id],
            class_agnostic,
        )
        if math.isnan(want):
            assert math.isnan(im.score)
        else:
            assert im.score == pytest.approx(want, abs=1e-12)
