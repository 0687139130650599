"""Analysis callbacks on a tiny RetinaNet-CEDNet-nano fitted for one step on a tiny synthetic digits set."""

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from cednet_pl.analysis.quality import read_quality
from cednet_pl.analysis.regions import read_curve
from cednet_pl.callbacks import DetectionQuality, GradientRegions, Panels


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny):
    base = tmp_path_factory.mktemp("cb")
    dm = tiny.datamodule()
    module = tiny.detector()
    callbacks = [
        DetectionQuality(),
        GradientRegions(num_images=3, batch_size=2, num_thresholds=11, every_n_validations=1),
        Panels(image_ids=None, num_images=2),
    ]
    trainer = tiny.trainer(base / "run", callbacks)
    trainer.fit(module, datamodule=dm)
    return SimpleNamespace(trainer=trainer, module=module, dm=dm, callbacks=callbacks, run=base / "run")


def test_quality_file_and_logged_mean(fitted):
    trainer, dm, run = fitted.trainer, fitted.dm, fitted.run
    path = run / "analysis" / "quality_val.json"
    report = read_quality(path)
    assert sorted(im.image_id for im in report.images) == sorted(dm.val_dataset.image_ids)
    assert report.dataset.ann_file == str(dm.val_annotation_file)
    assert report.meta["model_name"] == "cednet_next_nano"
    mean = report.mean_score()
    assert 0.0 <= mean <= 1.0
    assert float(trainer.callback_metrics["val/quality_mean"]) == pytest.approx(mean, abs=1e-6)
    logged = (run / "csv" / "metrics.csv").read_text()
    assert "val/quality_mean" in logged and "analysis/region_area" in logged
    # the scores come from the very results file that COCOeval scored
    results = json.loads((run / "coco_results_val.json").read_text())
    assert {r["image_id"] for r in results} <= {im.image_id for im in report.images}


def test_gradient_regions_and_panels_at_fit_end(fitted):
    dm, run = fitted.dm, fitted.run
    curve = read_curve(run / "analysis" / "regions" / "final.json")
    assert curve.image_ids == dm.val_dataset.image_ids[:3]
    assert len(curve.thresholds) == 11 and curve.area_fraction[-1] == 0.0
    assert all(a >= b for a, b in zip(curve.area_fraction, curve.area_fraction[1:], strict=False))
    assert (run / "analysis" / "regions" / "final.png").stat().st_size > 1000
    assert read_curve(run / "analysis" / "regions" / "val001_step1.json").image_ids == curve.image_ids
    panels = sorted((run / "analysis" / "panels" / "final").glob("*.png"))
    assert [p.stem for p in panels] == sorted(str(i) for i in dm.val_dataset.image_ids[:2])
    assert math.isfinite(curve.auc)


def test_analysis_is_read_only_and_restores_modes(fitted):
    trainer, module, run = fitted.trainer, fitted.module, fitted.run
    _, regions_cb, panels_cb = fitted.callbacks
    module.train()
    module.net.backbone.eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in module.state_dict().items()}
    modes = {n: m.training for n, m in module.named_modules()}
    regions_cb.analyse(trainer, module, "again")
    panels_cb.analyse(trainer, module, "again")
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.parameters())
    assert {n: m.training for n, m in module.named_modules()} == modes
    again = read_curve(run / "analysis" / "regions" / "again.json")
    final = read_curve(run / "analysis" / "regions" / "final.json")
    assert again.area_fraction == pytest.approx(final.area_fraction)


def test_validate_only_run_uses_image_list(fitted, tiny, tmp_path):
    module, dm = fitted.module, fitted.dm
    ids = dm.val_dataset.image_ids[-2:]
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(map(str, ids)))
    trainer = tiny.trainer(tmp_path / "eval", [DetectionQuality(), GradientRegions(image_list=str(listing))])
    trainer.validate(module, datamodule=dm, verbose=False)
    assert read_curve(tmp_path / "eval" / "analysis" / "regions" / "validate.json").image_ids == ids
    assert (tmp_path / "eval" / "analysis" / "quality_val.json").is_file()

    listing.write_text("5\n")
    bad = tiny.trainer(tmp_path / "eval2", [GradientRegions(image_list=str(listing))])
    with pytest.raises(
        ValueError, match=r"ids.txt names 1 image id\(s\) that .*instances_val.json does not contain"
    ):
        bad.validate(module, datamodule=dm, verbose=False)


def test_callbacks_reject_a_classifier():
    class NotADetector(L.LightningModule):
        task = "classification"

    with pytest.raises(TypeError, match="GradientRegions needs a detection model"):
        GradientRegions().check(None, NotADetector())
    with pytest.raises(TypeError, match="DetectionQuality needs a detection model"):
        DetectionQuality().setup(None, NotADetector(), "fit")
