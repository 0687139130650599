"""CEDNet building blocks: the block-family interface, LayerNorm2d and the NeXt family.

Family interface (stable; ``blocks_swin.py`` and ``blocks_resnet.py`` implement it)
====================================================================================

A *block family* tells the CEDNet core (:mod:`cednet_pl.models.cednet`) which blocks, norm and
activation to use. It is a frozen :class:`BlockFamily` dataclass registered under a short name::

    BlockFamily(
        name="next",              # the `family=` argument of CEDNet ("next" | "swin" | "res")
        base_block=make_base,     # BlockFactory: the plain block (P2 stage, encoder levels 0/1,
                                  #   UNet/Hourglass decoder and lateral blocks)
        focal_block=make_focal,   # BlockFactory: the dilated "focal" block (encoder level 2)
        norm2d=make_norm2d,       # Callable[[int], nn.Module]: channel norm of an NCHW map
                                  #   (LayerNorm2d for next/swin, nn.BatchNorm2d for res)
        act=make_act,             # Callable[[], nn.Module]: nn.GELU for next/swin, nn.ReLU for res
    )

``BlockFactory`` is called with keyword arguments only::

    block = factory(dim, drop_path=0.1, ls_init_value=1e-6, index=3)

- ``dim``: channels in and out (blocks never change the shape).
- ``drop_path``: stochastic-depth rate of this block (the core computes the model-wide linear ramp).
- ``ls_init_value``: layer-scale init; families without layer scale (Swin, ResNet) ignore it.
  ``None`` or ``0`` means "no layer scale" for families that have it.
- ``index``: position of the block inside its run (a P2 stage, one encoder level, one decoder
  level, or 0 for a lateral block); Swin uses it to shift the windows of odd blocks.

A block's ``forward(x)`` takes and returns an NCHW tensor of the same shape (it may be stored
channels_last; do not force ``.contiguous()``), for any spatial size >= 1 (Swin pads to a multiple
of the window internally). It must not modify its input in place (grad checkpointing recomputes
blocks). Its submodule names are the released checkpoint names (see ``reference/*.keys.tsv``), so
released state_dicts load 1:1. The core initialises every ``nn.Conv2d``/``nn.Linear`` of the whole
model (kaiming-normal, fan_out, linear gain, zero bias) *after* construction; a family initialises
any other parameter it owns (e.g. a relative-position bias table) in its block constructor.

Registering a family (at import time of its module)::

    from cednet_pl.models.blocks import BlockFamily, register_family
    register_family(BlockFamily("swin", base_block=..., focal_block=..., norm2d=..., act=...))

:func:`get_family` imports ``cednet_pl.models.blocks_swin`` / ``blocks_resnet`` on first use of
"swin" / "res", so the core never has to import them eagerly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

# timm.layers.LayerNorm2d: LayerNorm over the channels of NCHW maps (eps 1e-6), as the released models
from timm.layers import DropPath, LayerNorm2d
from timm.models import register_notrace_module
from torch import nn

__all__ = [
    "FAMILIES",
    "BlockFactory",
    "BlockFamily",
    "DepthwiseConv2d",
    "DilatedDepthwiseConv2d",
    "FocalNeXtBlock",
    "LayerNorm2d",
    "NeXtBlock",
    "PatchConv2d",
    "PointwiseConv2d",
    "depthwise_conv2d",
    "depthwise_weight_grad",
    "dilated_dwconv2d",
    "get_family",
    "register_family",
]


class BlockFactory(Protocol):
    """Builds one block of a family (see the module docstring)."""

    def __call__(
        self, dim: int, *, drop_path: float, ls_init_value: float | None, index: int
    ) -> nn.Module: ...


@dataclass(frozen=True)
class BlockFamily:
    """The parts of CEDNet that differ between the NeXt, Swin and ResNet families.

    Args:
        name: Family name, the ``family`` argument of ``CEDNet``.
        base_block: Factory of the plain block.
        focal_block: Factory of the dilated focal block (last encoder level).
        norm2d: ``norm2d(channels)`` returns the channel norm of an NCHW map.
        act: ``act()`` returns the activation module.
    """

    name: str
    base_block: BlockFactory
    focal_block: BlockFactory
    norm2d: Callable[[int], nn.Module]
    act: Callable[[], nn.Module]


FAMILIES: dict[str, BlockFamily] = {}

# Modules that register a family when imported; loaded lazily by get_family.
_FAMILY_MODULES = {
    "swin": "cednet_pl.models.blocks_swin",
    "swin_symmetric": "cednet_pl.models.blocks_swin",
    "res": "cednet_pl.models.blocks_resnet",
}


def register_family(family: BlockFamily) -> BlockFamily:
    """Register ``family`` under ``family.name`` and return it.

    Raises:
        ValueError: if a different family is already registered under that name.
    """
    existing = FAMILIES.get(family.name)
    if existing is not None and existing != family:
        raise ValueError(f"block family {family.name!r} is already registered ({existing})")
    FAMILIES[family.name] = family
    return family


def get_family(name: str | BlockFamily) -> BlockFamily:
    """Return the registered family ``name`` (importing its module on first use)."""
    if isinstance(name, BlockFamily):
        return name
    if name not in FAMILIES and name in _FAMILY_MODULES:
        importlib.import_module(_FAMILY_MODULES[name])
    if name not in FAMILIES:
        known = sorted(set(FAMILIES) | set(_FAMILY_MODULES))
        raise ValueError(f"unknown CEDNet block family {name!r}; expected one of {known}")
    return FAMILIES[name]


# Device-dependent paths: FX traces these as leaves (timm's notrace registry), TorchScript compiles them.
@register_notrace_module
class PointwiseConv2d(nn.Conv2d):
    """1x1 conv (same parameters and state_dict as ``nn.Conv2d(in, out, 1)``) computed as a Linear over NHWC.

    On CPU PyTorch runs small-map 1x1 convs through its slow im2col path; a matmul is several times
    faster, and for a channels_last input the permutes are free. Same MAC count. Other devices run the conv.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        bias: Learn a bias.
    """

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True) -> None:
        super().__init__(in_chs, out_chs, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # cuDNN's 1x1 conv is as fast or faster (H100, bf16)
            return self._conv_forward(x, self.weight, self.bias)
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return y.permute(0, 3, 1, 2)


@register_notrace_module
class PatchConv2d(nn.Conv2d):
    """k x k conv with stride k and no padding (a downsample; same parameters and state_dict as ``nn.Conv2d``),
    computed as a Linear over the k x k patches of the NHWC map.

    On CPU, oneDNN's strided conv backward is slower than the matmul on the patch-unfolded map (README, speed
    section). Rows/columns that do not fill a patch are dropped, as the strided conv does. Same MAC count. Other
    devices run the conv (cuDNN's is faster there).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        patch: Kernel size = stride.
        bias: Learn a bias.
    """

    def __init__(self, in_chs: int, out_chs: int, patch: int = 2, bias: bool = True) -> None:
        super().__init__(in_chs, out_chs, kernel_size=patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN's strided conv is faster off CPU
        if x.device.type != "cpu":
            return self._conv_forward(x, self.weight, self.bias)
        k = self.kernel_size[0]
        b, c, h, w = x.shape
        ho, wo = h // k, w // k
        x = x.permute(0, 2, 3, 1)[:, : ho * k, : wo * k].reshape(b, ho, k, wo, k, c)
        # Patch features in the weight's memory order, so the weight is only viewed and its gradient keeps the
        # parameter's strides (DDP's gradient buckets expect them): (kh, kw, C) for a channels_last weight (a
        # model moved to channels_last), (C, kh, kw) for a contiguous one.
        if self.weight.is_contiguous():
            x = x.permute(0, 1, 3, 5, 2, 4).reshape(b, ho, wo, c * k * k)
            weight = self.weight.view(self.out_channels, -1)
        else:
            x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, k * k * c)
            weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
        return F.linear(x, weight, self.bias).permute(0, 3, 1, 2)


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """Stride-1 depthwise conv whose weight gradient is computed as a depthwise conv too.

    oneDNN's depthwise weight-gradient kernel is several times slower than its forward on CPU. The same gradient
    is a depthwise conv of the padded input (all B*C maps as groups, NCHW) with the output gradient as the kernel,
    summed over the batch, which oneDNN's forward kernel runs faster (timings: README, speed section,
    ``scripts/bench_dwconv.py``). The input gradient is oneDNN's own; the backward is built from differentiable
    ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        (ph, pw), d = ctx.padding, ctx.dilation
        c = x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [ph, pw], [d, d], False, [0, 0], c, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            # the parameter's own strides (DDP gradient buckets)
            grad_w = torch.empty_like(weight).copy_(depthwise_weight_grad(x, grad, (ph, pw), d))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def depthwise_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, padding: tuple[int, int], dilation: int = 1
) -> torch.Tensor:
    """Weight gradient ``(C, 1, kh, kw)`` of a stride-1 'same' depthwise conv of ``x`` whose output gradient is
    ``grad``, computed as a depthwise conv of the padded input (all B*C maps as groups, NCHW) with ``grad`` as the
    kernel (stride = dilation), summed over the batch. Returned contiguous."""
    (ph, pw), d = padding, dilation
    b, c, h, w = x.shape
    xp = F.pad(x, (pw, pw, ph, ph)).reshape(1, b * c, h + 2 * ph, w + 2 * pw).contiguous()
    kernel = grad.contiguous().view(b * c, 1, h, w)
    gw = F.conv2d(xp, kernel, stride=d, groups=b * c)
    return gw.view(b, c, 1, *gw.shape[2:]).sum(0)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    dilation: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)`` for a stride-1 depthwise conv
    with 'same' padding (``padding == dilation * (kernel // 2)`` per side; a cropped kernel keeps that relation).

    When the weight is trained on CPU (grad enabled, no autocast) its gradient comes from a faster formulation
    (:class:`_DepthwiseConv2dCPU`); otherwise this is plain ``F.conv2d``. Same values and gradients.
    """
    if torch.jit.is_scripting():
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])
    if (
        x.device.type == "cpu"
        and weight.requires_grad
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        return _DepthwiseConv2dCPU.apply(x, weight, bias, tuple(padding), dilation)
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])


@register_notrace_module
class DepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k conv, stride 1, 'same' padding (``dilation * (k // 2)``); an ``nn.Conv2d`` (same parameters and
    state_dict) that runs :func:`depthwise_conv2d`.

    Args:
        dim: Channels (in = out = groups).
        kernel_size: Odd kernel size k.
        dilation: Dilation d.
        bias: Learn a bias.
    """

    def __init__(self, dim: int, kernel_size: int = 7, dilation: int = 1, bias: bool = True) -> None:
        pad = dilation * (kernel_size // 2)
        super().__init__(dim, dim, kernel_size, padding=pad, dilation=dilation, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.padding, self.dilation[0])


@register_notrace_module
class DilatedDepthwiseConv2d(DepthwiseConv2d):
    """A dilated :class:`DepthwiseConv2d` (same parameters and state_dict) computed by :func:`dilated_dwconv2d`
    (kernel cropped on small maps, space-to-batch on large ones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dilated_dwconv2d(x, self.weight, self.bias, self.dilation[0])


def dilated_dwconv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int
) -> torch.Tensor:
    """A depthwise, dilated, 'same'-padded conv (stride 1), computed the fast way (same result as the conv).

    CPU convolution kernels are slow for dilated depthwise convs. Two exact rewrites:

    - small maps (a side <= dilation * (k // 2)): the outer taps only ever see zero padding, so the
      kernel is cropped to the taps that can hit the map (a 7x7, dilation 3 conv on a 7x7 map is a
      5x5 one);
    - larger maps: "space to batch": the map is split into ``dilation**2`` interleaved sub-maps
      (zero-padded to a multiple of the dilation) and the undilated kernel runs on each.

    Args:
        x: ``(B, C, H, W)`` input.
        weight: ``(C, 1, k, k)`` depthwise kernel, k odd.
        bias: ``(C,)`` or None.
        dilation: Dilation d in both directions (the conv's padding is ``d * (k // 2)``).

    Returns:
        ``(B, C, H, W)``, equal to the conv's output up to float rounding.
    """
    d, k = dilation, weight.shape[-1]
    r = k // 2
    _, c, h, w = x.shape
    rh, rw = min(r, math.ceil(h / d) - 1), min(r, math.ceil(w / d) - 1)
    if rh < r or rw < r:
        weight = weight[:, :, r - rh : r + rh + 1, r - rw : r + rw + 1]
        if x.device.type == "cpu":
            # NOTE: oneDNN's dilated depthwise conv is slower on channels_last than on NCHW, and a strided
            # (cropped) weight alone sends it down the channels_last path: make both contiguous
            x, weight = x.contiguous(), weight.contiguous()
        return depthwise_conv2d(x, weight, bias, (d * rh, d * rw), d)
    # space to batch in NHWC (free for a channels_last input; the sub-maps stay channels_last, which oneDNN's
    # depthwise conv prefers on these map sizes)
    pad_b, pad_r = (-h) % d, (-w) % d
    xh = x.permute(0, 2, 3, 1)
    if pad_b or pad_r:
        xh = F.pad(xh, (0, 0, 0, pad_r, 0, pad_b))
    b, hs, ws = x.shape[0], (h + pad_b) // d, (w + pad_r) // d
    xs = xh.reshape(b, hs, d, ws, d, c).permute(0, 2, 4, 1, 3, 5).reshape(b * d * d, hs, ws, c)
    y = depthwise_conv2d(xs.permute(0, 3, 1, 2), weight, bias, (r, r)).permute(0, 2, 3, 1)
    y = y.reshape(b, d, d, hs, ws, c).permute(0, 3, 1, 4, 2, 5).reshape(b, hs * d, ws * d, c)
    return y[:, :h, :w].permute(0, 3, 1, 2)


def _layer_scale(dim: int, ls_init_value: float | None) -> nn.Parameter | None:
    if not ls_init_value:
        return None
    return nn.Parameter(torch.full((dim,), float(ls_init_value)))


class _NHWCMlp(nn.Module):
    """Shared tail of the NeXt blocks: (NHWC) pwconv1 -> act -> pwconv2 -> gamma (-> NCHW).

    Subclasses own ``pwconv1``, ``act``, ``pwconv2`` and ``gamma`` so the names stay flat.
    """

    # NOTE: no class-level annotations of these attributes: TorchScript cannot parse ``nn.Parameter | None``

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is NHWC; returns NCHW."""
        x = self.act(self.pwconv1(x))
        if self.gamma is None:
            x = self.pwconv2(x)
        # NOTE: is_scripting alone in its condition, so TorchScript skips compiling _fp16_compute
        elif torch.jit.is_scripting():  # noqa: SIM114
            x = self.pwconv2(x) * self.gamma
        elif _fp16_compute(x):
            x = self.pwconv2(x) * self.gamma
        else:
            # gamma folded into pwconv2 (gamma * (W h + b) = (gamma W) h + gamma b): the same function and
            # gradients without a multiply, and its backward, over the whole activation
            x = F.linear(x, self.pwconv2.weight * self.gamma[:, None], self.pwconv2.bias * self.gamma)
        return x.permute(0, 3, 1, 2)


def _fp16_compute(x: torch.Tensor) -> bool:
    """Whether a Linear on ``x`` computes in float16, where a folded ``gamma * W`` (gamma starts at 1e-6) would
    underflow. Under FX tracing (no device known) the folded form is traced."""
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) == torch.float16
    return x.dtype == torch.float16


# dtype/autocast-dependent layer-scale fold: an FX leaf
@register_notrace_module
class NeXtBlock(_NHWCMlp):
    """ConvNeXt block: dw7x7 -> LN -> Linear(4C) -> GELU -> Linear(C) -> gamma -> drop path -> + x.

    Args:
        dim: Channels.
        drop_path: Stochastic-depth rate.
        ls_init_value: Layer-scale init (``None``/0: no layer scale).
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        kernel_size: Depthwise kernel size (7; RevCol uses 3).
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        ls_init_value: float | None = 1e-6,
        mlp_ratio: int = 4,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, kernel_size=kernel_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = _layer_scale(dim, ls_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self._mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))


@register_notrace_module
class FocalNeXtBlock(_NHWCMlp):
    """Focal NeXt ("DNeXt") block of the last encoder level.

    ``y = x + act(LN2d(dw7x7(x)))``; ``y = y + act(LN2d(dw7x7_dilated3(y)))``;
    ``out = x + drop_path(gamma * Linear(C)(GELU(Linear(4C)(y))))`` (no norm before the MLP; the
    residual is taken from the block input ``x``).

    Args:
        dim: Channels.
        drop_path: Stochastic-depth rate.
        ls_init_value: Layer-scale init (``None``/0: no layer scale).
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        dilation: Dilation of the second depth-wise conv.
        norm2d: Channel norm after each depth-wise conv (LN2d; BatchNorm2d in the segmentation extras).
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        ls_init_value: float | None = 1e-6,
        mlp_ratio: int = 4,
        dilation: int = 3,
        norm2d: Callable[[int], nn.Module] = LayerNorm2d,
    ) -> None:
        super().__init__()
        self.dwconv1 = nn.Sequential(DepthwiseConv2d(dim, kernel_size=7), norm2d(dim), nn.GELU())
        self.dwconv2 = nn.Sequential(
            DilatedDepthwiseConv2d(dim, kernel_size=7, dilation=dilation),
            norm2d(dim),
            nn.GELU(),
        )
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = _layer_scale(dim, ls_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.dwconv1(x)
        y = y + self.dwconv2(y)
        return x + self.drop_path(self._mlp(y.permute(0, 2, 3, 1)))


class NeXtBNBlock(NeXtBlock):
    """NeXt block with BatchNorm2d (NCHW, before the MLP) in place of the LayerNorm: dw7x7 -> BN -> MLP.

    The block of the released segmentation extras (``norm_cfg=SyncBN`` in the extra encoder pass of CEDHead);
    a plain ``nn.BatchNorm2d`` so that ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into SyncBN.
    """

    def __init__(
        self, dim: int, drop_path: float = 0.0, ls_init_value: float | None = 1e-6, mlp_ratio: int = 4
    ) -> None:
        super().__init__(dim, drop_path=drop_path, ls_init_value=ls_init_value, mlp_ratio=mlp_ratio)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self._mlp(self.norm(self.dwconv(x)).permute(0, 2, 3, 1)))


def _next_base(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return NeXtBlock(dim, drop_path=drop_path, ls_init_value=ls_init_value)


def _next_focal(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return FocalNeXtBlock(dim, drop_path=drop_path, ls_init_value=ls_init_value)


NEXT_FAMILY = register_family(
    BlockFamily(name="next", base_block=_next_base, focal_block=_next_focal, norm2d=LayerNorm2d, act=nn.GELU)
)


def _next_bn_base(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return NeXtBNBlock(dim, drop_path=drop_path, ls_init_value=ls_init_value)


def _next_bn_focal(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return FocalNeXtBlock(dim, drop_path=drop_path, ls_init_value=ls_init_value, norm2d=nn.BatchNorm2d)


# The NeXt blocks with BatchNorm (SyncBN under DDP) everywhere: the extra encoder pass of the CEDHead
# segmentation backbone (released ``CEDNetWrapper``, ``extra_norm_cfg=SyncBN``).
NEXT_BN_FAMILY = register_family(
    BlockFamily(
        name="next_bn",
        base_block=_next_bn_base,
        focal_block=_next_bn_focal,
        norm2d=nn.BatchNorm2d,
        act=nn.GELU,
    )
)
