"""det_demo_convnext: det_demo's recipe with only the backbone changed, and a detector of matched size."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from testlib import compose_config

# the only keys det_demo_convnext may change (besides its task name / run dir)
BACKBONE_KEYS = {"kind", "model_name", "out_indices", "dims"}


def _compose(experiment: str, tmp_path):
    cfg = compose_config("train", [f"+experiment={experiment}"], tmp_path / experiment)
    return OmegaConf.to_container(cfg, resolve=False)


def test_det_demo_convnext_is_det_demo_with_another_backbone(tmp_path):
    demo, conv = _compose("det_demo", tmp_path), _compose("det_demo_convnext", tmp_path)
    assert conv["task_name"] == "det_demo_convnext" and demo["task_name"] == "det_demo"
    # the recipe: data, augmentation, trainer (epochs, validation schedule), callbacks, seed, everything else
    skip = {"hydra", "task_name", "model", "paths"}
    assert {k: v for k, v in conv.items() if k not in skip} == {
        k: v for k, v in demo.items() if k not in skip
    }
    assert set(conv) == set(demo)
    # the model: same detector, optimizer, schedule, evaluation and pyramid width; only the trunk differs
    assert {k: v for k, v in conv["model"].items() if k != "backbone"} == {
        k: v for k, v in demo["model"].items() if k != "backbone"
    }
    bc, bd = conv["model"]["backbone"], demo["model"]["backbone"]
    assert {k: v for k, v in bc.items() if k not in BACKBONE_KEYS} == {
        k: v for k, v in bd.items() if k not in BACKBONE_KEYS
    }
    assert bc["kind"] == "timm_fpn" and bd["kind"] == "cednet"


def test_det_demo_convnext_parameters_match_cednet_nano(tmp_path):
    """The paper pairs ConvNeXt-T + FPN with CEDNet-T at equal size: here within 10% of RetinaNet-CEDNet-nano."""
    counts = {}
    for experiment in ("det_demo", "det_demo_convnext"):
        cfg = compose_config("train", [f"+experiment={experiment}"], tmp_path / experiment)
        module = instantiate(cfg.model)
        counts[experiment] = sum(p.numel() for p in module.net.parameters())
    ratio = counts["det_demo_convnext"] / counts["det_demo"]
    assert ratio == pytest.approx(1.0, abs=0.10), counts
    # the FPN is part of the ConvNeXt detector (P3-P7), as in the paper's baseline
    assert type(module.net.backbone).__name__ == "TimmFPNBackbone"
    assert list(module.net.backbone.body.feature_info.channels()) == [32, 64, 128]
