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
from torch import nn
from torchmetrics import MeanMetric

from cednet_pl.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    detections_to_coco_results,
    evaluate_coco,
    write_results_json,
)
from cednet_pl.lit.optim import PerStepDenseOptimization, top_lr
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
    "build_backbone",
    "check_checkpoint_task",
    "load_pretrained_backbone",
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
