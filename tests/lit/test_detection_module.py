"""DetectionModule: COCO evaluation parity with pycocotools, layer decay, fast_dev_run, cednet-eval, wrong tasks."""

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cednet_pl.evaluation import (
    COCO_STAT_NAMES,
    detections_to_coco_results,
    evaluate_coco,
    write_results_json,
)
from cednet_pl.lit.detection import DetectionModule
from cednet_pl.lit.optim import detection_param_groups
from testlib import (
    FAST_OVERRIDES,
    TINY_DET_DATA,
    CrashAtEpoch,
    assert_coco_3x_recipe,
    compose_config,
    perturbed_predictions,
    with_extra_callback,
)


def perturbed_results(ann_file, seed=0):
    """Detections from the ground truth: jittered boxes, some wrong classes, misses and false positives."""

    def jitter(ann, rng):
        x, y, w, h = ann["bbox"]
        j = [rng.gauss(0, 0.08) * s for s in (w, h, w, h)]
        return [x + j[0], y + j[1], x + w + j[2], y + h + j[3]]

    def false_positive(rng):
        x, y = rng.uniform(0, 100), rng.uniform(0, 100)
        return [x, y, x + rng.uniform(5, 28), y + rng.uniform(5, 28)]

    cat_ids, image_ids, per_image = perturbed_predictions(ann_file, seed, jitter, false_positive)
    detections = [
        {
            "boxes": torch.tensor(boxes).reshape(-1, 4),
            "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        for boxes, scores, labels in per_image
    ]
    return detections_to_coco_results(image_ids, detections, cat_ids)


def standalone_pycocotools(ann_file, results_file):
    gt = COCO(str(ann_file))
    dt = gt.loadRes(str(results_file))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats]


def test_evaluation_equals_standalone_pycocotools_exactly(synthetic, tmp_path):
    results = perturbed_results(synthetic)
    assert {r["category_id"] for r in results} <= set(range(1, 20, 2))
    path = write_results_json(results, tmp_path / "res.json")
    stats, summary = evaluate_coco(synthetic, path)
    assert list(stats) == list(COCO_STAT_NAMES) and "Average Precision" in summary
    assert [stats[k] for k in COCO_STAT_NAMES] == standalone_pycocotools(synthetic, path)
    assert 0.2 < stats["map"] < 0.95


def test_faster_coco_eval_backend_agrees(synthetic, tmp_path):
    pytest.importorskip("faster_coco_eval")
    path = write_results_json(perturbed_results(synthetic, seed=1), tmp_path / "res.json")
    ref, _ = evaluate_coco(synthetic, path)
    fast, _ = evaluate_coco(synthetic, path, backend="faster_coco_eval")
    assert fast == pytest.approx(ref, abs=1e-12)


def test_empty_results_and_unknown_backend(synthetic, tmp_path):
    stats, _ = evaluate_coco(synthetic, write_results_json([], tmp_path / "empty.json"))
    assert stats["map"] == 0.0 and stats["mar_100"] == 0.0
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        evaluate_coco(synthetic, [], backend="detectron")


def test_layer_decay_groups_follow_the_trunk():
    module = DetectionModule(
        backbone={"kind": "cednet", "model_name": "cednet_next_nano", "out_channels": 32},
        num_classes=10,
        detector={"anchor_base_sizes": [16, 32, 64, 128, 256]},
    )
    net = module.net
    groups = detection_param_groups(net, weight_decay=0.05, layer_decay=0.9, head_weight_decay=1e-4)
    where = {id(p): g for g in groups for p in g["params"]}
    params = dict(net.named_parameters())
    assert len(where) == len(params)
    # nano: stem -> 0, stages.0/1/2 -> 1/2/3, everything after the trunk -> top (4)
    assert where[id(params["backbone.body.model.stem.0.weight"])]["lr_scale"] == pytest.approx(0.9**4)
    assert where[id(params["backbone.body.model.stages.2.0.encoder.0.0.pwconv1.weight"])]["lr_scale"] == 0.9
    for name in ("backbone.reduce_convs.0.0.weight", "head.classification_head.cls_logits.weight"):
        assert where[id(params[name])]["lr_scale"] == 1.0
    assert where[id(params["backbone.reduce_convs.0.0.weight"])]["weight_decay"] == 0.05
    assert where[id(params["head.classification_head.cls_logits.weight"])]["weight_decay"] == 1e-4
    assert where[id(params["head.classification_head.cls_logits.bias"])]["weight_decay"] == 0.0


