"""RevCol: reversible column networks (a Table A1 baseline of the CEDNet paper).

Paper: "Reversible Column Networks", Cai et al., ICLR 2023, arXiv https://arxiv.org/abs/2212.11696.
Written for cednet-pl from the facts in ``design/baselines.md`` (the official megvii-research/RevCol,
Apache-2.0, was read for names, shapes and arithmetic; no code of it carries over). Module names equal the
official state_dict keys, so released ImageNet checkpoints load 1:1 through
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.

Layout (224x224 input)::

    stem (conv4x4 s4 + LN) -> x
    subnet0 .. subnet{N-1}: columns of four levels (strides 4/8/16/32), each level
        c_l = alpha_l * c_l(previous column) + blocks_l(down(c_{l-1}(this column)) + up(c_{l+1}(previous column)))
    cls_blocks.3: pool -> LN -> Linear on the last column's c3 (the inference head)
    (aux_heads=True) cls_blocks.0-2 and decoder_blocks.0-2 after columns N/4-1, N/2-1, 3N/4-1: the official
        intermediate supervision (classification + image reconstruction), run by ``forward_aux`` only.

``save_memory=True`` trains through :class:`_ReversibleColumn`: each column runs without autograd and keeps
only its outputs; backward rebuilds the column's inputs from its outputs (``(c_new - level(...)) / alpha``),
replaying drop path's RNG and the autocast state, and backpropagates one level at a time.
"""

import contextlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from cednet_pl.models.blocks import DepthwiseConv2d, LayerNorm2d, NeXtBlock, PatchConv2d, PointwiseConv2d
from cednet_pl.models.cednet import _cfg as _cednet_cfg
from cednet_pl.models.cednet import _check_pool, _take_indices, adapt_first_conv
from cednet_pl.models.checkpoint import (
    check_state_dict_keys,
    load_pretrained_file,
    local_file_overlay,
    unwrap_state_dict,
)
from cednet_pl.models.factory import build_on_device

