"""LightningModule for image classification with deep supervision (CEDNet, arXiv 2302.06052).

The network comes from `timm.create_model(name, **kwargs)`, so the module's hyperparameters (a plain config) fully
describe a checkpoint. CEDNet models expose `forward_stage_logits` (one logits tensor per cascade stage); the loss
is the (weighted) mean of the per-stage losses. RevCol can learn its official intermediate supervision
(`revcol_aux_loss`, `revcol_compound_loss`). Other timm models train through their plain `forward`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cednet_pl.lit.optim import build_optimizer, build_scheduler, resolve_lr, top_lr
from cednet_pl.utils.logging import RankedLogger
from cednet_pl.utils.run import plain

log = RankedLogger(__name__)


def build_net(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with a helpful error for unknown names.

    Args:
        name: A timm model name (CEDNet names are registered by `import cednet_pl`).
        **kwargs: Passed to `timm.create_model` (num_classes, drop_path_rate, pretrained, ...).
    """
    import cednet_pl  # noqa: F401  (registers the CEDNet models with timm)

    if not timm.is_model(name):
        cednets = ", ".join(timm.list_models("cednet*")) or "(none registered)"
        raise ValueError(
            f"unknown model name {name!r}. CEDNet models: {cednets}. Any other timm model works too "
            f"(timm.list_models('*{name.split('_')[0]}*') lists candidates)"
        )
    return timm.create_model(name, **kwargs)


