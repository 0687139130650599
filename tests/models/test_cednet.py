"""timm-style contract tests of the CEDNet model (forward paths, features, heads, init, options)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from cednet_pl.models.cednet import CEDNet

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
NEXT_VARIANTS = [n for n in RELEASED if n.startswith("cednet_next")]

MakeNano = Callable[..., CEDNet]


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_all_variants_registered() -> None:
    names = set(timm.list_models("cednet_*"))
    assert {*RELEASED, "cednet_next_nano"} <= names
    assert timm.get_pretrained_cfg("cednet_next_tiny").classifier == "heads.2"
    assert timm.get_pretrained_cfg("cednet_next_small").classifier == "heads.3"


def test_forward_is_last_stage_logits_in_train_and_eval(make_nano: MakeNano) -> None:
    model = make_nano()
    x = _x()
    for train in (True, False):
        model.train(train)
        out = model(x)
        stages = model.forward_stage_logits(x)
        assert out.shape == (2, 10)
        assert len(stages) == model.num_stages == 2
        assert all(s.shape == (2, 10) for s in stages)
        torch.testing.assert_close(stages[-1], out)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), out)
    assert not torch.allclose(stages[0], stages[1])


def test_every_parameter_gets_a_gradient(make_nano: MakeNano) -> None:
    model = make_nano(drop_path_rate=0.1, drop_rate=0.1)
    model.train()
    loss = sum(F.cross_entropy(logits, torch.tensor([1, 2])) for logits in model.forward_stage_logits(_x()))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []

    # Through forward() only the last stage's head learns; the auxiliary heads get nothing.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(_x()), torch.tensor([1, 2])).backward()
    aux = [n for n, p in model.named_parameters() if p.grad is None]
    assert aux and all(n.startswith(("final_layers.0.", "norms.0.", "heads.0.")) for n in aux)


def test_features_only_matches_feature_info() -> None:
    model = timm.create_model("cednet_next_nano", features_only=True)
    assert model.feature_info.channels() == [48, 80, 128]
    assert model.feature_info.reduction() == [8, 16, 32]
    feats = model(_x(size=64))
    assert [tuple(f.shape) for f in feats] == [(2, 48, 8, 8), (2, 80, 4, 4), (2, 128, 2, 2)]
    assert not any(k.startswith(("final_layers", "norms", "heads")) for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no heads"):
        model.model(_x(size=64))

    sub = timm.create_model("cednet_next_nano", features_only=True, out_indices=(1, -1))
    assert sub.feature_info.channels() == [80, 128]
    assert sub.feature_info.reduction() == [16, 32]
    assert [f.shape[1] for f in sub(_x(size=64))] == [80, 128]


def test_features_are_the_last_stage_pyramid(make_nano: MakeNano) -> None:
    model = make_nano().eval()
    x = _x()
    c3, c4, c5 = model.forward_intermediates(x, intermediates_only=True)
    assert [c3.shape[1], c4.shape[1], c5.shape[1]] == list(model.dims)
    torch.testing.assert_close(c5, model.forward_features(x))
    final, inter = model.forward_intermediates(x, indices=1)
    torch.testing.assert_close(final, c5)
    assert len(inter) == 1
    torch.testing.assert_close(inter[0], c5)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])


def test_reset_classifier(make_nano: MakeNano) -> None:
    model = make_nano().eval()
    x = _x()
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert model(x).shape == (2, model.head_hidden_size)
    assert all(isinstance(h, nn.Identity) for h in model.heads)
    assert not any(k.startswith("heads.") for k in model.state_dict())
    model.reset_classifier(0, "")
    out = model(x)
    assert out.ndim == 4 and out.shape[:2] == (2, model.head_hidden_size)
    model.reset_classifier(7, "avg")
    assert [s.shape for s in model.forward_stage_logits(x)] == [(2, 7), (2, 7)]
    assert model.get_classifier() is model.heads[-1]
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, "catavgmax")


def test_num_classes_zero_removes_all_stage_heads() -> None:
    model = timm.create_model("cednet_next_nano", num_classes=0, aux_heads=True)
    assert all(isinstance(h, nn.Identity) for h in model.heads)
    assert [o.shape for o in model.forward_stage_logits(_x())] == [(2, 256), (2, 256)]


def test_grad_checkpointing_same_outputs_and_grads(make_nano: MakeNano) -> None:
    ref, ckpt = make_nano(), make_nano()
    ckpt.set_grad_checkpointing(True)
    assert all(m.grad_checkpointing for m in ckpt.modules() if hasattr(m, "grad_checkpointing"))
    x = _x()
    out_ref = ref.forward_stage_logits(x)
    out_ckpt = ckpt.forward_stage_logits(x)
    for a, b in zip(out_ref, out_ckpt, strict=True):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out_ref).backward()
    sum(o.sum() for o in out_ckpt).backward()
    grads = dict(ckpt.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_grad_checkpointing_with_drop_path_is_consistent(make_nano: MakeNano) -> None:
    """Under the same drop-path RNG, checkpointed blocks (recomputed in backward) give the same gradients."""
    model = make_nano(drop_path_rate=0.5)
    model.train()
    x = _x()

    def grads(checkpointing: bool, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = model(x)
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_plain, plain = grads(False, seed=1)
    out_ckpt, ckpt = grads(True, seed=1)
    out_other, _ = grads(False, seed=2)
    assert not torch.allclose(out_plain, out_other)  # drop path is active: another RNG state, other outputs
    assert torch.allclose(out_ckpt, out_plain, rtol=1e-5, atol=1e-6)
    assert set(ckpt) == set(plain) and "stem.0.weight" in ckpt
    differing = [n for n in plain if not torch.allclose(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)]
    assert differing == []


@pytest.mark.parametrize("variant", NEXT_VARIANTS)
def test_drop_path_ramp(variant: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(variant, drop_path_rate=0.3)
    rates = model.drop_path_rates
    blocks = model.blocks_in_ramp_order()
    assert len(blocks) == len(rates) == sum(1 for m in model.modules() if hasattr(m, "pwconv1"))
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(b >= a for a, b in itertools.pairwise(rates))
    for block, rate in zip(blocks, rates, strict=True):
        if rate == 0:
            assert isinstance(block.drop_path, nn.Identity)
        else:
            assert isinstance(block.drop_path, DropPath)
            assert block.drop_path.drop_prob == pytest.approx(rate)


def test_drop_path_ramp_order_covers_p2_encoder_decoder() -> None:
    with torch.device("meta"):
        model = timm.create_model("cednet_next_tiny_hourglass", drop_path_rate=0.2)
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(b)] for b in model.blocks_in_ramp_order()]
    # P2 (3) + 3 encoders x (1 + 2 + 2) + 2 decoders x (2 lateral + 2 + 1) = 3 + 15 + 10
    assert len(order) == 28
    assert order[:4] == ["stages.0.0", "stages.0.1", "stages.0.2", "stages.1.0.encoder.0.0"]
    assert order[8:13] == [
        "stages.1.1.lateral.0",
        "stages.1.1.decoder.0.0",
        "stages.1.1.decoder.0.1",
        "stages.1.1.lateral.1",
        "stages.1.1.decoder.1.0",
    ]
    assert order[-1] == "stages.3.0.encoder.2.1"


def test_group_matcher_for_layer_decay(make_nano: MakeNano) -> None:
    model = make_nano()
    layer = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer.values())
    assert {v for k, v in layer.items() if k.startswith("stem.")} == {0}
    for i in range(model.num_stages + 1):
        assert {v for k, v in layer.items() if k.startswith(f"stages.{i}.")} == {i + 1}
    assert {v for k, v in layer.items() if k.startswith(("final_layers", "norms", "heads"))} == {top}
    assert top == model.num_stages + 2
    assert model.group_matcher(coarse=True) == model.group_matcher(coarse=False)


def test_init_kaiming_fan_out_and_trunc_normal_head_scale() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cednet_next_nano", head_init_scale=0.5, aux_heads=True)
    conv = model.final_layers[0][0]  # 128 -> 256 conv1x1: fan_out 256
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    fc1 = model.stages[1][0].encoder[2][0].pwconv1  # Linear 128 -> 512: fan_out 512
    assert fc1.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    head = model.heads[0].weight  # trunc-normal 0.01 whatever num_classes, scaled by 0.5
    assert head.std().item() == pytest.approx(0.5 * 0.01, rel=0.05)
    gammas = [m.gamma for m in model.modules() if getattr(m, "gamma", None) is not None]
    assert gammas and all(torch.all(g == 1e-6) for g in gammas)
    zero = timm.create_model("cednet_next_nano", head_init_scale=0.0, aux_heads=True)
    assert all(torch.count_nonzero(h.weight) == 0 for h in zero.heads)


@pytest.mark.parametrize("name", ["cednet_next_nano", "cednet_next_tiny"])
def test_initial_logits_do_not_scale_with_few_classes(name: str) -> None:
    """Fine-tuning starts sane: initial logit std < 1 for 2, 10 and 1000 classes and after reset_classifier.

    (The released kaiming fan_out init gave std 1/sqrt(num_classes) per weight: logit std 32.6 for 2 classes.)
    """
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)  # 64 images: the std of 2 x 64 logits is a steady estimate
    for num_classes in (2, 10, 1000):
        model = timm.create_model(name, num_classes=num_classes, aux_heads=True).eval()
        with torch.no_grad():
            stds = [logits.std().item() for logits in model.forward_stage_logits(x)]
        assert max(stds) < 1.0, (num_classes, stds)
    model.reset_classifier(5)
    assert model.heads[0].bias.abs().sum() == 0
    with torch.no_grad():
        assert model(x).std().item() < 1.0


def test_default_cfg_consistency() -> None:
    model = timm.create_model("cednet_next_nano").eval()
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert f"{cfg['classifier']}.weight" in sd and f"{cfg['first_conv']}.weight" in sd
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["input_size"]) == (0.875, "bicubic", (3, 224, 224))
    with torch.no_grad():
        feat = model.forward_features(torch.zeros(1, *cfg["input_size"]))
    assert feat.shape[1] == model.num_features and tuple(feat.shape[-2:]) == cfg["pool_size"]
    assert model.get_classifier().in_features == model.head_hidden_size


def test_channels_last_and_odd_input_sizes(make_nano: MakeNano) -> None:
    model = make_nano().eval()
    x = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        c5 = model.forward_features(x)
    assert ref.shape == (1, 10) and c5.shape == (1, 128, 2, 3)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="decoder"):
        CEDNet(decoder="fpn")
    with pytest.raises(ValueError, match="family"):
        CEDNet(family="vit")
    with pytest.raises(ValueError, match="dims"):
        CEDNet(dims=(32, 64))
    with pytest.raises(ValueError, match="global_pool"):
        CEDNet(global_pool="token")


def test_tiny_forward_small_input() -> None:
    model = timm.create_model("cednet_next_tiny", num_classes=5, aux_heads=True).eval()
    with torch.no_grad():
        stages = model.forward_stage_logits(_x(1))
    assert [s.shape for s in stages] == [(1, 5)] * 3
    assert all(torch.isfinite(s).all() for s in stages)


@pytest.mark.slow
@pytest.mark.parametrize("variant", RELEASED)
def test_released_variants_forward_backward(variant: str) -> None:
    model = timm.create_model(variant, num_classes=5, drop_path_rate=0.1, aux_heads=True)
    stages = model.forward_stage_logits(_x(1))
    assert len(stages) == model.num_stages and all(s.shape == (1, 5) for s in stages)
    sum(s.sum() for s in stages).backward()
    assert all(p.grad is not None for p in model.parameters())
    features = timm.create_model(variant, features_only=True)
    with torch.no_grad():
        feats = features(_x(1))
    assert [f.shape[1] for f in feats] == features.feature_info.channels() == list(model.dims)
