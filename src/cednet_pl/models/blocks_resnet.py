"""ResNet block family for CEDNet (``cednet_res50``): BatchNorm + ReLU.

The base block is CEDNet's bottleneck: conv3x3 (C -> C) + BN + act, conv1x1 (C -> 4C) + BN + act,
conv1x1 (4C -> C) + BN, residual add, act. Unlike the classic ResNet bottleneck the 3x3 conv runs at
the block width C and the 1x1 convs expand and project back (an inverted bottleneck, as in ConvNeXt).

The focal block (arXiv 2302.06052, the ResNet counterpart of the dilated "DNeXt" block) first applies
two residual branches, ``x = x + conv1(x)`` (conv3x3 + BN + act) and ``x = x + dwconv1(x)`` (depthwise 7x7,
dilation 3, with bias, + BN + act), then the 1x1 expansion/projection, the residual add with the block
input and the act.

Module names follow the released checkpoints: ``conv1.{0,1}``, ``dwconv1.{0,1}`` (focal), ``conv2.{0,1}``,
``conv3.{0,1}`` (``.0`` the conv, ``.1`` the BatchNorm). No layer scale.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from cednet_pl.models.blocks import BlockFamily, register_family

__all__ = ["RES_FAMILY", "Bottleneck", "FocalBottleneck"]


def _conv_bn(
    in_chs: int,
    out_chs: int,
    kernel_size: int,
    act_layer: type[nn.Module] | None,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> nn.Sequential:
    """Conv (same padding) + BatchNorm (+ act): indices 0, 1 (, 2)."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_chs,
            out_chs,
            kernel_size,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=bias,
        ),
        nn.BatchNorm2d(out_chs),
    ]
    if act_layer is not None:
        layers.append(act_layer(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """CEDNet ResNet-family base block; NCHW in, NCHW out."""

    focal = False

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        expansion: int = 4,
        act_layer: type[nn.Module] = nn.ReLU,
        dilation: int = 3,
    ) -> None:
        """Create the block.

        Args:
            dim: Channels C.
            drop_path: Stochastic depth rate of the residual branch.
            expansion: Width of the 1x1 expansion relative to C.
            act_layer: Activation class; called with ``inplace=True``.
            dilation: Dilation of the focal block's depthwise 7x7 conv (3 in the released model).
        """
        super().__init__()
        self.conv1 = _conv_bn(dim, dim, 3, act_layer)
        if self.focal:
            self.dwconv1 = _conv_bn(dim, dim, 7, act_layer, dilation=dilation, groups=dim, bias=True)
        self.conv2 = _conv_bn(dim, dim * expansion, 1, act_layer)
        self.conv3 = _conv_bn(dim * expansion, dim, 1, None)
        self.act = act_layer(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial part before the 1x1 expansion: conv3x3 + BN + act."""
        return self.conv1(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return self.act(x + self.drop_path(self.conv3(self.conv2(self.spatial(x)))))


class FocalBottleneck(Bottleneck):
    """CEDNet ResNet-family focal block: residual conv3x3 and residual dilated dw7x7, then the 1x1 MLP."""

    focal = True

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Residual conv3x3 branch, then residual dilated dw7x7 branch (TorchScript compiles only this override,
        so the base block never refers to ``dwconv1``)."""
        y = x + self.conv1(x)
        return y + self.dwconv1(y)


def _res_base(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return Bottleneck(dim, drop_path=drop_path)


def _res_focal(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
    return FocalBottleneck(dim, drop_path=drop_path)


RES_FAMILY = register_family(
    BlockFamily(name="res", base_block=_res_base, focal_block=_res_focal, norm2d=nn.BatchNorm2d, act=nn.ReLU)
)
