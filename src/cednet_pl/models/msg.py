"""MSG-Transformer (messenger tokens), a Table A1 baseline of the CEDNet paper.

Paper: "MSG-Transformer: Exchanging Local Spatial Information by Manipulating Messenger Tokens",
Fang et al., CVPR 2022, arXiv https://arxiv.org/abs/2105.15168. Written for cednet-pl from the facts in
``design/baselines.md`` (the official hustvl/MSG-Transformer definition, Apache-2.0; no code of it carries
over). Module names and the state_dict layout equal the official model's (``msg_tokens``, ``patch_embed.*``,
``layers.i.blocks.j.*`` with the int64 ``relative_position_index`` buffers, ``layers.i.downsample.*``,
``norm``, ``head``), so a checkpoint saved from the official code loads 1:1 with
``timm.create_model("msg_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.

Layout (224x224 input, window w = 7, shuffle sizes G = 4, 4, 2, 1)::

    patch_embed: conv 7x7 s4 p2 + LN -> 56x56 patch map (NHWC)
    layers.i: the patch map is cut into w x w windows, grouped in shuffle regions of G_i x G_i windows;
      every window gets one messenger (MSG) token in front (1 + w*w tokens); blocks:
        x = x + attn(LN(x))     window attention (Swin relative bias + the MSG biases)
        MSG shuffle             each MSG token's channels split in G_i^2 groups, exchanged across the region
        x = x + mlp(LN(x))
      layers.i.downsample (i < 3): one conv 3x3 s2 + LN, applied to the patch map and to the MSG-token map
    norm, head: LN, the last stage's MSG token -> Linear

Input sizes: every stage's map must be a multiple of window x shuffle size, i.e. height and width each a
multiple of ``input_multiple`` = lcm_i(4 * 2^i * w * G_i) = 224 for the released configuration (224, 448,
672, ...; non-square allowed). At 224 the model equals the official one (which accepts only 224). At larger
sizes the last stage has more than one window, each with its own MSG token; the official code would return
one row per window there, this implementation averages those MSG tokens (``global_pool='token'``). Other
sizes raise a ``ValueError`` naming the size and the multiple; nothing is padded.

Training detail kept from the official code: its ``no_weight_decay`` names ``msg_token`` (not the parameter
``msg_tokens``), so the MSG tokens are weight-decayed; the relative-position tables and ``rel_pos_msg`` are
not (``no_weight_decay_keywords``).
"""

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    named_apply,
    register_model,
)
from timm.models._features import feature_take_indices
from torch import nn

from cednet_pl.models.blocks_swin import WindowAttention
from cednet_pl.models.cednet import adapt_first_conv
from cednet_pl.models.checkpoint import (
    check_state_dict_keys,
    load_pretrained_file,
    local_file_overlay,
    unwrap_state_dict,
)
from cednet_pl.models.factory import build_on_device

__all__ = [
    "MSGAttention",
    "MSGBlock",
    "MSGPatchMerging",
    "MSGStage",
    "MSGTransformer",
    "msg_checkpoint_filter_fn",
    "msg_input_multiple",
    "region_partition",
    "region_reverse",
    "shuffle_messengers",
]


_POOL_TYPES = ("token", "avg", "")
PATCH_STRIDE = 4


