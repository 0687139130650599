"""COCO detection data: a checked COCO dataset, LSJ + copy-paste training pipeline, and the DataModule.

Layout (all paths configurable, relative ones are taken under ``root``)::

    root/train2017/*.jpg   root/val2017/*.jpg
    root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

Labels are contiguous (``0..K-1``, the categories sorted by id); ``category_ids[label]`` maps back to
the COCO id (used when writing results JSON). Crowd annotations never become training targets; the
evaluation reads the annotation file itself, so they still count there as COCO defines. Images without
objects are kept. Boxes with zero or negative width/height (after clipping to the image) are dropped
and counted in a warning.

Each sample is ``(image, target)``: a float image in [0, 1] (C, H, W) and ``{"boxes": (N, 4) xyxy float,
"labels": (N,) int64, "image_id": int}``, plus ``"masks": (N, H, W) uint8`` with ``with_masks`` (Mask R-CNN):
masks are decoded from the annotations' polygons or RLE (checked when the file is read: every object has a
``segmentation``, polygons have >= 3 points, RLE sizes equal the image's), move with the image through LSJ,
flip and copy-paste, and after the training transforms every box is recomputed from its mask; objects whose
mask the crop emptied are dropped and counted (``num_vanished``). Validation images keep their original resolution; the
detector's transform resizes them (shorter side ``test_min_size``, longer <= ``test_max_size``) and
maps detections back.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from cednet_pl.data.det_transforms import boxes_from_masks, build_train_transforms, copy_paste
from cednet_pl.data.samplers import exact_eval_sampler, sample_seed, train_sampler
from cednet_pl.evaluation.coco_eval import load_coco_json

__all__ = ["COCODataModule", "COCODetection", "detection_collate"]

log = logging.getLogger(__name__)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Keep images (of different sizes) and targets as lists."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _check_images_exist(image_dir: Path, file_names: Sequence[str], ann_file: Path) -> None:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} (for {ann_file}) does not exist")
    listed = set(os.listdir(image_dir))
    missing = [
        name
        for name in file_names
        if (name not in listed if "/" not in name else not (image_dir / name).is_file())
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {ann_file} are missing from {image_dir}: "
            f"{', '.join(str(image_dir / m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def _decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    if isinstance(segmentation, list):
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        return None
    return mask_utils.decode(rle)


def _segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Why ``segmentation`` cannot give an instance mask of an ``height x width`` image (None: it can)."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "an empty polygon list"
        for poly in segmentation:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) / 2 if isinstance(poly, list) else poly
                return f"a polygon with {n} point(s) (a polygon needs >= 3 x,y points)"
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            return f"an RLE of size {size} on an image of size [{height}, {width}] (height, width)"
        return None
    return f"an unreadable segmentation of type {type(segmentation).__name__} (expected polygons or RLE)"


class COCODetection(Dataset):
    """COCO instances dataset with input checks (see the module docstring for the sample format).

    Args:
        image_dir: Directory of the images (``file_name`` entries are relative to it).
        ann_file: COCO instances JSON.
        transforms: v2 transform on ``(tv_tensors.Image uint8, target)``, e.g. LSJ; None keeps the image.
        copy_paste_prob: Probability of pasting objects of another (transformed) image; needs masks, which
            are then decoded from the segmentations (a box-shaped mask where an annotation has none).
        max_paste_objects: Most objects pasted at once.
        category_ids: Expected category ids (sorted); checked against the file's categories if given.
        seed: Base seed of the per-sample augmentation when indexed by ``(index, epoch)`` (from
            ``EpochSeededSampler(with_epoch=True)``): a sample's augmentation then depends only on the seed, the
            epoch and the index, so a resumed run repeats the uninterrupted one. A plain int index draws from the
            global RNG.
        with_masks: Yield instance masks (``target["masks"]``) and recompute boxes from them after the
            transforms; every non-crowd object must have a valid ``segmentation``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: v2.Transform | None = None,
        copy_paste_prob: float = 0.0,
        max_paste_objects: int = 7,
        category_ids: Sequence[int] | None = None,
        seed: int = 0,
        with_masks: bool = False,
    ) -> None:
        self.seed = int(seed)
        self.with_masks = bool(with_masks)
        self.num_vanished = 0
        self.max_paste_objects = int(max_paste_objects)
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.copy_paste_prob = float(copy_paste_prob)
        data = load_coco_json(self.ann_file)

        self.category_ids = sorted(int(c["id"]) for c in data["categories"])
        if category_ids is not None and list(category_ids) != self.category_ids:
            raise ValueError(
                f"{self.ann_file}: categories {self.category_ids} differ from the expected {list(category_ids)}"
            )
        self.category_names = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        self.cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}

        self.images = sorted(data["images"], key=lambda im: im["id"])
        image_by_id = {im["id"]: im for im in self.images}
        per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.num_degenerate = 0
        self.num_crowd = 0
        for ann in data["annotations"]:
            cid = ann.get("category_id")
            if cid not in self.cat_to_label:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} has category_id {cid!r}, which is not in the "
                    f"file's categories {self.category_ids}"
                )
            image = image_by_id.get(ann.get("image_id"))
            if image is None:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')!r}, "
                    "which is not in the file's images"
                )
            if ann.get("iscrowd", 0):
                self.num_crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
            if x1 <= x0 or y1 <= y0:
                self.num_degenerate += 1
                continue
            per_image[image["id"]].append({"box": (x0, y0, x1, y1), "ann": ann})
        if self.with_masks:
            self._check_segmentations(image_by_id, per_image)
        if self.num_degenerate:
            log.warning(
                "%s: dropped %d box(es) with zero or negative width/height (after clipping to the image)",
                self.ann_file,
                self.num_degenerate,
            )
        self.objects = [per_image.get(im["id"], []) for im in self.images]
        self.image_ids = [int(im["id"]) for im in self.images]
        _check_images_exist(self.image_dir, [im["file_name"] for im in self.images], self.ann_file)

    def _check_segmentations(
        self, image_by_id: dict[Any, dict[str, Any]], per_image: dict[int, list[dict[str, Any]]]
    ) -> None:
        missing, bad = [], []
        for image_id, objs in per_image.items():
            image = image_by_id[image_id]
            for o in objs:
                seg = o["ann"].get("segmentation")
                if seg is None:
                    missing.append(o["ann"].get("id"))
                    continue
                problem = _segmentation_problem(seg, int(image["height"]), int(image["width"]))
                if problem:
                    bad.append(f"annotation {o['ann'].get('id')} (image {image_id}) has {problem}")
        if missing:
            raise ValueError(
                f"{self.ann_file}: {len(missing)} object(s) have no `segmentation` (annotation ids "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}); an instance-segmentation experiment needs "
                "a mask (polygons or RLE) for every non-crowd object"
            )
        if bad:
            raise ValueError(
                f"{self.ann_file}: {len(bad)} invalid segmentation(s): {'; '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label_to_category_id(self) -> list[int]:
        """COCO category id of each contiguous label."""
        return list(self.category_ids)

    def _load(self, index: int, with_masks: bool) -> tuple[tv_tensors.Image, dict[str, Any]]:
        info = self.images[index]
        image = tv_tensors.Image(
            decode_image(str(self.image_dir / info["file_name"]), mode=ImageReadMode.RGB)
        )
        h, w = image.shape[-2:]
        objs = self.objects[index]
        boxes = torch.tensor([o["box"] for o in objs], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(
                [self.cat_to_label[o["ann"]["category_id"]] for o in objs], dtype=torch.int64
            ),
        }
        if with_masks:
            masks = torch.zeros((len(objs), h, w), dtype=torch.uint8)
            for i, o in enumerate(objs):
                m = _decode_mask(o["ann"].get("segmentation"), h, w)
                if not self.with_masks and (m is None or m.shape != (h, w) or not m.any()):
                    x0, y0, x1, y1 = o["box"]
                    masks[i, int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = 1
                elif m is not None:
                    masks[i] = torch.from_numpy(m.reshape(h, w))
            target["masks"] = tv_tensors.Mask(masks)
        return image, target

    def _transformed(self, index: int, with_masks: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self._load(index, with_masks)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
            if self.with_masks:
                target, vanished = boxes_from_masks(target)
                self.num_vanished += vanished
        return image, target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        if epoch is None:
            return self._sample(index)
        # NOTE: the v2 transforms draw from the global RNG: fork it, seeded for this (epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self._sample(index)

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        use_cp = self.copy_paste_prob > 0 and len(self) > 1 and float(torch.rand(())) < self.copy_paste_prob
        image, target = self._transformed(index, with_masks=use_cp or self.with_masks)
        if use_cp:
            other = int(torch.randint(len(self) - 1, ()))
            other += other >= index
            src_image, src_target = self._transformed(other, with_masks=True)
            image, target = copy_paste(image, target, src_image, src_target, self.max_paste_objects)
        out = {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"].as_subclass(torch.Tensor).long(),
            "image_id": self.image_ids[index],
        }
        if self.with_masks:
            out["masks"] = target["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        return image.as_subclass(torch.Tensor).float().div_(255.0), out


class COCODataModule(L.LightningDataModule):
    """COCO detection DataModule (train: LSJ + flip + copy-paste; val: original images).

    Args:
        root: Dataset root; relative image/annotation paths below are resolved under it.
        train_images: Training image directory.
        val_images: Validation image directory.
        train_annotations: Training annotation JSON.
        val_annotations: Validation annotation JSON (also the ground truth of the evaluation).
        batch_size: Training images per device (the COCO 3x recipe: 16 in total, e.g. 2 x 8 GPUs).
        val_batch_size: Validation images per device (default: ``batch_size``).
        num_workers: DataLoader workers.
        pin_memory: Pin host memory.
        train_size: LSJ output side (1024 in the recipe).
        scale_range: LSJ scale range.
        hflip_prob: Horizontal flip probability.
        copy_paste_prob: Copy-paste probability (0 disables it and the mask decoding).
        max_paste_objects: Most objects pasted at once.
        num_classes: Expected number of categories (checked against the annotation files; None: any).
        test_min_size: Shorter side at test time (used by the detector's transform; kept here so that the
            model config can interpolate it).
        test_max_size: Longest side at test time.
        size_divisible: Test-time padding multiple.
        shuffle_seed: Seed of the epoch-deterministic training order (DDP ranks take interleaved shards of it, a
            resumed run sees the same order as an uninterrupted one).
        with_masks: Instance masks in every sample (Mask R-CNN; see :class:`COCODetection`).
    """

    def __init__(
        self,
        root: str,
        train_images: str = "train2017",
        val_images: str = "val2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        train_size: int = 1024,
        scale_range: Sequence[float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        copy_paste_prob: float = 0.5,
        max_paste_objects: int = 7,
        num_classes: int | None = None,
        test_min_size: int = 800,
        test_max_size: int = 1333,
        size_divisible: int = 128,
        shuffle_seed: int = 0,
        with_masks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.train_dataset: COCODetection | None = None
        self.val_dataset: COCODetection | None = None

    def _path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def train_annotation_file(self) -> Path:
        return self._path(self.hparams.train_annotations)

    @property
    def val_annotation_file(self) -> Path:
        """The ground-truth file of the evaluation."""
        return self._path(self.hparams.val_annotations)

    @property
    def category_ids(self) -> list[int]:
        """``category_ids[label]`` is the COCO category id of a contiguous label."""
        if self.val_dataset is None:
            self.setup("validate")
        return self.val_dataset.label_to_category_id

    @property
    def category_names(self) -> list[str]:
        """``category_names[label]`` is the COCO category name of a contiguous label."""
        ids = self.category_ids
        return [self.val_dataset.category_names[c] for c in ids]

    @property
    def num_classes(self) -> int:
        """Number of categories (the configured value, else read from the validation annotations)."""
        if self.hparams.num_classes is not None:
            return int(self.hparams.num_classes)
        return len(self.category_ids)

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is None:
            val = COCODetection(
                self._path(self.hparams.val_images),
                self.val_annotation_file,
                with_masks=self.hparams.with_masks,
            )
            expected = self.hparams.num_classes
            if expected is not None and len(val.category_ids) != expected:
                raise ValueError(
                    f"{self.val_annotation_file} has {len(val.category_ids)} categories but data.num_classes is "
                    f"{expected}; set data.num_classes={len(val.category_ids)}"
                )
            self.val_dataset = val
        if stage in (None, "fit") and self.train_dataset is None:
            hp = self.hparams
            self.train_dataset = COCODetection(
                self._path(hp.train_images),
                self.train_annotation_file,
                transforms=build_train_transforms(hp.train_size, hp.scale_range, hp.hflip_prob),
                copy_paste_prob=hp.copy_paste_prob,
                max_paste_objects=hp.max_paste_objects,
                category_ids=self.val_dataset.category_ids,
                seed=hp.shuffle_seed,
                with_masks=hp.with_masks,
            )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        # train: epoch-seeded order, sharded over DDP ranks, (index, epoch) keys for the augmentation seeds;
        # eval: unpadded per-rank shards (every image once)
        sampler = (
            train_sampler(dataset, self.hparams.shuffle_seed, with_epoch=True, trainer=self.trainer)
            if shuffle
            else exact_eval_sampler(dataset)
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            collate_fn=detection_collate,
            drop_last=shuffle,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.val_dataset, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
