"""Swin and ResNet block families: structure, exact sizes, shifted windows, small-input training steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import cednet_pl  # noqa: F401  (registers the timm entry points)
from cednet_pl.models.blocks import (
    DepthwiseConv2d,
    FocalNeXtBlock,
    LayerNorm2d,
    NeXtBlock,
    PatchConv2d,
    PointwiseConv2d,
    depthwise_conv2d,
    dilated_dwconv2d,
    get_family,
)
from cednet_pl.models.blocks_resnet import Bottleneck, FocalBottleneck
from cednet_pl.models.blocks_swin import (
    SHIFT_MASK_VALUE,
    SwinBlock,
    SwinFocalBlock,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from cednet_pl.models.cednet import CEDNet
from cednet_pl.models.complexity import count_macs, count_params

FAMILY_VARIANTS = ("cednet_res50", "cednet_swin_tiny")


def _reference_keys(reference_dir: Path, variant: str) -> list[tuple[str, str]]:
    """(key, shape) rows of a released checkpoint, in file order."""
    path = reference_dir / f"{variant}.keys.tsv"
    lines = path.read_text().splitlines()
    assert lines[0] == "key\tshape", f"{path}: unexpected header {lines[0]!r}"
    return [tuple(line.split("\t")) for line in lines[1:]]


def _keys(module: nn.Module) -> list[tuple[str, str]]:
    return [(k, "x".join(str(s) for s in v.shape)) for k, v in module.state_dict().items()]


@pytest.fixture(scope="module", params=FAMILY_VARIANTS)
def released(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    # the released layout and whole-model count include every stage's head
    return request.param, timm.create_model(request.param, pretrained=False, aux_heads=True)


def _small(family: str, **kwargs) -> CEDNet:
    args = dict(p2_dim=32, p2_block=2, dims=(64, 96, 128), blocks=(2, 2, 2), num_stages=2, head_hidden=64)
    args.update(kwargs)
    return CEDNet(family=family, num_classes=10, aux_heads=True, **args)


# ----------------------------------------------------------------------------- released variants
def test_state_dict_matches_released_keys(released: tuple[str, nn.Module], reference_dir: Path) -> None:
    name, model = released
    assert _keys(model) == _reference_keys(reference_dir, name)  # same keys, shapes and order


def test_exact_param_counts(released: tuple[str, nn.Module], complexity_ref: dict) -> None:
    name, model = released
    assert count_params(model) == complexity_ref[name]["params_all"]
    assert count_params(model, inference_only=True) == complexity_ref[name]["params_inference"]


def test_macs_at_224_match_reference(released: tuple[str, nn.Module], complexity_ref: dict) -> None:
    name, model = released
    macs = count_macs(model, (1, 3, 224, 224))
    assert macs == pytest.approx(complexity_ref[name]["macs_224"], rel=5e-3)


def test_released_families_use_their_norms_and_acts() -> None:
    swin, res = get_family("swin"), get_family("res")
    assert swin.norm2d is LayerNorm2d and swin.act is nn.GELU
    assert res.norm2d is nn.BatchNorm2d and res.act is nn.ReLU
    blk = swin.base_block(64, drop_path=0.0, ls_init_value=1e-6, index=1)
    assert isinstance(blk, SwinBlock) and blk.shift_size == 3 and blk.attn.num_heads == 2
    assert swin.base_block(64, drop_path=0.0, ls_init_value=None, index=2).shift_size == 0
    assert isinstance(swin.focal_block(64, drop_path=0.0, ls_init_value=None, index=0), SwinFocalBlock)
    assert type(res.base_block(32, drop_path=0.0, ls_init_value=None, index=0)) is Bottleneck
    assert isinstance(res.focal_block(32, drop_path=0.0, ls_init_value=None, index=0), FocalBottleneck)


# ----------------------------------------------------------------------------- small models train
@pytest.mark.parametrize(("family", "size"), [("swin", 64), ("swin", 40), ("res", 48)], ids=lambda v: str(v))
def test_small_model_forward_backward(family: str, size: int) -> None:
    torch.manual_seed(0)
    model = _small(family, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, size, size)
    x_before = x.clone()
    logits = model.forward_stage_logits(x)
    assert [tuple(t.shape) for t in logits] == [(2, 10), (2, 10)]
    sum(F.cross_entropy(t, torch.tensor([1, 2])) for t in logits).backward()
    assert torch.equal(x, x_before)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
    c3 = math.ceil(math.ceil(size / 2) / 2) // 2  # two padded s2 stem convs, then conv2x2 s2 (floor)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, c3, c3),
        (96, c3 // 2, c3 // 2),
        (128, c3 // 4, c3 // 4),
    ]


def test_swin_grad_checkpointing_same_output() -> None:
    torch.manual_seed(0)
    model = _small("swin").eval()
    x = torch.randn(1, 3, 40, 40, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- Swin specifics
def test_window_partition_roundtrip() -> None:
    x = torch.arange(2 * 14 * 21 * 3, dtype=torch.float32).view(2, 14, 21, 3)
    windows = window_partition(x, 7)
    assert windows.shape == (2, 6, 49, 3)
    torch.testing.assert_close(windows[0, 1, :, 0], x[0, :7, 7:14, 0].reshape(-1))
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


def test_shifted_window_mask_regions() -> None:
    mask = shifted_window_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert torch.count_nonzero(mask[0]) == 0  # top-left window: one region
    last = mask[3]  # bottom-right window after the shift: 4 regions of 4x4, 4x3, 3x4, 3x3 tokens
    assert torch.equal(last, last.T)
    assert int((last == 0).sum()) == 16**2 + 12**2 + 12**2 + 9**2
    # window position (0, 0) is image row/col 10 (region 1), window position (6, 6) is wrapped row/col 0
    assert last[0, 48] == SHIFT_MASK_VALUE and last[0, 1] == 0 and last[47, 48] == 0
    assert set(torch.unique(mask).tolist()) == {SHIFT_MASK_VALUE, 0.0}


def _explicit_window_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Reference (shifted) window attention with explicit softmax, for maps that are window multiples."""
    attn, ws, shift = block.attn, block.window_size, block.shift_size
    _, h, w, c = x.shape
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    windows = window_partition(x, ws)
    b, nw, n, _ = windows.shape
    q, k, v = attn.qkv(windows).view(b, nw, n, 3, attn.num_heads, -1).permute(3, 0, 1, 4, 2, 5)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + attn.relative_position_bias()
    if shift:
        logits = logits + shifted_window_mask(h, w, ws, shift).unsqueeze(1)
    out = (logits.softmax(-1) @ v).transpose(2, 3).reshape(b, nw, n, c)
    out = window_reverse(attn.proj(out), ws, h, w)
    return torch.roll(out, (shift, shift), (1, 2)) if shift else out


