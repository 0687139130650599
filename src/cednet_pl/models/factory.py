"""timm's factory keywords for our models: ``device`` and ``dtype`` of ``timm.create_model``."""

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["build_on_device", "create_family_model"]


def build_on_device(build: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """``build(**kwargs)`` with parameters and buffers created on ``kwargs['device']`` and the floating ones cast to
    ``kwargs['dtype']`` (both popped; timm >= 1.0.20 passes them to every model's factory)."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(**kwargs)
    return model.to(dtype=dtype) if dtype is not None else model


def create_family_model(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable[..., dict[str, torch.Tensor]],
    num_levels: int,
    kwargs: dict[str, Any],
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for one of our families (CEDNet, RevCol, MSG).

    A released checkpoint given as ``pretrained_cfg_overlay=dict(file=PATH)`` goes through ``filter_fn``;
    ``features_only`` takes levels ``0..num_levels-1`` through ``forward_intermediates`` and, for a family with
    heads (a ``with_heads`` argument), builds none; ``device``/``dtype`` as :func:`build_on_device`.
    """
    from timm.models import build_model_with_cfg

    from cednet_pl.models.checkpoint import local_file_overlay

    if kwargs.get("features_only") and "with_heads" in inspect.signature(model_cls).parameters:
        kwargs.setdefault("with_heads", False)
    return build_on_device(
        lambda **kw: build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_cfg_overlay=local_file_overlay(kw),
            pretrained_filter_fn=filter_fn,
            feature_cfg=dict(out_indices=tuple(range(num_levels)), feature_cls="getter"),
            **kw,
        ),
        kwargs,
    )
