"""Segmentation models: CEDHead / UperNet on CEDNet, UperNet on a timm trunk, sliding window, trunk loading."""

from pathlib import Path

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

import cednet_pl  # noqa: F401
from cednet_pl.models.segmentation import (
    CEDHead,
    CEDNetSegBackbone,
    UperHead,
    build_segmentor,
    slide_inference,
)

NANO = {"kind": "cednet", "model_name": "cednet_next_nano", "drop_path_rate": 0.0}


def _ced(num_classes=5):
    return build_segmentor(
        {**NANO, "ced_extras": True, "out_channels": 64},
        num_classes,
        {"kind": "ced", "channels": 32},
        {"channels": 16},
    )


@pytest.mark.parametrize(
    ("backbone", "head", "channels", "aux_channels"),
    [
        (
            {**NANO, "ced_extras": True, "out_channels": 64},
            {"kind": "ced", "channels": 32},
            [32, 48, 64, 64],
            48,
        ),
        ({**NANO}, {"kind": "uper", "channels": 32}, [32, 48, 80, 128], 48),
        (
            {"kind": "timm", "model_name": "convnext_atto", "drop_path_rate": 0.0},
            {"kind": "uper", "channels": 32, "pool_scales": [1, 2]},
            [40, 80, 160, 320],
            160,
        ),
    ],
)
def test_segmentor_shapes(backbone, head, channels, aux_channels):
    net = build_segmentor(backbone, 7, head, {"channels": 16})
    assert net.backbone.out_channels == channels and net.backbone.aux_channels == aux_channels
    x = torch.randn(2, 3, 64, 96)
    feats, aux_feat = net.backbone(x)
    assert [f.shape[1] for f in feats] == channels
    assert [f.shape[-1] for f in feats] == [24, 12, 6, 3]  # strides 4, 8, 16, 32
    assert aux_feat.shape[1] == aux_channels
    logits, aux = net(x, with_aux=True)
    assert logits.shape == aux.shape == (2, 7, 64, 96)
    assert net(x).shape == (2, 7, 64, 96)


def test_cedhead_backbone_is_the_released_wrapper():
    """CEDNet-T + CEDHead: widths of the released config, BatchNorm (SyncBN-convertible) in every extra part,
    LN2d in the trunk and the last stage's decoder, GELU in the extras, ReLU in the head."""
    bb = CEDNetSegBackbone("cednet_next_tiny", ced_extras=True)
    assert bb.out_channels == [96, 192, 352, 512] and bb.aux_channels == 192
    assert not hasattr(bb.body, "heads") or len(bb.body.heads) == 0  # no classification heads
    assert [len(level) for level in bb.extra_encoder.encoder] == [2, 4, 2]
    extras = [bb.extra_encoder, bb.reduce_convs, bb.ppm, bb.last_decoder]
    norms = {
        type(m) for part in extras for m in part.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))
    }
    assert norms == {nn.BatchNorm2d}
    assert any(isinstance(m, nn.GELU) for m in bb.ppm.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.last_stage_decoder.modules())
    assert all(b.drop_path.drop_prob == 0.2 for level in bb.extra_encoder.encoder for b in level)
    head = CEDHead(bb.out_channels, 150)
    assert head.bottleneck[0].in_channels == 96 + 192 + 352 + 512 and head.bottleneck[0].out_channels == 512
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(bb)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.extra_encoder.modules())
    up = UperHead([96, 192, 352, 512], 150)
    assert [c[0].in_channels for c in up.lateral_convs] == [96, 192, 352]
    assert up.ppm.bottleneck[0].in_channels == 512 + 4 * 512


