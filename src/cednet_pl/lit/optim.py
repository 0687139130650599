"""Optimizer and learning-rate schedule construction (pure functions, no Lightning).

The classification recipe (ConvNeXt / CEDNet, section 5 of the design notes): AdamW, no weight decay on norms and
biases, optional layer-wise lr decay through timm (`create_optimizer_v2(layer_decay=...)`, which uses the model's
`group_matcher` and stores an `lr_scale` per param group), linear warmup then cosine decay, updated every optimizer
step. The schedule is a timm scheduler because only timm schedulers apply `lr_scale`; a LightningModule using it
must override `lr_scheduler_step` to call `scheduler.step_update(global_step)` (see `ClassificationModule`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn


def scale_lr(base_lr: float, base_batch_size: int, batch_size: int) -> float:
    """Linear lr scaling: `base_lr * batch_size / base_batch_size`.

    Args:
        base_lr: Learning rate at the reference batch size (4e-3 for the ImageNet recipe).
        base_batch_size: Reference global batch size (4096).
        batch_size: Effective global batch size = per-device batch * devices * nodes * gradient accumulation.
    """
    if base_batch_size <= 0 or batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got base={base_batch_size}, actual={batch_size}")
    return base_lr * batch_size / base_batch_size


def resolve_lr(
    lr: float | None, base_lr: float | None, base_batch_size: int | None, global_batch_size: int
) -> float:
    """The lr to use: an explicit `lr` wins, else `base_lr` scaled to the global batch size."""
    if lr is not None:
        return float(lr)
    if base_lr is None or base_batch_size is None:
        raise ValueError("optimizer config needs either `lr` or both `base_lr` and `base_batch_size`")
    return scale_lr(float(base_lr), int(base_batch_size), global_batch_size)


def build_optimizer(
    model: nn.Module,
    lr: float,
    name: str = "adamw",
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Create a timm optimizer for a bare model (not a LightningModule, so EMA copies and metrics stay out).

    1-D parameters (biases, norm weights, layer scale) and the model's `no_weight_decay()` names get no weight decay.
    With `layer_decay`, param groups follow the model's `group_matcher` (CEDNet: stem -> 0, stages.i -> i+1, heads
    -> top) and carry `lr_scale = layer_decay ** (num_layers - layer)`.

    Args:
        model: The network whose parameters are optimised.
        lr: Base learning rate (of the top layer).
        name: timm optimizer name (`adamw`, `sgd`, `lamb`, ...).
        weight_decay: Decoupled weight decay.
        layer_decay: Layer-wise lr decay factor (None: off).
        **kwargs: Passed to `timm.optim.create_optimizer_v2` (betas, eps, momentum, ...).
    """
    if "betas" in kwargs and kwargs["betas"] is not None:
        kwargs["betas"] = tuple(kwargs["betas"])
    return create_optimizer_v2(
        model,
        opt=name,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        filter_bias_and_bn=True,
        **kwargs,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    name: str = "cosine",
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
    warmup_lr: float = 0.0,
    min_lr: float = 1e-6,
) -> Scheduler | None:
    """Per-step warmup + cosine schedule (timm), or None for a constant lr.

    Args:
        optimizer: The optimizer (param groups may carry `lr_scale`).
        total_steps: Optimizer steps of the whole run (`trainer.estimated_stepping_batches`).
        steps_per_epoch: Optimizer steps per epoch (converts `warmup_epochs` into steps).
        name: "cosine" or "constant"/"none".
        warmup_epochs: Linear warmup length in epochs.
        warmup_steps: Warmup length in steps (wins over `warmup_epochs`).
        warmup_lr: Learning rate at step 0.
        min_lr: Final learning rate of the cosine.

    Returns:
        A timm scheduler driven by `step_update(num_updates)` (already applied for step 0), or None.
    """
    if name in ("constant", "none", None):
        return None
    if name != "cosine":
        raise ValueError(f"unknown scheduler name {name!r}; expected 'cosine' or 'constant'")
    total_steps = max(1, int(total_steps))
    warmup = int(warmup_steps) if warmup_steps is not None else math.ceil(warmup_epochs * steps_per_epoch)
    warmup = min(max(0, warmup), total_steps - 1) if total_steps > 1 else 0
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scheduler.step_update(num_updates=0)
    return scheduler


def top_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest current lr over param groups (the top layer's lr with layer decay)."""
    return max(float(g["lr"]) for g in optimizer.param_groups)


def build_poly_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
) -> Scheduler:
    """Per-step poly decay ``lr * (1 - t / T) ** power`` with linear warmup from ``warmup_ratio * lr`` (timm).

    The mmseg recipe (ADE20K 160k): power 1, min_lr 0, 1500 warmup iterations from ratio 1e-6. A timm
    scheduler, so each group's ``lr_scale`` (layer decay) applies; drive it with ``step_update(global_step)``.

    Args:
        optimizer: The optimizer (param groups may carry ``lr_scale``).
        total_steps: Optimizer steps of the whole run.
        power: Poly exponent.
        min_lr: Final learning rate.
        warmup_steps: Linear warmup length in steps (capped below the run length).
        warmup_ratio: Warmup starts at ``warmup_ratio * lr``.
    """
    from timm.scheduler import PolyLRScheduler

    total_steps = max(1, int(total_steps))
    warmup = min(max(0, int(warmup_steps)), total_steps - 1)
    base_lr = max(float(g["lr"]) for g in optimizer.param_groups)
    scheduler = PolyLRScheduler(
        optimizer,
        t_initial=total_steps,
        power=power,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=base_lr * warmup_ratio,
        warmup_prefix=False,
        t_in_epochs=False,
    )
    scheduler.step_update(num_updates=0)
    return scheduler
