"""Semantic segmentation: CEDNet with CEDHead or UperNet, timm baselines with UperNet (framework-free).

Written from the facts of ``design/cednet.md`` section 8 and the released mmseg configs (no mmseg code).

- :class:`CEDNetSegBackbone`: the CEDNet trunk (no classification heads). Plain (``ced_extras=False``, the
  UperNet backbone) it returns ``[c2, c3, c4, c5]`` of the last cascade stage (c2 = the P2 stage before its
  downsample) and, for the auxiliary head, c3 of the stage before the last. With ``ced_extras=True`` it is the
  released ``CEDNetWrapper`` (the CEDHead backbone): the last stage gets a decoder too, one more encoder pass
  (NeXt blocks with BatchNorm, constant drop path) runs on its c3, each level is reduced to
  ``min(dim, out_channels)`` (conv1x1 + BN), a PPM (pool scales 1,2,3,6) + conv3x3 bottleneck refines c5, and a
  last top-down decoder fuses c5 -> c4 -> c3 -> c2 (conv1x1, bilinear x2, add, BN). Its auxiliary feature is
  the last stage's decoded c3. The extras use GELU, the heads ReLU, as the released configs.
- :class:`TimmSegBackbone`: any timm ``features_only`` trunk (ConvNeXt-T: strides 4..32, aux on index 2).
- Heads: :class:`CEDHead` (resize all levels to the finest, concat, conv3x3 + BN + ReLU, dropout, conv1x1),
  :class:`UperHead` (PPM on the coarsest level + FPN fusion, 512 channels), :class:`FCNHead` (the auxiliary
  head: conv3x3 + BN + ReLU, dropout, conv1x1; loss weight 0.4 in the recipe).
- :class:`Segmentor`: backbone + head (+ aux head); logits are upsampled (bilinear) to the input size.
  :func:`slide_inference` / :meth:`Segmentor.inference` run sliding-window (crop 512, stride 341 in the recipe)
  or whole-image inference, optionally multi-scale + flip (softmax averaged).

BatchNorm in the heads and extras is plain ``nn.BatchNorm2d``; Lightning's ``sync_batchnorm=True`` turns it
into SyncBN under DDP, as SyncBN in the released configs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from cednet_pl.models.blocks import get_family
from cednet_pl.models.cednet import CEDNetDecoder, CEDNetEncoder, _run_blocks
from cednet_pl.models.detection import (
    TimmTrunk,
    _trunk_group_matcher,
    load_cednet_trunk,
    prefixed_group_matcher,
)

__all__ = [
    "ADE20K_MODELS",
    "SEG_BACKBONES",
    "SEG_HEADS",
    "CEDHead",
    "CEDNetSegBackbone",
    "FCNHead",
    "PyramidPooling",
    "Segmentor",
    "TimmSegBackbone",
    "UperHead",
    "build_segmentor",
    "slide_inference",
]

log = logging.getLogger(__name__)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _cna(in_chs: int, out_chs: int, kernel_size: int, act: Callable[..., nn.Module] = nn.ReLU) -> nn.Module:
    """conv (no bias) + BatchNorm2d + activation (mmcv's ``ConvModule`` with a norm)."""
    return Conv2dNormActivation(
        in_chs, out_chs, kernel_size, norm_layer=nn.BatchNorm2d, activation_layer=act, inplace=None
    )


class PyramidPooling(nn.Module):
    """PSP pooling module + bottleneck: ``x`` and its pools at ``pool_scales`` (conv1x1 + BN + act each, upsampled
    back) concatenated, then conv3x3 + BN + act to ``channels``."""

    def __init__(
        self,
        in_chs: int,
        channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        act: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(int(s)), _cna(in_chs, channels, 1, act)) for s in pool_scales
        )
        self.bottleneck = _cna(in_chs + len(pool_scales) * channels, channels, 3, act)

    def forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(pool(x), x.shape[-2:]) for pool in self.pools]
        return self.bottleneck(torch.cat(outs, dim=1))


class _SegHead(nn.Module):
    """Classifier part shared by the heads: Dropout2d + conv1x1 (init normal std 0.01, as mmseg's)."""

    def _make_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def classify(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(x))


class CEDHead(_SegHead):
    """CEDNet's light head: every level resized to the finest, concatenated, conv3x3 + BN + ReLU, classifier."""

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 512, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.bottleneck = _cna(sum(in_channels), channels, 3)
        self._make_classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([feats[0]] + [_resize(f, size) for f in feats[1:]], dim=1)
        return self.classify(self.bottleneck(x))