def test_layer_decay_groups_follow_the_trunk():
    net = _ced()
    layer_of = group_parameters(net, net.group_matcher(), reverse=True)
    assert layer_of["backbone.body.stem.0.weight"] == 0
    assert layer_of["backbone.body.stages.0.0.dwconv.weight"] == 1
    # nano has 2 cascade stages: stages.2 and the last stage's decoder share layer 3
    last = [k for k in layer_of if k.startswith("backbone.last_stage_decoder.")]
    assert last and {layer_of[k] for k in last} == {
        layer_of["backbone.body.stages.2.0.encoder_downsample.0.0.weight"]
    }
    top = max(layer_of.values())
    assert (
        layer_of["decode_head.classifier.weight"]
        == top
        == layer_of["backbone.extra_encoder.encoder.0.0.pwconv1.weight"]
    )
    assert top == 4


def test_slide_inference_equals_whole_image_on_one_window():
    torch.manual_seed(0)
    net = _ced(4).eval()
    x = torch.randn(1, 3, 64, 80)
    whole = net.inference(x, mode="whole")
    slide = net.inference(x, mode="slide", crop=96, stride=64)
    assert torch.equal(slide, whole)


def test_slide_inference_overlapping_windows_cover_every_pixel_once_averaged():
    """A pixel-wise model makes every window agree: the average over overlapping windows is the model."""
    conv = nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 70, 100)
    calls = []

    def fn(crop):
        calls.append(tuple(crop.shape[-2:]))
        return conv(crop)

    out = slide_inference(fn, x, 5, crop=32, stride=21)
    torch.testing.assert_close(out, conv(x))
    # ceil((70 - 32) / 21) + 1 = 3 rows, ceil((100 - 32) / 21) + 1 = 5 columns, the last flush with the border
    assert set(calls) == {(32, 32)} and len(calls) == 3 * 5
    with pytest.raises(ValueError, match="stride"):
        slide_inference(fn, x, 5, crop=32, stride=0)


def test_multiscale_flip_averages_probabilities():
    torch.manual_seed(0)
    net = _ced(3).eval()
    x = torch.randn(1, 3, 64, 64)
    probs = net.inference(x, mode="whole", scales=(0.75, 1.0), flip=True)
    assert probs.shape == (1, 3, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="inference mode"):
        net.inference(x, mode="tiled")


def test_trunk_loads_from_a_classification_checkpoint(tmp_path: Path):
    cls = timm.create_model("cednet_next_nano", num_classes=10)
    path = tmp_path / "cls.pth"
    torch.save({"model": cls.state_dict()}, path)
    for ced in (True, False):
        bb = CEDNetSegBackbone("cednet_next_nano", pretrained=str(path), ced_extras=ced, out_channels=64)
        torch.testing.assert_close(bb.body.stem[0].weight, cls.stem[0].weight)
        torch.testing.assert_close(
            bb.body.stages[2][0].encoder[2][0].pwconv1.weight, cls.stages[2][0].encoder[2][0].pwconv1.weight
        )
    wrong = tmp_path / "tiny.pth"
    torch.save(timm.create_model("cednet_next_tiny", num_classes=0, with_heads=False).state_dict(), wrong)
    with pytest.raises(RuntimeError, match="does not fit cednet_next_nano"):
        CEDNetSegBackbone("cednet_next_nano", pretrained=str(wrong))


def test_segmentation_checkpoint_is_not_a_backbone(tmp_path: Path):
    seg = tmp_path / "seg.ckpt"
    torch.save(
        {
            "state_dict": {"net.decode_head.classifier.weight": torch.zeros(1)},
            "cednet_config": {"model": {"_target_": "cednet_pl.lit.segmentation.SegmentationModule"}},
        },
        seg,
    )
    with pytest.raises(ValueError, match="segmentation checkpoint"):
        CEDNetSegBackbone("cednet_next_nano", pretrained=str(seg))


def test_build_segmentor_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="backbone kind"):
        build_segmentor({"kind": "resnet"}, 3)
    with pytest.raises(ValueError, match="head kind"):
        build_segmentor(NANO, 3, {"kind": "deeplab"})
    with pytest.raises(ValueError, match="NeXt family"):
        CEDNetSegBackbone("cednet_res50", ced_extras=True)