def test_fast_dev_run_writes_coco_results_and_metrics(make_cfg):
    from cednet_pl.train import train

    cfg = make_cfg("train", ["+experiment=det_demo", "++trainer.fast_dev_run=true", *TINY_DET_DATA])
    _, objects = train(cfg)
    run = Path(objects["trainer"].default_root_dir)
    report = json.loads((run / "coco_metrics_val.json").read_text())
    assert set(report["metrics"]) == {f"val/{k}" for k in COCO_STAT_NAMES}
    assert report["backend"] == "pycocotools" and report["num_images"] == 4
    results = json.loads((run / "coco_results_val.json").read_text())
    assert {r["image_id"] for r in results} <= {100001, 100002, 100003, 100004}
    assert {r["category_id"] for r in results} <= set(range(1, 20, 2))
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in results)
    logged = objects["trainer"].callback_metrics
    assert all(f"val/{k}" in logged for k in COCO_STAT_NAMES) and "train/loss" in logged
    # the model summary's FLOPs come from a real forward of `example_input_array` (one 128 px test image)
    from lightning.pytorch.utilities.model_summary import ModelSummary

    assert objects["model"].example_input_array[0][0].shape == (3, 128, 128)
    assert ModelSummary(objects["model"]).total_flops > 10**7


def test_eval_of_a_detection_checkpoint_and_wrong_tasks(make_cfg, tmp_path):
    from cednet_pl.eval import evaluate
    from cednet_pl.train import train

    cfg = make_cfg(
        "train",
        ["+experiment=det_demo", "trainer.max_epochs=1", "+trainer.limit_train_batches=1", *TINY_DET_DATA],
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["category_ids"] == list(range(1, 20, 2))

    ecfg = make_cfg("eval", [f"ckpt={ckpt}"])
    metrics, _ = evaluate(ecfg)
    assert all(f"val/{k}" in metrics for k in COCO_STAT_NAMES)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert written["val/map"] == metrics["val/map"]
    coco = json.loads((tmp_path / "run" / "coco_metrics_val.json").read_text())
    assert coco["metrics"]["val/map"] == pytest.approx(metrics["val/map"])
    assert (tmp_path / "run" / "coco_results_val.json").is_file()

    # a detection checkpoint given to the classification task
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(make_cfg("eval", [f"ckpt={ckpt}", "model=cednet_next_nano"]))
    # a classification checkpoint given to the detection task
    cls_ckpt = tmp_path / "cls.ckpt"
    torch.save(
        {
            "state_dict": {"net.stem.0.weight": torch.zeros(1)},
            "pytorch-lightning_version": "2.6.6",
            "global_step": 1,
            "cednet_config": {
                "model": {
                    "_target_": "cednet_pl.lit.classification.ClassificationModule",
                    "net": {"name": "x"},
                },
                "data": {"_target_": "cednet_pl.data.digits.DigitsDataModule"},
            },
        },
        cls_ckpt,
    )
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(
            make_cfg("eval", [f"ckpt={cls_ckpt}", "model=retinanet_cednet_next_nano", "data=synthetic_det"])
        )
    module = DetectionModule(
        backbone={"kind": "cednet", "model_name": "cednet_next_nano", "out_channels": 32}, num_classes=10
    )
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        module.on_load_checkpoint(torch.load(cls_ckpt, weights_only=True))


def test_detection_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    """A detection run killed after epoch 0 and resumed ends with the uninterrupted run's weights."""
    from cednet_pl.train import train

    overrides = [
        *FAST_OVERRIDES,
        "+experiment=det_demo",
        *TINY_DET_DATA,
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.deterministic=true",
    ]
    full_cfg = compose_config("train", overrides, tmp_path / "full")
    train(full_cfg)
    cfg = compose_config("train", overrides, tmp_path / "resumed")
    with monkeypatch.context() as m:
        with_extra_callback(m, CrashAtEpoch(1))
        with pytest.raises(KeyError, match="simulated crash"):
            train(cfg)
    cfg = compose_config("train", overrides, tmp_path / "resumed")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from"] == str(
        run_dir / "checkpoints" / "last.ckpt"
    )
    full = torch.load(Path(full_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (full["epoch"], full["global_step"]) == (1, 4)
    differing = [
        k
        for k, v in full["state_dict"].items()
        if not torch.allclose(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    ]
    assert differing == []


@pytest.mark.parametrize(
    ("name", "model_name", "drop_path", "layer_decay"),
    [
        ("det_retinanet_cednet_t", "cednet_next_tiny", 0.2, 0.95),
        ("det_retinanet_convnext_t", "convnext_tiny", 0.4, 0.95),
        ("det_retinanet_swin_t", "swin_tiny_patch4_window7_224", 0.2, None),
    ],
)
def test_coco_3x_experiments_compose(make_cfg, name, model_name, drop_path, layer_decay):
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert_coco_3x_recipe(cfg, name, model_name, drop_path, layer_decay)
    det = cfg.model.detector
    assert (det.min_size, det.max_size, det.size_divisible) == (800, 1333, 128)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["det_retinanet_cednet_t", "det_retinanet_convnext_t", "det_retinanet_swin_t"]
)
def test_coco_3x_models_instantiate(make_cfg, name):
    import hydra

    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    module = hydra.utils.instantiate(cfg.model)
    feats = module.net.backbone(torch.zeros(1, 3, 256, 256))
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