def region_partition(x: torch.Tensor, window: int, shuffle: int) -> torch.Tensor:
    """Cut a ``(B, H, W, C)`` map into shuffle regions of windows.

    Args:
        x: Map whose sides are multiples of ``window * shuffle``.
        window: Window side w.
        shuffle: Shuffle-region side G (in windows).

    Returns:
        ``(B * R, G*G, w*w, C)``: regions row-major over the image (batch-major), windows row-major in their
        region, tokens row-major in their window.
    """
    b, h, w, c = x.shape
    side = window * shuffle
    x = x.reshape(b, h // side, shuffle, window, w // side, shuffle, window, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, shuffle * shuffle, window * window, c)


def region_reverse(x: torch.Tensor, window: int, shuffle: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`region_partition`: ``(B * R, G*G, w*w, C)`` -> ``(B, height, width, C)``."""
    c = x.shape[-1]
    side = window * shuffle
    x = x.reshape(-1, height // side, width // side, shuffle, shuffle, window, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, height, width, c)


def shuffle_messengers(x: torch.Tensor) -> torch.Tensor:
    """Exchange the MSG tokens' channel groups across the windows of each shuffle region.

    Args:
        x: ``(B', G2, T, C)`` tokens, the MSG token of each window at position 0 (G2 windows per region;
            C a multiple of G2).

    Returns:
        The same tokens, with MSG token ``j``'s channel group ``i`` (C / G2 channels) moved to MSG token ``i``'s
        channel group ``j``.
    """
    b, g2, _, c = x.shape
    msg = x[:, :, 0].reshape(b, g2, g2, c // g2).transpose(1, 2).reshape(b, g2, 1, c)
    return torch.cat((msg, x[:, :, 1:]), dim=2)


def msg_input_multiple(window_size: int, shuffle_size: Sequence[int], patch_size: int = PATCH_STRIDE) -> int:
    """Input side multiple for which every stage's map is a multiple of window x shuffle size (224 released)."""
    return math.lcm(*(patch_size * 2**i * window_size * g for i, g in enumerate(shuffle_size)))


@torch.fx.wrap
def _check_input_size(height: int, width: int, multiple: int) -> None:
    """Raise a ``ValueError`` unless both sides are positive multiples of ``multiple`` (a leaf under FX)."""
    if height % multiple != 0 or width % multiple != 0 or height <= 0 or width <= 0:
        raise ValueError(
            f"MSG-Transformer: input size {height}x{width} is not supported; height and width must each be "
            f"a multiple of {multiple} (every stage's map a multiple of window x shuffle-region size), "
            f"e.g. {multiple}x{multiple} or {2 * multiple}x{2 * multiple}"
        )


class MSGAttention(WindowAttention):
    """Window attention over 1 MSG token + w*w patch tokens: Swin's relative bias plus the MSG biases."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """Create the attention.

        Args:
            dim: Channels C (a multiple of ``num_heads``).
            num_heads: Attention heads.
            window_size: Window side w (the relative table has ``(2w-1)^2`` rows).
            qkv_bias: Bias in the qkv projection.
            attn_drop: Dropout on the attention weights (training only).
            proj_drop: Dropout after the output projection.
        """
        # Swin's table, persistent int64 index buffer, qkv and proj (the official names and order)
        super().__init__(dim, num_heads, window_size, qkv_bias)
        self.attn_drop = attn_drop
        # [:, 0]: bias of every patch query for the MSG key; [:, 1]: bias of the MSG query's whole row
        self.rel_pos_msg = nn.Parameter(torch.zeros(num_heads, 2, 1, 1))
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.rel_pos_msg, std=0.02)

    def attention_bias(self) -> torch.Tensor:
        """The additive bias ``(heads, 1 + w*w, 1 + w*w)`` of the attention logits (MSG token first)."""
        n = self.window_size * self.window_size
        patches = self.relative_position_bias()
        to_msg = self.rel_pos_msg[:, 0].expand(-1, n, 1)
        from_msg = self.rel_pos_msg[:, 1].expand(-1, 1, n + 1)
        return torch.cat((from_msg, torch.cat((to_msg, patches), dim=-1)), dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B', G2, 1 + w*w, C)`` -> same shape; every window attends within itself."""
        b, g2, t, c = x.shape
        qkv = self.qkv(x).reshape(b * g2, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B' * G2, heads, T, head_dim)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=self.attention_bias().to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, g2, t, c)))


class MSGBlock(nn.Module):
    """MSG-Transformer block: attention, MSG shuffle, MLP (pre-norm, both residual)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shuffle_size: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        """Create the block.

        Args:
            dim: Channels C (a multiple of ``shuffle_size**2`` when it is above 1).
            num_heads: Attention heads.
            window_size: Window side.
            shuffle_size: Side G of the shuffle region (1: no shuffle).
            mlp_ratio: MLP hidden width / C.
            qkv_bias: Bias in the qkv projection.
            drop: Dropout after the attention projection and in the MLP.
            attn_drop: Attention-weight dropout.
            drop_path: Stochastic depth of both residual branches.
        """
        super().__init__()
        if shuffle_size > 1 and dim % (shuffle_size * shuffle_size):
            raise ValueError(
                f"MSGBlock: dim={dim} is not divisible by shuffle_size**2={shuffle_size**2} (MSG channel groups)"
            )
        self.shuffle_size = shuffle_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSGAttention(dim, num_heads, window_size, qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B', G*G, 1 + w*w, C)`` -> same shape."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.shuffle_size > 1:
            x = shuffle_messengers(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MSGPatchMerging(nn.Module):
    """Downsampling between stages: conv 3x3 s2 (C -> 2C) + LN, on the patch map and the MSG-token map alike."""

    def __init__(self, dim: int) -> None:
        """Create the layer for ``dim`` input channels."""
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(2 * dim)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def forward(self, x: torch.Tensor, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, W, C)`` patches and ``(B, H/w, W/w, C)`` MSG tokens -> both at half size, 2C channels."""
        return self._down(x), self._down(msg)


class MSGStage(nn.Module):
    """One stage (official ``BasicLayer``): blocks over shuffle regions, then (not in the last) downsampling."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        shuffle_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        downsample: bool = True,
    ) -> None:
        """Create the stage (``drop_path``: one rate per block)."""
        super().__init__()
        self.window_size = window_size
        self.shuffle_size = shuffle_size
        self.grad_checkpointing = False
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                MSGBlock(
                    dim, num_heads, window_size, shuffle_size, mlp_ratio, qkv_bias, drop, attn_drop, rates[j]
                )
                for j in range(depth)
            ]
        )
        self.downsample = MSGPatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks.

        Args:
            x: ``(B, H, W, C)`` patch map (H, W multiples of window x shuffle size).
            msg: ``(B, H/w, W/w, C)`` MSG-token map (one token per window).

        Returns:
            The patch map and MSG-token map after the blocks (before ``downsample``).
        """
        height, width = x.shape[1], x.shape[2]
        ws, gs = self.window_size, self.shuffle_size
        tokens = torch.cat((region_partition(msg, 1, gs), region_partition(x, ws, gs)), dim=2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        x = region_reverse(tokens[:, :, 1:], ws, gs, height, width)
        msg = region_reverse(tokens[:, :, :1], 1, gs, height // ws, width // ws)
        return x, msg


class MSGPatchEmbed(nn.Module):
    """Conv 7x7 stride 4 padding 2 + LayerNorm; NCHW image in, NHWC map out."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class MSGTransformer(nn.Module):
    """MSG-Transformer classifier / backbone (see the module docstring for layout and input sizes)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        shuffle_size: Sequence[int] = (4, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
    ) -> None:
        """Create the model.

        Args:
            num_classes: Classifier outputs (0: no classifier, ``forward`` returns pooled features).
            in_chans: Input channels.
            embed_dim: Channels of stage 0 (doubled at every stage).
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            window_size: Window side w.
            shuffle_size: Shuffle-region side G per stage (windows); stage i's channels must be a multiple of
                G_i^2 where G_i > 1.
            mlp_ratio: MLP hidden width / channels.
            qkv_bias: Bias in the qkv projections.
            drop_rate: Dropout after the patch embedding, attention projections and in the MLPs.
            attn_drop_rate: Attention-weight dropout.
            drop_path_rate: Stochastic depth, ``linspace(0, rate, sum(depths))`` over the blocks in order.
            global_pool: ``'token'`` (the last stage's MSG token, averaged when there are several), ``'avg'``
                (mean of the last stage's patch tokens) or ``''`` (no pooling: ``forward_head`` returns tokens).
        """
        super().__init__()
        if not (len(depths) == len(num_heads) == len(shuffle_size)):
            raise ValueError(
                f"MSGTransformer: depths {tuple(depths)}, num_heads {tuple(num_heads)} and shuffle_size "
                f"{tuple(shuffle_size)} must have one entry per stage"
            )
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_layers = len(depths)
        self.window_size = window_size
        self.shuffle_size = tuple(int(g) for g in shuffle_size)
        self.input_multiple = msg_input_multiple(window_size, self.shuffle_size)
        dims = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.msg_tokens = nn.Parameter(torch.zeros(1, self.shuffle_size[0] ** 2, 1, embed_dim))
        self.in_chans = in_chans  # timm contract attribute
        self.patch_embed = MSGPatchEmbed(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.drop_path_rates = rates
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.layers.append(
                MSGStage(
                    dims[i],
                    depth,
                    num_heads[i],
                    window_size,
                    self.shuffle_size[i],
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    rates[start : start + depth],
                    downsample=i < self.num_layers - 1,
                )
            )
            start += depth
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=dims[i], reduction=PATCH_STRIDE * 2**i, module=f"layers.{i}")
            for i in range(self.num_layers)
        ]
        trunc_normal_(self.msg_tokens, std=0.02)
        named_apply(_init_weights, self)

    # ------------------------------------------------------------------ timm contract
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: embedding, blocks in order (downsampling after its stage)."""
        return dict(
            stem=r"^patch_embed|^msg_tokens",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (recomputed in backward; outputs unchanged)."""
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative-position tables and MSG biases (the official ``no_weight_decay_keywords``)."""
        return {
            name
            for name, _ in self.named_parameters()
            if name.endswith(("relative_position_bias_table", "rel_pos_msg"))
        }

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: none) and optionally the pooling."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else self.msg_tokens
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # the model's device and dtype, and its train/eval mode (timm's reset_classifier contract)
        self.head = head.to(device=ref.device, dtype=ref.dtype).train(self.training)
        named_apply(_init_weights, self.head)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what the selected features do not need (used by ``features_only``); returns their indices."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if max_index < self.num_layers - 1:
            # the last kept stage's downsampling only feeds stages that are gone
            self.layers[max_index].downsample = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # ------------------------------------------------------------------ forward paths
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image -> stage-0 patch map ``(B, H/4, W/4, C)`` and MSG-token map ``(B, H/4w, W/4w, C)``."""
        _check_input_size(x.shape[-2], x.shape[-1], self.input_multiple)
        x = self.pos_drop(self.patch_embed(x))
        height, width = x.shape[1], x.shape[2]
        ws, gs = self.window_size, self.shuffle_size[0]
        regions = (height // (ws * gs)) * (width // (ws * gs)) * x.shape[0]
        msg = region_reverse(self.msg_tokens.expand(regions, -1, -1, -1), 1, gs, height // ws, width // ws)
        return x, msg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage tokens ``(B, R + H*W, C)``: the R MSG tokens (one per last-stage window, row-major;
        R = 1 at 224), then the patch tokens row-major (stride 32). At 224 these are the official tokens."""
        x, msg = self._embed(x)
        for layer in self.layers:
            x, msg = layer(x, msg)
            if layer.downsample is not None:
                x, msg = layer.downsample(x, msg)
        return self.norm(torch.cat((msg.flatten(1, 2), x.flatten(1, 2)), dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of :meth:`forward_features` (see ``global_pool``) and classify."""
        if self.global_pool != "":
            num_msg = x.shape[1] // (1 + self.window_size * self.window_size)
            x = x[:, :num_msg].mean(1) if self.global_pool == "token" else x[:, num_msg:].mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Every stage's patch map after its blocks (strides 4, 8, 16, 32), NCHW or NHWC.

        Args:
            x: Input images.
            indices: Last-n (int) or absolute/negative stage indices; None: all stages.
            norm: Apply the final LayerNorm to the last stage's map.
            stop_early: Stop after the last selected stage (only with ``intermediates_only``).
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: Return only the maps.

        Returns:
            The selected maps, or ``(forward_features output, maps)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NHWC'")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x, msg = self._embed(x)
        last = len(self.layers) - 1
        layers = self.layers[: max_index + 1] if stop_early and intermediates_only else self.layers
        intermediates = []
        for i, layer in enumerate(layers):
            x, msg = layer(x, msg)
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
            if layer.downsample is not None:
                x, msg = layer.downsample(x, msg)
        if intermediates_only:
            return intermediates
        return self.norm(torch.cat((msg.flatten(1, 2), x.flatten(1, 2)), dim=1)), intermediates

    def blocks_in_ramp_order(self) -> list[nn.Module]:
        """All blocks in drop-path ramp order (matches ``self.drop_path_rates``)."""
        return [block for layer in self.layers for block in layer.blocks]


def _check_pool(global_pool: str) -> None:
    if global_pool not in _POOL_TYPES:
        raise ValueError(f"global_pool={global_pool!r}; expected one of {_POOL_TYPES}")


def _init_weights(module: nn.Module, name: str = "") -> None:
    """Official init: Linear trunc_normal(.02) with zero bias, LayerNorm 1/0; convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------- checkpoints
def msg_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check an official-layout checkpoint against ``model`` (no renaming: module names are the official ones).

    - wrappers are removed (``model`` / ``state_dict`` / ``module.``; see ``unwrap_state_dict``);
    - ``head.*`` / ``norm.*`` are dropped when the model has none (``features_only``, ``num_classes=0``);
      a classifier of another ``num_classes`` is dropped with a warning (fresh init);
    - ``patch_embed.proj.weight`` is adapted to another ``in_chans``;
    - anything else missing, unexpected or mis-shaped raises ``RuntimeError`` naming the keys.
    """
    sd = unwrap_state_dict(state_dict)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    variant = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    for prefix in ("head.", "norm."):
        if not any(k.startswith(prefix) for k in expected):
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    note = None
    head = [k for k in sd if k.startswith("head.") and k in expected]
    if any(sd[k].shape != expected[k] for k in head) and all(
        sd[k].shape[1:] == expected[k][1:] for k in head
    ):
        note = (
            f"{variant}: checkpoint classifier {tuple(sd['head.weight'].shape)} differs from the model's "
            f"{tuple(expected['head.weight'])} (other num_classes); the classifier keeps its fresh initialisation"
        )
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    adapt_first_conv(sd, "patch_embed.proj.weight", expected)
    check_state_dict_keys(sd, expected, variant)
    if note:
        warnings.warn(note, stacklevel=2)
    return sd


def _load_pretrained_file(model: MSGTransformer, path: str) -> None:
    """``model.load_pretrained`` hook used by timm for ``pretrained_cfg_overlay=dict(file=...)``."""
    load_pretrained_file(model, path, msg_checkpoint_filter_fn)


MSGTransformer.load_pretrained = _load_pretrained_file  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- registration
def _create_msg(variant: str, pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    return build_on_device(  # timm's device/dtype factory keywords
        lambda **kw: build_model_with_cfg(
            MSGTransformer,
            variant,
            pretrained,
            pretrained_cfg_overlay=local_file_overlay(kw),
            pretrained_filter_fn=msg_checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
            **kw,
        ),
        kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2105.15168",
        **kwargs,
    }


# Official definitions (configs/msg_*_p4_win7_224.yaml). Drop path (T/S/B 0.1/0.3/0.5) is set by the training
# config (timm convention: 0 here).
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "msg_tiny": dict(embed_dim=64, depths=(2, 4, 12, 4), num_heads=(2, 4, 8, 16)),
    "msg_small": dict(embed_dim=96, depths=(2, 4, 12, 4), num_heads=(3, 6, 12, 24)),
    "msg_base": dict(embed_dim=96, depths=(2, 4, 28, 4), num_heads=(3, 6, 12, 24)),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_ARGS})


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> MSGTransformer:
    return _create_msg(name, pretrained=pretrained, **dict(MODEL_ARGS[name], **kwargs))


@register_model
def msg_tiny(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-T (25.1M params, 3.82G MACs at 224)."""
    return _build("msg_tiny", pretrained, kwargs)


@register_model
def msg_small(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-S (56.0M params, 8.46G MACs at 224)."""
    return _build("msg_small", pretrained, kwargs)


@register_model
def msg_base(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-B (84.4M params, 14.24G MACs at 224)."""
    return _build("msg_base", pretrained, kwargs)
