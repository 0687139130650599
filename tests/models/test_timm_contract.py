"""The timm model contract, for every model this package registers with timm.

Our own checks of what timm's ``tests/test_models.py`` asks of a model (forward, backward reaching every parameter,
default cfg / head manipulation, ``features_only``, ``forward_intermediates``, TorchScript, FX forward/backward and
FX + TorchScript). The models are discovered from timm's registry by the module that registered them, so every
family added to ``cednet_pl.models`` is covered without editing this file. Fast suite: ``cednet_next_nano`` on
everything, plus the Swin and ResNet families for TorchScript/FX (their blocks differ); the rest is slow.
"""

from __future__ import annotations

import inspect

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules, model_entrypoint
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import cednet_pl  # noqa: F401  (registers the models)

OURS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("cednet_pl."))
FAST = {"cednet_next_nano"}
FAST_SCRIPT_FX = FAST | {"cednet_swin_tiny", "cednet_res50"}
TARGET_SIZE = 64  # input side for every check (smaller than timm's 96-224: CPU CI)


def _params(fast: set[str]) -> list:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in OURS]


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = model.pretrained_cfg
    size = cfg["input_size"]
    if not cfg.get("fixed_input_size"):  # timm's rule: capped at the target, not below the model's minimum
        low = cfg.get("min_input_size") or (size[0], 1, 1)
        size = (size[0], *(max(min(s, TARGET_SIZE), m) for s, m in zip(size[1:], low[1:], strict=True)))
    torch.manual_seed(0)
    return torch.randn(batch, *size)


def _tracer_kwargs() -> dict:
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def _fx(model: nn.Module) -> nn.Module:
    """The whole model as an FX GraphModule (output = the last graph node), as timm's tests build it."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=_tracer_kwargs(),
    )


def _single(out: dict[str, torch.Tensor]) -> torch.Tensor:
    (value,) = out.values()
    return value


def test_discovery_finds_our_models() -> None:
    assert set(OURS) >= FAST_SCRIPT_FX
    assert "convnext_tiny" in timm.list_models() and "convnext_tiny" not in OURS


@pytest.mark.parametrize("name", _params(FAST))
def test_forward_backward_reach_every_parameter(name: str) -> None:
    """timm's test_model_forward/backward: the default model is the inference model, no parameter is idle."""
    model = timm.create_model(name, num_classes=7).train()
    x = _input(model)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []

    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", _params(FAST))
def test_default_cfg_heads_and_factory(name: str) -> None:
    """timm's test_model_default_cfgs (and its API checks) on the meta device."""
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    model = timm.create_model(name, device="meta").eval()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    cfg = model.pretrained_cfg
    assert model.in_chans == cfg["input_size"][0]
    assert (
        model.num_classes == cfg["num_classes"] > 0 and model.num_features > 0 and model.head_hidden_size > 0
    )
    sd = model.state_dict()
    assert f"{cfg['classifier']}.weight" in sd and f"{cfg['first_conv']}.weight" in sd
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None

    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    spatial = feats.ndim == 4  # token models (timm's "non-standard" group) return (B, N, C)
    if spatial:
        assert feats.shape[1] == model.num_features and tuple(feats.shape[-2:]) == tuple(cfg["pool_size"])
    else:
        assert feats.shape[-1] == model.num_features
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    if spatial:
        model.reset_classifier(0, "")
        dense = model(x)
        assert dense.ndim == 4 and tuple(dense.shape[-2:]) == tuple(cfg["pool_size"])
        headless = timm.create_model(name, num_classes=0, global_pool="", device="meta").eval()
        assert headless(x).shape == dense.shape

    model.to(dtype=torch.float64)
    model.reset_classifier(3)
    head = model.get_classifier()
    assert head.weight.dtype == torch.float64 and head.weight.device.type == "meta" and not head.training


@pytest.mark.parametrize("name", _params(FAST))
def test_features_only_and_forward_intermediates(name: str) -> None:
    model = timm.create_model(name, features_only=True).eval()
    x = _input(model, batch=1)
    info = list(zip(model.feature_info.channels(), model.feature_info.reduction(), strict=True))
    assert len(info) >= 3
    with torch.no_grad():
        outs = model(x)
    assert [(o.shape[1], x.shape[-1] // o.shape[-1]) for o in outs] == info

    net = timm.create_model(name).eval()
    with torch.no_grad():
        final, inter = net.forward_intermediates(x)
        torch.testing.assert_close(final, net.forward_features(x))
    assert [t.shape[1] for t in inter] == [c for c, _ in info]


@pytest.mark.parametrize("name", _params(FAST_SCRIPT_FX))
def test_torchscript_and_fx(name: str) -> None:
    """timm's test_model_forward_torchscript, test_model_forward_fx / backward_fx and fx_torchscript."""
    with timm.set_scriptable(True):
        model = timm.create_model(name, num_classes=5).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-5)
        fx = _fx(model)
        torch.testing.assert_close(_single(fx(x)), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_single(torch.jit.script(fx)(x)), ref, rtol=1e-4, atol=1e-5)

    fx_train = _fx(model.train())
    _single(fx_train(x)).mean().backward()
    assert [n for n, p in fx_train.named_parameters() if p.grad is None] == []
