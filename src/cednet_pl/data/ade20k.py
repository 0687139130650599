"""Semantic segmentation data: ADE20K (official layout) and the embedded synthetic digits set.

Layout (ADEChallengeData2016, as released)::

    root/images/training/*.jpg        root/annotations/training/*.png      (same stem)
    root/images/validation/*.jpg      root/annotations/validation/*.png

Labels are single-channel PNGs. ADE20K (``reduce_zero_label=True``): 0 = "other" is ignored (255) and 1..150 become
0..149; any other value is an error naming the file and the values. Without ``reduce_zero_label`` labels are
0..num_classes-1 (255 = ignore).

Training transforms (the released mmseg pipeline, with torchvision.transforms.v2 on ``tv_tensors.Image`` /
``tv_tensors.Mask``): resize keeping the aspect ratio to ``scale`` (2048x512) times a ratio in 0.5..2.0, random
crop 512 (retried up to 10 times until no class covers more than 75% of the crop: ``cat_max_ratio``), horizontal
flip, photometric distortion (brightness factor 1 +- 32/255, contrast and saturation 0.5-1.5, hue +-18 degrees,
each with probability 0.5; mmseg's brightness is additive, a factor here), normalise, pad to
the crop size (labels padded with 255). Validation: the original image, normalised; labels at full resolution.

:class:`SyntheticSegDataModule` turns the embedded detection set (:mod:`cednet_pl.data.synthetic_det`, exact
digit masks) into this layout once: pixel labels 0 = background, 1..10 = digits 0..9.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cednet_pl.data.samplers import exact_eval_sampler, train_sampler

__all__ = [
    "ADE20KDataModule",
    "SegmentationFolder",
    "SegmentationTrainTransform",
    "SyntheticSegDataModule",
    "generate_synthetic_seg",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = {"train": "training", "val": "validation"}


class SegmentationTrainTransform:
    """The released ADE20K training pipeline on ``(tv_tensors.Image, tv_tensors.Mask)``.

    Args:
        scale: ``(long, short)`` base scale (2048, 512): the image is resized, aspect ratio kept, to fit
            ``ratio * scale``.
        ratio_range: Range of the random ratio.
        crop_size: Square crop side (512).
        cat_max_ratio: A crop is retried (10 times at most) while one class covers more than this share of its
            labelled pixels.
        hflip_prob: Horizontal flip probability.
        photometric: Apply the photometric distortion.
        mean: Normalisation mean.
        std: Normalisation std.
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        crop_size: int = 512,
        cat_max_ratio: float = 0.75,
        hflip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.crop_size = int(crop_size)
        self.cat_max_ratio = float(cat_max_ratio)
        jitter = [
            v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
            v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(hue=18 / 360)], p=0.5),
        ]
        self.augment = v2.Compose([v2.RandomHorizontalFlip(hflip_prob), *(jitter if photometric else [])])
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def _resize(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Any, Any]:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        h, w = image.shape[-2:]
        long_side, short_side = self.scale[0] * ratio, self.scale[1] * ratio
        factor = min(long_side / max(h, w), short_side / min(h, w))
        size = [max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))]
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)

    def _crop(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Any, Any]:
        h, w = image.shape[-2:]
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        box = (0, 0)
        for _ in range(10):
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            box = (top, left)
            if self.cat_max_ratio >= 1.0:
                break
            labels = mask[..., top : top + ch, left : left + cw]
            counts = torch.bincount(labels[labels != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return (
            TF.crop(image, box[0], box[1], ch, cw),
            TF.crop(mask, box[0], box[1], ch, cw),
        )

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._resize(image, mask)
        image, mask = self._crop(image, mask)
        image, mask = self.augment(image, mask)
        image = self.normalize(image)
        pad_h, pad_w = self.crop_size - image.shape[-2], self.crop_size - image.shape[-1]
        if pad_h > 0 or pad_w > 0:
            image = TF.pad(image, [0, 0, max(pad_w, 0), max(pad_h, 0)], fill=0)
            mask = TF.pad(mask, [0, 0, max(pad_w, 0), max(pad_h, 0)], fill=IGNORE_INDEX)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class SegmentationEvalTransform:
    """Validation: the original image normalised, the label untouched."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(image).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class SegmentationFolder(Dataset):
    """Images and label PNGs of one split in the ADE20K layout (see the module docstring).

    Args:
        root: Dataset root (``images/`` and ``annotations/`` below it).
        split: ``"training"`` or ``"validation"`` (sub-directory names).
        num_classes: Classes after the label mapping (150 for ADE20K).
        reduce_zero_label: Label 0 is ignored and 1..num_classes map to 0..num_classes-1 (ADE20K).
        image_suffix: Image file suffix (``.jpg`` for ADE20K).
        label_suffix: Label file suffix.
        transforms: Callable on ``(tv_tensors.Image, tv_tensors.Mask)``.

    Raises:
        FileNotFoundError: The image directory is missing or empty, or an image has no label file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        num_classes: int,
        reduce_zero_label: bool = True,
        image_suffix: str = ".jpg",
        label_suffix: str = ".png",
        transforms: Any = None,
    ) -> None:
        self.root = Path(root)
        self.image_dir = self.root / "images" / split
        self.label_dir = self.root / "annotations" / split
        self.num_classes = int(num_classes)
        self.reduce_zero_label = reduce_zero_label
        self.transforms = transforms
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"segmentation image directory not found: {self.image_dir} (expected the ADE20K layout "
                "root/images/{training,validation}/ and root/annotations/{training,validation}/)"
            )
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() == image_suffix.lower())
        if not self.images:
            raise FileNotFoundError(f"no {image_suffix} images in {self.image_dir}")
        self.labels = [self.label_dir / (p.stem + label_suffix) for p in self.images]
        missing = [str(lab) for lab in self.labels if not lab.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) in {self.image_dir} have no label file, e.g. {missing[:3]} "
                f"(each image needs annotations/<split>/<stem>{label_suffix})"
            )
        # ADE20K: 0..num_classes (0 = other, ignored); else 0..num_classes-1 and 255
        self.max_label = self.num_classes if reduce_zero_label else self.num_classes - 1

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The image (uint8) and its mapped label map (int64, 255 = ignore), checked."""
        image_path, label_path = self.images[index], self.labels[index]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(label_path) as lab:
            if lab.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"label {label_path} has mode {lab.mode}; expected a single-channel PNG (class index per pixel)"
                )
            label = np.asarray(lab).astype(np.int64)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; a label must have its image's size"
            )
        values = np.unique(label)
        ok = (values >= 0) & (values <= self.max_label)
        if not self.reduce_zero_label:
            ok |= values == IGNORE_INDEX
        if not ok.all():
            allowed = f"0-{self.max_label}" + ("" if self.reduce_zero_label else f" or {IGNORE_INDEX}")
            raise ValueError(
                f"label {label_path} has values {[int(v) for v in values[~ok]]} outside {allowed} "
                f"(num_classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label})"
            )
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
        return (
            tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(label)),
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _eval_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
    """Validation images keep their own sizes: lists, not stacked tensors."""
    return [b[0] for b in batch], [b[1] for b in batch]


class ADE20KDataModule(L.LightningDataModule):
    """ADE20K (ADEChallengeData2016) semantic segmentation.

    Args:
        root: Dataset root (``images/`` and ``annotations/``).
        num_classes: 150.
        reduce_zero_label: Label 0 ignored, 1..150 -> 0..149.
        class_names: Class names for the per-class IoU report (None: indices).
        image_suffix: Image suffix.
        batch_size: Training crops per device (2 in the recipe, 8 GPUs).
        val_batch_size: Validation images per device (each runs its own sliding window).
        num_workers: DataLoader workers.
        pin_memory: Pin host memory.
        crop_size: Training crop side.
        scale: Base resize scale ``(long, short)``.
        ratio_range: Random resize ratio range.
        cat_max_ratio: Crop rule (see :class:`SegmentationTrainTransform`).
        hflip_prob: Flip probability.
        photometric: Photometric distortion on/off.
        shuffle_seed: Base seed of the epoch-seeded training order (sharded over DDP ranks).
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        class_names: Sequence[str] | None = None,
        image_suffix: str = ".jpg",
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        crop_size: int = 512,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip_prob: float = 0.5,
        photometric: bool = True,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"data.class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        self.train_dataset: SegmentationFolder | None = None
        self.val_dataset: SegmentationFolder | None = None

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A PIL image -> the normalised tensor validation sees (cednet-predict)."""
        return v2.Compose([v2.PILToTensor(), SegmentationEvalTransform().normalize])

    def _folder(self, split: str, transforms: Any) -> SegmentationFolder:
        hp = self.hparams
        return SegmentationFolder(
            self.root,
            SPLITS[split],
            self.num_classes,
            hp.reduce_zero_label,
            hp.image_suffix,
            transforms=transforms,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.val_dataset is None:
            self.val_dataset = self._folder("val", SegmentationEvalTransform())
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._folder(
                "train",
                SegmentationTrainTransform(
                    hp.scale, hp.ratio_range, hp.crop_size, hp.cat_max_ratio, hp.hflip_prob, hp.photometric
                ),
            )

    def train_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            sampler=train_sampler(self.train_dataset, self.hparams.shuffle_seed, trainer=self.trainer),
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.val_dataset,
            batch_size=self.hparams.val_batch_size,
            shuffle=False,
            sampler=exact_eval_sampler(self.val_dataset),
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            collate_fn=_eval_collate,
            persistent_workers=workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------- embedded synthetic set
SEG_MANIFEST_VERSION = 1
DEMO_CLASS_NAMES = ["background", *(str(d) for d in range(10))]


def generate_synthetic_seg(root: str | os.PathLike, **det_kwargs: Any) -> Path:
    """Write the synthetic digits set in the ADE20K layout under ``root`` (once per parameter set).

    The canvases and exact masks come from :func:`cednet_pl.data.synthetic_det.generate_synthetic_det` (rendered
    into ``root/det``); label PNGs hold 0 for background and ``d + 1`` for digit ``d``.

    Args:
        root: Cache directory.
        **det_kwargs: :func:`~cednet_pl.data.synthetic_det.generate_synthetic_det` parameters.
    """
    from pycocotools import mask as mask_utils

    from cednet_pl.data.synthetic_det import generate_synthetic_det, manifest_matches

    root = Path(root)
    det_root = generate_synthetic_det(root / "det", **det_kwargs)
    manifest = {
        "version": SEG_MANIFEST_VERSION,
        "det_manifest": json.loads((det_root / "manifest.json").read_text()),
    }
    manifest_path = root / "seg_manifest.json"
    if manifest_matches(manifest_path, manifest):
        return root
    for split, folder in (("train", "training"), ("val", "validation")):
        coco = json.loads((det_root / "annotations" / f"instances_{split}.json").read_text())
        digit_of = {c["id"]: int(c["name"]) for c in coco["categories"]}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for sub in ("images", "annotations"):
            shutil.rmtree(root / sub / folder, ignore_errors=True)
            (root / sub / folder).mkdir(parents=True)
        for im in coco["images"]:
            label = np.zeros((im["height"], im["width"]), dtype=np.uint8)
            for ann in by_image.get(im["id"], []):
                label[mask_utils.decode(ann["segmentation"]) > 0] = digit_of[ann["category_id"]] + 1
            stem = Path(im["file_name"]).stem
            shutil.copyfile(det_root / split / im["file_name"], root / "images" / folder / f"{stem}.png")
            Image.fromarray(label, mode="L").save(root / "annotations" / folder / f"{stem}.png")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return root


class SyntheticSegDataModule(ADE20KDataModule):
    """The embedded segmentation default: synthetic digit canvases, 11 classes (background + 10 digits).

    Args:
        root: Cache directory.
        **kwargs: Generation parameters of :func:`~cednet_pl.data.synthetic_det.generate_synthetic_det`
            (``num_train``, ``num_val``, ``image_size``, ``num_digits``, ``digit_size``, ``empty_prob``, ``seed``)
            and :class:`ADE20KDataModule` arguments (batch sizes, crop, scale...).
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        from cednet_pl.data.synthetic_det import generate_synthetic_det

        names = [p for p in inspect.signature(generate_synthetic_det).parameters if p != "root"]
        self.generator_kwargs = {k: kwargs.pop(k) for k in names if k in kwargs}
        kwargs.setdefault("num_classes", len(DEMO_CLASS_NAMES))
        kwargs.setdefault("reduce_zero_label", False)
        kwargs.setdefault("image_suffix", ".png")
        kwargs.setdefault("class_names", DEMO_CLASS_NAMES)
        super().__init__(root=root, **kwargs)

    def prepare_data(self) -> None:
        generate_synthetic_seg(self.root, **self.generator_kwargs)
