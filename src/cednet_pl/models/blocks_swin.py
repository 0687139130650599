"""Swin block family for CEDNet (``cednet_swin_tiny``).

The base block is a Swin Transformer block (Liu et al., 2021): window multi-head self attention with a
relative position bias, shifted windows on odd block indices within a level, then an MLP; both residual,
no layer scale. Heads = C / 32, window 7.

The focal block (the Swin counterpart of CEDNet's dilated "DNeXt" block, arXiv 2302.06052) keeps the
residual unit of the base block, but inside it adds two residual branches on the normalised input:
``y = norm1(x); y = y + act(LN(WMSA(y))); y = y + act(LN(dwconv7x7_dil3(y))); x = x + drop_path(y)``.

Module names follow the released CEDNet checkpoints (``norm1``, ``attn.qkv``, ``attn.proj``,
``attn.relative_position_bias_table``, ``attn.relative_position_index``, ``norm2``, ``pwconv1``, ``pwconv2``,
and for the focal block ``norm_act1.0``, ``dwconv2``, ``norm_act2.0``).

Blocks take and return NCHW tensors; internally they work channels-last (NHWC), so a channels-last NCHW
input makes the entry/exit permutes free. Attention runs through ``F.scaled_dot_product_attention`` with the
relative position bias (plus the shifted-window mask) as an additive float mask; the dilated depthwise conv
runs through :func:`dilated_dwconv2d` (an exact, faster rewrite on CPU).

Windows: maps whose sides are not a multiple of the window are zero-padded at the bottom/right after
``norm1`` (as the released detection backbone does); padded tokens are not masked.

Shifted windows on a map that fits one window (e.g. 7x7 at stride 32 for a 224 input), two forms:

- ``shift_mode="released"`` (family ``"swin"``, used by ``cednet_swin_tiny``): as the released CEDNet code,
  the forward cyclic shift (and its mask) is applied only when the (padded) height exceeds the window, but
  the reverse shift (``torch.roll`` by ``+window // 2``) is always applied. On a one-window map the block's
  attention output is therefore rolled by ``(3, 3)`` for window 7. The released checkpoints were trained
  with this behaviour; it is needed to reproduce their logits.
- ``shift_mode="symmetric"`` (family ``"swin_symmetric"``, e.g.
  ``timm.create_model("cednet_swin_tiny", family="swin_symmetric")``): neither roll on a map that fits one
  window (height and width), the textbook Swin behaviour.

The blocks are FX leaves (the shift and padding depend on the map size) and are TorchScript-compatible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_notrace_module
from torch import nn

from cednet_pl.models.blocks import BlockFamily, DilatedDepthwiseConv2d, LayerNorm2d, register_family

__all__ = [
    "SHIFT_MASK_VALUE",
    "SHIFT_MODES",
    "SWIN_FAMILY",
    "SWIN_SYMMETRIC_FAMILY",
    "SwinBlock",
    "SwinFocalBlock",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

# Additive mask value between tokens of different regions after the cyclic shift (as the released model).
SHIFT_MASK_VALUE = -100.0
SHIFT_MODES = ("released", "symmetric")


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the ``(2w-1)^2`` relative position table for every (query, key) pair of a window.

    Args:
        window_size: Window side ``w``.

    Returns:
        Long tensor ``(w*w, w*w)``; entry ``[i, j]`` encodes ``(dy + w - 1) * (2w - 1) + (dx + w - 1)``
        with ``(dy, dx)`` = position of token i minus position of token j (row-major tokens).
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), in [0, 2w-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split ``(B, H, W, C)`` (H, W multiples of the window) into ``(B, nW, w*w, C)``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, w*w, C)`` -> ``(B, H, W, C)``."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def shifted_window_mask(
    height: int,
    width: int,
    window_size: int,
    shift_size: int,
    device: torch.device | None = None,
    mask_value: float = SHIFT_MASK_VALUE,
) -> torch.Tensor:
    """Additive attention mask for shifted windows on a (padded) ``height x width`` map.

    After the cyclic shift by ``-shift_size``, a window at the bottom/right border holds tokens from up to
    four regions that were not adjacent in the image. Tokens may only attend to tokens of their own region.

    Args:
        height: Map height, a multiple of ``window_size``.
        width: Map width, a multiple of ``window_size``.
        window_size: Window side.
        shift_size: Cyclic shift (0 < shift_size < window_size).
        device: Device of the returned mask.
        mask_value: Additive value across regions (an argument, not a global: TorchScript).

    Returns:
        Float tensor ``(nW, w*w, w*w)``: 0 within a region, ``mask_value`` across regions.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    # region index per row/column: [0, H-w) -> 0, [H-w, H-s) -> 1, [H-s, H) -> 2
    region_h = (rows >= height - window_size).long() + (rows >= height - shift_size).long()
    region_w = (cols >= width - window_size).long() + (cols >= width - shift_size).long()
    labels = (region_h[:, None] * 3 + region_w[None, :])[None, :, :, None]  # (1, H, W, 1)
    labels = window_partition(labels, window_size)[0, :, :, 0]  # (nW, N)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, mask_value)