@pytest.mark.parametrize("index", [0, 1])
def test_window_attention_matches_explicit_softmax(index: int) -> None:
    torch.manual_seed(0)
    block = SwinBlock(64, index=index)
    x = torch.randn(2, 14, 21, 64)
    torch.testing.assert_close(block.window_attention(x), _explicit_window_attention(block, x))


def test_shifted_windows_block_attention_across_regions() -> None:
    torch.manual_seed(0)
    block = SwinBlock(32, index=1).eval()
    x = torch.randn(1, 14, 14, 32)
    base = block.window_attention(x)

    def changed_at(src: tuple[int, int], dst: tuple[int, int]) -> bool:
        x2 = x.clone()
        x2[0, src[0], src[1]] += 10.0
        return not torch.allclose(block.window_attention(x2)[0, dst[0], dst[1]], base[0, dst[0], dst[1]])

    # (13, 13) and (0, 0) share the bottom-right shifted window but lie in different regions
    assert not changed_at((0, 0), (13, 13))
    assert not changed_at((13, 0), (13, 13))
    # (12, 12) is in the same region and window: it is attended to
    assert changed_at((12, 12), (13, 13))
    # without the shift (even block) (13, 13) and (6, 6) are in different windows, (8, 8) in the same one
    plain = SwinBlock(32, index=0).eval()
    plain.load_state_dict(block.state_dict())
    y = plain.window_attention(x)
    x2 = x.clone()
    x2[0, 6, 6] += 10.0
    torch.testing.assert_close(plain.window_attention(x2)[0, 13, 13], y[0, 13, 13])
    x2[0, 8, 8] += 10.0
    assert not torch.allclose(plain.window_attention(x2)[0, 13, 13], y[0, 13, 13])


