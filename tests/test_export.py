"""cednet-export: classifier (EMA or raw weights) and RetinaNet network to ONNX (run in onnxruntime) and torch.export,
dynamic batch, outputs equal to the eager module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cednet_pl.eval import build_module
from cednet_pl.export import ATOL, RTOL, DetectorNetwork, export, export_network, run_exported
from cednet_pl.models.checkpoint import read_checkpoint

pytest.importorskip("onnxruntime", reason="the `export` extra (onnx, onnxruntime) is not installed")


def ecfg(make_cfg, *overrides: str) -> DictConfig:
    return make_cfg("export", ["extras.print_config=false", *overrides], fast=False)


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_export_classifier_ema(trained_ckpt: Path, make_cfg, fmt: str) -> None:
    cfg = ecfg(make_cfg, f"ckpt={trained_ckpt}", f"format={fmt}")
    meta = export(cfg)
    out_dir = Path(cfg.paths.output_dir)
    assert json.loads((out_dir / "export.json").read_text()) == meta
    assert meta["task"] == "classification" and meta["ema"] is True
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["class_names"] == [
        str(d) for d in range(10)
    ]
    assert meta["max_abs_diff"] <= ATOL

    module, _, _ = build_module(cfg, read_checkpoint(trained_ckpt), trained_ckpt)
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's (2) and the check's (3)
    with torch.no_grad():
        ema, raw = module.ema.module.eval()(x), module.net.eval()(x)
    (got,) = run_exported(Path(meta["file"]), fmt, x)
    _assert_close(got, ema)
    assert not torch.allclose(got, raw, atol=1e-4)


def test_export_raw_weights_and_bad_format(trained_ckpt: Path, make_cfg) -> None:
    cfg = ecfg(make_cfg, f"ckpt={trained_ckpt}", "format=onnx", "use_ema=false", "input_size=[32,48]")
    meta = export(cfg)
    assert meta["ema"] is False and meta["input"]["shape"] == ["batch", 3, 32, 48]
    module, _, _ = build_module(cfg, read_checkpoint(trained_ckpt), trained_ckpt, ema=False)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        _assert_close(run_exported(Path(meta["file"]), "onnx", x)[0], module.net.eval()(x))
    with pytest.raises(ValueError, match="format='tflite'"):
        export(ecfg(make_cfg, f"ckpt={trained_ckpt}", "format=tflite"))


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_export_retinanet_network(tmp_path: Path, fmt: str) -> None:
    """Backbone pyramid + head; torchvision's postprocessing (anchors, decoding, NMS) stays outside."""
    from analysis.conftest import SIZE, tiny_detector

    module = tiny_detector().eval()
    net = DetectorNetwork(module.net)
    info = export_network(net, torch.randn(2, 3, SIZE, SIZE), fmt, tmp_path / f"det.{fmt}", ["cls", "box"])
    assert info["max_abs_diff"] <= ATOL
    # the exported outputs decode to the detector's own detections
    images = [torch.rand(3, SIZE, SIZE) for _ in range(3)]
    image_list, _ = module.net.transform(images)
    cls, box = run_exported(tmp_path / f"det.{fmt}", fmt, image_list.tensors)
    with torch.no_grad():
        head = module.net.head(list(module.net.backbone(image_list.tensors).values()))
        _assert_close(cls, head["cls_logits"])
        _assert_close(box, head["bbox_regression"])
        features = list(module.net.backbone(image_list.tensors).values())
        anchors = module.net.anchor_generator(image_list, features)
        sizes = [(SIZE, SIZE)] * 3
        dets = module.net._detect(
            {"cls_logits": cls, "bbox_regression": box}, anchors, features, sizes, sizes
        )
        expected = module.net(images)
    for d, e in zip(dets, expected, strict=True):
        assert len(d["boxes"]) == len(e["boxes"]) > 0
        torch.testing.assert_close(d["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