class UperHead(_SegHead):
    """UperNet head: PPM on the coarsest level, FPN top-down fusion (lateral conv1x1, output conv3x3), every
    level resized to the finest, concatenated, conv3x3 fusion, classifier. All convs + BN + ReLU."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(_cna(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_cna(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _cna(len(in_channels) * channels, channels, 3)
        self._make_classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.ppm(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        x = torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1)
        return self.classify(self.fpn_bottleneck(x))


class FCNHead(_SegHead):
    """Auxiliary FCN head (one conv3x3 + BN + ReLU, no input concat), classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = _cna(in_channels, channels, 3)
        self._make_classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.conv(x))


class TopDownFusion(nn.Module):
    """The released ``LastDecoder``: from the coarsest level down, ``f_l = BN(f_l + up(conv1x1(f_{l+1})))``.

    Args:
        dims: Channels of the levels, finest first (e.g. ``[p2_dim, d0, d1, out_channels]``).
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        # index i fuses level i + 1 into level i
        self.upsample_convs = nn.ModuleList(nn.Conv2d(dims[i + 1], dims[i], 1) for i in range(len(dims) - 1))
        self.norms = nn.ModuleList(nn.BatchNorm2d(dims[i]) for i in range(len(dims) - 1))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        outs = list(feats)
        for i in range(len(outs) - 2, -1, -1):
            up = _resize(self.upsample_convs[i](outs[i + 1]), outs[i].shape[-2:])
            outs[i] = self.norms[i](outs[i] + up)
        return outs


class CEDNetSegBackbone(nn.Module):
    """CEDNet segmentation backbone (see the module docstring).

    Args:
        model_name: A CEDNet variant registered with timm.
        pretrained: Classification checkpoint (ours or released) to load the trunk from (None: random init).
        drop_path_rate: Stochastic depth of the trunk (0.2 in the ADE20K recipe); the extra encoder pass uses
            it as a constant rate, as released.
        ls_init_value: Layer-scale init of the trunk and the extras (1.0 in the released segmentation configs;
            a loaded checkpoint overwrites the trunk's).
        ced_extras: Build the CEDHead backbone (last-stage decoder, extra encoder, PPM, last decoder with c2).
        out_channels: Width cap of the extras (512).
        pool_scales: PPM pool scales of the extras.
        **model_kwargs: Passed to ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str = "cednet_next_tiny",
        pretrained: str | None = None,
        drop_path_rate: float = 0.2,
        ls_init_value: float | None = 1.0,
        ced_extras: bool = False,
        out_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import cednet_pl.models.cednet  # noqa: F401  (registers the CEDNet models with timm)

        self.model_name = model_name
        self.body = timm.create_model(
            model_name,
            num_classes=0,
            with_heads=False,
            drop_path_rate=drop_path_rate,
            ls_init_value=ls_init_value,
            **model_kwargs,
        )
        body = self.body
        family = get_family(body.family)
        dims = list(body.dims)
        p2_dim = body.stages[0][-1][0].in_channels
        self.num_stages = body.num_stages
        self.ced_extras = ced_extras
        self.out_channels = [p2_dim, *dims]
        self.aux_channels = dims[0]
        self.last_stage_decoder = None
        if ced_extras:
            self._build_extras(family, dims, p2_dim, drop_path_rate, ls_init_value, out_channels, pool_scales)
        if pretrained:
            self.load_trunk(pretrained)

    def _build_extras(
        self,
        family: Any,
        dims: list[int],
        p2_dim: int,
        drop_path_rate: float,
        ls_init_value: float | None,
        out_channels: int,
        pool_scales: Sequence[int],
    ) -> None:
        body = self.body
        if family.name != "next":
            raise ValueError(
                f"{self.model_name}: the CEDHead extras are defined for the NeXt family (got {family.name!r}); "
                "use the UperNet head (ced_extras=False) for other families"
            )
        # The released wrapper sets last_decoder=True: the last cascade stage gets a (LN2d) decoder too.
        self.last_stage_decoder = CEDNetDecoder(family, dims, "lightweight", ls_init_value=ls_init_value)
        extra_dims = [min(d, out_channels) for d in dims]
        depths = [len(level) for level in body.stages[1][0].encoder]
        self.extra_encoder = CEDNetEncoder(
            get_family("next_bn"), extra_dims, depths, [drop_path_rate] * sum(depths), ls_init_value
        )
        self.reduce_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d)) for d in extra_dims
        )
        self.ppm = PyramidPooling(extra_dims[2], out_channels, pool_scales, act=nn.GELU)
        self.last_decoder = TopDownFusion([p2_dim, extra_dims[0], extra_dims[1], out_channels])
        self.out_channels = [p2_dim, extra_dims[0], extra_dims[1], out_channels]
        for name, m in self.named_modules():
            if not name.startswith("body.") and isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def trunk(self) -> nn.Module:
        return self.body

    def load_trunk(self, path: str | os.PathLike) -> None:
        """Load the trunk from a classification checkpoint (heads dropped; anything else must match)."""
        load_cednet_trunk(self.body, path, self.model_name)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups: stem -> 0, ``stages.i`` -> i + 1 (the last stage's decoder with its stage, as
        the released ``stages.N.1``); the extras and heads join the top group."""
        matcher = _trunk_group_matcher(self.body)
        if self.last_stage_decoder is not None:
            blocks = matcher["blocks"]
            blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
            matcher["blocks"] = [*blocks, (r"^last_stage_decoder\.", (self.num_stages,))]
        return matcher

    def _stages(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        body = self.body
        x = body.stem(x)
        c2 = _run_blocks(body.stages[0][:-1], x, body.grad_checkpointing)
        feats: tuple[Tensor, ...] = (body.stages[0][-1](c2),)
        outs = []
        for stage in body.stages[1:]:
            feats = stage(feats)
            outs.append(feats)
        return c2, outs

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """``(features finest first, auxiliary-head feature)``."""
        c2, outs = self._stages(x)
        if self.last_stage_decoder is None:
            aux = outs[-2][0] if len(outs) > 1 else outs[-1][0]
            return [c2, *outs[-1]], aux
        last = self.last_stage_decoder(outs[-1])
        c3, c4, c5 = self.extra_encoder((last[0],))
        c3, c4, c5 = (conv(f) for conv, f in zip(self.reduce_convs, (c3, c4, c5), strict=True))
        feats = self.last_decoder([c2, c3, c4, self.ppm(c5)])
        return feats, last[0]


class TimmSegBackbone(TimmTrunk):
    """A timm ``features_only`` trunk (ConvNeXt-T: strides 4/8/16/32) for UperNet.

    Args:
        model_name: timm model name.
        pretrained: False/None (random), True (timm's weights, needs the network) or a classification checkpoint.
        drop_path_rate: Stochastic depth (0.4 for ConvNeXt-T in the released ADE20K config).
        out_indices: Feature indices (finest first).
        aux_index: Index into the returned features of the auxiliary head's input (2: stride 16 for ConvNeXt).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``ls_init_value=1.0`` as released).
    """

    def __init__(
        self,
        model_name: str = "convnext_tiny",
        pretrained: bool | str | None = None,
        drop_path_rate: float = 0.4,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        aux_index: int = 2,
        **model_kwargs: Any,
    ) -> None:
        super().__init__(model_name, pretrained, drop_path_rate, out_indices, **model_kwargs)
        self.out_channels = list(self.body.feature_info.channels())
        if not 0 <= aux_index < len(self.out_channels):
            raise ValueError(f"aux_index={aux_index} out of range for {len(self.out_channels)} features")
        self.aux_index = aux_index
        self.aux_channels = self.out_channels[aux_index]

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        feats = list(self.body(x))
        return feats, feats[self.aux_index]


SEG_BACKBONES: dict[str, type[nn.Module]] = {"cednet": CEDNetSegBackbone, "timm": TimmSegBackbone}
SEG_HEADS: dict[str, type[nn.Module]] = {"ced": CEDHead, "uper": UperHead}

# The models of the ADE20K experiments (released ced-mmseg configs) as build_segmentor arguments, for the size
# table and the benchmark (the experiment configs are the source for training).
ADE20K_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "cednet_t_cedhead": dict(
        backbone=dict(kind="cednet", model_name="cednet_next_tiny", ced_extras=True, out_channels=512),
        head=dict(kind="ced", channels=512),
    ),
    "cednet_t_upernet": dict(
        backbone=dict(kind="cednet", model_name="cednet_next_tiny"),
        head=dict(kind="uper", channels=512, pool_scales=(1, 2, 3, 6)),
    ),
    "convnext_t_upernet": dict(
        backbone=dict(kind="timm", model_name="convnext_tiny", out_indices=(0, 1, 2, 3), drop_path_rate=0.4),
        head=dict(kind="uper", channels=512, pool_scales=(1, 2, 3, 6)),
    ),
}


def slide_inference(
    fn: Callable[[Tensor], Tensor], images: Tensor, num_classes: int, crop: int, stride: int
) -> Tensor:
    """Sliding-window logits at the input resolution (windows averaged where they overlap).

    Windows of ``crop`` x ``crop`` every ``stride`` pixels, the last one flush with the border (mmseg's ``slide``
    mode); an image no larger than one window runs as one window of its own size, so its logits equal
    whole-image inference.

    Args:
        fn: Maps an (N, 3, h, w) crop to (N, num_classes, h, w) logits.
        images: (N, 3, H, W) normalised images.
        num_classes: Output channels.
        crop: Window side.
        stride: Window step.
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"sliding window needs crop > 0 and stride > 0, got crop={crop}, stride={stride}")
    n, _, h, w = images.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    logits = images.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += fn(images[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


class Segmentor(nn.Module):
    """Backbone + decode head (+ auxiliary FCN head). ``forward`` returns logits at the input size."""

    def __init__(
        self, backbone: nn.Module, decode_head: nn.Module, aux_head: nn.Module | None, num_classes: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.num_classes = num_classes

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone trunk's layer-decay groups (under ``backbone.``); everything else is the top group."""
        return prefixed_group_matcher(self.backbone.group_matcher(coarse), "backbone.")

    def forward(self, x: Tensor, with_aux: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits (N, classes, H, W) at the input size; with ``with_aux`` also the auxiliary head's (or None)."""
        feats, aux_feat = self.backbone(x)
        logits = _resize(self.decode_head(feats), x.shape[-2:])
        if not with_aux:
            return logits
        aux = _resize(self.aux_head(aux_feat), x.shape[-2:]) if self.aux_head is not None else None
        return logits, aux

    @torch.no_grad()
    def inference(
        self,
        images: Tensor,
        mode: str = "slide",
        crop: int = 512,
        stride: int = 341,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> Tensor:
        """Logits (one scale, no flip) or averaged softmax probabilities at the input size.

        Args:
            images: (N, 3, H, W) normalised images at their original resolution.
            mode: ``"slide"`` (sliding window) or ``"whole"``.
            crop: Sliding-window side.
            stride: Sliding-window step.
            scales: Resize ratios of the multi-scale test (e.g. 0.5..1.75); results resized back to (H, W).
            flip: Also run the horizontally flipped images.
        """
        if mode not in ("slide", "whole"):
            raise ValueError(f"inference mode={mode!r}; expected 'slide' or 'whole'")
        size = images.shape[-2:]

        def run(x: Tensor) -> Tensor:
            if mode == "whole":
                return self(x).float()
            return slide_inference(self, x, self.num_classes, crop, stride)

        views = [(float(s), False) for s in scales] + ([(float(s), True) for s in scales] if flip else [])
        if len(views) == 1 and views[0][0] == 1.0:
            return run(images)
        total = None
        for scale, flipped in views:
            x = images.flip(-1) if flipped else images
            if scale != 1.0:
                x = _resize(x, (round(size[0] * scale), round(size[1] * scale)))
            out = run(x)
            out = out.flip(-1) if flipped else out
            probs = _resize(out, size).softmax(dim=1)
            total = probs if total is None else total + probs
        return total / len(views)


def build_segmentor(
    backbone: dict[str, Any],
    num_classes: int,
    head: dict[str, Any] | None = None,
    aux_head: dict[str, Any] | None = None,
) -> Segmentor:
    """Build a :class:`Segmentor` from plain configs.

    Args:
        backbone: ``kind`` (``cednet`` or ``timm``) + constructor arguments.
        num_classes: Classes of the heads.
        head: ``kind`` (``ced`` or ``uper``) + ``channels``, ``dropout`` (and ``pool_scales`` for UperNet).
        aux_head: FCN head arguments (``channels``, ``dropout``), or None for no auxiliary head.
    """
    backbone = dict(backbone)
    head = dict(head or {"kind": "uper"})
    kind = backbone.pop("kind", "cednet")
    if kind not in SEG_BACKBONES:
        raise ValueError(f"segmentation backbone kind={kind!r}; expected one of {sorted(SEG_BACKBONES)}")
    head_kind = head.pop("kind", "uper")
    if head_kind not in SEG_HEADS:
        raise ValueError(f"segmentation head kind={head_kind!r}; expected one of {sorted(SEG_HEADS)}")
    bb = SEG_BACKBONES[kind](**backbone)
    decode_head = SEG_HEADS[head_kind](bb.out_channels, num_classes, **head)
    aux = FCNHead(bb.aux_channels, num_classes, **aux_head) if aux_head is not None else None
    return Segmentor(bb, decode_head, aux, num_classes)
