"""CEDNet: a cascade encoder-decoder network for dense prediction.

Paper: "CEDNet: A Cascade Encoder-Decoder Network for Dense Prediction", Pattern Recognition 158
(2025), arXiv https://arxiv.org/abs/2302.06052::

    @article{zhang2025cednet,
      title={CEDNet: A Cascade Encoder-Decoder Network for Dense Prediction},
      author={Zhang, Gang and Li, Ziyi and Tang, Chufeng and Li, Jianmin and Hu, Xiaolin},
      journal={Pattern Recognition}, volume={158}, year={2025}}

Written for cednet-pl from the facts in ``design/cednet.md`` (no code of the original carries
over). Module names equal the released checkpoint keys, so released state_dicts load 1:1; no
weights are downloadable, load a local file with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.

Layout (224x224 input)::

    stem (stride 4) -> stages.0 (P2 blocks + downsample, stride 8)
      -> stages.1 .. stages.N: encoder (c3, c4, c5 at strides 8/16/32) + decoder (not in stage N)
      -> per stage head on c5: final_layers.s (conv1x1 + norm + act) -> pool -> norms.s -> heads.s
"""

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    named_apply,
    register_model,
)
from torch import nn

from cednet_pl.models.blocks import BlockFamily, PatchConv2d, PointwiseConv2d, get_family
from cednet_pl.models.checkpoint import (
    check_state_dict_keys,
    load_checkpoint_file,
    load_pretrained_file,
    local_file_overlay,
    unwrap_state_dict,
)
from cednet_pl.models.factory import build_on_device

__all__ = [
    "DECODERS",
    "CEDNet",
    "CEDNetDecoder",
    "CEDNetEncoder",
    "checkpoint_filter_fn",
    "load_checkpoint_file",
]


_logger = logging.getLogger(__name__)

