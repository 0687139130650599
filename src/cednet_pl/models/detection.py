"""RetinaNet and Mask R-CNN detectors: CEDNet as a neck-free pyramid backbone, timm baselines with an FPN.

- :class:`CEDNetPyramid`: the CEDNet trunk (``features_only``: the last cascade stage's c3/c4/c5, no
  classifier heads) + ``reduce_convs`` (conv1x1 -> ``out_channels`` + LN2d per level) + ``add_blocks``
  (conv3x3 stride 2 + LN2d on the previous coarsest level), no FPN (the cascade already fuses scales).
  One-stage form (RetinaNet): two extra levels, P3-P7 at strides 8-128. Two-stage form (Mask R-CNN,
  ``p2_level=True, num_extra_levels=1``): P2-P6 at strides 4-64, where
  ``P2 = conv3x3(LN2d(up2(P3) + LN2d(conv1x1(c2))))`` and c2 is the P2 stage's block output (stride 4,
  before its downsample), as the released ``CEDNetWrapperTwoStage``. ``pretrained=PATH`` loads the trunk
  from a classification checkpoint (our Lightning ``.ckpt`` or a released ``.pth``), checked by
  :func:`cednet_pl.models.cednet.checkpoint_filter_fn`.
- :class:`TimmFPNBackbone`: any timm ``features_only`` model (ConvNeXt-T, Swin-T) + torchvision's
  ``FeaturePyramidNetwork``: C3-C5 with ``LastLevelP6P7`` (P6 from C5, as RetinaNet v2) = P3-P7, or
  C2-C5 with ``LastLevelMaxPool`` = P2-P6 (Mask R-CNN).
- :func:`build_retinanet`: torchvision's ``RetinaNet``/``RetinaNetHead``/``AnchorGenerator`` around either.
- :func:`build_maskrcnn`: torchvision's ``MaskRCNN`` (RPN, ``MultiScaleRoIAlign``, box and mask heads,
  losses and postprocessing) around a P2-P6 backbone. Labels stay contiguous ``0..K-1`` outside
  (:class:`MaskRCNNDetector` shifts them past torchvision's background class 0).

One pass, losses and detections (:meth:`RetinaNetDetector.forward_with_loss`)::

    net.eval()                                     # no drop path, no norm statistics update
    images = [img.requires_grad_() for img in images]   # float (3, H, W) in [0, 1], original resolution
    losses, detections = net.forward_with_loss(images, targets)   # targets: boxes xyxy (original px), labels
    sum(losses.values()).backward()                # d loss / d original pixels in images[i].grad

It runs transform (normalise, resize, pad) -> backbone -> head -> anchors, then both ``compute_loss``
(against the targets, resized with the images) and ``postprocess_detections`` (score threshold, top-k,
NMS) with the boxes mapped back to original coordinates (detached). :meth:`MaskRCNNDetector.forward_with_loss`
does the same for Mask R-CNN (RPN + box + mask losses, detections with masks pasted at original size). Every step up to the loss is
differentiable with respect to the input tensors, including the resize. Losses and box decoding run in
float32 even under autocast.

Resizing: the detector's transform resizes only at inference (shorter side ``min_size``, longer <=
``max_size``, padded to ``size_divisible``); training images come already sized by the data pipeline
(LSJ), which torchvision's transform would otherwise resize a second time.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    paste_masks_in_image,
    resize_boxes,
)
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from cednet_pl.models.blocks import LayerNorm2d
from cednet_pl.models.cednet import checkpoint_filter_fn
from cednet_pl.models.checkpoint import CONFIG_KEY, read_checkpoint, unwrap_state_dict

__all__ = [
    "BOX_LOSSES",
    "CEDNetPyramid",
    "DetectionTransform",
    "MaskRCNNDetector",
    "RetinaNetDetector",
    "TimmFPNBackbone",
    "TimmTrunk",
    "build_maskrcnn",
    "build_retinanet",
    "load_cednet_trunk",
    "load_classification_state_dict",
    "load_timm_trunk",
    "prefixed_group_matcher",
]

log = logging.getLogger(__name__)

BOX_LOSSES = ("giou", "smooth_l1", "l1", "diou", "ciou")
#: State-dict prefixes of each detector's heads (how a checkpoint's detector kind is recognised).
DETECTOR_HEAD_PREFIXES = {"retinanet": ("net.head.",), "maskrcnn": ("net.roi_heads.", "net.rpn.")}


def detector_kind_of(state_dict: dict[str, Any]) -> str | None:
    """``"retinanet"``, ``"maskrcnn"`` or None (no detector head) from a LightningModule state_dict."""
    for kind, prefixes in DETECTOR_HEAD_PREFIXES.items():
        if any(k.startswith(prefixes) for k in state_dict):
            return kind
    return None


def load_classification_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict of a classification checkpoint (Lightning ``.ckpt`` or ``.pth``), weights-only.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is a detection or segmentation checkpoint, or cannot be read (see ``read_checkpoint``).
        RuntimeError: The file holds no state_dict.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    target = str(((ckpt.get(CONFIG_KEY) or {}).get("model") or {}).get("_target_", ""))
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else {}
    kind = detector_kind_of(state)
    if kind is not None or target.endswith(("DetectionModule", "InstanceSegmentationModule")):
        raise ValueError(
            f"{path} is a detection checkpoint ({kind or target}); a detection backbone loads the trunk of "
            "a classification checkpoint (a cednet-train classification .ckpt or a released .pth)"
        )
    if target.endswith("SegmentationModule") or any(k.startswith("net.decode_head.") for k in state):
        raise ValueError(
            f"{path} is a segmentation checkpoint; a backbone loads the trunk of a classification "
            "checkpoint (a cednet-train classification .ckpt or a released .pth)"
        )
    return unwrap_state_dict(ckpt, source=path)


def load_cednet_trunk(trunk: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Load a CEDNet trunk (no heads) from a classification checkpoint; heads dropped, anything else must match."""
    sd = load_classification_state_dict(path)
    try:
        sd = checkpoint_filter_fn(sd, trunk)
    except RuntimeError as err:
        raise RuntimeError(f"backbone checkpoint {path} does not fit {model_name}: {err}") from err
    trunk.load_state_dict(sd, strict=True)
    log.info("loaded the %s trunk from %s (%d tensors)", model_name, path, len(sd))


