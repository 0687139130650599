"""LightningModule for semantic segmentation (CEDNet + CEDHead/UperNet, timm + UperNet; ADE20K recipe).

``SegmentationModule.net`` is a :class:`~cednet_pl.models.segmentation.Segmentor`. Training: pixel cross-entropy
(ignore index 255) on the decode head + ``aux_weight`` (0.4) x the auxiliary FCN head's, AdamW with layer decay
over the trunk's groups (stem -> 0, ``stages.i`` -> i + 1, extras and heads -> top), poly schedule with linear
warmup per step. Validation/test: each image at its original resolution through sliding-window inference (crop
512, stride 341; optional multi-scale + flip), accumulated in a torchmetrics confusion matrix (its state is a sum,
so with the exact evaluation sampler every image counts once under DDP). Logged: ``val/miou`` (mean over classes
that occur in the labels or predictions), ``val/acc`` (pixel accuracy), ``val/macc`` (mean class accuracy);
rank zero writes ``<run dir>/per_class_iou_val.json`` (IoU and accuracy per class name).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from cednet_pl.lit.detection import check_checkpoint_task, load_pretrained_backbone
from cednet_pl.lit.optim import PerStepDenseOptimization, top_lr
from cednet_pl.models.segmentation import Segmentor, build_segmentor
from cednet_pl.utils.logging import RankedLogger
from cednet_pl.utils.run import plain

__all__ = ["IGNORE_INDEX", "SegmentationModule", "segmentation_scores"]

log = RankedLogger(__name__)

IGNORE_INDEX = 255


def segmentation_scores(confmat: torch.Tensor) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU/accuracy from a confusion matrix.

    ``confmat[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (ignored pixels excluded). A class
    with no pixel in the labels nor the predictions has IoU NaN and is left out of the mean (mmseg's
    ``nanmean``); a class absent from the labels has accuracy NaN.
    """
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(1)
    union = gt + cm.sum(0) - tp
    iou = tp / union  # NaN where union == 0
    acc = tp / gt
    total = cm.sum()
    return {
        "miou": float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
        "acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "macc": float(acc.nanmean()) if bool((gt > 0).any()) else float("nan"),
        "iou": iou.tolist(),
        "class_acc": acc.tolist(),
        "pixels": int(total),
    }


