"""Mask R-CNN: the two-stage CEDNet pyramid (P2-P6), FPN P2-P6 baselines, one-pass losses + detections."""

import math

import pytest
import timm
import torch

import cednet_pl  # noqa: F401  (registers the CEDNet models)
from cednet_pl.models.detection import CEDNetPyramid, TimmFPNBackbone, build_maskrcnn

SIZES = (16, 32, 64, 128, 256)
MASK_RCNN_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def _two_stage(**kwargs):
    return CEDNetPyramid(
        "cednet_next_nano", out_channels=32, drop_path_rate=0.0, p2_level=True, num_extra_levels=1, **kwargs
    )


def _nano_maskrcnn(**kwargs):
    torch.manual_seed(0)
    kwargs = {
        "anchor_sizes": SIZES,
        "min_size": 64,
        "max_size": 96,
        "representation_size": 64,
        "mask_head_channels": (16, 16),
        **kwargs,
    }
    return build_maskrcnn(_two_stage(), num_classes=4, **kwargs)


def test_two_stage_pyramid_levels_strides_and_p2_fusion():
    bb = _two_stage()
    assert (bb.out_channels, bb.num_levels, bb.strides) == (32, 5, [4, 8, 16, 32, 64])
    x = torch.randn(2, 3, 128, 160)
    feats = bb(x)
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    for f, stride in zip(feats.values(), bb.strides, strict=True):
        assert f.shape == (2, 32, math.ceil(128 / stride), math.ceil(160 / stride))
    names = {n.split(".")[0] for n, _ in bb.named_parameters()}
    assert names == {"body", "reduce_convs", "add_blocks", "reduce_c2", "merge_c2"}
    # P2 = merge_c2(up2(P3) + reduce_c2(c2)), c2 = the P2 blocks' output (nano: p2_dim 32, stride 4)
    trunk = bb.trunk
    c2 = trunk.stem(x)
    for block in list(trunk.stages[0])[:-1]:
        c2 = block(c2)
    assert c2.shape == (2, 32, 32, 40)
    up = torch.nn.functional.interpolate(feats["p3"], scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(feats["p2"], bb.merge_c2(up + bb.reduce_c2(c2)), atol=1e-5)
    # the one-stage form is unchanged: P3-P7
    assert CEDNetPyramid("cednet_next_nano", out_channels=32).strides == [8, 16, 32, 64, 128]


def test_two_stage_trunk_loads_a_classification_checkpoint(tmp_path):
    torch.manual_seed(1)
    sd = timm.create_model("cednet_next_nano", num_classes=10).state_dict()
    torch.save({"model": sd}, tmp_path / "cls.pth")
    bb = _two_stage(pretrained=str(tmp_path / "cls.pth"))
    loaded = bb.trunk.state_dict()
    assert loaded and all(torch.equal(v, sd[k]) for k, v in loaded.items())


def test_fpn_p2_p6_baseline():
    bb = TimmFPNBackbone("convnext_atto", out_channels=32, out_indices=(0, 1, 2, 3), extra_levels="maxpool")
    feats = bb(torch.randn(1, 3, 128, 128))
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"] and bb.strides == [4, 8, 16, 32, 64]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    with pytest.raises(ValueError, match="extra_levels"):
        TimmFPNBackbone("convnext_atto", out_indices=(0, 1, 2, 3), extra_levels="p6")


def test_builder_checks_levels():
    with pytest.raises(ValueError, match="5 levels but 4 anchor sizes"):
        build_maskrcnn(_two_stage(), 4, anchor_sizes=(32, 64, 128, 256))
    with pytest.raises(ValueError, match="roi_levels"):
        build_maskrcnn(_two_stage(), 4, anchor_sizes=SIZES, roi_levels=6)


def _sample():
    images = [torch.rand(3, 70, 90, requires_grad=True), torch.rand(3, 60, 48, requires_grad=True)]
    masks = torch.zeros(2, 70, 90, dtype=torch.uint8)
    masks[0, 20:70, 10:50] = 1
    masks[1, 10:40, 60:90] = 1
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0], [60.0, 10.0, 90.0, 40.0]]),
            "labels": torch.tensor([0, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    targets[0]["masks"] = masks
    targets[1]["masks"] = torch.zeros(0, 60, 48, dtype=torch.uint8)
    return images, targets


def test_one_pass_losses_detections_and_masks_in_eval_mode():
    net = _nano_maskrcnn(box_score_thresh=0.0, box_detections_per_img=20).eval()
    images, targets = _sample()
    losses, detections = net.forward_with_loss(images, targets)
    assert set(losses) == MASK_RCNN_LOSSES
    total = sum(losses.values())
    assert bool(torch.isfinite(total))
    total.backward()
    for img in images:
        assert img.grad is not None and float(img.grad.abs().sum()) > 0
    assert not net.training
    with torch.no_grad():
        plain = net(images)
    for det, ref, img in zip(detections, plain, images, strict=True):
        assert len(det["boxes"]) == 20 and not det["masks"].requires_grad
        assert det["masks"].shape == (20, 1, *img.shape[-2:])
        assert torch.allclose(det["boxes"], ref["boxes"]) and torch.equal(det["labels"], ref["labels"])
        assert torch.allclose(det["masks"], ref["masks"])
        # contiguous labels outside (torchvision's background class 0 never comes out)
        assert int(det["labels"].min()) >= 0 and int(det["labels"].max()) <= 3
    # eval mode: the loss's anchor/RoI sampling is seeded, the pass is deterministic
    again, _ = net.forward_with_loss([i.detach() for i in images], targets)
    assert all(torch.equal(again[k], losses[k].detach()) for k in losses)


def test_training_forward_and_missing_masks():
    net = _nano_maskrcnn().train()
    images, targets = _sample()
    losses = net([i.detach() for i in images], targets)
    assert set(losses) == MASK_RCNN_LOSSES
    no_masks = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    with pytest.raises(ValueError, match=r"needs target masks: target\(s\) \[0, 1\]"):
        net.eval().forward_with_loss(images, no_masks)