class WindowAttention(nn.Module):
    """Multi-head self attention inside non-overlapping windows, with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True) -> None:
        """Create the attention.

        Args:
            dim: Channels C (a multiple of ``num_heads``).
            num_heads: Attention heads.
            window_size: Window side w; the bias table has ``(2w-1)^2`` rows.
            qkv_bias: Bias in the qkv projection.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # persistent: the released checkpoints contain it
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias ``(heads, w*w, w*w)`` added to the attention logits."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            windows: ``(B, nW, N, C)`` tokens, N = w*w.
            mask: Optional additive mask ``(nW, N, N)`` (shifted windows).

        Returns:
            ``(B, nW, N, C)``.
        """
        b, nw, n, c = windows.shape
        qkv = self.qkv(windows).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, head_dim)
        attn_mask = self.relative_position_bias()  # (heads, N, N)
        if mask is not None:
            attn_mask = attn_mask.unsqueeze(0) + mask.unsqueeze(1)  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


@register_notrace_module
class SwinBlock(nn.Module):
    """Swin Transformer block (base block of the Swin family); NCHW in, NCHW out."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        index: int = 0,
        window_size: int = 7,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_eps: float = 1e-6,
        shift_mode: str = "released",
    ) -> None:
        """Create the block.

        Args:
            dim: Channels C.
            drop_path: Stochastic depth rate of both residual branches.
            index: Index of the block within its level; odd indices use shifted windows.
            window_size: Window side (7 in the released models).
            head_dim: Channels per head; heads = max(1, C // head_dim) (C / 32 in the released models).
            mlp_ratio: Hidden width of the MLP relative to C.
            act_layer: Activation of the MLP (and of the focal branches).
            norm_eps: LayerNorm epsilon.
            shift_mode: ``"released"`` or ``"symmetric"``: the shift on a map that fits one window (module
                docstring).
        """
        super().__init__()
        if shift_mode not in SHIFT_MODES:
            raise ValueError(f"SwinBlock: shift_mode={shift_mode!r}; expected one of {SHIFT_MODES}")
        self.shift_mode = shift_mode
        self.dim = dim
        self.window_size = window_size
        self.shift_size = window_size // 2 if index % 2 else 0
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads=max(1, dim // head_dim), window_size=window_size)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted) window attention over a ``(B, H, W, C)`` map; pads to a window multiple and crops back."""
        _, h, w, _ = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        shift = self.shift_size
        if self.shift_mode == "released":
            # the released code: forward shift only when H exceeds the window, reverse shift always
            fwd, rev = shift if hp > ws else 0, shift
        else:
            fwd = rev = shift if max(hp, wp) > ws else 0
        mask: torch.Tensor | None = None
        if fwd > 0:
            x = torch.roll(x, shifts=(-fwd, -fwd), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, fwd, device=x.device)
        x = window_reverse(self.attn(window_partition(x, ws), mask), ws, hp, wp)
        if rev > 0:
            x = torch.roll(x, shifts=(rev, rev), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :h, :w, :]
        return x

    def token_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """First residual unit on a ``(B, H, W, C)`` map."""
        return x + self.drop_path(self.window_attention(self.norm1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        x = self.token_mixer(x.permute(0, 2, 3, 1))
        x = x + self.drop_path(self.pwconv2(self.act(self.pwconv1(self.norm2(x)))))
        return x.permute(0, 3, 1, 2)


@register_notrace_module
class SwinFocalBlock(SwinBlock):
    """Swin focal block: window attention and a dilated dw7x7, each followed by LN + act, each residual."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        index: int = 0,
        window_size: int = 7,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_eps: float = 1e-6,
        dilation: int = 3,
        shift_mode: str = "released",
    ) -> None:
        """Create the block.

        Args:
            dim: Channels C.
            drop_path: Stochastic depth rate.
            index: Index of the block within its level; odd indices use shifted windows.
            window_size: Window side.
            head_dim: Channels per head.
            mlp_ratio: Hidden width of the MLP relative to C.
            act_layer: Activation.
            norm_eps: LayerNorm epsilon.
            dilation: Dilation of the depthwise 7x7 conv (3 in the released models).
            shift_mode: See :class:`SwinBlock`.
        """
        super().__init__(
            dim, drop_path, index, window_size, head_dim, mlp_ratio, act_layer, norm_eps, shift_mode
        )
        self.norm_act1 = nn.Sequential(nn.LayerNorm(dim, eps=norm_eps), act_layer())
        self.dwconv2 = DilatedDepthwiseConv2d(dim, kernel_size=7, dilation=dilation)
        self.norm_act2 = nn.Sequential(nn.LayerNorm(dim, eps=norm_eps), act_layer())

    def token_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """Attention branch and dilated-conv branch, both residual on the normalised input."""
        y = self.norm1(x)
        y = y + self.norm_act1(self.window_attention(y))
        y = y + self.norm_act2(self.dwconv2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x + self.drop_path(y)


def _swin_family(name: str, shift_mode: str) -> BlockFamily:
    def base(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
        return SwinBlock(dim, drop_path=drop_path, index=index, shift_mode=shift_mode)

    def focal(dim: int, *, drop_path: float, ls_init_value: float | None, index: int) -> nn.Module:
        return SwinFocalBlock(dim, drop_path=drop_path, index=index, shift_mode=shift_mode)

    return register_family(
        BlockFamily(name=name, base_block=base, focal_block=focal, norm2d=LayerNorm2d, act=nn.GELU)
    )


SWIN_FAMILY = _swin_family("swin", "released")
SWIN_SYMMETRIC_FAMILY = _swin_family("swin_symmetric", "symmetric")