__all__ = ["REVCOL_AUX_PREFIXES", "RevCol", "revcol_checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

# The fast convs branch on the device; timm's FX tracer keeps them as leaves.
for _conv in (DepthwiseConv2d, PatchConv2d, PointwiseConv2d):
    register_notrace_module(_conv)
# The training-only intermediate-supervision heads (their keys in a released checkpoint).
REVCOL_AUX_PREFIXES = ("cls_blocks.0.", "cls_blocks.1.", "cls_blocks.2.", "decoder_blocks.")


def _fx_tracing() -> bool:
    """True while torch.fx symbolically traces the model (the reversible Function cannot be traced)."""
    return bool(torch.fx._symbolic_trace.is_fx_symbolic_tracing())


@torch.fx.wrap
def _clamp_alphas_(a0: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, a3: torch.Tensor) -> int:
    """Official RevCol: before every column's forward, ``|alpha| >= 1e-3`` in place, sign kept (0 stays 0).

    Works on ``.data`` (as the original), so the version counters of the parameters do not change and graphs
    that saved them stay valid. Returns 0 (FX records the call as one opaque node).
    """
    with torch.no_grad():
        for a in (a0, a1, a2, a3):
            d = a.data
            d.copy_(d.sign() * d.abs().clamp(min=1e-3))
    return 0


class UpSample(nn.Module):
    """Upper level -> this level: Linear(C_{l+1} -> C_l) + LayerNorm on NHWC, then nearest 2x upsampling."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.channel_reschedule = nn.Sequential(nn.Linear(in_chs, out_chs), nn.LayerNorm(out_chs, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Fusion(nn.Module):
    """Input of a level: ``down(lower)`` (conv2x2 s2 + LN; identity at level 0) ``+ up(upper)`` (not in the first
    column, not at level 3)."""

    def __init__(self, level: int, dims: Sequence[int], first_col: bool) -> None:
        super().__init__()
        self.down = (
            nn.Sequential(PatchConv2d(dims[level - 1], dims[level], patch=2), LayerNorm2d(dims[level]))
            if level > 0
            else nn.Identity()
        )
        self.up = UpSample(dims[level + 1], dims[level]) if not first_col and level < 3 else None

    def forward(self, lower: torch.Tensor, upper: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
        x = self.down(lower)
        if self.up is not None and upper is not None:
            x = x + self.up(upper)
        return x


class Level(nn.Module):
    """One level of a column: ``fusion`` then ConvNeXt blocks (depthwise kernel 3)."""

    def __init__(
        self,
        level: int,
        dims: Sequence[int],
        depths: Sequence[int],
        kernel_size: int,
        first_col: bool,
        dp_rates: Sequence[float],
    ) -> None:
        super().__init__()
        start = sum(depths[:level])
        self.fusion = Fusion(level, dims, first_col)
        self.blocks = nn.Sequential(
            *[
                NeXtBlock(
                    dims[level], drop_path=dp_rates[start + i], ls_init_value=1e-6, kernel_size=kernel_size
                )
                for i in range(depths[level])
            ]
        )

    def forward(self, lower: torch.Tensor, upper: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
        return self.blocks(self.fusion(lower, upper))


def _shortcut(out: torch.Tensor, alpha: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    # The first column has no previous c (the official code adds alpha * 0, so alpha gets a zero gradient).
    if c is None:
        return out + alpha * 0.0
    return out + alpha * c


class SubNet(nn.Module):
    """One column: four levels and their shortcut scales ``alpha0-3`` (1xCx1x1, init 0.5).

    Args:
        dims: Widths of the four levels.
        depths: Blocks per level.
        kernel_size: Depthwise kernel of the blocks.
        first_col: The first column (no ``up`` fusion, no previous column).
        dp_rates: Drop-path rates of the blocks in order (the same ramp in every column).
        save_memory: Train through the reversible Function.
    """

    def __init__(
        self,
        dims: Sequence[int],
        depths: Sequence[int],
        kernel_size: int,
        first_col: bool,
        dp_rates: Sequence[float],
        save_memory: bool,
    ) -> None:
        super().__init__()
        self.first_col = first_col
        self.save_memory = save_memory
        self.alpha0 = nn.Parameter(torch.full((1, dims[0], 1, 1), 0.5))
        self.alpha1 = nn.Parameter(torch.full((1, dims[1], 1, 1), 0.5))
        self.alpha2 = nn.Parameter(torch.full((1, dims[2], 1, 1), 0.5))
        self.alpha3 = nn.Parameter(torch.full((1, dims[3], 1, 1), 0.5))
        self.level0 = Level(0, dims, depths, kernel_size, first_col, dp_rates)
        self.level1 = Level(1, dims, depths, kernel_size, first_col, dp_rates)
        self.level2 = Level(2, dims, depths, kernel_size, first_col, dp_rates)
        self.level3 = Level(3, dims, depths, kernel_size, first_col, dp_rates)

    def forward(
        self,
        x: torch.Tensor,
        c0: Optional[torch.Tensor],  # noqa: UP045
        c1: Optional[torch.Tensor],  # noqa: UP045
        c2: Optional[torch.Tensor],  # noqa: UP045
        c3: Optional[torch.Tensor],  # noqa: UP045
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _clamp_alphas_(self.alpha0, self.alpha1, self.alpha2, self.alpha3)
        # NOTE: is_scripting alone in the condition, so TorchScript drops the branch (the Function is not scriptable)
        if not torch.jit.is_scripting():  # noqa: SIM102
            if self.save_memory and self.training and torch.is_grad_enabled() and not _fx_tracing():
                return _reversible_column(self, x, c0, c1, c2, c3)
        c0 = _shortcut(self.level0(x, c1), self.alpha0, c0)
        c1 = _shortcut(self.level1(c0, c2), self.alpha1, c1)
        c2 = _shortcut(self.level2(c1, c3), self.alpha2, c2)
        c3 = _shortcut(self.level3(c2, None), self.alpha3, c3)
        return c0, c1, c2, c3

    @torch.jit.ignore
    def levels(self) -> list[Level]:
        return [self.level0, self.level1, self.level2, self.level3]

    @torch.jit.ignore
    def alphas(self) -> list[nn.Parameter]:
        return [self.alpha0, self.alpha1, self.alpha2, self.alpha3]


# ---------------------------------------------------------------------- reversible mode
def _autocast_states(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    kinds = [k for k in dict.fromkeys((device_type, "cpu")) if torch.amp.is_autocast_available(k)]
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


def _reversible_column(
    column: SubNet,
    x: torch.Tensor,
    c0: torch.Tensor | None,
    c1: torch.Tensor | None,
    c2: torch.Tensor | None,
    c3: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = [[p for p in level.parameters() if p.requires_grad] for level in column.levels()]
    params = [p for group in groups for p in group] + column.alphas()
    out = _ReversibleColumn.apply(column, [len(g) for g in groups], x, c0, c1, c2, c3, *params)
    return out[0], out[1], out[2], out[3]


class _ReversibleColumn(torch.autograd.Function):
    """One RevCol column whose forward keeps no activations (inputs: x, c0-c3 of the previous column, the
    trainable parameters of levels 0-3, then alpha0-3).

    Backward goes down from level 3 to level 0: recompute ``o_l = level_l(lower, upper)`` with autograd (the RNG
    state and autocast of the forward replayed), rebuild the previous column's ``c_l = (c'_l - o_l) / alpha_l``,
    and backpropagate ``G_l`` (the gradient on ``c'_l``, completed by level l+1's gradient on its lower input)
    into the parameters, the lower input and the upper input (the rebuilt ``c_{l+1}``). Gradients go through
    ``torch.autograd.grad`` (returned, never accumulated as a side effect), so ``torch.autograd.grad`` to the
    pixels works.
    """

    @staticmethod
    def forward(ctx, column, sizes, x, c0, c1, c2, c3, *params):  # type: ignore[override]
        ctx.column, ctx.sizes, ctx.first = column, sizes, c0 is None
        ctx.autocast = _autocast_states(x.device.type)
        ctx.rng_devices = []
        ctx.cpu_states, ctx.dev_states = [], []
        levels, alphas = column.levels(), column.alphas()
        lowers_prev = [c0, c1, c2, c3]
        new: list[torch.Tensor] = []
        with torch.no_grad():
            for lvl in range(4):
                devices, states = get_device_states(x)
                ctx.rng_devices = devices
                ctx.cpu_states.append(torch.get_rng_state())
                ctx.dev_states.append(states)
                lower = x if lvl == 0 else new[lvl - 1]
                upper = lowers_prev[lvl + 1] if lvl < 3 else None
                new.append(_shortcut(levels[lvl](lower, upper), alphas[lvl], lowers_prev[lvl]))
        ctx.save_for_backward(x, *new)
        return tuple(new)

    @staticmethod
    def backward(ctx, g0, g1, g2, g3):  # type: ignore[override]
        x, *new = ctx.saved_tensors
        column: SubNet = ctx.column
        levels, alphas = column.levels(), column.alphas()
        groups, start = [], 0
        all_params = [p for level in levels for p in level.parameters() if p.requires_grad]
        for n in ctx.sizes:
            groups.append(all_params[start : start + n])
            start += n
        grad_new = [g0, g1, g2, g3]
        grad_old: list[torch.Tensor | None] = [None] * 4
        grad_alpha: list[torch.Tensor | None] = [None] * 4
        grad_params: list[torch.Tensor | None] = []
        grad_x = None
        old: list[torch.Tensor | None] = [None] * 4
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.random.fork_rng(devices=ctx.rng_devices))
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            per_level: list[list[torch.Tensor | None]] = [[] for _ in range(4)]
            for lvl in (3, 2, 1, 0):
                lower = (x if lvl == 0 else new[lvl - 1]).detach().requires_grad_(True)
                upper_src = old[lvl + 1] if lvl < 3 else None
                upper = upper_src.detach().requires_grad_(True) if upper_src is not None else None
                torch.set_rng_state(ctx.cpu_states[lvl])
                if ctx.rng_devices:
                    set_device_states(ctx.rng_devices, ctx.dev_states[lvl])
                out = levels[lvl](lower, upper)
                inputs = [lower] + ([upper] if upper is not None else []) + groups[lvl]
                grads = torch.autograd.grad(out, inputs, grad_new[lvl], allow_unused=True)
                g_lower = grads[0]
                if upper is not None:
                    g_upper = grads[1]
                    if g_upper is not None:
                        grad_old[lvl + 1] = grad_old[lvl + 1] + g_upper  # type: ignore[operator]
                per_level[lvl] = list(grads[1 + (upper is not None) :])
                if lvl == 0:
                    grad_x = g_lower
                elif g_lower is not None:
                    grad_new[lvl - 1] = grad_new[lvl - 1] + g_lower
                alpha = alphas[lvl]
                if ctx.first:
                    grad_alpha[lvl] = torch.zeros_like(alpha)
                else:
                    with torch.no_grad():
                        prev = (new[lvl] - out.detach()) / alpha
                    old[lvl] = prev
                    grad_alpha[lvl] = (grad_new[lvl] * prev).sum((0, 2, 3), keepdim=True).to(alpha.dtype)
                    grad_old[lvl] = grad_new[lvl] * alpha
            for lvl in range(4):
                grad_params.extend(per_level[lvl])
        return (None, None, grad_x, *grad_old, *grad_params, *grad_alpha)


# ---------------------------------------------------------------------- heads
class Classifier(nn.Module):
    """Pool -> LayerNorm -> Linear (``classifier.0``, ``classifier.1``); ``global_pool=''`` keeps the map."""

    def __init__(
        self, in_chs: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.dense = not global_pool
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Sequential(
            nn.LayerNorm(in_chs, eps=1e-6),
            nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity(),
        )

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.dense:
            x = x.permute(0, 2, 3, 1)
        x = self.drop(self.classifier[0](x))
        if not pre_logits:
            x = self.classifier[1](x)
        return x.permute(0, 3, 1, 2) if self.dense else x

    def set_pool(self, global_pool: str) -> None:
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.dense = not global_pool


class Decoder(nn.Module):
    """Image decoder of the intermediate supervision: three steps (conv1x1 + LN + GELU, bilinear 2x with
    align_corners, one ConvNeXt block of MLP ratio 1), then conv1x1 to 48 channels and PixelShuffle(4)."""

    def __init__(self, dims: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        dims = list(reversed(dims))
        self.proj_layers = nn.ModuleList(
            [
                nn.Sequential(PointwiseConv2d(dims[i - 1], dims[i]), LayerNorm2d(dims[i]), nn.GELU())
                for i in range(1, len(dims))
            ]
        )
        self.normal_layers = nn.ModuleList(
            [
                nn.Sequential(NeXtBlock(dims[i], ls_init_value=1e-6, mlp_ratio=1, kernel_size=kernel_size))
                for i in range(1, len(dims))
            ]
        )
        self.projback = nn.Sequential(PointwiseConv2d(dims[-1], 4**2 * 3), nn.PixelShuffle(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj, blocks in zip(self.proj_layers, self.normal_layers, strict=True):
            x = F.interpolate(proj(x), scale_factor=2.0, mode="bilinear", align_corners=True)
            x = blocks(x)
        return self.projback(x)


# ---------------------------------------------------------------------- model
class RevCol(nn.Module):
    """RevCol classifier/backbone (timm model contract).

    ``forward`` returns the last column's logits (train and eval). With ``aux_heads=True`` the official
    intermediate supervision heads are built too; :meth:`forward_aux` returns their outputs.

    Args:
        dims: Widths of the four levels.
        depths: Blocks per level (every column).
        num_columns: Number of columns (a multiple of 4 when ``aux_heads``).
        kernel_size: Depthwise kernel of the blocks.
        in_chans: Input channels.
        num_classes: Classes (0: the head returns the normalised pooled features).
        global_pool: ``'avg'``, ``'max'``, ``'avgmax'`` or ``''``.
        drop_rate: Dropout before the classifier.
        drop_path_rate: End of the linear drop-path ramp over one column's blocks (the same in every column).
        save_memory: Train through the reversible column Function (activations not kept; the official recipe).
        aux_heads: Build ``cls_blocks.0-2`` and ``decoder_blocks.0-2`` (training-only intermediate supervision).
        with_heads: False builds the backbone only (``features_only``).
    """

    #: the training-only heads (``count_params(inference_only=True)`` and ``--inference-only`` skip them)
    training_only_prefixes = REVCOL_AUX_PREFIXES

    def __init__(
        self,
        dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 4, 2),
        num_columns: int = 4,
        kernel_size: int = 3,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        save_memory: bool = False,
        aux_heads: bool = False,
        with_heads: bool = True,
    ) -> None:
        super().__init__()
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 entries (levels 0-3); got {dims} and {depths}")
        if num_columns < 1 or (aux_heads and num_columns % 4):
            raise ValueError(f"num_columns={num_columns}: needs >= 1, and a multiple of 4 with aux_heads")
        _check_pool(global_pool)
        self.dims, self.depths = dims, depths
        self.num_columns = num_columns
        self.in_chans = in_chans  # timm contract attribute
        self.num_classes = num_classes if with_heads else 0
        self.num_features = self.head_hidden_size = dims[3]
        self.drop_rate = drop_rate
        self.aux_heads = bool(aux_heads and with_heads)
        self.grad_checkpointing = False
        total = sum(depths)
        self.drop_path_rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        self.stem = nn.Sequential(PatchConv2d(in_chans, dims[0], patch=4), LayerNorm2d(dims[0]))
        for i in range(num_columns):
            self.add_module(
                f"subnet{i}", SubNet(dims, depths, kernel_size, i == 0, self.drop_path_rates, save_memory)
            )
        if with_heads:
            heads: list[nn.Module] = [nn.Identity() for _ in range(3)]
            if self.aux_heads:
                heads = [Classifier(dims[3], num_classes, global_pool, drop_rate) for _ in range(3)]
            heads.append(Classifier(dims[3], num_classes, global_pool, drop_rate))
            self.cls_blocks = nn.ModuleList(heads)
        else:
            self.cls_blocks = nn.ModuleList()
        if self.aux_heads:
            self.decoder_blocks = nn.ModuleList([Decoder(dims, kernel_size) for _ in range(3)])
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"subnet{num_columns - 1}.level{i}")
            for i in range(4)
        ]
        self.apply(_init_weights)

    # ------------------------------------------------------------------ timm contract
    @torch.jit.ignore
    def columns(self) -> list[SubNet]:
        return [getattr(self, f"subnet{i}") for i in range(self.num_columns)]

    @torch.jit.ignore
    def set_save_memory(self, enable: bool = True) -> None:
        """Switch the reversible training mode of every column."""
        for column in self.columns():
            column.save_memory = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: stem, then the columns in order, then the heads."""
        return dict(stem=r"^stem", blocks=r"^subnet(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every column in the non-reversible mode (the reversible mode recomputes anyway)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The inference classifier (``cls_blocks.3.classifier.1``)."""
        return self.cls_blocks[3].classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace every classifier (the inference head and, if built, the intermediate ones)."""
        if len(self.cls_blocks) == 0:
            raise RuntimeError(
                "this RevCol has no heads (features_only / with_heads=False); no classifier to reset"
            )
        if global_pool is not None:
            _check_pool(global_pool)
        self.num_classes = num_classes
        for head in self.cls_blocks:
            if isinstance(head, Classifier):
                if global_pool is not None:
                    head.set_pool(global_pool)
                linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
                ref = head.classifier[
                    0
                ].weight  # the model's device, dtype and train/eval mode (timm contract)
                head.classifier[1] = linear.to(device=ref.device, dtype=ref.dtype).train(self.training)
                linear.apply(_init_weights)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 4, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the heads (used by ``features_only``); returns the absolute feature indices."""
        take, _ = _take_indices(len(self.feature_info), indices)
        if prune_head:
            self.cls_blocks = nn.ModuleList()
            if hasattr(self, "decoder_blocks"):
                del self.decoder_blocks
            self.aux_heads = False
            self.num_classes = 0
        return take

    # ------------------------------------------------------------------ forward paths
    def _columns_forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        c0: Optional[torch.Tensor] = None  # noqa: UP045
        c1: Optional[torch.Tensor] = None  # noqa: UP045
        c2: Optional[torch.Tensor] = None  # noqa: UP045
        c3: Optional[torch.Tensor] = None  # noqa: UP045
        for column in self.children():
            if hasattr(column, "first_col"):
                # the reversible mode recomputes anyway: checkpointing only the plain mode
                checkpointed = self.grad_checkpointing and not column.save_memory and torch.is_grad_enabled()
                if checkpointed and not torch.jit.is_scripting():
                    c0, c1, c2, c3 = checkpoint(column, x, c0, c1, c2, c3, use_reentrant=False)
                else:
                    c0, c1, c2, c3 = column(x, c0, c1, c2, c3)
        assert c0 is not None and c1 is not None and c2 is not None and c3 is not None
        return c0, c1, c2, c3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last column's c3 (stride 32, ``num_features`` channels), unpooled NCHW."""
        return self._columns_forward(x)[3]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The inference head (``cls_blocks.3``): pool, LayerNorm, (dropout,) classifier."""
        if len(self.cls_blocks) == 0:
            raise RuntimeError(
                "this RevCol has no heads (features_only / with_heads=False); no classifier output"
            )
        return self.cls_blocks[3](x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_aux(
        self, x: torch.Tensor, with_images: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The official intermediate supervision outputs (needs ``aux_heads=True``).

        Args:
            x: Input images.
            with_images: Run the image decoders (False: only the classifiers, e.g. for evaluation).

        Returns:
            ``(logits, images)``: four logits (after columns N/4-1, N/2-1, 3N/4-1, N-1; the last equals
            ``forward(x)``) and three decoded images (logits of the de-normalised input, ``(B, 3, H, W)``).
        """
        if not self.aux_heads:
            raise RuntimeError(
                "forward_aux needs the intermediate-supervision heads: create the model with aux_heads=True"
            )
        interval = self.num_columns // 4
        logits: list[torch.Tensor] = []
        images: list[torch.Tensor] = []
        x = self.stem(x)
        c: tuple[torch.Tensor | None, ...] = (None, None, None, None)
        for i, column in enumerate(self.columns()):
            if self.grad_checkpointing and not column.save_memory and torch.is_grad_enabled():
                c = checkpoint(column, x, *c, use_reentrant=False)
            else:
                c = column(x, *c)
            if (i + 1) % interval == 0:
                k = i // interval
                logits.append(self.cls_blocks[k](c[3]))
                if k < 3 and with_images:
                    images.append(self.decoder_blocks[k](c[3]))
        return logits, images

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The last column's four levels (strides 4-32; ``indices`` select among them).

        Returns:
            The selected features, or ``(c3, features)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: RevCol only outputs NCHW")
        take, _ = _take_indices(len(self.feature_info), indices)
        feats = self._columns_forward(x)
        intermediates = [feats[i] for i in take]
        if intermediates_only:
            return intermediates
        return feats[3], intermediates


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------- checkpoints
def revcol_checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check a released (or converted) RevCol checkpoint against ``model``.

    - wrappers (``model``, Lightning ``state_dict``, ``module.``) are removed;
    - the training-only ``cls_blocks.0-2`` / ``decoder_blocks`` are dropped, with a logged note, when the model
      does not build them; when the model builds them but the checkpoint lacks them they keep their fresh init;
    - heads the model does not have (``features_only``, ``num_classes=0``) are dropped;
    - classifiers of another ``num_classes`` keep their fresh init, with a warning;
    - ``stem.0.weight`` is adapted to another ``in_chans``;
    - anything else missing, unexpected or mis-shaped raises ``RuntimeError`` naming the keys.
    """
    sd = unwrap_state_dict(state_dict)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    variant = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    notes: list[str] = []

    dropped = [k for k in sd if k.startswith(REVCOL_AUX_PREFIXES) and k not in expected]
    if dropped and not any(k.startswith(REVCOL_AUX_PREFIXES) for k in expected):
        _logger.info(
            "%s: dropping the %d training-only intermediate-supervision tensors (cls_blocks.0-2, decoder_blocks); "
            "build the model with aux_heads=True to keep them",
            variant,
            len(dropped),
        )
        sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    if not any(k.startswith("cls_blocks.") for k in expected):
        sd = {k: v for k, v in sd.items() if not k.startswith("cls_blocks.")}
    linear_keys = [k for k in expected if k.startswith("cls_blocks.") and ".classifier.1." in k]
    ckpt_linear = [k for k in sd if k.startswith("cls_blocks.") and ".classifier.1." in k]
    if not linear_keys and ckpt_linear:  # num_classes=0
        sd = {k: v for k, v in sd.items() if k not in set(ckpt_linear)}
    shared = [k for k in linear_keys if k in sd]
    if any(sd[k].shape != expected[k] for k in shared) and all(
        sd[k].shape[1:] == expected[k][1:] for k in shared
    ):
        notes.append(
            f"{variant}: checkpoint classifier shapes {tuple(sd[shared[0]].shape)} differ from the model's "
            f"{tuple(expected[shared[0]])} (other num_classes); the classifiers keep their fresh initialisation"
        )
        sd = {k: v for k, v in sd.items() if k not in set(shared)}
        expected = {k: v for k, v in expected.items() if k not in set(linear_keys)}

    adapt_first_conv(sd, "stem.0.weight", expected)
    aux_all = [k for k in expected if k.startswith(REVCOL_AUX_PREFIXES)]
    optional: list[str] = []
    if aux_all and not any(k in sd for k in aux_all):
        notes.append(
            f"{variant}: checkpoint has no intermediate-supervision heads; they keep their fresh initialisation"
        )
        optional = aux_all
    check_state_dict_keys(sd, expected, variant, optional=optional)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return sd


def _load_pretrained_file(model: RevCol, path: str) -> None:
    """``model.load_pretrained`` hook used by timm for ``pretrained_cfg_overlay=dict(file=...)``."""
    load_pretrained_file(model, path, revcol_checkpoint_filter_fn)


RevCol.load_pretrained = _load_pretrained_file  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- registration
def _create_revcol(variant: str, pretrained: bool = False, **kwargs: Any) -> RevCol:
    if kwargs.get("features_only"):
        kwargs.setdefault("with_heads", False)
    return build_on_device(  # timm's device/dtype factory keywords
        lambda **kw: build_model_with_cfg(
            RevCol,
            variant,
            pretrained,
            pretrained_cfg_overlay=local_file_overlay(kw),
            pretrained_filter_fn=revcol_checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
            **kw,
        ),
        kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return _cednet_cfg(
        classifier="cls_blocks.3.classifier.1", license="apache-2.0", paper_ids="arXiv:2212.11696", **kwargs
    )


# Official definitions (design/baselines.md). Drop path is set by the training config (timm convention);
# the official T/S/B recipe uses 0.1/0.3/0.4.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "revcol_tiny": dict(dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=4),
    "revcol_small": dict(dims=(64, 128, 256, 512), depths=(2, 2, 4, 2), num_columns=8),
    "revcol_base": dict(dims=(72, 144, 288, 576), depths=(1, 1, 3, 2), num_columns=16),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_ARGS})


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> RevCol:
    return _create_revcol(name, pretrained=pretrained, **dict(MODEL_ARGS[name], **kwargs))


@register_model
def revcol_tiny(pretrained: bool = False, **kwargs: Any) -> RevCol:
    """RevCol-T: widths 64-512, blocks (2, 2, 4, 2), 4 columns."""
    return _build("revcol_tiny", pretrained, kwargs)


@register_model
def revcol_small(pretrained: bool = False, **kwargs: Any) -> RevCol:
    """RevCol-S: widths 64-512, blocks (2, 2, 4, 2), 8 columns."""
    return _build("revcol_small", pretrained, kwargs)


@register_model
def revcol_base(pretrained: bool = False, **kwargs: Any) -> RevCol:
    """RevCol-B: widths 72-576, blocks (1, 1, 3, 2), 16 columns."""
    return _build("revcol_base", pretrained, kwargs)
