"""Detection models: CEDNet pyramid and FPN baseline shapes, checkpoint loading, one-pass losses + detections."""

import math

import pytest
import timm
import torch

import cednet_pl  # noqa: F401  (registers the CEDNet models)
from cednet_pl.models.detection import CEDNetPyramid, TimmFPNBackbone, build_retinanet

SIZES = (16, 32, 64, 128, 256)


def _nano_detector(**kwargs):
    torch.manual_seed(0)
    backbone = CEDNetPyramid("cednet_next_nano", out_channels=32, drop_path_rate=0.1)
    kwargs = {"anchor_base_sizes": SIZES, "min_size": 64, "max_size": 96, "size_divisible": 32, **kwargs}
    return build_retinanet(backbone, num_classes=4, **kwargs)


def test_cednet_pyramid_levels_strides_and_channels():
    bb = CEDNetPyramid("cednet_next_nano", out_channels=32, drop_path_rate=0.0)
    assert (bb.out_channels, bb.num_levels, bb.strides) == (32, 5, [8, 16, 32, 64, 128])
    feats = bb(torch.randn(2, 3, 128, 160))
    assert list(feats) == ["p3", "p4", "p5", "p6", "p7"]
    for f, stride in zip(feats.values(), bb.strides, strict=True):
        assert f.shape == (2, 32, math.ceil(128 / stride), math.ceil(160 / stride))
    # no classifier heads in the trunk; the neck-free pyramid is reduce_convs + add_blocks only
    names = {n.split(".")[0] for n, _ in bb.named_parameters()}
    assert names == {"body", "reduce_convs", "add_blocks"}
    assert not any(k in n for n, _ in bb.named_parameters() for k in ("heads.", "final_layers.", "norms."))


def test_fpn_baseline_levels():
    bb = TimmFPNBackbone("convnext_atto", out_channels=32, drop_path_rate=0.0)
    feats = bb(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    assert all(f.shape[1] == 32 for f in feats.values()) and bb.num_levels == 5


@pytest.mark.parametrize("layout", ["lightning", "released"])
def test_loads_trunk_from_classification_checkpoint(tmp_path, layout):
    torch.manual_seed(1)
    cls = timm.create_model("cednet_next_nano", num_classes=10)
    sd = cls.state_dict()
    if layout == "lightning":
        ckpt = {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "pytorch-lightning_version": "2.6"}
    else:
        ckpt = {"model": sd, "epoch": 300}
    path = tmp_path / "cls.ckpt"
    torch.save(ckpt, path)
    bb = CEDNetPyramid("cednet_next_nano", pretrained=str(path), out_channels=32)
    loaded = bb.trunk.state_dict()
    assert loaded and all(torch.equal(v, sd[k]) for k, v in loaded.items())


def test_mismatched_trunk_fails_clearly(tmp_path):
    other = timm.create_model("cednet_next_nano", num_classes=10, dims=(32, 64, 96))
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(RuntimeError, match=r"(?s)does not fit cednet_next_nano.*shape mismatch"):
        CEDNetPyramid("cednet_next_nano", pretrained=str(path))


def test_detection_checkpoint_is_not_a_backbone(tmp_path):
    net = _nano_detector()
    path = tmp_path / "det.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    with pytest.raises(ValueError, match="is a detection checkpoint"):
        CEDNetPyramid("cednet_next_nano", pretrained=str(path))


def test_anchor_sizes_must_match_levels():
    backbone = CEDNetPyramid("cednet_next_nano", out_channels=32)
    with pytest.raises(ValueError, match="5 levels but 4 anchor sizes"):
        build_retinanet(backbone, 4, anchor_base_sizes=(32, 64, 128, 256))
    with pytest.raises(ValueError, match="box_loss"):
        build_retinanet(backbone, 4, box_loss="iou")


def test_one_pass_losses_and_detections_in_eval_mode_with_input_gradient():
    net = _nano_detector(score_thresh=0.0, detections_per_img=20).eval()
    images = [torch.rand(3, 70, 90, requires_grad=True), torch.rand(3, 60, 48, requires_grad=True)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0], [60.0, 10.0, 110.0, 40.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses, detections = net.forward_with_loss(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    total = sum(losses.values())
    assert total.requires_grad and bool(torch.isfinite(total))
    total.backward()
    for img in images:
        assert img.grad is not None and img.grad.shape == img.shape
        assert bool(torch.isfinite(img.grad).all()) and float(img.grad.abs().sum()) > 0
    assert not net.training
    # detections: same as the plain eval forward, in original image coordinates, detached
    with torch.no_grad():
        plain = net(images)
    for det, ref, img in zip(detections, plain, images, strict=True):
        assert len(det["boxes"]) == 20 and not det["boxes"].requires_grad
        assert torch.allclose(det["boxes"], ref["boxes"]) and torch.equal(det["labels"], ref["labels"])
        assert (
            float(det["boxes"][:, 2].max()) <= img.shape[-1]
            and float(det["boxes"][:, 3].max()) <= img.shape[-2]
        )
    # eval mode: no drop path, so the pass is deterministic
    again, _ = net.forward_with_loss([i.detach() for i in images], targets)
    assert all(torch.equal(again[k], losses[k].detach()) for k in losses)


def test_degenerate_target_box_is_rejected():
    net = _nano_detector().eval()
    bad = [{"boxes": torch.tensor([[10.0, 10.0, 10.0, 30.0]]), "labels": torch.tensor([0])}]
    with pytest.raises(ValueError, match="zero or negative width/height"):
        net.forward_with_loss([torch.rand(3, 64, 64)], bad)