DECODERS = ("lightweight", "unet", "hourglass", "fpnconv")
_POOL_TYPES = ("", "avg", "max", "avgmax")
_HEAD_PREFIXES = ("final_layers", "norms", "heads")


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Run the modules of ``blocks`` one after another (not the container's own ``forward``), each checkpointed when
    asked and autograd is on. Eager only: scriptable callers check ``not torch.jit.is_scripting()`` first, the idiom
    TorchScript compiles away."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x, use_reentrant=False)
    for block in blocks:
        x = block(x)
    return x


class CEDNetStage(nn.Sequential):
    """One cascade stage (``stages.1`` ..): encoder, then decoder (all but the last stage); ``list[Tensor]`` in and
    out (c3, c4, c5), typed for TorchScript."""

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        for module in self:
            feats = module(feats)
        return feats


class CEDNetP2Stage(nn.Sequential):
    """Stem output -> P2 blocks -> conv2x2 s2 downsample (``stages.0``); takes and returns a one-entry feature
    list, so every stage of the cascade has the same ``list[Tensor] -> list[Tensor]`` signature (TorchScript)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self.grad_checkpointing = False

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        x = feats[0]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = _run_blocks(self, x, True)
        else:
            for module in self:
                x = module(x)
        return [x]


def _conv_norm(
    in_chs: int, out_chs: int, kernel_size: int, stride: int, family: BlockFamily, padding: int = 0
) -> nn.Sequential:
    if kernel_size == stride and padding == 0:
        conv: nn.Conv2d = PatchConv2d(in_chs, out_chs, patch=kernel_size)
    else:
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding)
    return nn.Sequential(conv, family.norm2d(out_chs))


class CEDNetEncoder(nn.Module):
    """Encoder of one cascade stage: three levels (strides 8/16/32) joined by conv2x2 s2 downsamples.

    Levels 0 and 1 run base blocks, level 2 runs focal blocks. The input is the previous stage's
    feature tuple; a plain encoder reads only its first entry (c3). With ``fuse_prev`` (FPN-conv
    variant) the previous stage's c4 and c5 are added to the level 1 and level 2 inputs.

    Args:
        family: Block family.
        dims: Channels of the three levels.
        depths: Number of blocks per level.
        drop_path_rates: Drop-path rate of every block, level 0 first.
        ls_init_value: Layer-scale init.
        fuse_prev: Add the previous stage's c4/c5 to the level 1/2 inputs.
    """

    def __init__(
        self,
        family: BlockFamily,
        dims: Sequence[int],
        depths: Sequence[int],
        drop_path_rates: Sequence[float],
        ls_init_value: float | None,
        fuse_prev: bool = False,
    ) -> None:
        super().__init__()
        self.fuse_prev = fuse_prev
        self.grad_checkpointing = False
        rates = iter(drop_path_rates)
        self.encoder = nn.ModuleList()
        for level, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            factory = family.focal_block if level == 2 else family.base_block
            self.encoder.append(
                nn.Sequential(
                    *[
                        factory(dim, drop_path=next(rates), ls_init_value=ls_init_value, index=i)
                        for i in range(depth)
                    ]
                )
            )
        self.encoder_downsample = nn.ModuleList(
            [_conv_norm(dims[i], dims[i + 1], 2, 2, family) for i in range(len(dims) - 1)]
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = feats[0]
        outs: list[torch.Tensor] = []
        # ModuleLists are indexed by literals only (TorchScript): the two downsamples are spelled out
        for level, blocks in enumerate(self.encoder):
            if level == 1:
                x = self.encoder_downsample[0](x)
            elif level == 2:
                x = self.encoder_downsample[1](x)
            if level > 0 and self.fuse_prev and len(feats) > level:
                x = x + feats[level]
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _run_blocks(blocks, x, True)
            else:
                x = blocks(x)
            outs.append(x)
        return outs


class CEDNetDecoder(nn.Module):
    """Top-down decoder of one cascade stage.

    For level ``l`` = 1 then 0: ``c_l = norm(lateral(c_l) + up2(conv1x1(c_{l+1})))`` followed by the
    decoder blocks of that level; ``up2`` is bilinear (align_corners False) to the size of ``c_l``.
    ``lateral`` is one base block (hourglass) or the identity; decoder blocks exist for UNet and
    hourglass. The FPN-conv variant ends with conv3x3 + norm on each level. c5 passes through.

    Args:
        family: Block family.
        dims: Channels of the three levels.
        kind: One of ``DECODERS``.
        depths: Decoder blocks at level 1 and level 0 (UNet/hourglass only).
        drop_path_rates: Drop-path rates, in run order (lateral 1, decoder 1, lateral 0, decoder 0).
        ls_init_value: Layer-scale init.
    """

    def __init__(
        self,
        family: BlockFamily,
        dims: Sequence[int],
        kind: str,
        depths: Sequence[int] = (0, 0),
        drop_path_rates: Sequence[float] = (),
        ls_init_value: float | None = 1e-6,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.grad_checkpointing = False
        rates = iter(drop_path_rates)
        levels = (1, 0)  # top-down: c4 first, then c3
        self.decoder_upsample = nn.ModuleList(
            [nn.Sequential(PointwiseConv2d(dims[lvl + 1], dims[lvl])) for lvl in levels]
        )
        self.decoder_norm = nn.ModuleList([family.norm2d(dims[lvl]) for lvl in levels])
        lateral, decoder = [], []
        for lvl, depth in zip(levels, depths, strict=True):
            if kind == "hourglass":
                lateral.append(
                    family.base_block(dims[lvl], drop_path=next(rates), ls_init_value=ls_init_value, index=0)
                )
            if kind in ("unet", "hourglass"):
                decoder.append(
                    nn.Sequential(
                        *[
                            family.base_block(
                                dims[lvl], drop_path=next(rates), ls_init_value=ls_init_value, index=i
                            )
                            for i in range(depth)
                        ]
                    )
                )
        # Placeholders without parameters where a variant has no lateral / decoder blocks (same state_dict), so the
        # forward zips four equally long ModuleLists (TorchScript indexes ModuleLists by literals only)
        self.lateral = nn.ModuleList(lateral or [nn.Identity(), nn.Identity()])
        self.decoder = nn.ModuleList(decoder or [nn.Sequential(), nn.Sequential()])
        self.decoder_conv = (
            nn.ModuleList([_conv_norm(d, d, 3, 1, family, padding=1) for d in dims])
            if kind == "fpnconv"
            else None
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = list(feats)
        x = outs[2]
        for i, (upsample, norm, lateral, blocks) in enumerate(
            zip(self.decoder_upsample, self.decoder_norm, self.lateral, self.decoder)  # noqa: B905 (TorchScript)
        ):
            lvl = 1 - i  # top-down: c4, then c3
            skip = lateral(outs[lvl])
            up = F.interpolate(upsample(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = norm(skip + up)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _run_blocks(blocks, x, True)
            else:
                x = blocks(x)
            outs[lvl] = x
        if self.decoder_conv is not None:
            for i, conv in enumerate(self.decoder_conv):
                outs[i] = conv(outs[i])
        return outs


class CEDNet(nn.Module):
    """CEDNet classifier/backbone (timm model contract).

    ``forward`` returns the last stage's logits (train and eval). By default only the last stage's head is
    built (the inference model, Table A1's parameter count); with ``aux_heads=True`` every cascade stage gets its
    head and ``forward_stage_logits`` returns every stage's logits for deep supervision.

    Args:
        in_chans: Input channels.
        num_classes: Classes of every stage head (0: no classifier, heads return pooled features).
        global_pool: Head pooling: ``'avg'``, ``'max'``, ``'avgmax'`` or ``''`` (none: dense output).
        family: Block family name (``'next'``, ``'swin'``, ``'res'``) or a ``BlockFamily``.
        p2_dim: Width of the stem output and the P2 stage.
        p2_block: Number of base blocks in the P2 stage.
        dims: Channels of the three pyramid levels (strides 8, 16, 32).
        blocks: Blocks per level ``[b0, b1, b2]`` (split between encoder and decoder for UNet/hourglass).
        num_stages: Number of cascade stages.
        decoder: ``'lightweight'``, ``'unet'``, ``'hourglass'`` or ``'fpnconv'``.
        drop_rate: Dropout before each classifier.
        drop_path_rate: End of the linear stochastic-depth ramp over all blocks.
        ls_init_value: Layer-scale init of the blocks.
        head_init_scale: Scale of the initial classifier weights (trunc-normal std 0.01; biases start at 0).
        head_hidden: Width of the per-stage head (conv1x1 before pooling).
        stem_dim: Width of the first stem conv.
        with_heads: False builds the backbone only (no ``final_layers``/``norms``/``heads``; used for
            ``features_only``, so that backbone-only checkpoints load).
        aux_heads: Also build the heads of all but the last stage (training-only, deep supervision). Without
            them their ModuleList slots hold parameter-free placeholders, so the last head keeps its released
            name (``heads.{num_stages - 1}``).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        family: str | BlockFamily = "next",
        p2_dim: int = 96,
        p2_block: int = 3,
        dims: Sequence[int] = (192, 352, 512),
        blocks: Sequence[int] = (2, 4, 2),
        num_stages: int = 3,
        decoder: str = "lightweight",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        head_hidden: int = 2048,
        stem_dim: int = 32,
        with_heads: bool = True,
        aux_heads: bool = False,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r}; expected one of {DECODERS}")
        if len(dims) != 3 or len(blocks) != 3:
            raise ValueError(f"dims and blocks need 3 entries (levels c3, c4, c5); got {dims} and {blocks}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        _check_pool(global_pool)
        fam = get_family(family)
        dims = tuple(int(d) for d in dims)
        blocks = tuple(int(b) for b in blocks)
        self.family = fam.name
        self.in_chans = in_chans
        self.aux_heads = bool(aux_heads and with_heads)
        self.num_classes = num_classes if with_heads else 0
        self.num_stages = num_stages
        self.decoder_kind = decoder
        self.dims = dims
        self.drop_rate = drop_rate
        self.num_features = dims[2]
        self.head_hidden_size = head_hidden
        self.grad_checkpointing = False

        if decoder in ("unet", "hourglass"):
            enc_depths = (blocks[0] // 2, blocks[1] // 2, blocks[2])
            dec_depths = (blocks[1] - blocks[1] // 2, blocks[0] - blocks[0] // 2)
        else:
            enc_depths, dec_depths = blocks, (0, 0)
        n_lateral = 2 if decoder == "hourglass" else 0
        n_enc, n_dec = sum(enc_depths), sum(dec_depths) + n_lateral
        total = p2_block + num_stages * n_enc + (num_stages - 1) * n_dec
        rates = calculate_drop_path_rates(drop_path_rate, total)
        # Rates in ramp order: P2 blocks, then per stage its encoder blocks, then its decoder blocks.
        self.drop_path_rates = rates
        rate_iter = iter(rates)

        def take(n: int) -> list[float]:
            return [next(rate_iter) for _ in range(n)]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, kernel_size=3, stride=2, padding=1),
            fam.norm2d(stem_dim),
            fam.act(),
            nn.Conv2d(stem_dim, p2_dim, kernel_size=3, stride=2, padding=1),
            fam.norm2d(p2_dim),
            fam.act(),
        )
        p2 = [
            fam.base_block(p2_dim, drop_path=r, ls_init_value=ls_init_value, index=i)
            for i, r in enumerate(take(p2_block))
        ]
        self.stages = nn.ModuleList([CEDNetP2Stage(*p2, _conv_norm(p2_dim, dims[0], 2, 2, fam))])
        for s in range(num_stages):
            stage = [CEDNetEncoder(fam, dims, enc_depths, take(n_enc), ls_init_value, decoder == "fpnconv")]
            if s < num_stages - 1:
                stage.append(CEDNetDecoder(fam, dims, decoder, dec_depths, take(n_dec), ls_init_value))
            self.stages.append(CEDNetStage(*stage))

        built = self._built_heads(with_heads)
        self.final_layers = nn.ModuleList(
            [
                nn.Sequential(PointwiseConv2d(dims[2], head_hidden), fam.norm2d(head_hidden), fam.act())
                if b
                else nn.Identity()
                for b in built
            ]
        )
        self.norms = nn.ModuleList(
            [nn.LayerNorm(head_hidden, eps=1e-6) if b else nn.Identity() for b in built]
        )
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.heads = self._make_heads(self.num_classes) if with_heads else nn.ModuleList()

        last = f"stages.{num_stages}.0.encoder"
        self.feature_info = [
            dict(num_chs=dims[0], reduction=8, module=f"{last}.0"),
            dict(num_chs=dims[1], reduction=16, module=f"{last}.1"),
            dict(num_chs=dims[2], reduction=32, module=f"{last}.2"),
        ]
        named_apply(_init_weights, self)
        self.head_init_scale = head_init_scale
        self._init_heads(head_init_scale)

    def _built_heads(self, with_heads: bool = True) -> list[bool]:
        """Per stage: whether its head is built (last stage always, the others with ``aux_heads``)."""
        if not with_heads:
            return []
        return [self.aux_heads or s == self.num_stages - 1 for s in range(self.num_stages)]

    def _make_heads(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList(
            [
                nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 and b else nn.Identity()
                for b in self._built_heads()
            ]
        )

    @torch.no_grad()
    def _init_heads(self, scale: float) -> None:
        """Classifier init whose logit scale does not depend on ``num_classes`` (ConvNeXt-style trunc-normal).

        The released code initialises them kaiming-normal with fan_out (std 1/sqrt(num_classes)): initial logits
        of std 10-30 for a few classes. Released checkpoints overwrite it, so parity does not depend on it. The
        classifier input is LayerNorm'd (squared norm = width), so with std 0.01 the initial logits have std
        0.01 * sqrt(2048) = 0.45 for the 2048-wide head, whatever ``num_classes`` (ConvNeXt-T: 0.02 * sqrt(768)).
        """
        for head in self.heads:
            if isinstance(head, nn.Linear):
                trunc_normal_(head.weight, std=0.01)
                nn.init.zeros_(head.bias)
                head.weight.mul_(scale)

    # ------------------------------------------------------------------ timm contract
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: stem -> 0, ``stages.i`` -> i + 1, heads last."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (recomputed in backward; outputs unchanged)."""
        self.grad_checkpointing = enable
        for module in self.modules():
            if isinstance(module, (CEDNetP2Stage, CEDNetEncoder, CEDNetDecoder)):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (none beyond timm's 1-d rule)."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier of the last stage (the one used at inference)."""
        return self.heads[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifiers of all stages (``num_classes=0`` removes them)."""
        if len(self.final_layers) == 0:
            raise RuntimeError(
                "this CEDNet has no heads (features_only / with_heads=False); cannot reset the classifier"
            )
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        else:
            _check_pool(self.global_pool.pool_type)
        self.num_classes = num_classes
        ref = self.final_layers[-1][0].weight
        self.heads = self._make_heads(num_classes).to(device=ref.device, dtype=ref.dtype).train(self.training)
        self._init_heads(self.head_init_scale)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 3, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stage heads (used by ``features_only``); returns the absolute feature indices."""
        take, _ = _take_indices(len(self.feature_info), indices)
        if prune_head:
            self.final_layers = nn.ModuleList()
            self.norms = nn.ModuleList()
            self.heads = nn.ModuleList()
            self.num_classes = 0
        return take

    # ------------------------------------------------------------------ forward paths
    def _cascade(self, x: torch.Tensor, every_stage: bool = False) -> list[list[torch.Tensor]]:
        """(c3, c4, c5) of the last cascade stage, or of every stage in order (``every_stage``)."""
        feats: list[torch.Tensor] = [self.stem(x)]
        outs: list[list[torch.Tensor]] = []
        for i, stage in enumerate(self.stages):
            feats = stage(feats)
            if every_stage and i > 0:
                outs.append(feats)
        if not every_stage:
            outs.append(feats)
        return outs

    def _last_stage(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._cascade(x)[0]

    def _check_heads(self) -> None:
        if len(self.final_layers) == 0:
            raise RuntimeError(
                "this CEDNet has no heads (features_only / with_heads=False); no classifier output"
            )

    def _norm_head(self, x: torch.Tensor, norm: nn.Module, head: nn.Module, pre_logits: bool) -> torch.Tensor:
        """LayerNorm (channels last), dropout and classifier on the pooled (B, C) or unpooled (B, C, H, W) map."""
        dense = self.global_pool.is_identity()
        if dense:
            x = x.permute(0, 2, 3, 1)
        x = self.head_drop(norm(x))
        if not pre_logits:
            x = head(x)
        return x.permute(0, 3, 1, 2) if dense else x

    @torch.jit.unused
    def _stage_head(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of stage ``s`` (eager: ModuleLists indexed by a variable)."""
        x = self.global_pool(self.final_layers[s](x))
        return self._norm_head(x, self.norms[s], self.heads[s], False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's c5 (stride 32, ``num_features`` channels), unpooled NCHW."""
        return self._last_stage(x)[2]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last stage's head on c5: conv1x1 + norm + act, pool, LayerNorm, (dropout,) classifier."""
        self._check_heads()
        x = self.global_pool(self.final_layers[-1](x))
        dense = self.global_pool.is_identity()
        if dense:
            x = x.permute(0, 2, 3, 1)
        x = self.head_drop(self.norms[-1](x))
        if not pre_logits:
            x = self.heads[-1](x)
        return x.permute(0, 3, 1, 2) if dense else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_stage_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every cascade stage (deep supervision); the last equals ``forward(x)``.

        Raises:
            RuntimeError: the model was built without ``aux_heads=True``.
        """
        self._check_heads()
        if not self.aux_heads:
            raise RuntimeError(
                "forward_stage_logits needs the auxiliary stage heads: create the model with aux_heads=True "
                "(timm.create_model(name, aux_heads=True); the classification module does this when "
                "deep_supervision is on)"
            )
        stages = self._cascade(x, every_stage=True)
        return [self._stage_head(s, f[2]) for s, f in enumerate(stages[:-1])] + [
            self.forward_head(stages[-1][2])
        ]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The last stage's pyramid (c3, c4, c5) (``indices`` select among them).

        Args:
            x: Input images.
            indices: Last-n (int) or absolute/negative indices into (c3, c4, c5); None: all.
            norm: Unused (CEDNet has no final norm before the head).
            stop_early: Unused (every stage is needed for the last stage's features).
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return only the selected features.

        Returns:
            The selected features, or ``(c5, features)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: CEDNet only outputs NCHW")
        take, _ = _take_indices(len(self.feature_info), indices)
        feats = self._last_stage(x)
        intermediates = [feats[i] for i in take]
        if intermediates_only:
            return intermediates
        return feats[2], intermediates

    def blocks_in_ramp_order(self) -> list[nn.Module]:
        """All blocks in drop-path ramp order (matches ``self.drop_path_rates``)."""
        out: list[nn.Module] = list(self.stages[0][:-1])
        for stage in self.stages[1:]:
            encoder = stage[0]
            for level in encoder.encoder:
                out.extend(level)
            if len(stage) > 1:
                dec = stage[1]
                for lateral, blocks in zip(dec.lateral, dec.decoder, strict=True):
                    if not isinstance(lateral, nn.Identity):
                        out.append(lateral)
                    out.extend(blocks)
        return out


def _check_pool(global_pool: str) -> None:
    if global_pool not in _POOL_TYPES:
        raise ValueError(f"global_pool={global_pool!r}; expected one of {_POOL_TYPES}")


def _take_indices(n: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Absolute indices into ``n`` features: None -> all, int k -> last k, sequence -> (negatives ok)."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"last-n indices={indices} out of range 1..{n}")
        take = list(range(n - indices, n))
    else:
        take = []
        for i in indices:
            j = n + i if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"feature index {i} out of range for {n} features (c3, c4, c5)")
            take.append(j)
    return take, max(take)


def _init_weights(module: nn.Module, name: str = "") -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="linear")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------- checkpoints
def _head_stage(key: str) -> int | None:
    """Stage index of a head key (``final_layers.s.*``, ``norms.s.*``, ``heads.s.*``), else None."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] in _HEAD_PREFIXES and parts[1].isdigit():
        return int(parts[1])
    return None


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check a (released or converted) checkpoint against ``model`` and adapt the heads.

    Module names equal the released keys, so no renaming happens. Rules:

    - checkpoint wrappers are removed (see :func:`unwrap_state_dict`);
    - head groups (``final_layers``/``norms``/``heads``) the model does not have (``features_only``,
      ``num_classes=0``) are dropped;
    - the auxiliary (non-last) stage heads are dropped, with a logged note, when the model was built without
      them (``aux_heads=False``, the default);
    - if the classifier shapes differ (other ``num_classes``), all ``heads.*`` are dropped with a warning
      and keep their fresh init;
    - if the checkpoint has only the last stage's head (``--inference-only``), the auxiliary heads
      keep their fresh init, with a warning;
    - ``stem.0.weight`` is adapted when ``in_chans`` differs;
    - anything else missing, unexpected or mis-shaped raises ``RuntimeError`` naming the keys.
    """
    sd = unwrap_state_dict(state_dict)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    variant = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    num_stages = getattr(model, "num_stages", 0)
    notes: list[str] = []  # warnings, emitted only when the checkpoint passes

    for prefix in _HEAD_PREFIXES:
        if not any(k.startswith(prefix + ".") for k in expected):
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix + ".")}

    if not getattr(model, "aux_heads", True):
        aux = [k for k in sd if (st := _head_stage(k)) is not None and st < num_stages - 1]
        if aux:
            _logger.info(
                "%s: the checkpoint carries the auxiliary stage heads (%d tensors, e.g. %s); the model was built "
                "without them (aux_heads=False), so they are not loaded",
                variant,
                len(aux),
                aux[0],
            )
            sd = {k: v for k, v in sd.items() if k not in set(aux)}

    head_keys = [k for k in sd if k.startswith("heads.") and k in expected]
    # Another num_classes changes only the classifiers' output dimension (dim 0).
    if any(sd[k].shape != expected[k] for k in head_keys) and all(
        sd[k].shape[1:] == expected[k][1:] for k in head_keys
    ):
        notes.append(
            f"{variant}: checkpoint classifier shapes {tuple(sd[head_keys[0]].shape)} differ from the model's "
            f"{tuple(expected[head_keys[0]])} (other num_classes); dropping heads.* ({len(head_keys)} tensors), "
            "the classifiers keep their fresh initialisation"
        )
        sd = {k: v for k, v in sd.items() if not k.startswith("heads.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("heads.")}

    adapt_first_conv(sd, "stem.0.weight", expected)

    aux_missing = [
        k for k in expected if k not in sd and (s := _head_stage(k)) is not None and s < num_stages - 1
    ]
    aux_all = [k for k in expected if (s := _head_stage(k)) is not None and s < num_stages - 1]
    optional: list[str] = []
    if aux_missing and len(aux_missing) == len(aux_all):
        notes.append(
            f"{variant}: checkpoint has no auxiliary (non-last-stage) heads; they keep their fresh "
            "initialisation (they only matter for deep-supervision training)"
        )
        optional = aux_missing
    check_state_dict_keys(sd, expected, variant, optional=optional)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return sd


def adapt_first_conv(sd: dict[str, torch.Tensor], key: str, expected: Mapping[str, torch.Size]) -> None:
    """Adapt the first conv's weight ``sd[key]`` in place to the model's ``in_chans`` (timm's rule)."""
    if key in sd and key in expected:
        w, shape = sd[key], expected[key]
        if w.ndim == 4 and w.shape != shape and w.shape[0] == shape[0] and w.shape[2:] == shape[2:]:
            sd[key] = adapt_input_conv(shape[1], w)


def _load_pretrained_file(model: CEDNet, path: str) -> None:
    """``model.load_pretrained`` hook used by timm for ``pretrained_cfg_overlay=dict(file=...)``."""
    load_pretrained_file(model, path, checkpoint_filter_fn)


CEDNet.load_pretrained = _load_pretrained_file  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- registration
def _create_cednet(variant: str, pretrained: bool = False, **kwargs: Any) -> CEDNet:
    if kwargs.get("features_only"):
        kwargs.setdefault("with_heads", False)
    return build_on_device(
        lambda **kw: build_model_with_cfg(
            CEDNet,
            variant,
            pretrained,
            pretrained_cfg_overlay=local_file_overlay(kw),
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2), feature_cls="getter"),
            **kw,
        ),
        kwargs,
    )


def _cfg(num_stages: int = 3, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": f"heads.{num_stages - 1}",
        "license": "unknown (released CEDNet weights; check the original repository)",
        **kwargs,
    }


# Released definitions (design/cednet.md section 3). Drop-path rates of the paper's recipe are set by
# the training config, not here (timm convention): T/S/B 0.1/0.4/0.5, res50 0.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "cednet_next_nano": dict(
        stem_dim=16,
        p2_dim=32,
        p2_block=1,
        dims=(48, 80, 128),
        blocks=(1, 1, 1),
        num_stages=2,
        head_hidden=256,
    ),
    "cednet_next_tiny": dict(p2_dim=96, p2_block=3, dims=(192, 352, 512), blocks=(2, 4, 2), num_stages=3),
    "cednet_next_small": dict(p2_dim=96, p2_block=3, dims=(192, 352, 512), blocks=(2, 7, 2), num_stages=4),
    "cednet_next_base": dict(p2_dim=128, p2_block=3, dims=(256, 448, 704), blocks=(2, 7, 2), num_stages=4),
    "cednet_next_tiny_unet": dict(
        p2_dim=96, p2_block=3, dims=(192, 352, 512), blocks=(2, 4, 2), num_stages=3, decoder="unet"
    ),
    "cednet_next_tiny_hourglass": dict(
        p2_dim=96, p2_block=3, dims=(160, 320, 512), blocks=(2, 4, 2), num_stages=3, decoder="hourglass"
    ),
    "cednet_next_tiny_fpnconv": dict(
        p2_dim=96, p2_block=3, dims=(160, 304, 448), blocks=(2, 4, 2), num_stages=3, decoder="fpnconv"
    ),
    "cednet_swin_tiny": dict(
        family="swin", p2_dim=96, p2_block=3, dims=(160, 288, 416), blocks=(2, 4, 2), num_stages=3
    ),
    "cednet_res50": dict(
        family="res", p2_dim=64, p2_block=3, dims=(128, 256, 384), blocks=(1, 4, 2), num_stages=3
    ),
}

default_cfgs = generate_default_cfgs(
    {name: _cfg(num_stages=args["num_stages"]) for name, args in MODEL_ARGS.items()}
)


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> CEDNet:
    return _create_cednet(name, pretrained=pretrained, **dict(MODEL_ARGS[name], **kwargs))


@register_model
def cednet_next_nano(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """Small NeXt CEDNet for CPU demos and tests (stem 16, P2 32, 2 stages, dims 48/80/128, head 256)."""
    return _build("cednet_next_nano", pretrained, kwargs)


@register_model
def cednet_next_tiny(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-T (lightweight decoder)."""
    return _build("cednet_next_tiny", pretrained, kwargs)


@register_model
def cednet_next_small(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-S (4 stages)."""
    return _build("cednet_next_small", pretrained, kwargs)


@register_model
def cednet_next_base(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-B (4 stages)."""
    return _build("cednet_next_base", pretrained, kwargs)


@register_model
def cednet_next_tiny_unet(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-T with the UNet-style decoder."""
    return _build("cednet_next_tiny_unet", pretrained, kwargs)


@register_model
def cednet_next_tiny_hourglass(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-T with the hourglass-style decoder."""
    return _build("cednet_next_tiny_hourglass", pretrained, kwargs)


@register_model
def cednet_next_tiny_fpnconv(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-NeXt-T, FPN-conv variant (released as ``*_fpn``)."""
    return _build("cednet_next_tiny_fpnconv", pretrained, kwargs)


@register_model
def cednet_swin_tiny(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-Swin-T (Swin blocks from ``blocks_swin.py``)."""
    return _build("cednet_swin_tiny", pretrained, kwargs)


@register_model
def cednet_res50(pretrained: bool = False, **kwargs: Any) -> CEDNet:
    """CEDNet-Res50 (bottleneck blocks, BatchNorm, ReLU; ``blocks_resnet.py``)."""
    return _build("cednet_res50", pretrained, kwargs)