def test_released_shift_on_a_one_window_map_is_the_reverse_roll_only() -> None:
    """The released Swin block: on a 7x7 map (one window) a shifted block skips the forward roll and the mask but
    still rolls the attention output back by window // 2 = 3; the symmetric form does neither."""
    torch.manual_seed(0)
    released = SwinFocalBlock(64, index=1).eval()
    symmetric = SwinFocalBlock(64, index=1, shift_mode="symmetric").eval()
    plain = SwinFocalBlock(64, index=0).eval()
    symmetric.load_state_dict(released.state_dict())
    plain.load_state_dict(released.state_dict())
    assert released.shift_mode == "released" and released.shift_size == 3
    y = torch.randn(2, 7, 7, 64)
    with torch.no_grad():
        unshifted = plain.window_attention(y)
        torch.testing.assert_close(released.window_attention(y), torch.roll(unshifted, (3, 3), dims=(1, 2)))
        torch.testing.assert_close(symmetric.window_attention(y), unshifted)
        x = torch.randn(2, 64, 7, 7)
        torch.testing.assert_close(symmetric(x), plain(x))
        assert not torch.allclose(released(x), plain(x), atol=1e-3)
        # maps larger than a window: both forms are the textbook shifted window (forward roll, mask, reverse roll)
        x = torch.randn(2, 64, 14, 14)
        torch.testing.assert_close(released(x), symmetric(x))
        assert not torch.allclose(released(x), plain(x), atol=1e-3)


def test_swin_families_choose_the_shift_mode() -> None:
    assert (
        get_family("swin").base_block(64, drop_path=0.0, ls_init_value=None, index=1).shift_mode == "released"
    )
    sym = get_family("swin_symmetric").focal_block(64, drop_path=0.0, ls_init_value=None, index=1)
    assert sym.shift_mode == "symmetric"
    model = timm.create_model("cednet_swin_tiny", family="swin_symmetric", num_classes=3)
    assert {b.shift_mode for b in model.modules() if isinstance(b, SwinBlock)} == {"symmetric"}
    assert {
        b.shift_mode for b in timm.create_model("cednet_swin_tiny").modules() if isinstance(b, SwinBlock)
    } == {"released"}
    with pytest.raises(ValueError, match="shift_mode"):
        SwinBlock(64, shift_mode="left")


@pytest.mark.parametrize("size", [(2, 2), (5, 9), (16, 16)])
def test_swin_blocks_pad_non_window_multiples(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, *size).to(memory_format=torch.channels_last)
    for block in (SwinBlock(64, index=1), SwinFocalBlock(64, index=1)):
        out = block(x)
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (7, 7), (9, 10), (10, 10), (16, 11)], ids=str)
def test_dilated_dwconv_fast_paths_equal_conv(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel_size=7, padding=9, dilation=3, groups=8)
    x = torch.randn(2, 8, *size).to(memory_format=torch.channels_last).requires_grad_()
    ref, out = conv(x), dilated_dwconv2d(x, conv.weight, conv.bias, conv.dilation[0])
    torch.testing.assert_close(out, ref)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(7, 7), (8, 11), (28, 28)], ids=str)
def test_matmul_convs_equal_conv2d(size: tuple[int, int], channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, *size)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    convs = (PatchConv2d(8, 12, patch=2), PointwiseConv2d(8, 12))
    if channels_last:  # as after model.to(memory_format=torch.channels_last): the 4-d weights too
        convs = tuple(conv.to(memory_format=torch.channels_last) for conv in convs)
    for conv in convs:
        ref = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)
        out = conv(x)
        torch.testing.assert_close(out, ref)
        grads_ref = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
        grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
        # the weight gradient keeps the parameter's strides (DDP buckets); 1x1 weights differ only on size-1 dims
        assert grads[1].stride() == conv.weight.stride() or conv.kernel_size == (1, 1)
    assert set(PatchConv2d(8, 12).state_dict()) == set(nn.Conv2d(8, 12, 2, stride=2).state_dict())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("kernel", "dilation", "size", "bias"),
    [
        (7, 1, (9, 9), True),
        (7, 1, (5, 12), True),
        (3, 1, (1, 1), False),
        (7, 3, (7, 7), True),
        (7, 3, (10, 11), True),
    ],
    ids=str,
)
def test_depthwise_conv_equals_conv2d(
    kernel: int, dilation: int, size: tuple[int, int], bias: bool, channels_last: bool
) -> None:
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, kernel, dilation, bias=bias)
    ref = nn.Conv2d(6, 6, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=6, bias=bias)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(3, 6, *size)
    if channels_last:
        conv, ref, x = (t.to(memory_format=torch.channels_last) for t in (conv, ref, x))
    x.requires_grad_()
    params, ref_params = [x, conv.weight, conv.bias][: 2 + bias], [x, ref.weight, ref.bias][: 2 + bias]
    for run in (conv, lambda t: dilated_dwconv2d(t, conv.weight, conv.bias, conv.dilation[0])):
        out, expected = run(x), ref(x)
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.square().sum(), params)
        for g, g_ref in zip(grads, torch.autograd.grad(expected.square().sum(), ref_params), strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
        if run is conv:  # the weight gradient keeps the parameter's strides (DDP buckets)
            assert grads[1].stride() == conv.weight.stride()


def test_depthwise_conv_gradients_and_fallbacks() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: depthwise_conv2d(*t, (2, 2), 2), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *t: depthwise_conv2d(*t, (1, 1), 1), (x, w, b))
    # plain F.conv2d where the fast weight gradient does not apply: no grad, CPU autocast (bf16 gradients)
    conv = DepthwiseConv2d(4, 3)
    xf = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(xf), F.conv2d(xf, conv.weight, conv.bias, padding=1, groups=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(xf.requires_grad_())
    out.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape


@pytest.mark.parametrize("block_cls", [NeXtBlock, FocalNeXtBlock])
def test_layer_scale_folded_into_pwconv2_is_exact(block_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    block = block_cls(16)
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 9, 9).requires_grad_()

    def unfolded(x: torch.Tensor) -> torch.Tensor:  # the layer scale as a multiply after pwconv2
        if block_cls is NeXtBlock:
            y = block.norm(block.dwconv(x).permute(0, 2, 3, 1))
        else:
            y = x + block.dwconv1(x)
            y = (y + block.dwconv2(y)).permute(0, 2, 3, 1)
        return x + (block.pwconv2(block.act(block.pwconv1(y))) * block.gamma).permute(0, 3, 1, 2)

    params = [x, block.gamma, block.pwconv2.weight, block.pwconv2.bias, block.pwconv1.weight]
    out, ref = block(x), unfolded(x)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), params)
    grads_ref = torch.autograd.grad(ref.square().sum(), params)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_layer_scale_not_folded_under_fp16() -> None:
    # gamma starts at 1e-6: gamma * W would underflow in float16, so the block keeps the multiply there
    torch.manual_seed(0)
    block = NeXtBlock(32)
    # x as small as the update (the LayerNorm undoes the scale), so subtracting the residual is exact
    x = torch.randn(2, 32, 8, 8) * 1e-6
    ref = block(x) - x
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x) - x
    assert ref.abs().max() > 0
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=ref.abs().max().item() * 2e-2)


