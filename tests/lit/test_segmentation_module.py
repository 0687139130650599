"""SegmentationModule: scores, layer decay + poly schedule, seg_demo end to end, cednet-eval, wrong tasks, recipes."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from cednet_pl.lit.optim import build_poly_scheduler
from cednet_pl.lit.segmentation import SegmentationModule, segmentation_scores
from testlib import TINY_SEG_DATA

TINY_DATA = [
    "data.num_train=4",
    "data.num_val=3",
    *TINY_SEG_DATA,
    "model.evaluation.crop=48",
    "model.evaluation.stride=32",
]


def test_scores_from_confusion_matrix():
    pred = torch.tensor([[0, 0, 1, 1, 2, 2]])
    target = torch.tensor([[0, 1, 1, 1, 255, 0]])
    cm = MulticlassConfusionMatrix(4, ignore_index=255)
    cm.update(pred, target)
    s = segmentation_scores(cm.compute())
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 3, pred 2 -> 2/3; class 2: tp 0, union 1 -> 0;
    # class 3 never occurs -> NaN, left out of the mean
    assert s["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["acc"] == pytest.approx(3 / 5) and s["pixels"] == 5
    assert s["macc"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_layer_decay_and_poly_schedule():
    module = SegmentationModule(
        net={
            "backbone": {
                "kind": "cednet",
                "model_name": "cednet_next_nano",
                "ced_extras": True,
                "out_channels": 32,
            },
            "head": {"kind": "ced", "channels": 16},
            "aux_head": {"channels": 8},
        },
        num_classes=3,
    )
    from cednet_pl.lit.optim import detection_param_groups

    groups = detection_param_groups(module.net, weight_decay=0.05, layer_decay=0.9)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales == [round(0.9**k, 6) for k in (4, 3, 2, 1, 0)]
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))
    opt = torch.optim.AdamW([{**g, "lr": 1e-4} for g in groups], lr=1e-4)
    sched = build_poly_scheduler(opt, total_steps=100, warmup_steps=10, warmup_ratio=1e-6)
    top = next(g for g in opt.param_groups if g["lr_scale"] == 1.0)
    low = next(g for g in opt.param_groups if g["lr_scale"] == pytest.approx(0.9**4))
    assert top["lr"] == pytest.approx(1e-10)
    sched.step_update(10)
    assert top["lr"] == pytest.approx(1e-4 * 0.9) and low["lr"] == pytest.approx(1e-4 * 0.9 * 0.9**4)
    sched.step_update(55)
    assert top["lr"] == pytest.approx(1e-4 * 0.45)
    sched.step_update(100)
    assert top["lr"] == pytest.approx(0.0, abs=1e-12)


def test_seg_demo_trains_and_eval_reproduces(make_cfg, tmp_path):
    from cednet_pl.eval import evaluate
    from cednet_pl.train import train

    cfg = make_cfg(
        "train",
        ["+experiment=seg_demo", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", *TINY_DATA],
    )
    metrics, objects = train(cfg)
    run = tmp_path / "run"
    report = json.loads((run / "per_class_iou_val.json").read_text())
    assert set(report["per_class"]) == {"background", *map(str, range(10))}
    assert report["pixels"] == 3 * 64 * 64  # every validation pixel counted once
    assert report["metrics"]["val/miou"] == pytest.approx(metrics["val/miou"])
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    emetrics, _ = evaluate(make_cfg("eval", [f"ckpt={ckpt}"]))
    for key in ("val/miou", "val/acc", "val/macc"):
        assert emetrics[key] == metrics[key]
    again = json.loads((run / "per_class_iou_val.json").read_text())
    assert again["per_class"] == report["per_class"]

    # cednet-predict: one label PNG per image at its resolution, equal to the module's evaluation inference
    from PIL import Image

    from cednet_pl.predict import predict

    val_dir = Path(cfg.data.root) / "images" / "validation"
    out = predict(
        make_cfg("predict", [f"ckpt={ckpt}", f"input={val_dir}", "extras.print_config=false"], fast=False)
    )
    assert out["task"] == "segmentation" and len(out["predictions"]) == 3
    module = objects["model"].eval()
    transform = objects["datamodule"].eval_transform()
    for row, path in zip(out["predictions"], out["files"], strict=True):
        label = torch.from_numpy(np.array(Image.open(row["mask"]))).long()
        with torch.no_grad():
            image = transform(Image.open(path).convert("RGB"))
            expected = module.predict_logits(image).argmax(0)
        assert label.shape == (64, 64) and torch.equal(label, expected)
        assert sum(row["class_shares"].values()) == pytest.approx(1.0, abs=1e-5)
        assert set(row["class_shares"]) <= {"background", *map(str, range(10))}

    # a segmentation checkpoint given to the classification / detection tasks
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(make_cfg("eval", [f"ckpt={ckpt}", "model=cednet_next_nano"]))
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(make_cfg("eval", [f"ckpt={ckpt}", "model=retinanet_cednet_next_nano", "data=synthetic_det"]))
    # ... and another task's checkpoint to the segmentation module
    module = objects["model"]
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        module.on_load_checkpoint(
            {
                "state_dict": {"net.head.x": torch.zeros(1)},
                "cednet_config": {"model": {"_target_": "cednet_pl.lit.detection.DetectionModule"}},
            }
        )


@pytest.mark.parametrize(
    ("name", "kind", "model_name", "head", "drop_path"),
    [
        ("seg_ced_t", "cednet", "cednet_next_tiny", "ced", 0.2),
        ("seg_upernet_ced_t", "cednet", "cednet_next_tiny", "uper", 0.2),
        ("seg_upernet_convnext_t", "timm", "convnext_tiny", "uper", 0.4),
    ],
)
def test_ade20k_160k_experiments_compose(make_cfg, name, kind, model_name, head, drop_path):
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert cfg.task_name == name and cfg.data._target_.endswith("ADE20KDataModule")
    bb = cfg.model.net.backbone
    assert (bb.kind, bb.model_name, bb.drop_path_rate) == (kind, model_name, drop_path)
    assert bb.get("ced_extras", False) == (head == "ced")
    assert cfg.model.net.head.kind == head and cfg.model.net.head.channels == 512
    assert cfg.model.net.aux_head.channels == 256 and cfg.model.loss.aux_weight == 0.4
    opt, sched = cfg.model.optimizer, cfg.model.scheduler
    assert (opt.name, opt.lr, opt.weight_decay, opt.layer_decay) == ("adamw", 1e-4, 0.05, 0.9)
    assert (sched.name, sched.power, sched.warmup_steps, sched.warmup_ratio) == ("poly", 1.0, 1500, 1e-6)
    assert cfg.trainer.max_steps == 160000 and cfg.data.batch_size * cfg.trainer.devices == 16
    assert cfg.trainer.sync_batchnorm and "mixed" in cfg.trainer.precision
    assert (cfg.data.crop_size, list(cfg.data.scale), list(cfg.data.ratio_range)) == (
        512,
        [2048, 512],
        [0.5, 2.0],
    )
    ev = cfg.model.evaluation
    assert (ev.mode, ev.crop, ev.stride) == ("slide", 512, 341)
    assert cfg.model.num_classes == 150 and cfg.data.reduce_zero_label


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seg_ced_t", "seg_upernet_ced_t", "seg_upernet_convnext_t"])
def test_ade20k_models_instantiate(make_cfg, name):
    import hydra

    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    module = hydra.utils.instantiate(cfg.model).eval()
    out = module.net(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 150, 128, 128)


def test_schedule_names_pick_the_builder_and_unknown_names_fail():
    from types import SimpleNamespace

    from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler

    net_cfg = {
        "backbone": {"kind": "cednet", "model_name": "cednet_next_nano", "out_channels": 32},
        "head": {"kind": "uper", "channels": 16, "pool_scales": [1, 2]},
        "aux_head": None,
    }
    module = SegmentationModule(net=net_cfg, num_classes=3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=50)  # only what configure_optimizers reads
    assert isinstance(module.configure_optimizers()["lr_scheduler"]["scheduler"], PolyLRScheduler)  # default
    module.hparams["scheduler"] = {"name": "multistep", "warmup_steps": 2}
    assert isinstance(module.configure_optimizers()["lr_scheduler"]["scheduler"], MultiStepLRScheduler)
    module.hparams["scheduler"] = {"name": "constant"}
    assert "lr_scheduler" not in module.configure_optimizers()
    module.hparams["scheduler"] = {"name": "cosine"}
    with pytest.raises(ValueError, match=r"model.scheduler.name='cosine'.*multistep.*poly"):
        module.configure_optimizers()
