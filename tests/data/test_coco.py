"""COCO dataset checks, label mapping, crowd/degenerate handling and the train pipeline."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cednet_pl.data.coco import COCODataModule, COCODetection
from cednet_pl.data.det_transforms import build_train_transforms

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 42, "name": "bird"}]


def write_set(root, annotations=None, images=None, categories=CATEGORIES, skip_files=()):
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = images or [
        {"id": 10, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 11, "file_name": "b.png", "height": 40, "width": 60},
    ]
    for im in images:
        if im["file_name"] not in skip_files:
            Image.fromarray(np.full((im["height"], im["width"], 3), 100, np.uint8)).save(
                root / "img" / im["file_name"]
            )
    annotations = (
        annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 10, "category_id": 42, "bbox": [5, 5, 10, 20], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 10, 30, 10], "iscrowd": 1, "area": 300},
        ]
    )
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / "img", path


def test_label_mapping_round_trip_crowd_and_empty_images(tmp_path):
    img_dir, ann = write_set(tmp_path)
    ds = COCODetection(img_dir, ann)
    assert ds.category_ids == [3, 7, 42]
    assert [ds.label_to_category_id[ds.cat_to_label[c]] for c in (3, 7, 42)] == [3, 7, 42]
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    # the crowd box (dog) is not a training target; the bird is label 2
    assert target["labels"].tolist() == [2] and target["image_id"] == 10
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 25.0]]
    assert ds.num_crowd == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_degenerate_boxes_dropped_and_counted(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [5, 5, 10, -3], "iscrowd": 0},
        {
            "id": 3,
            "image_id": 10,
            "category_id": 7,
            "bbox": [70, 5, 10, 10],
            "iscrowd": 0,
        },  # outside the image
        {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 0},
    ]
    img_dir, ann = write_set(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING):
        ds = COCODetection(img_dir, ann)
    assert ds.num_degenerate == 3
    assert "dropped 3 box(es) with zero or negative width/height" in caplog.text and str(ann) in caplog.text
    assert ds[0][1]["boxes"].shape == (0, 4)
    assert ds[1][1]["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file not found: .*nope\.json"):
        COCODetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "got a JSON list"), ('{"images": []}', "missing list")],
)
def test_not_coco_json(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        COCODetection(tmp_path, path)
    assert str(path) in str(err.value)


def test_unknown_category_names_id_and_file(tmp_path):
    anns = [{"id": 5, "image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    img_dir, ann = write_set(tmp_path, annotations=anns)
    with pytest.raises(
        ValueError, match=r"annotation 5 has category_id 99, which is not in the file's categories"
    ) as err:
        COCODetection(img_dir, ann)
    assert str(ann) in str(err.value)


def test_missing_image_names_the_file(tmp_path):
    img_dir, ann = write_set(tmp_path, skip_files=("b.png",))
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .* are missing") as err:
        COCODetection(img_dir, ann)
    assert str(img_dir / "b.png") in str(err.value)


def test_num_classes_mismatch_is_explained(tmp_path):
    write_set(tmp_path)
    dm = COCODataModule(
        root=str(tmp_path), val_images="img", val_annotations="ann.json", num_classes=80, num_workers=0
    )
    with pytest.raises(ValueError, match=r"has 3 categories but data.num_classes is 80"):
        dm.setup("validate")


def test_lsj_and_copy_paste_give_valid_fixed_size_samples(tmp_path):
    size = 64
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 80} for i in range(1, 5)]
    segs = [[[10, 10, 30, 10, 30, 40, 10, 40]], [[40, 5, 70, 5, 70, 30, 40, 30]]]
    anns = [
        {
            "id": 10 * i + k,
            "image_id": i,
            "category_id": 7,
            "bbox": [seg[0][0], seg[0][1], 20 + 10 * k, 25 + 5 * (1 - k)],
            "segmentation": seg,
            "iscrowd": 0,
        }
        for i in range(1, 5)
        for k, seg in enumerate(segs)
    ]
    img_dir, ann = write_set(tmp_path, annotations=anns, images=images)
    ds = COCODetection(img_dir, ann, transforms=build_train_transforms(size, (0.5, 1.5)), copy_paste_prob=1.0)
    torch.manual_seed(0)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, size, size)
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) >= 1
        assert (
            bool((boxes[:, 2:] > boxes[:, :2]).all())
            and float(boxes.min()) >= 0
            and float(boxes.max()) <= size
        )


def test_copy_paste_updates_occluded_boxes_and_drops_hidden_objects():
    from torchvision import tv_tensors

    from cednet_pl.data.det_transforms import copy_paste

    def sample(rects, labels, value):
        masks = torch.zeros(len(rects), 20, 20, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, rects, strict=True):
            m[y0:y1, x0:x1] = 1
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(rects, dtype=torch.float32), format="XYXY", canvas_size=(20, 20)
        )
        image = tv_tensors.Image(torch.full((3, 20, 20), value, dtype=torch.uint8))
        return image, {"boxes": boxes, "labels": torch.tensor(labels), "masks": tv_tensors.Mask(masks)}

    base = sample([(0, 0, 10, 10), (12, 12, 16, 16)], [1, 2], 0)
    src = sample([(5, 0, 20, 10), (11, 11, 17, 17)], [3, 4], 200)
    # seed 1 pastes both source objects
    image, target = copy_paste(*base, *src, max_objects=7, generator=torch.Generator().manual_seed(1))
    boxes = {int(label): box.tolist() for label, box in zip(target["labels"], target["boxes"], strict=True)}
    # the right half of object 1 is covered: its box shrinks to the visible part; object 2 is hidden: removed
    assert boxes == {1: [0.0, 0.0, 5.0, 10.0], 3: [5.0, 0.0, 20.0, 10.0], 4: [11.0, 11.0, 17.0, 17.0]}
    assert int(image[0, 5, 7]) == 200 and int(image[0, 5, 2]) == 0 and int(image[0, 18, 18]) == 0
    assert len(target["masks"]) == len(target["labels"]) == len(target["boxes"])


def _mask_anns(seg_b=None):
    from pycocotools import mask as mask_utils

    rle_mask = np.zeros((40, 60), np.uint8, order="F")
    rle_mask[8:30, 35:55] = 1
    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return [
        # a polygon (a 20 x 30 rectangle), a compressed RLE, a crowd region (uncompressed RLE)
        {
            "id": 1,
            "image_id": 10,
            "category_id": 42,
            "bbox": [5, 5, 20, 30],
            "iscrowd": 0,
            "segmentation": [[5, 5, 25, 5, 25, 35, 5, 35]],
        },
        {
            "id": 2,
            "image_id": 10,
            "category_id": 7,
            "bbox": [35, 8, 20, 22],
            "iscrowd": 0,
            "segmentation": seg_b if seg_b is not None else rle,
        },
        {
            "id": 3,
            "image_id": 11,
            "category_id": 3,
            "bbox": [0, 0, 10, 10],
            "iscrowd": 1,
            "segmentation": {"counts": [0, 100, 2300], "size": [40, 60]},
        },
    ]


def test_masks_from_polygons_and_rle_crowd_for_eval_only(tmp_path):
    img_dir, ann = write_set(tmp_path, annotations=_mask_anns())
    ds = COCODetection(img_dir, ann, with_masks=True)
    _, target = ds[0]
    masks = target["masks"]
    assert masks.shape == (2, 40, 60) and masks.dtype == torch.uint8
    assert int(masks[1].sum()) == 22 * 20 and bool(masks[1, 8:30, 35:55].all())
    assert bool(masks[0, 6:34, 6:24].all()) and int(masks[0, :, 30:].sum()) == 0
    _, crowd_only = ds[1]
    assert crowd_only["masks"].shape == (0, 40, 60) and ds.num_crowd == 1


def test_lsj_moves_masks_with_boxes_and_drops_vanished_objects(tmp_path):
    anns = _mask_anns()
    # the box reaches far right of the polygon: crops can keep a piece of the box but none of the mask
    anns[0]["bbox"] = [5, 5, 50, 30]
    img_dir, ann = write_set(tmp_path, annotations=anns)
    ds = COCODetection(img_dir, ann, transforms=build_train_transforms(32, (2.0, 3.0), 0.5), with_masks=True)
    torch.manual_seed(0)
    kept = 0
    for _ in range(30):
        image, target = ds[0]
        masks, boxes = target["masks"], target["boxes"]
        assert image.shape == (3, 32, 32) and masks.shape[1:] == (32, 32)
        assert len(masks) == len(boxes) == len(target["labels"])
        kept += len(masks)
        for m, b in zip(masks, boxes, strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            # every box is its mask's extent (pixel edges)
            assert b.tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    # a 32 px crop of a 64-96 px wide image loses an object now and then: dropped and counted
    assert ds.num_vanished > 0 and kept + ds.num_vanished <= 60


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        ([[5, 5, 25, 5]], r"annotation 2 \(image 10\) has a polygon with 2.0 point\(s\)"),
        ({"counts": "abc", "size": [20, 60]}, r"an RLE of size \[20, 60\] on an image of size \[40, 60\]"),
    ],
)
def test_bad_segmentations_are_named(tmp_path, seg, message):
    img_dir, ann = write_set(tmp_path, annotations=_mask_anns(seg))
    with pytest.raises(ValueError, match=message):
        COCODetection(img_dir, ann, with_masks=True)
    COCODetection(img_dir, ann)  # a box-only experiment does not need them


def test_missing_segmentations_for_a_mask_experiment(tmp_path):
    img_dir, ann = write_set(tmp_path)
    with pytest.raises(ValueError, match=r"ann.json: 1 object\(s\) have no `segmentation`"):
        COCODetection(img_dir, ann, with_masks=True)