class SegmentationModule(PerStepDenseOptimization, L.LightningModule):
    """Semantic segmentation training and mIoU evaluation.

    Args:
        net: :func:`~cednet_pl.models.segmentation.build_segmentor` config: ``backbone`` (``kind`` cednet/timm
            + arguments; ``pretrained`` = a classification checkpoint, loaded when fitting starts), ``head``
            (``kind`` ced/uper, ``channels``, ``dropout``, ``pool_scales``), ``aux_head`` (``channels``,
            ``dropout``; null = none).
        num_classes: Classes (150 for ADE20K, label 0 ignored and 1..150 mapped to 0..149 by the data).
        loss: ``aux_weight`` (0.4), ``ignore_index`` (255).
        optimizer: ``name`` (adamw), ``lr``, ``weight_decay``, ``layer_decay`` (0.9 in the recipe), other timm
            optimizer kwargs (betas, eps).
        scheduler: :func:`~cednet_pl.lit.optim.build_poly_scheduler` kwargs (``power``, ``min_lr``,
            ``warmup_steps``, ``warmup_ratio``), or ``{name: constant}``.
        evaluation: ``mode`` (slide/whole), ``crop``, ``stride``, ``scales`` (multi-scale ratios), ``flip``.
        class_names: Names for the per-class JSON (default: the datamodule's ``class_names``, else indices).
    """

    default_schedule = "poly"
    monitor = "val/miou"
    monitor_mode = "max"
    task = "segmentation"

    def __init__(
        self,
        net: Mapping[str, Any],
        num_classes: int,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        net = dict(plain(net))
        hp = {
            "net": net,
            "num_classes": int(num_classes),
            "loss": dict(plain(loss) or {}),
            "optimizer": dict(plain(optimizer) or {}),
            "scheduler": dict(plain(scheduler) or {}),
            "evaluation": dict(plain(evaluation) or {}),
            "class_names": list(plain(class_names)) if class_names is not None else None,
        }
        self.save_hyperparameters(hp, logger=False)
        self.num_classes = int(num_classes)
        backbone = dict(net.get("backbone") or {})
        self.pretrained = backbone.pop("pretrained", None)
        self.net: Segmentor = build_segmentor(
            backbone, self.num_classes, head=net.get("head"), aux_head=net.get("aux_head")
        )
        self.aux_weight = float(hp["loss"].get("aux_weight", 0.4))
        self.ignore_index = int(hp["loss"].get("ignore_index", IGNORE_INDEX))
        self.val_confmat = MulticlassConfusionMatrix(
            self.num_classes, ignore_index=self.ignore_index, validate_args=False
        )
        self.class_names: list[str] | None = hp["class_names"]
        self.last_scores: dict[str, Any] | None = None

    # ------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if (
            dm is not None
            and getattr(dm, "num_classes", None) is not None
            and int(dm.num_classes) != self.num_classes
        ):
            raise ValueError(
                f"model.num_classes={self.num_classes} but the datamodule has {dm.num_classes} classes; "
                "set model.num_classes=${data.num_classes}"
            )
        if self.class_names is None and dm is not None and getattr(dm, "class_names", None):
            self.class_names = list(dm.class_names)
        # NOTE: when a fit resumes, the checkpoint restored after setup overwrites these weights
        if stage == "fit" and self.pretrained:
            self._load_pretrained(self.pretrained)

    def _load_pretrained(self, spec: Any) -> None:
        load_pretrained_backbone(self.net.backbone, spec)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_task(
            checkpoint, "SegmentationModule", "net.decode_head.", "segmentation", "segmentation head"
        )

    # ------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # NOTE: float32 loss under autocast; a crop whose pixels are all ignored contributes 0, not NaN
        valid = (target != self.ignore_index).sum()
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return loss / valid.clamp(min=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, masks = batch
        logits, aux = self.net(images, with_aux=True)
        loss_decode = self._loss(logits, masks)
        loss = loss_decode
        n = images.shape[0]
        if aux is not None and self.aux_weight > 0:
            loss_aux = self._loss(aux, masks)
            loss = loss + self.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/loss_decode", loss_decode, batch_size=n)
        self.log("train/lr", top_lr(self.trainer.optimizers[0]), batch_size=n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (or averaged probabilities) of one normalised (3, H, W) image at its resolution."""
        cfg = self.hparams["evaluation"]
        return self.net.inference(
            image[None],
            mode=cfg.get("mode", "slide"),
            crop=int(cfg.get("crop", 512)),
            stride=int(cfg.get("stride", 341)),
            scales=tuple(cfg.get("scales") or (1.0,)),
            flip=bool(cfg.get("flip", False)),
        )[0]

    def _eval_step(self, batch: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        images, masks = batch
        for image, mask in zip(images, masks, strict=True):
            pred = self.predict_logits(image).argmax(0)
            self.val_confmat.update(pred[None], mask[None])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self.val_confmat.reset()

    def on_test_epoch_start(self) -> None:
        self.val_confmat.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _epoch_end(self, prefix: str) -> None:
        if self.trainer.sanity_checking:
            self.val_confmat.reset()
            return
        # compute() sums the confusion matrices of all ranks: the same numbers on every rank
        scores = segmentation_scores(self.val_confmat.compute())
        self.val_confmat.reset()
        self.last_scores = scores
        self.log_dict(
            {f"{prefix}/{k}": (0.0 if math.isnan(scores[k]) else scores[k]) for k in ("miou", "acc", "macc")},
            sync_dist=False,
        )
        if self.trainer.is_global_zero:
            self._write_per_class(scores, prefix)

    def _write_per_class(self, scores: dict[str, Any], prefix: str) -> Path:
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        report = {
            "metrics": {f"{prefix}/{k}": scores[k] for k in ("miou", "acc", "macc")},
            "per_class": {
                name: {"iou": iou, "acc": acc}
                for name, iou, acc in zip(names, scores["iou"], scores["class_acc"], strict=True)
            },
            "pixels": scores["pixels"],
            "evaluation": dict(self.hparams["evaluation"]),
            "epoch": int(self.current_epoch),
            "global_step": int(self.global_step),
        }
        out = Path(self.trainer.default_root_dir) / f"per_class_iou_{prefix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        # NaN (class never seen) is written as null
        text = json.dumps(report, indent=2).replace("NaN", "null")
        out.write_text(text)
        return out
