"""Optimizer and learning-rate schedule construction (pure functions, no Lightning).

The classification recipe (ConvNeXt / CEDNet, section 5 of the design notes): AdamW, no weight decay on norms and
biases, optional layer-wise lr decay through timm (`create_optimizer_v2(layer_decay=...)`, which uses the model's
`group_matcher` and stores an `lr_scale` per param group), linear warmup then cosine decay, updated every optimizer
step. The schedule is a timm scheduler because only timm schedulers apply `lr_scale`; a LightningModule using it
must override `lr_scheduler_step` to call `scheduler.step_update(global_step)` (see `ClassificationModule`).

The dense-prediction modules (detection, instance and semantic segmentation) share their param groups
(`detection_param_groups`), optimizer (`build_dense_optimizer`) and per-step schedules (`build_multistep_scheduler`,
`build_poly_scheduler`) through the `PerStepDenseOptimization` mixin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from cednet_pl.utils.logging import RankedLogger

log = RankedLogger(__name__)


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


def detection_param_groups(
    net: torch.nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    head_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise lr decay (``lr_scale``) and weight decay rules for a detector.

    Layers come from ``net.group_matcher()`` (the backbone trunk's coarse groups: stem -> 0, ``stages.i`` ->
    i + 1); every other parameter (CEDNet's pyramid convs, an FPN, the head) is the top layer, scale 1, and
    layer ``i`` gets ``layer_decay ** (top - i)``. 1-D parameters (norms, biases, layer scales) and the trunk's
    ``no_weight_decay()`` names get no weight decay. ``head_weight_decay`` (1e-4 in the original recipe)
    replaces ``weight_decay`` for the parameters after the backbone: the head and an FPN neck.

    Args:
        net: The detector (:class:`~cednet_pl.models.detection.RetinaNetDetector`).
        weight_decay: Decoupled weight decay of the backbone.
        layer_decay: Layer-wise lr decay factor (None: off).
        head_weight_decay: Weight decay after the backbone (None: ``weight_decay``).
    """
    matcher = net.group_matcher() if layer_decay and hasattr(net, "group_matcher") else {}
    layer_of = group_parameters(net, matcher, reverse=True) if matcher else {}
    top = max(layer_of.values(), default=0)
    no_decay: set[str] = set()
    trunk = getattr(getattr(net, "backbone", None), "trunk", None)
    if trunk is not None and hasattr(trunk, "no_weight_decay"):
        prefix = "backbone.body.model." if trunk is not net.backbone.body else "backbone.body."
        no_decay = {prefix + n for n in trunk.no_weight_decay()}
    groups: dict[tuple[int, float], dict[str, Any]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(name, top)
        after_backbone = not name.startswith("backbone.") or name.startswith("backbone.fpn.")
        if param.ndim <= 1 or name in no_decay:
            decay = 0.0
        elif after_backbone and head_weight_decay is not None:
            decay = float(head_weight_decay)
        else:
            decay = float(weight_decay)
        key = (layer, decay)
        if key not in groups:
            scale = float(layer_decay) ** (top - layer) if layer_decay else 1.0
            groups[key] = {"params": [], "weight_decay": decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_dense_optimizer(net: torch.nn.Module, config: Mapping[str, Any] | None) -> torch.optim.Optimizer:
    """The timm optimizer of a dense-prediction model from its plain config.

    ``config``: ``name`` (adamw), ``lr``, ``weight_decay``, ``layer_decay``, ``head_weight_decay`` (see
    :func:`detection_param_groups`), other timm optimizer kwargs (betas, eps).
    """
    cfg = dict(config or {})
    name = cfg.pop("name", "adamw")
    lr = float(cfg.pop("lr", 1e-4))
    groups = detection_param_groups(
        net,
        weight_decay=cfg.pop("weight_decay", 0.05),
        layer_decay=cfg.pop("layer_decay", None),
        head_weight_decay=cfg.pop("head_weight_decay", None),
    )
    if cfg.get("betas") is not None:
        cfg["betas"] = tuple(cfg["betas"])
    return create_optimizer_v2(groups, opt=name, lr=lr, **cfg)


def per_step_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` result for a timm scheduler stepped every optimizer step."""
    log.info(
        f"lr {optimizer.defaults['lr']:.3g}, {len(optimizer.param_groups)} param groups, "
        f"{total_steps} optimizer steps"
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def build_multistep_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (27 / 36, 33 / 36),
    gamma: float = 0.1,
    warmup_steps: int = 500,
    warmup_factor: float = 0.001,
) -> MultiStepLRScheduler:
    """Linear warmup + step decay, per optimizer step, with milestones as fractions of the run.

    A timm scheduler, so that each param group's ``lr_scale`` (layer decay) is applied; drive it with
    ``step_update(global_step)``.

    Args:
        optimizer: The optimizer.
        total_steps: Optimizer steps of the whole run.
        milestones: Fractions of ``total_steps`` where the lr is multiplied by ``gamma`` (27/36 and 33/36 of the
            COCO 3x schedule), so a shorter run keeps the same shape.
        gamma: Decay factor at each milestone.
        warmup_steps: Linear warmup length in optimizer steps (capped at a tenth of the run).
        warmup_factor: Warmup starts at ``warmup_factor * lr``.
    """
    total_steps = max(1, int(total_steps))
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"scheduler milestones are fractions of the run in (0, 1), got {list(milestones)}")
    warmup = min(int(warmup_steps), total_steps // 10)
    base_lr = max(float(g["lr"]) for g in optimizer.param_groups)
    scheduler = MultiStepLRScheduler(
        optimizer,
        decay_t=[max(1, round(m * total_steps)) for m in milestones],
        decay_rate=gamma,
        warmup_t=warmup,
        warmup_lr_init=base_lr * warmup_factor,
        warmup_prefix=False,
        t_in_epochs=False,
    )
    scheduler.step_update(num_updates=0)
    return scheduler


class PerStepDenseOptimization:
    """``configure_optimizers`` of the dense-prediction modules (a mixin before ``L.LightningModule``).

    The optimizer comes from ``hparams["optimizer"]`` (:func:`build_dense_optimizer`); ``hparams["scheduler"]``
    names a per-step timm schedule (``multistep``: :func:`build_multistep_scheduler`, ``poly``:
    :func:`~cednet_pl.lit.optim.build_poly_scheduler`, ``constant``/``none``), its other keys are the builder's
    kwargs; ``default_schedule`` is used when it names none.
    """

    default_schedule = "multistep"

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_dense_optimizer(self.net, self.hparams["optimizer"])
        sched_cfg = dict(self.hparams["scheduler"] or {})
        name = sched_cfg.pop("name", self.default_schedule)
        if name in ("constant", "none"):
            return {"optimizer": optimizer}
        builders = {"multistep": build_multistep_scheduler, "poly": build_poly_scheduler}
        if name not in builders:
            raise ValueError(
                f"model.scheduler.name={name!r}; expected one of {[*builders, 'constant', 'none']}"
            )
        total = int(self.trainer.estimated_stepping_batches)
        return per_step_schedule(optimizer, builders[name](optimizer, total, **sched_cfg), total)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # NOTE: timm schedulers apply each group's `lr_scale` (layer decay); driven by the optimizer step count
        scheduler.step_update(num_updates=self.global_step)