def test_swin_focal_block_branches() -> None:
    block = SwinFocalBlock(64)
    conv = block.dwconv2
    assert (conv.kernel_size, conv.dilation, conv.padding, conv.groups) == ((7, 7), (3, 3), (9, 9), 64)
    assert isinstance(block.norm_act1[0], nn.LayerNorm) and isinstance(block.norm_act1[1], nn.GELU)
    # with zero attention, conv branch and MLP outputs, the block is the identity
    for layer in (block.attn.proj, block.pwconv2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(block.norm_act1[0].bias)
    nn.init.zeros_(block.norm_act1[0].weight)
    nn.init.zeros_(block.norm_act2[0].weight)
    nn.init.zeros_(block.norm_act2[0].bias)
    x = torch.randn(1, 64, 9, 9)
    out = block(x)
    # y = norm1(x) is added to the shortcut: out = x + LN(x) (MLP branch is zero)
    expected = x + F.layer_norm(
        x.permute(0, 2, 3, 1), (64,), block.norm1.weight, block.norm1.bias, 1e-6
    ).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------- ResNet specifics
def test_bottleneck_structure() -> None:
    block = FocalBottleneck(32)
    assert [type(m) for m in block.conv1] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert block.conv1[0].bias is None and block.conv2[0].bias is None and block.conv3[0].bias is None
    assert len(block.conv3) == 2  # no act before the residual add
    dw = block.dwconv1[0]
    assert (dw.kernel_size, dw.dilation, dw.padding, dw.groups) == ((7, 7), (3, 3), (9, 9), 32)
    assert dw.bias is not None
    assert not hasattr(Bottleneck(32), "dwconv1")


def test_bottleneck_zero_branch_is_relu_identity() -> None:
    for block in (Bottleneck(16), FocalBottleneck(16)):
        nn.init.zeros_(block.conv3[1].weight)  # BN gamma 0: the residual branch is zero
        block.eval()
        x = torch.randn(2, 16, 6, 6)
        torch.testing.assert_close(block(x), F.relu(x))


def test_res_model_uses_batchnorm_everywhere_but_head_norms() -> None:
    model = _small("res")
    for name in ("stem.1", "stem.4", "stages.0.2.1", "stages.1.0.encoder_downsample.0.1", "final_layers.0.1"):
        assert isinstance(model.get_submodule(name), nn.BatchNorm2d), name
    assert isinstance(model.get_submodule("stages.1.1.decoder_norm.0"), nn.BatchNorm2d)
    assert isinstance(model.get_submodule("norms.0"), nn.LayerNorm)
    assert not any(isinstance(m, (nn.GELU, LayerNorm2d)) for m in model.modules())
