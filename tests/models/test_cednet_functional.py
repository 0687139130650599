"""Functional equivalence of CEDNet with the released implementation.

The released code and weights cannot be downloaded here, so equivalence is established in two parts:

1. Names: every module of ours carries the released checkpoint key (``test_cednet_sizes.py`` checks the
   full key/shape list of all eight released variants), so a released state_dict maps 1:1 onto the model
   with no renaming (``test_checkpoint.py`` loads such files).
2. Function: with the model's own (randomised) weights, each building block and the stage wiring are
   recomputed here by hand from the formulas of ``design/cednet.md`` (explicit LayerNorm, erf-GELU,
   matrix products and a hand-built bilinear x2 matrix) and compared in float64:
   LN2d, the ConvNeXt block, the focal (dilated) block, the lightweight decoder fusion
   ``c4 = LN2d(c4 + up2(conv1x1(c5)))``, ``c3 = LN2d(c3 + up2(conv1x1(c4)))``, the head, and the
   whole forward pass of a 2-stage model (encoder reads only c3 of the previous stage).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cednet_pl.models.blocks import FocalNeXtBlock, LayerNorm2d, NeXtBlock
from cednet_pl.models.cednet import CEDNet


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random float64 weights everywhere (norm scales around 1) so no term is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            is_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1 + 0.2 * noise if is_scale else 0.3 * noise)
    return module.eval()


def _ln_channels(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over dim 1 of NCHW, written out."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[None, :, None, None] + b[None, :, None, None]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _linear_channels(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Linear / conv1x1 over the channels of NCHW: ``y[n,o,h,w] = sum_c W[o,c] x[n,c,h,w] + b[o]``."""
    return torch.einsum("oc,nchw->nohw", w.reshape(w.shape[0], -1), x) + b[None, :, None, None]


