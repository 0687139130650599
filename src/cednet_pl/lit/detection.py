"""LightningModule for COCO-style detection with RetinaNet (CEDNet pyramid or timm + FPN backbones).

``DetectionModule.net`` is a :class:`~cednet_pl.models.detection.RetinaNetDetector` (torchvision RetinaNet);
``net.forward_with_loss(images, targets)`` gives losses and detections from one pass in any mode (see
:mod:`cednet_pl.models.detection`), which validation uses to log ``val/loss`` next to the COCO numbers.

Validation collects detections (original image coordinates), maps contiguous labels back to COCO category
ids, gathers all ranks, and on rank zero writes ``<run dir>/coco_results_val.json`` (``image_id``,
``category_id``, ``bbox`` xywh, ``score``) and evaluates that file against the annotation file with
pycocotools ``COCOeval`` (or faster-coco-eval): ``val/map``, ``val/map_50``, ``val/map_75``,
``val/map_{small,medium,large}``, ``val/mar_{1,10,100}``, ``val/mar_{small,medium,large}``, also written
to ``<run dir>/coco_metrics_val.json``. Running pycocotools by hand on those two files gives the same
numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torchmetrics import MeanMetric

from cednet_pl.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    detections_to_coco_results,
    evaluate_coco,
    write_results_json,
)
from cednet_pl.lit.optim import build_poly_scheduler, top_lr
from cednet_pl.models.detection import (
    CEDNetPyramid,
    RetinaNetDetector,
    TimmFPNBackbone,
    build_retinanet,
)
from cednet_pl.utils.logging import RankedLogger
from cednet_pl.utils.run import plain

__all__ = [
    "BACKBONES",
    "DETECTION_TASKS",
    "DetectionModule",
    "PerStepDenseOptimization",
    "build_backbone",
    "build_dense_optimizer",
    "build_multistep_scheduler",
    "check_checkpoint_task",
    "detection_param_groups",
    "load_pretrained_backbone",
    "per_step_schedule",
]

log = RankedLogger(__name__)

BACKBONES = {"cednet": CEDNetPyramid, "timm_fpn": TimmFPNBackbone}
#: ``task`` of the LightningModules whose ``net`` has ``forward_with_loss`` (the analysis runs on all of them).
DETECTION_TASKS = ("detection", "instance_segmentation")


def build_backbone(kind: str = "cednet", **kwargs: Any) -> torch.nn.Module:
    """Build a detection backbone from its plain config.

    Args:
        kind: ``"cednet"`` (:class:`CEDNetPyramid`, P3-P7 without a neck) or ``"timm_fpn"``
            (:class:`TimmFPNBackbone`, a timm trunk + FPN).
        **kwargs: Constructor arguments (``model_name``, ``pretrained``, ``out_channels``, ``drop_path_rate``...).
    """
    import cednet_pl.models.cednet  # noqa: F401  (registers the CEDNet models with timm)

    if kind not in BACKBONES:
        raise ValueError(f"backbone kind={kind!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[kind](**kwargs)


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


def load_pretrained_backbone(backbone: torch.nn.Module, spec: Any) -> None:
    """Load a backbone's trunk: ``True`` = timm's own weights (needs the network), else a checkpoint path."""
    if spec is True:
        import timm

        src = timm.create_model(
            backbone.model_name,
            pretrained=True,
            features_only=True,
            feature_cls="getter",
            out_indices=backbone.body.out_indices,
        )
        backbone.body.load_state_dict(src.state_dict())
    else:
        backbone.load_trunk(str(spec))


def check_checkpoint_task(
    checkpoint: dict[str, Any], module: str, head_prefix: str, task: str, head_name: str
) -> None:
    """Raise a "wrong-task checkpoint" ValueError unless ``checkpoint`` holds a ``module`` with ``head_prefix`` keys."""
    stored = checkpoint.get("cednet_config") or {}
    target = str((stored.get("model") or {}).get("_target_", ""))
    if target and not target.endswith(module):
        raise ValueError(f"wrong-task checkpoint: it holds a {target} model, not a {task} model ({module})")
    if not any(k.startswith(head_prefix) for k in checkpoint.get("state_dict", {})):
        raise ValueError(
            f"wrong-task checkpoint: it has no {head_name} ({head_prefix}*); not a {task} checkpoint"
        )


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


class DetectionModule(PerStepDenseOptimization, L.LightningModule):
    """RetinaNet training and COCO evaluation.

    Args:
        backbone: Plain backbone config: ``kind`` (``cednet`` or ``timm_fpn``) + constructor arguments, e.g.
            ``{kind: cednet, model_name: cednet_next_tiny, pretrained: PATH, drop_path_rate: 0.2}``.
            ``pretrained`` (a classification checkpoint, or ``true`` for timm's weights of a baseline) is loaded
            when fitting starts, not when a trained detector is rebuilt for evaluation.
        num_classes: Object classes (``data.num_classes``; 80 for COCO).
        detector: :func:`~cednet_pl.models.detection.build_retinanet` arguments (anchors, test sizes, box loss...).
        optimizer: ``name`` (adamw), ``lr``, ``weight_decay``, ``layer_decay`` (lr decay per trunk group: stem ->
            0, ``stages.i`` -> i + 1, everything after the trunk -> top), ``head_weight_decay`` (see
            :func:`detection_param_groups`), other timm optimizer kwargs (betas, eps).
        scheduler: :func:`build_multistep_scheduler` kwargs (``milestones`` as fractions, ``gamma``,
            ``warmup_steps``, ``warmup_factor``), or ``{name: constant}``.
        evaluation: ``backend`` (``pycocotools`` or ``faster_coco_eval``), ``annotation_file`` (default: the
            datamodule's ``val_annotation_file``).
    """

    monitor = "val/map"
    monitor_mode = "max"
    task = "detection"
    #: state-dict prefix and name of the detector's head (the wrong-task check of a checkpoint)
    head_prefix = "net.head."
    head_name = "RetinaNet head"
    #: the target keys the detector trains on
    target_keys: tuple[str, ...] = ("boxes", "labels")
    #: the detector's losses (keys of its loss dict without a ``loss_`` prefix), logged as ``<split>/loss_<name>``
    loss_names: tuple[str, ...] = ("classification", "bbox_regression")

    def __init__(
        self,
        backbone: Mapping[str, Any],
        num_classes: int,
        detector: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        backbone = dict(plain(backbone))
        detector = dict(plain(detector) or {})
        optimizer = dict(plain(optimizer) or {})
        scheduler = dict(plain(scheduler) or {})
        evaluation = dict(plain(evaluation) or {})
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "num_classes": int(num_classes),
                "detector": detector,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "evaluation": evaluation,
            },
            logger=False,
        )
        self.num_classes = int(num_classes)
        backbone_kwargs = dict(backbone)
        self.pretrained = backbone_kwargs.pop("pretrained", None)
        self.net: RetinaNetDetector = self.build_detector(
            build_backbone(**backbone_kwargs), self.num_classes, **detector
        )
        self.category_ids: list[int] | None = None
        self.category_names: list[str] | None = (
            None  # stored in checkpoints, named predictions (cednet-predict)
        )
        self.results_path: Path | None = None
        self._val_outputs: list[tuple[int, dict[str, Any]]] = []
        self._val_image_ids: list[int] = []
        # val/test losses: means over exactly the evaluated images. torchmetrics sums (loss x images, images) over
        # the ranks once at the epoch end; per-step `sync_dist` means would weight the ranks' uneven shards equally
        self.eval_losses = nn.ModuleDict(
            {
                prefix: nn.ModuleDict(
                    {name: MeanMetric() for name in ("loss", *(f"loss_{n}" for n in self.loss_names))}
                )
                for prefix in ("val", "test")
            }
        )

    @staticmethod
    def build_detector(backbone: torch.nn.Module, num_classes: int, **detector: Any) -> torch.nn.Module:
        """The detector around ``backbone`` (:func:`~cednet_pl.models.detection.build_retinanet`)."""
        return build_retinanet(backbone, num_classes, **detector)

    def _net_targets(self, targets: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        return [{k: t[k] for k in self.target_keys} for t in targets]

    # ------------------------------------------------------------------ model
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.net(images)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "category_ids"):
            ids = list(dm.category_ids)
            if len(ids) != self.num_classes:
                raise ValueError(
                    f"num_classes={self.num_classes} but the dataset has {len(ids)} categories ({ids[:10]}...); "
                    "set model.num_classes=${data.num_classes} and data.num_classes to the category count"
                )
            self.category_ids = ids
            self.category_names = list(getattr(dm, "category_names", None) or []) or None
        # two square images at the detector's test size (two: GroupNorm cannot normalise a single 1x1 P7 map of a
        # small demo size): Lightning's model summary runs them to print true FLOPs
        side = int(self.net.transform.min_size[0])
        self.example_input_array = ([torch.zeros(3, side, side), torch.zeros(3, side, side)],)
        # NOTE: when a fit resumes, the checkpoint restored after setup overwrites these weights
        if stage == "fit" and self.pretrained:
            self._load_pretrained(self.pretrained)

    def _load_pretrained(self, spec: Any) -> None:
        load_pretrained_backbone(self.net.backbone, spec)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_task(
            checkpoint, "." + type(self).__name__, self.head_prefix, self.task, self.head_name
        )
        if checkpoint.get("category_ids"):
            self.category_ids = list(checkpoint["category_ids"])
        if checkpoint.get("category_names"):
            self.category_names = [str(n) for n in checkpoint["category_names"]]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.category_ids is not None:
            checkpoint["category_ids"] = list(self.category_ids)
        if self.category_names is not None:
            checkpoint["category_names"] = list(self.category_names)

    # ------------------------------------------------------------------ training
    def training_step(
        self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        losses = self.net(images, self._net_targets(targets))
        loss = sum(losses.values())
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, value in losses.items():
            self.log(f"train/loss_{name.removeprefix('loss_')}", value, batch_size=n)
        self.log("train/lr", top_lr(self.trainer.optimizers[0]), batch_size=n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs, self._val_image_ids = [], []

    def _eval_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], prefix: str) -> None:
        images, targets = batch
        losses, detections = self.net.forward_with_loss(images, self._net_targets(targets))
        n = len(images)
        # NOTE: torchvision's RetinaNet losses are means over the batch's images: weight n gives the per-image mean
        # (Mask R-CNN's are means over the batch's sampled anchors/RoIs, nearly so)
        values = {"loss": sum(losses.values())}
        values.update({f"loss_{k.removeprefix('loss_')}": v for k, v in losses.items()})
        for name, value in values.items():
            metric = self.eval_losses[prefix][name]
            metric.update(value.detach(), weight=n)
            self.log(f"{prefix}/{name}", metric, batch_size=n)
        for t, det in zip(targets, detections, strict=True):
            image_id = int(t["image_id"])
            self._val_image_ids.append(image_id)
            self._val_outputs.append((image_id, self._keep_detections(det)))

    def _keep_detections(self, det: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What validation keeps of one image's detections until the epoch ends (on the CPU)."""
        return {k: det[k].cpu() for k in ("boxes", "scores", "labels")}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._coco_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._coco_epoch_end("test")

    def _annotation_file(self) -> Path:
        ann = self.hparams["evaluation"].get("annotation_file")
        if ann:
            return Path(ann)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_annotation_file"):
            raise ValueError(
                "COCO evaluation needs the annotation file: use a COCO datamodule or set "
                "model.evaluation.annotation_file"
            )
        return Path(dm.val_annotation_file)

    def _gather(self) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
        outputs, image_ids = self._val_outputs, self._val_image_ids
        if (
            self.trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (outputs, image_ids))
            outputs = [o for part in gathered for o in part[0]]
            image_ids = [i for part in gathered for i in part[1]]
        unique: dict[int, tuple[int, dict[str, Any]]] = {}
        for out in outputs:
            unique.setdefault(out[0], out)
        return [unique[k] for k in sorted(unique)], sorted(set(image_ids))

    def _coco_epoch_end(self, prefix: str) -> None:
        if self.trainer.sanity_checking:
            return
        outputs, image_ids = self._gather()
        stats: dict[str, float] | None = None
        if self.trainer.is_global_zero:
            stats = self._evaluate(outputs, image_ids, prefix)
        stats = self.trainer.strategy.broadcast(stats, src=0)
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in stats.items()}, sync_dist=False)
        self._val_outputs, self._val_image_ids = [], []

    def _coco_results(self, outputs: list[tuple[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """COCO results entries per iou type (``bbox`` here)."""
        ids, dets = [o[0] for o in outputs], [o[1] for o in outputs]
        return {"bbox": detections_to_coco_results(ids, dets, self.category_ids)}

    def _evaluate(self, outputs: list, image_ids: list[int], prefix: str) -> dict[str, float]:
        if self.category_ids is None:
            raise ValueError(
                "category ids unknown: evaluate with the COCO datamodule the model was trained on"
            )
        ann_file = self._annotation_file()
        backend = self.hparams["evaluation"].get("backend", "pycocotools")
        out_dir = Path(self.trainer.default_root_dir)
        with ann_file.open("rb") as f:
            all_ids = {int(im["id"]) for im in json.load(f)["images"]}
        subset = None
        if set(image_ids) != all_ids:
            subset = image_ids
            log.warning(
                f"COCO evaluation on {len(image_ids)} of the {len(all_ids)} images of {ann_file} "
                "(partial validation); the numbers are not comparable to a full evaluation"
            )
        stats: dict[str, float] = {}
        files: dict[str, str] = {}
        counts: dict[str, int] = {}
        for iou_type, results in self._coco_results(outputs).items():
            # NOTE: box results keep their historical names (coco_results_val.json, val/map ...); masks get a
            # file of their own (no bbox entries, see cednet_pl.evaluation.coco_eval) and `mask_` metrics
            tag = "" if iou_type == "bbox" else "mask_"
            path = write_results_json(
                results, out_dir / f"coco_{'segm_' if iou_type == 'segm' else ''}results_{prefix}.json"
            )
            if iou_type == "bbox":
                self.results_path = path
            values, summary = evaluate_coco(
                ann_file, path, backend=backend, image_ids=subset, iou_type=iou_type
            )
            log.info(f"COCO {iou_type} evaluation ({backend}) of {path}:\n{summary}")
            stats.update({f"{tag}{k}": values[k] for k in COCO_STAT_NAMES})
            files[iou_type], counts[iou_type] = str(path), len(results)
        report = {
            "metrics": {f"{prefix}/{k}": v for k, v in stats.items()},
            "annotation_file": str(ann_file),
            "results_file": files["bbox"],
            "results_files": files,
            "backend": backend,
            "num_images": len(subset) if subset is not None else len(all_ids),
            "num_detections": counts["bbox"],
            "epoch": int(self.current_epoch),
            "global_step": int(self.global_step),
        }
        with (out_dir / f"coco_metrics_{prefix}.json").open("w") as f:
            json.dump(report, f, indent=2)
        return stats
