"""Exact sizes of the released definitions: state_dict keys/shapes, parameter counts and MACs."""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from cednet_pl.models.complexity import aux_head_prefixes, count_macs, count_params

RELEASED = (
    "cednet_next_tiny",
    "cednet_next_small",
    "cednet_next_base",
    "cednet_next_tiny_unet",
    "cednet_next_tiny_hourglass",
    "cednet_next_tiny_fpnconv",
    "cednet_swin_tiny",
    "cednet_res50",
)
SHARED_REFERENCE = Path("/work/shared/reference")


def _meta_model(variant: str, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(variant, **kwargs)


@pytest.mark.parametrize("variant", RELEASED)
def test_state_dict_equals_released_keys(variant: str, reference_keys: Callable) -> None:
    # the released checkpoints carry every stage's head: the training model (aux_heads=True) has their layout
    expected = reference_keys(variant)
    got = {k: tuple(v.shape) for k, v in _meta_model(variant, aux_heads=True).state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    # the inference model (the default) is the released layout without the auxiliary heads, same names
    model = _meta_model(variant)
    inference = {k: v for k, v in expected.items() if not k.startswith(aux_head_prefixes(model))}
    assert len(inference) < len(expected)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == inference


@pytest.mark.parametrize("variant", RELEASED)
def test_param_counts_exact(variant: str, complexity_ref: dict) -> None:
    """Default model = Table A1's inference count; with ``aux_heads`` = the released whole model."""
    model = _meta_model(variant)
    assert count_params(model) == complexity_ref[variant]["params_inference"]
    assert count_params(model, inference_only=True) == complexity_ref[variant]["params_inference"]
    whole = _meta_model(variant, aux_heads=True)
    assert count_params(whole) == complexity_ref[variant]["params_all"]
    assert count_params(whole, inference_only=True) == complexity_ref[variant]["params_inference"]


def test_macs_tiny(complexity_ref: dict) -> None:
    model = timm.create_model("cednet_next_tiny")
    macs = count_macs(model)
    assert macs == pytest.approx(complexity_ref["cednet_next_tiny"]["macs_224"], rel=0.005)
    assert model.training, "count_macs must restore the train/eval mode"


@pytest.mark.slow
@pytest.mark.parametrize("variant", RELEASED)
def test_macs_all_variants(variant: str, complexity_ref: dict) -> None:
    model = timm.create_model(variant)
    assert count_macs(model) == pytest.approx(complexity_ref[variant]["macs_224"], rel=0.005)
    assert model.training, "count_macs must restore the train/eval mode"


def test_mac_counter_on_hand_computed_net() -> None:
    """conv3x3 3->8 s1 p1 on 10x10 + conv1x1 8->4 on 10x10 + linear 4->5 (after pooling)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.LayerNorm([8, 10, 10]),  # norms are not counted
        nn.Conv2d(8, 4, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    expected = 10 * 10 * 8 * 3 * 3 * 3 + 10 * 10 * 4 * 8 + 4 * 5
    assert count_macs(net, (1, 3, 10, 10)) == expected
    assert count_macs(net, (2, 3, 10, 10)) == 2 * expected
    assert count_params(net) == sum(p.numel() for p in net.parameters())


def test_inference_params_exclude_only_auxiliary_heads() -> None:
    model = _meta_model("cednet_next_tiny", aux_heads=True)
    aux = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(
            ("final_layers.0.", "final_layers.1.", "norms.0.", "norms.1.", "heads.0.", "heads.1.")
        )
    )
    assert count_params(model) - count_params(model, inference_only=True) == aux > 0


@pytest.mark.skipif(not SHARED_REFERENCE.is_dir(), reason="no shared reference folder on this machine")
def test_reference_copies_match_shared(reference_dir: Path) -> None:
    # every in-repo copy equals its shared original (the shared folder may hold tables of models not yet added)
    names = sorted(p.name for p in reference_dir.glob("*.tsv"))
    assert len(names) >= 13
    matched, mismatch, errors = filecmp.cmpfiles(SHARED_REFERENCE, reference_dir, names, shallow=False)
    assert (len(matched), mismatch, errors) == (len(names), [], [])