def _up2_matrix(n: int) -> torch.Tensor:
    """(2n x n) bilinear x2 interpolation matrix, align_corners=False (half-pixel centres, edge clamp)."""
    m = torch.zeros(2 * n, n, dtype=torch.float64)
    for o in range(2 * n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = min(math.floor(src), n - 1)
        i1 = min(i0 + 1, n - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


def _up2(x: torch.Tensor) -> torch.Tensor:
    uh, uw = _up2_matrix(x.shape[2]), _up2_matrix(x.shape[3])
    return torch.einsum("ph,nchw,qw->ncpq", uh, x, uw)


def _next_block(block: NeXtBlock, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x, block.dwconv.weight, block.dwconv.bias, padding=3, groups=x.shape[1])
    y = _ln_channels(y, block.norm.weight, block.norm.bias)
    y = _linear_channels(
        _gelu(_linear_channels(y, block.pwconv1.weight, block.pwconv1.bias)),
        block.pwconv2.weight,
        block.pwconv2.bias,
    )
    return x + block.gamma[None, :, None, None] * y


def _focal_block(block: FocalNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    conv1, ln1 = block.dwconv1[0], block.dwconv1[1]
    conv2, ln2 = block.dwconv2[0], block.dwconv2[1]
    y = x + _gelu(
        _ln_channels(F.conv2d(x, conv1.weight, conv1.bias, padding=3, groups=c), ln1.weight, ln1.bias)
    )
    d = F.conv2d(y, conv2.weight, conv2.bias, padding=9, dilation=3, groups=c)
    y = y + _gelu(_ln_channels(d, ln2.weight, ln2.bias))
    y = _linear_channels(
        _gelu(_linear_channels(y, block.pwconv1.weight, block.pwconv1.bias)),
        block.pwconv2.weight,
        block.pwconv2.bias,
    )
    return x + block.gamma[None, :, None, None] * y


def _conv_ln(seq: nn.Sequential, x: torch.Tensor, stride: int, padding: int = 0) -> torch.Tensor:
    conv, norm = seq[0], seq[1]
    return _ln_channels(
        F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding), norm.weight, norm.bias
    )


def _run(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = _focal_block(block, x) if isinstance(block, FocalNeXtBlock) else _next_block(block, x)
    return x


def _encoder(enc: nn.Module, c3: torch.Tensor) -> list[torch.Tensor]:
    outs = [_run(enc.encoder[0], c3)]
    for level in (1, 2):
        outs.append(_run(enc.encoder[level], _conv_ln(enc.encoder_downsample[level - 1], outs[-1], 2)))
    return outs


def _lightweight_decoder(
    dec: nn.Module, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor
) -> list[torch.Tensor]:
    up = dec.decoder_upsample
    n4, n3 = dec.decoder_norm
    c4 = _ln_channels(c4 + _up2(_linear_channels(c5, up[0][0].weight, up[0][0].bias)), n4.weight, n4.bias)
    c3 = _ln_channels(c3 + _up2(_linear_channels(c4, up[1][0].weight, up[1][0].bias)), n3.weight, n3.bias)
    return [c3, c4, c5]


def _head(model: CEDNet, s: int, c5: torch.Tensor) -> torch.Tensor:
    conv, norm = model.final_layers[s][0], model.final_layers[s][1]
    y = _gelu(_ln_channels(_linear_channels(c5, conv.weight, conv.bias), norm.weight, norm.bias))
    y = y.mean(dim=(2, 3))
    ln = model.norms[s]
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(
        y.var(-1, unbiased=False, keepdim=True) + 1e-6
    ) * ln.weight + ln.bias
    return y @ model.heads[s].weight.T + model.heads[s].bias


@pytest.fixture(scope="module")
def nano() -> CEDNet:
    return _randomise(timm.create_model("cednet_next_nano", num_classes=6, aux_heads=True))


def test_up2_matrix_is_bilinear_align_corners_false() -> None:
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(_up2(x), expected)


def test_layernorm2d_by_hand() -> None:
    norm = _randomise(LayerNorm2d(12))
    x = torch.randn(2, 12, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(norm(x), _ln_channels(x, norm.weight, norm.bias))
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(norm(cl), _ln_channels(x, norm.weight, norm.bias))


def test_next_block_by_hand() -> None:
    block = _randomise(NeXtBlock(16))
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(block(x), _next_block(block, x))


def test_focal_block_by_hand() -> None:
    block = _randomise(FocalNeXtBlock(16))
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), _focal_block(block, x))


def test_lightweight_decoder_fusion_by_hand(nano: CEDNet) -> None:
    decoder = nano.stages[1][1]
    gen = torch.Generator().manual_seed(3)
    c3, c4, c5 = (
        torch.randn(2, c, s, s, generator=gen, dtype=torch.float64)
        for c, s in zip(nano.dims, (8, 4, 2), strict=True)
    )
    for got, want in zip(decoder((c3, c4, c5)), _lightweight_decoder(decoder, c3, c4, c5), strict=True):
        torch.testing.assert_close(got, want)


def test_whole_forward_by_hand(nano: CEDNet) -> None:
    """stem -> P2 -> [encoder(c3) -> lightweight decoder] -> encoder(c3) -> head, all written out."""
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stem = nano.stem
    y = _gelu(
        _ln_channels(
            F.conv2d(x, stem[0].weight, stem[0].bias, stride=2, padding=1), stem[1].weight, stem[1].bias
        )
    )
    y = _gelu(
        _ln_channels(
            F.conv2d(y, stem[3].weight, stem[3].bias, stride=2, padding=1), stem[4].weight, stem[4].bias
        )
    )
    y = _conv_ln(nano.stages[0][-1], _run(nano.stages[0][:-1], y), 2)
    logits = []
    c3 = y
    for s in range(nano.num_stages):
        stage = nano.stages[s + 1]
        feats = _encoder(stage[0], c3)
        if len(stage) > 1:
            feats = _lightweight_decoder(stage[1], *feats)
        logits.append(_head(nano, s, feats[2]))
        c3 = feats[0]
    with torch.no_grad():
        got = nano.forward_stage_logits(x)
        out = nano(x)
    for a, b in zip(got, logits, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out, logits[-1])
