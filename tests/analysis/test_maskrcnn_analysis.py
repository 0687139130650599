"""The appendix-B analysis (quality scores, gradient regions, panels) runs unchanged on a tiny Mask R-CNN."""

import math

import torch

from cednet_pl.analysis.detector import gradient_pass
from cednet_pl.analysis.quality import read_quality
from cednet_pl.analysis.regions import read_curve
from cednet_pl.callbacks import DetectionQuality, GradientRegions, Panels
from cednet_pl.lit.instance_segmentation import InstanceSegmentationModule

SIZE = 64


def tiny_maskrcnn() -> InstanceSegmentationModule:
    torch.manual_seed(0)
    return InstanceSegmentationModule(
        backbone={
            "kind": "cednet",
            "model_name": "cednet_next_nano",
            "out_channels": 32,
            "p2_level": True,
            "num_extra_levels": 1,
        },
        num_classes=10,
        detector={
            "min_size": SIZE,
            "max_size": SIZE,
            "size_divisible": 32,
            "anchor_sizes": [16, 32, 64, 128, 256],
            "representation_size": 64,
            "mask_head_channels": [16],
            "box_score_thresh": 0.0,
        },
        scheduler={"name": "constant"},
    )


def test_analysis_callbacks_and_gradient_pass_on_mask_rcnn(tiny, tmp_path):
    dm = tiny.datamodule(with_masks=True)
    module = tiny_maskrcnn()
    callbacks = [
        DetectionQuality(),
        GradientRegions(num_images=2, batch_size=2, num_thresholds=11, every_n_validations=1),
        Panels(image_ids=None, num_images=1),
    ]
    trainer = tiny.trainer(tmp_path / "run", callbacks)
    trainer.fit(module, datamodule=dm)
    run = tmp_path / "run"
    report = read_quality(run / "analysis" / "quality_val.json")
    assert sorted(im.image_id for im in report.images) == sorted(dm.val_dataset.image_ids)
    assert 0.0 <= report.mean_score() <= 1.0
    curve = read_curve(run / "analysis" / "regions" / "final.json")
    assert curve.image_ids == dm.val_dataset.image_ids[:2] and math.isfinite(curve.auc)
    assert len(list((run / "analysis" / "panels" / "final").glob("*.png"))) == 1
    assert "val/mask_map" in trainer.callback_metrics

    # the pass differentiates all five losses (mask loss included) w.r.t. the pixels, leaves params alone
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    result = gradient_pass(
        module.net, dm.val_dataset, dm.val_dataset.image_ids[:2], batch_size=2, keep_maps=[]
    )
    assert result.fractions.shape == (2, 101) and result.results
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in before.items())
    assert module.net.training  # modes restored
