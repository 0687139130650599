"""InstanceSegmentationModule (Mask R-CNN): mask results + COCO segm parity, fast_dev_run, cednet-eval, wrong tasks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cednet_pl.evaluation import (
    COCO_STAT_NAMES,
    encode_masks,
    evaluate_coco,
    masks_to_coco_results,
    write_results_json,
)
from cednet_pl.lit.instance_segmentation import InstanceSegmentationModule
from testlib import TINY_DET_DATA, assert_coco_3x_recipe, perturbed_predictions


def perturbed_mask_results(ann_file, seed=0):
    """Mask detections from the ground truth: shifted/eroded masks, wrong classes, misses, false positives."""

    def shifted(ann, rng):
        m = torch.from_numpy(mask_utils.decode(ann["segmentation"])).float()
        m = torch.roll(m, shifts=(rng.randrange(-1, 2), rng.randrange(-1, 2)), dims=(0, 1))
        return m * rng.uniform(0.55, 1.0)

    def false_positive(rng):
        m = torch.zeros(128, 128)
        x, y = rng.randrange(100), rng.randrange(100)
        m[y : y + rng.randrange(5, 25), x : x + rng.randrange(5, 25)] = 0.9
        return m

    cat_ids, image_ids, per_image = perturbed_predictions(ann_file, seed, shifted, false_positive)
    detections = [
        {
            "rles": encode_masks(torch.stack(masks)[:, None] if masks else torch.zeros(0, 1, 128, 128)),
            "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        for masks, scores, labels in per_image
    ]
    return masks_to_coco_results(image_ids, detections, cat_ids)


def test_encode_masks_round_trip():
    probs = torch.zeros(2, 1, 10, 12)
    probs[0, 0, 2:5, 3:9] = 0.7
    probs[1, 0, 0, 0] = 0.4  # below the threshold: empty mask
    rles = encode_masks(probs)
    assert [r["size"] for r in rles] == [[10, 12], [10, 12]] and isinstance(rles[0]["counts"], str)
    decoded = mask_utils.decode([{**r, "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded[..., 0], (probs[0, 0] > 0.5).numpy()) and decoded[..., 1].sum() == 0
    assert encode_masks(torch.zeros(0, 1, 10, 12)) == []


def test_segm_evaluation_equals_standalone_pycocotools_exactly(synthetic, tmp_path):
    results = perturbed_mask_results(synthetic)
    assert all("bbox" not in r and "segmentation" in r for r in results)
    path = write_results_json(results, tmp_path / "segm.json")
    stats, summary = evaluate_coco(synthetic, path, iou_type="segm")
    gt = COCO(str(synthetic))
    ev = COCOeval(gt, gt.loadRes(str(path)), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [stats[k] for k in COCO_STAT_NAMES] == [float(s) for s in ev.stats]
    assert 0.2 < stats["map"] < 0.95 and "Average Precision" in summary
    with pytest.raises(ValueError, match="unknown COCO iou_type"):
        evaluate_coco(synthetic, path, iou_type="keypoints")


def test_segm_faster_coco_eval_backend_agrees(synthetic, tmp_path):
    pytest.importorskip("faster_coco_eval")
    path = write_results_json(perturbed_mask_results(synthetic, seed=1), tmp_path / "segm.json")
    ref, _ = evaluate_coco(synthetic, path, iou_type="segm")
    fast, _ = evaluate_coco(synthetic, path, backend="faster_coco_eval", iou_type="segm")
    assert fast == pytest.approx(ref, abs=1e-12)


def test_fast_dev_run_writes_box_and_mask_results(make_cfg):
    from cednet_pl.train import train

    cfg = make_cfg("train", ["+experiment=ins_demo", "++trainer.fast_dev_run=true", *TINY_DET_DATA])
    _, objects = train(cfg)
    run = Path(objects["trainer"].default_root_dir)
    report = json.loads((run / "coco_metrics_val.json").read_text())
    names = {f"val/{k}" for k in COCO_STAT_NAMES} | {f"val/mask_{k}" for k in COCO_STAT_NAMES}
    assert set(report["metrics"]) == names and report["num_images"] == 4
    boxes = json.loads((run / "coco_results_val.json").read_text())
    masks = json.loads((run / "coco_segm_results_val.json").read_text())
    assert boxes and len(masks) == len(boxes)
    assert all(r["segmentation"]["size"] == [128, 128] and "bbox" not in r for r in masks)
    logged = objects["trainer"].callback_metrics
    assert names <= set(logged) and "train/loss_mask" in logged and "val/loss_mask" in logged


def test_eval_of_a_mask_checkpoint_and_wrong_tasks(make_cfg, tmp_path):
    from cednet_pl.eval import evaluate
    from cednet_pl.train import train

    cfg = make_cfg(
        "train",
        ["+experiment=ins_demo", "trainer.max_epochs=1", "+trainer.limit_train_batches=1", *TINY_DET_DATA],
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics, _ = evaluate(make_cfg("eval", [f"ckpt={ckpt}"]))
    assert "val/mask_map" in metrics and "val/map" in metrics
    coco = json.loads((tmp_path / "run" / "coco_metrics_val.json").read_text())
    assert coco["metrics"]["val/mask_map"] == pytest.approx(metrics["val/mask_map"])

    # cednet-predict on a mask checkpoint: COCO results with an RLE mask of the image's size per detection
    from PIL import Image

    from cednet_pl.predict import predict

    val_dir = Path(cfg.data.root) / "val"
    out = predict(
        make_cfg("predict", [f"ckpt={ckpt}", f"input={val_dir}", "extras.print_config=false"], fast=False)
    )
    assert out["task"] == "instance_segmentation"
    sizes = {str(f): Image.open(f).size for f in out["files"]}
    for row in out["predictions"]:
        w, h = sizes[row["file_name"]]
        assert row["segmentation"]["size"] == [h, w]
        assert mask_utils.decode(
            {**row["segmentation"], "counts": row["segmentation"]["counts"].encode()}
        ).shape == (h, w)

    # a mask checkpoint given to the RetinaNet task, through cednet-eval and through the module
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(make_cfg("eval", [f"ckpt={ckpt}", "model=retinanet_cednet_next_nano", "data=synthetic_det"]))
    from cednet_pl.lit.detection import DetectionModule

    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    retinanet = DetectionModule(backbone={"kind": "cednet", "model_name": "cednet_next_nano"}, num_classes=10)
    with pytest.raises(
        ValueError, match=r"wrong-task checkpoint: it holds a cednet_pl\.lit\.instance_segmentation"
    ):
        retinanet.on_load_checkpoint(stored)
    # the reverse: a RetinaNet checkpoint given to the mask task
    module = InstanceSegmentationModule(
        backbone={"kind": "cednet", "model_name": "cednet_next_nano"}, num_classes=10
    )
    box_ckpt = {"state_dict": {f"net.{k}": v for k, v in retinanet.net.state_dict().items()}}
    with pytest.raises(ValueError, match=r"it has no Mask R-CNN RoI heads \(net\.roi_heads\.\*\)"):
        module.on_load_checkpoint(box_ckpt)
    # a mask checkpoint is not a backbone either
    from cednet_pl.models.detection import CEDNetPyramid

    with pytest.raises(ValueError, match=r"is a detection checkpoint \(maskrcnn\)"):
        CEDNetPyramid("cednet_next_nano", pretrained=str(ckpt))


def test_mask_model_needs_mask_data(make_cfg):
    from cednet_pl.train import train

    cfg = make_cfg(
        "train",
        ["+experiment=ins_demo", "data.with_masks=false", "++trainer.fast_dev_run=true", *TINY_DET_DATA],
    )
    with pytest.raises(ValueError, match=r"needs instance masks.*data\.with_masks=true"):
        train(cfg)


@pytest.mark.parametrize(
    ("name", "model_name", "drop_path", "layer_decay"),
    [
        ("ins_maskrcnn_cednet_t", "cednet_next_tiny", 0.2, 0.95),
        ("ins_maskrcnn_convnext_t", "convnext_tiny", 0.4, 0.95),
        ("ins_maskrcnn_swin_t", "swin_tiny_patch4_window7_224", 0.2, None),
    ],
)
def test_mask_rcnn_3x_experiments_compose(make_cfg, name, model_name, drop_path, layer_decay):
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert_coco_3x_recipe(cfg, name, model_name, drop_path, layer_decay)
    assert cfg.data.with_masks and cfg.model._target_.endswith("InstanceSegmentationModule")
    assert "head_norm" not in cfg.model.detector


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ins_maskrcnn_cednet_t", "ins_maskrcnn_convnext_t", "ins_maskrcnn_swin_t"])
def test_mask_rcnn_3x_models_instantiate(make_cfg, name):
    import hydra

    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    module = hydra.utils.instantiate(cfg.model)
    feats = module.net.backbone(torch.zeros(1, 3, 256, 256))
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert [f.shape[-1] for f in feats.values()] == [64, 32, 16, 8, 4]
    assert all(f.shape[1] == 256 for f in feats.values())
    assert module.net.roi_heads.box_predictor.cls_score.out_features == 81


def test_predicted_masks_become_coco_rle():
    from cednet_pl.predict import masks_to_rle

    soft = torch.zeros(2, 1, 5, 7)
    soft[0, 0, 1:3, 2:6] = 0.9
    soft[1, 0, 4, 0] = 0.6
    soft[1, 0, 0, 0] = 0.5  # not above the 0.5 threshold
    rles = masks_to_rle(soft)
    assert [r["size"] for r in rles] == [[5, 7], [5, 7]]
    json.dumps(rles)  # plain JSON (counts as str)
    for r, m in zip(rles, soft, strict=True):
        decoded = mask_utils.decode({**r, "counts": r["counts"].encode()})
        assert np.array_equal(decoded, (m[0] > 0.5).numpy().astype(np.uint8))