def load_timm_trunk(trunk: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Load a timm trunk from a classification state_dict; keys the pruned trunk lacks (head) are ignored."""
    sd = load_classification_state_dict(path)
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in sd]
    mismatched = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or mismatched:
        raise RuntimeError(
            f"backbone checkpoint {path} does not fit {model_name}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    trunk.load_state_dict({k: sd[k] for k in expected}, strict=True)


def prefixed_group_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Re-anchor a timm ``group_matcher`` (regexes on a submodule's parameter names) below ``prefix``."""

    def fix(pattern: str) -> str:
        return "^" + re.escape(prefix) + (pattern[1:] if pattern.startswith("^") else pattern)

    out: dict[str, Any] = {}
    for name, spec in matcher.items():
        if isinstance(spec, str):
            out[name] = fix(spec)
        elif spec is not None:
            out[name] = [(fix(p), suffix) for p, suffix in spec]
    return out


def _trunk_group_matcher(body: nn.Module) -> dict[str, Any]:
    """Coarse layer-decay groups of a ``features_only`` trunk (stem -> 0, stage i -> i + 1), under ``body.``."""
    trunk = _trunk(body)
    if not hasattr(trunk, "group_matcher"):
        return {}
    return prefixed_group_matcher(
        trunk.group_matcher(coarse=True), "body.model." if trunk is not body else "body."
    )


def _trunk(body: nn.Module) -> nn.Module:
    """The classification model inside a timm ``features_only`` wrapper (``FeatureGetterNet.model``)."""
    return body.model if hasattr(body, "model") and isinstance(body.model, nn.Module) else body


def _init_convs(*modules: nn.Module) -> None:
    for m in (sub for module in modules for sub in module.modules()):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
            nn.init.zeros_(m.bias)


def _level_names(strides: Sequence[int]) -> list[str]:
    """``p<log2 stride>`` per level (``p2`` for stride 4)."""
    return [f"p{int(s).bit_length() - 1}" for s in strides]


class CEDNetPyramid(nn.Module):
    """CEDNet detection backbone without a neck: P3-P7 (RetinaNet) or P2-P6 (Mask R-CNN) from the last stage.

    Args:
        model_name: A CEDNet variant registered with timm (or any timm model whose ``features_only``
            output has strides 8/16/32, e.g. ``convnext_atto`` with ``out_indices=(1, 2, 3)``).
        pretrained: Path of a classification checkpoint to load the trunk from (None: random init).
        out_channels: Channels of every pyramid level.
        drop_path_rate: Stochastic depth of the trunk (0.2 for CEDNet-T in the COCO recipe).
        out_indices: Trunk feature indices (None: the model's default, c3/c4/c5 for CEDNet).
        num_extra_levels: Stride-2 levels added on top of the coarsest (2: P6 and P7; 1: P6 for Mask R-CNN).
        p2_level: Add the stride-4 level P2 fused from the P2 stage's output (the two-stage form; CEDNet
            trunks only: the input of ``stages.0``'s last module, its downsample).
        **model_kwargs: Passed to ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str = "cednet_next_tiny",
        pretrained: str | None = None,
        out_channels: int = 256,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] | None = None,
        num_extra_levels: int = 2,
        p2_level: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if out_indices is not None:
            model_kwargs["out_indices"] = tuple(out_indices)
        self.model_name = model_name
        self.body = timm.create_model(
            model_name, features_only=True, drop_path_rate=drop_path_rate, **model_kwargs
        )
        reductions = list(self.body.feature_info.reduction())
        if reductions != [8, 16, 32]:
            raise ValueError(
                f"{model_name}: features_only gives strides {reductions}, expected [8, 16, 32] (c3, c4, c5); "
                "set out_indices"
            )
        self.out_channels = out_channels
        self.p2_level = bool(p2_level)
        self.strides = (
            [4] * self.p2_level + [8, 16, 32] + [32 * 2 ** (i + 1) for i in range(num_extra_levels)]
        )
        self.num_levels = len(self.strides)
        self.level_names = _level_names(self.strides)
        self.reduce_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=1), LayerNorm2d(out_channels))
            for c in self.body.feature_info.channels()
        )
        self.add_blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1),
                LayerNorm2d(out_channels),
            )
            for _ in range(num_extra_levels)
        )
        _init_convs(self.reduce_convs, self.add_blocks)
        self._c2: Tensor | None = None
        if self.p2_level:
            stages = getattr(self.trunk, "stages", None)
            if stages is None or not isinstance(stages[0], nn.Sequential) or len(stages[0]) < 2:
                raise ValueError(
                    f"p2_level needs a CEDNet trunk (P2 blocks + downsample in stages.0); got {model_name}"
                )
            downsample = stages[0][-1]
            p2_dim = next(m for m in downsample.modules() if isinstance(m, nn.Conv2d)).in_channels
            self.reduce_c2 = nn.Sequential(
                nn.Conv2d(p2_dim, out_channels, kernel_size=1), LayerNorm2d(out_channels)
            )
            self.merge_c2 = nn.Sequential(
                LayerNorm2d(out_channels), nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
            )
            _init_convs(self.reduce_c2, self.merge_c2)
            # NOTE: c2 is the downsample's input; a pre-hook keeps the trunk's own forward (and checkpoint) unchanged
            downsample.register_forward_pre_hook(self._keep_c2)
        if pretrained:
            self.load_trunk(pretrained)

    def _keep_c2(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._c2 = args[0]

    @property
    def trunk(self) -> nn.Module:
        """The classification trunk (module names as in the classification model, heads pruned)."""
        return _trunk(self.body)

    def load_trunk(self, path: str | os.PathLike) -> None:
        """Load the trunk from a classification checkpoint; heads are dropped, anything else must match."""
        load_cednet_trunk(self.trunk, path, self.model_name)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups (timm convention): ``stem`` -> 0, ``stages.i`` -> i + 1; the neck joins the top."""
        return _trunk_group_matcher(self.body)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        self._c2 = None
        feats = [conv(f) for conv, f in zip(self.reduce_convs, self.body(x), strict=True)]
        for block in self.add_blocks:
            feats.append(block(feats[-1]))
        if self.p2_level:
            c2, self._c2 = self._c2, None
            lateral = self.reduce_c2(c2)
            up = F.interpolate(feats[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            feats.insert(0, self.merge_c2(up + lateral))
        return OrderedDict(zip(self.level_names, feats, strict=True))


class TimmTrunk(nn.Module):
    """A timm ``features_only`` trunk (``body``) with classification-checkpoint loading and layer-decay groups.

    Args:
        model_name: timm model, e.g. ``convnext_tiny`` or ``swin_tiny_patch4_window7_224``.
        pretrained: False/None (random), True (timm's pretrained weights, needs the network) or a path to a
            classification checkpoint to load into the trunk.
        drop_path_rate: Stochastic depth of the trunk.
        out_indices: Trunk feature indices.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``strict_img_size=False`` for Swin).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | None,
        drop_path_rate: float,
        out_indices: Sequence[int],
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.body = timm.create_model(
            model_name,
            pretrained=pretrained is True,
            features_only=True,
            feature_cls="getter",
            out_indices=tuple(out_indices),
            drop_path_rate=drop_path_rate,
            **model_kwargs,
        )
        if isinstance(pretrained, str | os.PathLike) and pretrained:
            self.load_trunk(pretrained)

    @property
    def trunk(self) -> nn.Module:
        return _trunk(self.body)

    def load_trunk(self, path: str | os.PathLike) -> None:
        """Load the trunk from a classification state_dict; keys the pruned trunk lacks (head) are ignored."""
        load_timm_trunk(self.trunk, path, self.model_name)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups from the trunk's coarse ``group_matcher``; what follows the trunk joins the top."""
        return _trunk_group_matcher(self.body)


class TimmFPNBackbone(TimmTrunk):
    """A timm ``features_only`` trunk + torchvision FPN: C3-C5 + P6/P7 from C5 (P3-P7) or C2-C5 + max-pool P6.

    Args:
        model_name: timm model, e.g. ``convnext_tiny`` or ``swin_tiny_patch4_window7_224``.
        pretrained: False/None (random), True (timm's pretrained weights, needs the network) or a path to a
            classification checkpoint to load into the trunk.
        out_channels: FPN channels.
        drop_path_rate: Stochastic depth of the trunk.
        out_indices: Trunk feature indices: strides 8/16/32 (``(1, 2, 3)`` for ConvNeXt and Swin, RetinaNet)
            or 4/8/16/32 (``(0, 1, 2, 3)``, Mask R-CNN).
        extra_levels: ``"p6p7"`` (``LastLevelP6P7`` from C5, RetinaNet) or ``"maxpool"`` (``LastLevelMaxPool``
            on the coarsest output, Mask R-CNN's FPN).
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``strict_img_size=False`` for Swin).
    """

    def __init__(
        self,
        model_name: str = "convnext_tiny",
        pretrained: bool | str | None = None,
        out_channels: int = 256,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (1, 2, 3),
        extra_levels: str = "p6p7",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(model_name, pretrained, drop_path_rate, out_indices, **model_kwargs)
        reductions = list(self.body.feature_info.reduction())
        if reductions not in ([8, 16, 32], [4, 8, 16, 32]):
            raise ValueError(
                f"{model_name}: out_indices {out_indices} give strides {reductions}, expected [8, 16, 32] "
                "or [4, 8, 16, 32]"
            )
        channels = list(self.body.feature_info.channels())
        extras = {"p6p7": lambda: LastLevelP6P7(channels[-1], out_channels), "maxpool": LastLevelMaxPool}
        if extra_levels not in extras:
            raise ValueError(f"extra_levels={extra_levels!r}; expected one of {sorted(extras)}")
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extras[extra_levels]())
        self.out_channels = out_channels
        self.strides = reductions + [64, 128][: 2 if extra_levels == "p6p7" else 1]
        self.num_levels = len(self.strides)
        self.level_names = _level_names(self.strides)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        out = self.fpn(OrderedDict(zip(self.level_names, feats, strict=False)))
        return OrderedDict(zip(self.level_names, out.values(), strict=True))


class DetectionTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that resizes only at inference unless ``resize_in_train`` is set.

    Args:
        min_size: Shorter side at inference.
        max_size: Longer side cap at inference.
        image_mean: Normalisation mean.
        image_std: Normalisation std.
        size_divisible: Batches are padded to a multiple of this (128 in the COCO recipe).
        resize_in_train: Also resize training images (off: the data pipeline sizes them, e.g. LSJ).
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int = 128,
        resize_in_train: bool = False,
    ) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        self.resize_in_train = resize_in_train

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        if self.training and not self.resize_in_train:
            return image, target
        return super().resize(image, target)


class _BackboneGroups:
    """Layer-decay groups of a torchvision detector whose ``backbone`` has a ``group_matcher``."""

    backbone: nn.Module

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups for timm's optimizer factory: the backbone trunk's groups, then everything else
        (neck, heads) in one top group."""
        matcher = getattr(self.backbone, "group_matcher", None)
        return prefixed_group_matcher(matcher(coarse), "backbone.") if matcher is not None else {}


def _check_target_boxes(targets: list[dict[str, Tensor]]) -> None:
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        if bad.any():
            raise ValueError(
                f"target {i} has a box with zero or negative width/height: {boxes[bad][0].tolist()}"
            )


class RetinaNetDetector(_BackboneGroups, RetinaNet):
    """torchvision ``RetinaNet`` plus :meth:`forward_with_loss` (losses and detections in one pass)."""

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        # NOTE: losses and box decoding in float32 even under autocast (bf16 boxes are off by pixels)
        return super().compute_loss(targets, {k: v.float() for k, v in head_outputs.items()}, anchors)

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        outputs = {k: [v.float() for v in vs] for k, vs in head_outputs.items()}
        return super().postprocess_detections(outputs, anchors, image_shapes)

    def forward_with_loss(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses against ``targets`` and detections, from one pass, in the module's current mode.

        Args:
            images: Float images (3, H, W) in [0, 1] at original resolution (may require grad).
            targets: Per image ``boxes`` (N, 4) xyxy in original pixels and ``labels`` (N,) contiguous.

        Returns:
            ``(losses, detections)``: ``{"classification", "bbox_regression"}`` scalar tensors
            (differentiable w.r.t. ``images`` and the parameters), and per image ``boxes`` (original
            coordinates), ``scores``, ``labels`` (detached).
        """
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        image_list, targets = self.transform(images, targets)
        _check_target_boxes(targets)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        losses = self.compute_loss(targets, head_outputs, anchors)
        with torch.no_grad():
            detections = self._detect(head_outputs, anchors, features, image_list.image_sizes, original_sizes)
        return losses, detections

    def _detect(
        self,
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        features: list[Tensor],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        num_anchors = head_outputs["cls_logits"].shape[1] // sum(per_level)
        split = [n * num_anchors for n in per_level]
        split_outputs = {k: list(v.detach().split(split, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(split)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, image_sizes)
        # transform.postprocess maps back to original sizes only in eval mode; do it in both modes.
        for det, size, orig in zip(detections, image_sizes, original_sizes, strict=True):
            ratio_h, ratio_w = orig[0] / size[0], orig[1] / size[1]
            det["boxes"] = det["boxes"] * det["boxes"].new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
        return detections


def _with_transform(
    model: nn.Module,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    size_divisible: int,
    resize_in_train: bool,
) -> Any:
    """``model`` with its transform replaced by a :class:`DetectionTransform` (no resize in training)."""
    model.transform = DetectionTransform(
        min_size,
        max_size,
        image_mean,
        image_std,
        size_divisible=size_divisible,
        resize_in_train=resize_in_train,
    )
    return model


def _anchor_sizes(base_sizes: Sequence[int], scales_per_octave: int) -> tuple[tuple[float, ...], ...]:
    return tuple(
        tuple(float(s) * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)) for s in base_sizes
    )


def build_retinanet(
    backbone: nn.Module,
    num_classes: int,
    anchor_base_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    scales_per_octave: int = 3,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 128,
    resize_in_train: bool = False,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    box_loss: str = "giou",
    head_norm: str | None = "group_norm",
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    topk_candidates: int = 1000,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
) -> RetinaNetDetector:
    """torchvision RetinaNet on a P3-P7 backbone.

    Args:
        backbone: Module with ``out_channels`` returning an OrderedDict of levels (high resolution first).
        num_classes: Object classes (no background class: torchvision's focal loss is per-class sigmoid).
        anchor_base_sizes: Anchor size of each level (one per backbone level; 32..512 for P3-P7).
        scales_per_octave: Anchor scales per level (``base * 2^(i/n)``); 3 x 3 ratios = 9 anchors.
        aspect_ratios: Anchor aspect ratios (same on every level).
        min_size: Shorter side at inference (``data.test_min_size``).
        max_size: Longer side cap at inference (``data.test_max_size``).
        size_divisible: Padding multiple of a batch (``data.size_divisible``).
        resize_in_train: Let the transform resize training images too (off: the data pipeline sizes them).
        image_mean: Normalisation mean (the trunk's pretraining mean).
        image_std: Normalisation std.
        box_loss: Regression loss, one of ``BOX_LOSSES`` (``giou`` as RetinaNet v2, ``smooth_l1``, ``l1``).
        head_norm: ``"group_norm"`` (GroupNorm(32) in the head convs, as RetinaNet v2) or None.
        score_thresh: Minimum score of a kept detection.
        nms_thresh: Per-class NMS IoU threshold.
        detections_per_img: Detections kept per image (100 = COCOeval's largest maxDets).
        topk_candidates: Candidates per level before NMS.
        fg_iou_thresh: Anchor/box IoU for a positive anchor.
        bg_iou_thresh: Anchor/box IoU below which an anchor is negative.
    """
    if not hasattr(backbone, "out_channels"):
        raise ValueError(f"backbone {type(backbone).__name__} has no `out_channels` attribute")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss={box_loss!r}; expected one of {BOX_LOSSES}")
    num_levels = getattr(backbone, "num_levels", None)
    if num_levels is None:
        with torch.no_grad():
            num_levels = len(backbone(torch.zeros(1, 3, size_divisible, size_divisible)))
    if num_levels != len(anchor_base_sizes):
        raise ValueError(
            f"the backbone has {num_levels} levels but {len(anchor_base_sizes)} anchor sizes were given "
            f"({list(anchor_base_sizes)}); give one anchor size per level"
        )
    anchor_generator = AnchorGenerator(
        _anchor_sizes(anchor_base_sizes, scales_per_octave), (tuple(aspect_ratios),) * len(anchor_base_sizes)
    )
    if head_norm not in ("group_norm", None):
        raise ValueError(f"head_norm={head_norm!r}; expected 'group_norm' or None")
    norm_layer = partial(nn.GroupNorm, 32) if head_norm == "group_norm" else None
    head = RetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=norm_layer,
    )
    # NOTE: torchvision selects the box loss through this attribute (its v2 builder sets "giou" the same way).
    head.regression_head._loss_type = box_loss
    model = RetinaNetDetector(
        backbone,
        num_classes,
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
    )
    return _with_transform(model, min_size, max_size, image_mean, image_std, size_divisible, resize_in_train)


class MaskRCNNDetector(_BackboneGroups, MaskRCNN):
    """torchvision ``MaskRCNN`` with contiguous labels and :meth:`forward_with_loss` (one pass).

    Labels are ``0..K-1`` in targets and detections, as for :class:`RetinaNetDetector`; inside, torchvision's
    softmax box classifier has the background at 0, so they are shifted by one on the way in and out.
    Detections carry ``masks`` (N, 1, H, W) probabilities at original image size (threshold 0.5 for a
    binary mask). The RoI heads are used only through their parts (``select_training_samples``, the RoI
    pools, heads and predictors, ``postprocess_detections``), so another ``RoIHeads`` with the same parts
    (e.g. a cascade) can replace ``roi_heads`` later without changing this class's interface.
    """

    @staticmethod
    def _shift(items: list[dict[str, Tensor]], offset: int) -> list[dict[str, Tensor]]:
        return [{**t, "labels": t["labels"] + offset} for t in items]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """torchvision's forward (losses in training, detections in eval) with contiguous labels."""
        out = super().forward(images, None if targets is None else self._shift(targets, 1))
        return out if self.training else self._shift(out, -1)

    def forward_with_loss(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses against ``targets`` and detections, from one pass, in the module's current mode.

        In eval mode the anchor and RoI sampling of the losses is seeded (0), so that the pass is deterministic; the
        detections use the current mode's proposal counts (``rpn_*_nms_top_n_test`` in eval).

        Args:
            images: Float images (3, H, W) in [0, 1] at original resolution (may require grad).
            targets: Per image ``boxes`` (N, 4) xyxy in original pixels, ``labels`` (N,) contiguous and
                ``masks`` (N, H, W) uint8 at the image's size.

        Returns:
            ``(losses, detections)``: ``{"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
            "loss_box_reg", "loss_mask"}`` and per image ``boxes`` (original coordinates), ``scores``,
            ``labels``, ``masks`` (N, 1, H, W) probabilities at original size (detached).
        """
        missing = [i for i, t in enumerate(targets) if "masks" not in t]
        if missing:
            raise ValueError(
                f"Mask R-CNN needs target masks: target(s) {missing[:5]} have none (a mask experiment's dataset "
                "yields them: data.with_masks=true)"
            )
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        targets = self._shift([{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets], 1)
        image_list, targets = self.transform(images, targets)
        _check_target_boxes(targets)
        features = self.backbone(image_list.tensors)
        devices = [image_list.tensors.device] if image_list.tensors.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=not self.training):
            if not self.training:
                # NOTE: the RPN and RoI losses sample anchors/proposals at random
                torch.manual_seed(0)
            proposals, losses = self._rpn_with_loss(image_list, features, targets)
            losses.update(self._roi_losses(features, proposals, image_list.image_sizes, targets))
        with torch.no_grad():
            detections = self._roi_detections(features, proposals, image_list.image_sizes, original_sizes)
        return losses, self._shift(detections, -1)

    def _rpn_with_loss(
        self, images: Any, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """``RegionProposalNetwork.forward`` with its loss computed in any mode."""
        rpn = self.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched, anchors)
        loss_objectness, loss_box = rpn.compute_loss(objectness, deltas, labels, regression_targets)
        return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def _roi_losses(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Box and mask losses of the RoI heads on sampled proposals (their training branch, any mode)."""
        heads = self.roi_heads
        proposals, matched_idxs, labels, regression_targets = heads.select_training_samples(
            proposals, targets
        )
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[i] for p, i in zip(proposals, pos, strict=True)]
        pos_matched = [m[i] for m, i in zip(matched_idxs, pos, strict=True)]
        mask_logits = heads.mask_predictor(
            heads.mask_head(heads.mask_roi_pool(features, mask_proposals, image_sizes))
        )
        loss_mask = maskrcnn_loss(
            mask_logits,
            mask_proposals,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            pos_matched,
        )
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}

    def _roi_detections(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections of the RoI heads (their inference branch, any mode), mapped to original sizes."""
        heads = self.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels = heads.postprocess_detections(
            class_logits, box_regression, proposals, image_sizes
        )
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes)))
        masks = maskrcnn_inference(mask_logits, labels)
        out = []
        for b, s, lab, m, size, orig in zip(
            boxes, scores, labels, masks, image_sizes, original_sizes, strict=True
        ):
            b = resize_boxes(b, size, orig)
            out.append({"boxes": b, "scores": s, "labels": lab, "masks": paste_masks_in_image(m, b, orig)})
        return out


def build_maskrcnn(
    backbone: nn.Module,
    num_classes: int,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    resize_in_train: bool = False,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    roi_levels: int = 4,
    representation_size: int = 1024,
    mask_head_channels: Sequence[int] = (256, 256, 256, 256),
    **maskrcnn_kwargs: Any,
) -> MaskRCNNDetector:
    """torchvision Mask R-CNN on a P2-P6 backbone (RPN on every level, RoIAlign on the first ``roi_levels``).

    Args:
        backbone: Module with ``out_channels`` returning an OrderedDict of levels, highest resolution (P2)
            first (:class:`CEDNetPyramid` with ``p2_level=True``, :class:`TimmFPNBackbone` with C2-C5).
        num_classes: Object classes without the background (``data.num_classes``; 80 for COCO).
        anchor_sizes: RPN anchor size of each level (one per backbone level; 32..512 on P2-P6).
        aspect_ratios: RPN anchor aspect ratios (height / width, same on every level).
        min_size: Shorter side at inference.
        max_size: Longer side cap at inference.
        size_divisible: Padding multiple of a batch.
        resize_in_train: Let the transform resize training images too (off: the data pipeline sizes them).
        image_mean: Normalisation mean.
        image_std: Normalisation std.
        roi_levels: Levels RoIAlign pools from (4: P2-P5, as torchvision's and mmdet's FPN Mask R-CNN).
        representation_size: Width of the box head's two fc layers (1024).
        mask_head_channels: Channels of the mask head's conv3x3 layers (4 x 256).
        **maskrcnn_kwargs: Further ``torchvision.models.detection.MaskRCNN`` arguments (``rpn_*``, ``box_*``).
    """
    if not hasattr(backbone, "out_channels"):
        raise ValueError(f"backbone {type(backbone).__name__} has no `out_channels` attribute")
    names = getattr(backbone, "level_names", None)
    if names is None:
        with torch.no_grad():
            names = list(backbone(torch.zeros(1, 3, size_divisible * 2, size_divisible * 2)))
    if len(names) != len(anchor_sizes):
        raise ValueError(
            f"the backbone has {len(names)} levels but {len(anchor_sizes)} anchor sizes were given "
            f"({list(anchor_sizes)}); give one anchor size per level"
        )
    if not 1 <= roi_levels <= len(names):
        raise ValueError(f"roi_levels={roi_levels}; expected 1..{len(names)} (the backbone's levels)")
    channels = backbone.out_channels
    anchor_generator = AnchorGenerator(
        tuple((float(s),) for s in anchor_sizes),
        (tuple(float(r) for r in aspect_ratios),) * len(anchor_sizes),
    )
    roi_names = list(names[:roi_levels])
    box_pool = MultiScaleRoIAlign(roi_names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(roi_names, output_size=14, sampling_ratio=2)
    mask_channels = list(mask_head_channels)
    model = MaskRCNNDetector(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(channels, mask_channels, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_classes + 1),
        **maskrcnn_kwargs,
    )
    return _with_transform(model, min_size, max_size, image_mean, image_std, size_divisible, resize_in_train)