def _strip_net(key: str) -> str | None:
    """``net.<k>`` / ``ema.module.<k>`` -> ``<k>`` (the net's own parameter name); None for other keys."""
    for prefix in ("net.", "ema.module."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def _probe_net(name: str, net_kwargs: Mapping[str, Any]) -> nn.Module:
    """Model `name` built on the meta device (no memory, no weights loaded) to inspect its structure."""
    probe_kwargs = {k: v for k, v in net_kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    with torch.device("meta"):
        return build_net(name, **probe_kwargs)


def _has_stage_heads(name: str, net_kwargs: dict[str, Any]) -> bool:
    """Whether model `name` has per-stage heads for deep supervision (`forward_stage_logits` and the `aux_heads`
    keyword, e.g. CEDNet), probed on the meta device."""
    probe = _probe_net(name, net_kwargs)
    return callable(getattr(probe, "forward_stage_logits", None)) and hasattr(probe, "aux_heads")


def revcol_compound_loss(
    logits: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    image: torch.Tensor,
    target: torch.Tensor,
    criterion: nn.Module,
    image_weight: float = 3.0,
    class_weight: float = 0.7,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RevCol's intermediate-supervision loss (official ``loss.py``).

    ``sum_i [BCEWithLogits(images[i], image) * (1 - i/n) * image_weight + criterion(logits[i], target) * ((i+1)/m)
    * class_weight] + criterion(logits[-1], target)`` over the ``n`` decoders, with ``m = len(logits)``.

    Args:
        logits: The classifiers' logits after columns N/4, N/2, 3N/4, N (the last is the inference head).
        images: The decoders' image logits (one fewer than ``logits``).
        image: The reconstruction target in [0, 1]: the (mixed) input de-normalised; clamped to [0.01, 0.99] here.
        target: Class indices or (mixup) soft targets, whatever ``criterion`` takes.
        criterion: The classification loss.
        image_weight: Reconstruction coefficient (official 3.0).
        class_weight: Intermediate classification coefficient (official 0.7).

    Returns:
        The total and its terms (one per decoder, then the last classifier's).
    """
    if len(images) != len(logits) - 1:
        raise ValueError(
            f"revcol_compound_loss: {len(logits)} logits need {len(logits) - 1} images, got {len(images)}"
        )
    image = image.clamp(0.01, 0.99)
    terms = []
    for i, pred in enumerate(images):
        rec = nn.functional.binary_cross_entropy_with_logits(pred.float(), image.float())
        cls = criterion(logits[i], target)
        terms.append(
            rec * (1 - i / len(images)) * image_weight + cls * ((i + 1) / len(logits)) * class_weight
        )
    terms.append(criterion(logits[-1], target))
    return torch.stack(terms).sum(), terms


_REVCOL_AUX_DEFAULTS = {
    "image_weight": 3.0,
    "class_weight": 0.7,
    "mean": list(IMAGENET_DEFAULT_MEAN),
    "std": list(IMAGENET_DEFAULT_STD),
}


def _revcol_aux_config(value: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `revcol_aux_loss` option as a full plain dict (None: off)."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(_REVCOL_AUX_DEFAULTS)
    if not isinstance(value, Mapping):
        raise ValueError(f"revcol_aux_loss must be true/false/null or a mapping, got {value!r}")
    unknown = sorted(set(value) - set(_REVCOL_AUX_DEFAULTS))
    if unknown:
        raise ValueError(
            f"revcol_aux_loss: unknown keys {unknown}; expected some of {sorted(_REVCOL_AUX_DEFAULTS)}"
        )
    cfg = {**_REVCOL_AUX_DEFAULTS, **value}
    if len(cfg["mean"]) != len(cfg["std"]):
        raise ValueError(f"revcol_aux_loss: mean {cfg['mean']} and std {cfg['std']} differ in length")
    return {k: (list(v) if isinstance(v, list | tuple) else float(v)) for k, v in cfg.items()}


class ClassificationModule(L.LightningModule):
    """Image classification: deep supervision, mixup/cutmix, label smoothing, layer decay, EMA, top-1/5 metrics.

    Args:
        net: Plain config of the network: `name` (timm model name) plus `timm.create_model` kwargs, e.g.
            `{name: cednet_next_tiny, num_classes: 1000, drop_path_rate: 0.1}`.
        deep_supervision: Train every cascade stage's head (needs `net.forward_stage_logits`); otherwise only the
            last head.
        stage_weights: Loss weight of each stage (length = number of stages); None = equal weights (the mean).
        label_smoothing: Label smoothing (inside mixup's soft targets when mixup is on).
        mixup: timm `Mixup` kwargs (mixup_alpha, cutmix_alpha, prob, switch_prob, mode, ...) or None for off.
            The train batch size must be even (train loaders drop the last batch).
        optimizer: `name`, `lr` (explicit) or `base_lr` + `base_batch_size` (linear scaling by the global batch
            size = per-device batch * world size * accumulation), `weight_decay`, `layer_decay`, other timm
            optimizer kwargs.
        scheduler: `name` (cosine/constant), `warmup_epochs` or `warmup_steps`, `warmup_lr`, `min_lr`.
        ema: `decay` plus optional `ModelEmaV3` kwargs (use_warmup, update_after_step, ...), or None for off.
            The EMA copy is evaluated next to the raw weights (val/acc1_ema, val/acc5_ema).
        channels_last: Use the channels-last memory format (faster convolutions on GPUs with tensor cores).
        revcol_aux_loss: RevCol's intermediate supervision (the official recipe): `true` or a mapping with
            `image_weight` (3.0), `class_weight` (0.7) and the data normalisation `mean`/`std` (ImageNet's), used to
            de-normalise the input into the reconstruction target; `null`/`false` is off. Builds the net with
            `aux_heads=True` and logs every classifier's top-1 (`acc1_stage0-3`).
    """

    #: metric that checkpointing/early stopping watch unless the config says otherwise
    monitor = "val/acc1"
    monitor_mode = "max"
    task = "classification"

    def __init__(
        self,
        net: Mapping[str, Any],
        deep_supervision: bool = True,
        stage_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.1,
        mixup: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        revcol_aux_loss: bool | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        net = dict(plain(net))
        revcol_aux = _revcol_aux_config(plain(revcol_aux_loss))
        if revcol_aux is not None and str(net.get("name", "")).startswith("revcol_"):
            net.setdefault("aux_heads", True)
        stage_weights = plain(stage_weights)
        mixup = plain(mixup)
        optimizer = plain(optimizer)
        scheduler = plain(scheduler)
        ema = plain(ema)
        self.save_hyperparameters(
            {
                "net": net,
                "deep_supervision": deep_supervision,
                "stage_weights": list(stage_weights) if stage_weights is not None else None,
                "label_smoothing": label_smoothing,
                "mixup": mixup,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "ema": ema,
                "channels_last": channels_last,
                "revcol_aux_loss": revcol_aux,
            },
            logger=False,
        )
        if "name" not in net:
            raise ValueError(f"`net` config needs a `name` (a timm model name), got keys {sorted(net)}")
        net_kwargs = dict(net)
        name = net_kwargs.pop("name")
        if deep_supervision and "aux_heads" not in net_kwargs and _has_stage_heads(name, net_kwargs):
            net_kwargs["aux_heads"] = True  # the training-only heads of every cascade stage
        self.net = build_net(name, **net_kwargs)
        self.num_classes = int(self.net.num_classes)
        self.class_names: list[str] | None = None  # from the datamodule; stored in checkpoints
        has_stages = callable(getattr(self.net, "forward_stage_logits", None))
        self.deep_supervision = bool(deep_supervision and has_stages)
        self.num_stages = int(getattr(self.net, "num_stages", 1)) if has_stages else 1
        self.revcol_aux = revcol_aux
        if revcol_aux is not None:
            if not getattr(self.net, "aux_heads", False) or not callable(
                getattr(self.net, "forward_aux", None)
            ):
                raise ValueError(
                    f"revcol_aux_loss needs a RevCol net with aux_heads=True; {self.hparams['net']['name']} "
                    f"(aux_heads={net.get('aux_heads')}) has no intermediate-supervision heads"
                )
            self.deep_supervision = False
            self.num_stages = 4
            self.register_buffer(
                "_img_mean", torch.tensor(revcol_aux["mean"]).view(1, -1, 1, 1), persistent=False
            )
            self.register_buffer(
                "_img_std", torch.tensor(revcol_aux["std"]).view(1, -1, 1, 1), persistent=False
            )
        self.stage_weights = self._check_stage_weights(stage_weights)

        self.mixup_fn = (
            Mixup(**{"label_smoothing": label_smoothing, **mixup, "num_classes": self.num_classes})
            if mixup
            else None
        )
        self.label_smoothing = float(label_smoothing)
        self.train_criterion: nn.Module = (
            SoftTargetCrossEntropy()
            if self.mixup_fn is not None
            else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

        self.ema: ModelEmaV3 | None = None
        if ema:
            ema_kwargs = dict(ema)
            self.ema = ModelEmaV3(self.net, **ema_kwargs)
            # NOTE: frozen, so DDP leaves the copy out of gradient reduction and the optimizer never sees it
            self.ema.requires_grad_(False)
            # NOTE: the copy only runs inside validation, where Lightning switches everything to eval mode
            self.ema.train()
        self._ema_step = -1

        k5 = min(5, self.num_classes)
        stage_ids = range(self.num_stages) if self.num_stages > 1 else ()
        self.train_metrics = MetricCollection(self._acc_metrics(k5, stage_ids))
        val = self._acc_metrics(k5, stage_ids)
        if self.ema is not None:
            val["acc1_ema"] = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
            val["acc5_ema"] = MulticlassAccuracy(self.num_classes, top_k=k5, average="micro")
        # NOTE: a torchmetrics mean (float sum + weight states), not self.log(sync_dist=True): Lightning floors the
        # synced batch count when DDP ranks see unequal sample counts (Lightning #21859), e.g. 351 val images on 2 ranks
        val["loss"] = MeanMetric()
        self.val_metrics = MetricCollection(val)
        self.test_metrics = self.val_metrics.clone()
        self._tp_images = 0
        self._tp_seconds = 0.0
        self._tp_last: float | None = None

    def _acc_metrics(self, k5: int, stage_ids: Sequence[int]) -> dict[str, MulticlassAccuracy]:
        metrics = {
            "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(self.num_classes, top_k=k5, average="micro"),
        }
        for i in stage_ids:
            metrics[f"acc1_stage{i}"] = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        return metrics

    def _check_stage_weights(self, weights: Sequence[float] | None) -> list[float]:
        if weights is None:
            return [1.0] * self.num_stages
        weights = [float(w) for w in weights]
        if len(weights) != self.num_stages:
            raise ValueError(
                f"stage_weights has {len(weights)} entries but {self.hparams['net']['name']} has "
                f"{self.num_stages} cascade stages"
            )
        if sum(weights) <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"stage_weights must be non-negative with a positive sum, got {weights}")
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def stage_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every supervised stage (just the last head when not deep-supervised)."""
        if self.revcol_aux is not None:
            return list(self.net.forward_aux(x, with_images=False)[0])
        if self.deep_supervision:
            return list(self.net.forward_stage_logits(x))
        return [self.net(x)]

    def _update_acc(self, metrics: MetricCollection, logits: list[torch.Tensor], y: torch.Tensor) -> None:
        last = logits[-1].detach()
        metrics["acc1"].update(last, y)
        metrics["acc5"].update(last, y)
        if len(logits) > 1:
            for i, stage in enumerate(logits):
                metrics[f"acc1_stage{i}"].update(stage.detach(), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = self._prepare(x)
        if self.mixup_fn is not None:
            if x.shape[0] % 2 == 0:
                x, target = self.mixup_fn(x, y)
            else:
                target = mixup_target(y, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        else:
            target = y
        if self.revcol_aux is not None:
            logits, images = self.net.forward_aux(x)
            image = x.float() * self._img_std + self._img_mean  # the (mixed) input, de-normalised (official)
            loss, losses = revcol_compound_loss(
                logits,
                images,
                image,
                target,
                self.train_criterion,
                self.revcol_aux["image_weight"],
                self.revcol_aux["class_weight"],
            )
        else:
            logits = self.stage_logits(x)
            losses = [self.train_criterion(out, target) for out in logits]
            weights = self.stage_weights if len(logits) == len(self.stage_weights) else [1.0] * len(logits)
            loss = sum(w * stage_loss for w, stage_loss in zip(weights, losses, strict=True)) / sum(weights)

        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        if len(losses) > 1:
            for i, stage_loss in enumerate(losses):
                self.log(f"train/loss_stage{i}", stage_loss.detach(), on_step=True, on_epoch=False)
        self._update_acc(self.train_metrics, logits, y)
        self.log_dict({f"train/{k}": m for k, m in self.train_metrics.items()}, on_step=False, on_epoch=True)
        if self._trainer is not None and self._trainer.optimizers:
            self.log(
                "train/lr", top_lr(self.trainer.optimizers[0]), on_step=True, on_epoch=False, prog_bar=True
            )
        return loss

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metrics: MetricCollection
    ) -> None:
        x, y = batch
        keep = y >= 0  # a negative label marks an image the dataset could not decode: not counted
        if not bool(keep.all()):
            x, y = x[keep], y[keep]
            if y.numel() == 0:
                return
        x = self._prepare(x)
        logits = self.stage_logits(x)
        loss = nn.functional.cross_entropy(logits[-1], y)
        metrics["loss"].update(loss.detach(), weight=x.shape[0])
        self._update_acc(metrics, logits, y)
        if self.ema is not None and "acc1_ema" in metrics:
            ema_logits = self.ema.module(x)
            metrics["acc1_ema"].update(ema_logits, y)
            metrics["acc5_ema"].update(ema_logits, y)
        self.log_dict(
            {f"{split}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True, prog_bar=False
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.net(self._prepare(x)).softmax(dim=-1)

    # EMA and throughput bookkeeping
    def setup(self, stage: str) -> None:
        # one image at the data's size (else the model's default input size): Lightning's model summary runs it to
        # print true FLOPs and tensor sizes
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        size = (
            getattr(dm, "image_size", None)
            or (getattr(dm, "hparams", None) or {}).get("image_size")
            or (getattr(self.net, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        )
        self.example_input_array = torch.zeros(1, 3, int(size), int(size))
        names = getattr(dm, "class_names", None) if dm is not None else None
        if names is not None:
            if len(names) != self.num_classes:
                raise ValueError(
                    f"the datamodule names {len(names)} classes but the model has num_classes={self.num_classes}"
                )
            self.class_names = [str(n) for n in names]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.class_names is not None:
            checkpoint["class_names"] = list(self.class_names)  # named predictions (cednet-predict)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("class_names"):
            self.class_names = [str(n) for n in checkpoint["class_names"]]
        # a module built without EMA (e.g. cednet-eval ema=false) ignores the checkpoint's EMA copy
        state = checkpoint.get("state_dict") or {}
        if self.ema is None and any(k.startswith("ema.") for k in state):
            state = {k: v for k, v in state.items() if not k.startswith("ema.")}
        # a module built without the training-only stage heads (deep_supervision=false) ignores them
        own = set(self.state_dict())
        aux = self._aux_head_keys() if any(k not in own for k in state) else set()
        dropped = {k for k in state if _strip_net(k) in aux}
        if dropped:
            log.info(
                "the checkpoint carries %d tensors of the training-only stage heads (e.g. %s); this module was "
                "built without them (deep_supervision=false), so they are not loaded",
                len(dropped),
                min(dropped),
            )
            state = {k: v for k, v in state.items() if k not in dropped}
        if state is not checkpoint.get("state_dict"):
            checkpoint["state_dict"] = state

    def _aux_head_keys(self) -> set[str]:
        """Parameter names of the net's training-only heads that this module's net lacks (``aux_heads=False``),
        from a meta-device probe with ``aux_heads=True`` (empty for nets without such heads)."""
        if getattr(self.net, "aux_heads", True):
            return set()
        net_kwargs = dict(self.hparams["net"])
        probe = _probe_net(net_kwargs.pop("name"), {**net_kwargs, "aux_heads": True})
        return set(probe.state_dict()) - set(self.net.state_dict())

    def on_train_start(self) -> None:
        self.val_metrics.reset()

    def on_train_epoch_start(self) -> None:
        self._tp_images, self._tp_seconds, self._tp_last = 0, 0.0, None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.net, step=self.global_step)
        now = time.perf_counter()
        if self._tp_last is not None:
            self._tp_images += int(batch[0].shape[0])
            self._tp_seconds += now - self._tp_last
        self._tp_last = now

    def on_validation_start(self) -> None:
        self._tp_last = None

    def on_train_epoch_end(self) -> None:
        if self._tp_seconds > 0:
            world = self._trainer.world_size if self._trainer is not None else 1
            self.log(
                "train/throughput", self._tp_images * world / self._tp_seconds, on_step=False, on_epoch=True
            )

    def _global_batch_size(self) -> int:
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            batch = getattr(trainer.train_dataloader, "batch_size", None) or 1
        return int(batch) * trainer.world_size * int(trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = dict(self.hparams["optimizer"] or {"name": "adamw", "lr": 1e-3})
        global_batch = self._global_batch_size()
        lr = resolve_lr(
            cfg.pop("lr", None), cfg.pop("base_lr", None), cfg.pop("base_batch_size", None), global_batch
        )
        optimizer = build_optimizer(self.net, lr=lr, **cfg)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = build_scheduler(
            optimizer, total, total / epochs, **(self.hparams["scheduler"] or {"name": "constant"})
        )
        log.info(
            f"lr {lr:.3g} (global batch {global_batch}), {len(optimizer.param_groups)} param groups, "
            f"{total} optimizer steps"
        )
        if scheduler is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # NOTE: timm schedulers apply each group's `lr_scale` (layer decay); driven by the optimizer step count
        scheduler.step_update(num_updates=self.global_step)
