"""timm's factory keywords for our models: ``device`` and ``dtype`` of ``timm.create_model``."""

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["build_on_device"]


def build_on_device(build: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """``build(**kwargs)`` with parameters and buffers created on ``kwargs['device']`` and the floating ones cast to
    ``kwargs['dtype']`` (both popped; timm >= 1.0.20 passes them to every model's factory)."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(**kwargs)
    return model.to(dtype=dtype) if dtype is not None else model
