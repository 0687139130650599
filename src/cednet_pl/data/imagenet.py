"""ImageNet-style classification data on the ImageFolder layout, with the ConvNeXt training transforms.

Layout: `root/train/<class>/<image>` and `root/val/<class>/<image>` (val sorted into class folders, as for
torchvision's ImageFolder). Transforms come from `timm.data.create_transform` with the ConvNeXt recipe:
RandAugment `rand-m9-mstd0.5-inc1`, bicubic, random erasing 0.25 in `pixel` mode, eval resize + center crop 0.875.
(With RandAugment on, timm does not add colour jitter, exactly as the ConvNeXt and DeiT code paths.)

Corrupt images: by default (`on_corrupt="skip"`) a training image that fails to decode is replaced by the next
readable one of the split; a validation image is dropped from the metrics instead (its label becomes
`IGNORE_LABEL`: a neighbour would count one image twice). Each skipped file is logged through the run's logger (it
lands in the job log), and the `SkippedImagesReport` callback reports the count per epoch and at the end and
writes the list to `<run dir>/skipped_images.tsv`. More than `max_corrupt` skipped files stop the run.
`on_corrupt="error"` stops at the first one, naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from cednet_pl.data.samplers import exact_eval_sampler, train_sampler


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits kept (all channels zero), which Pillow >= 12 refuses.

    NOTE: `rand-m9-mstd0.5-inc1` samples magnitudes up to 10, where the increasing posterize keeps 0 bits; the
    ConvNeXt recipe ran on a Pillow that accepted it, so the recipe needs this to not crash at random.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    if auto_augment.NAME_TO_OP.get(_name) is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


log = logging.getLogger(__name__)

#: Label of a validation sample whose image could not be decoded: the LightningModule leaves it out of the metrics.
IGNORE_LABEL = -1


class CorruptImageError(RuntimeError):
    """An image file could not be decoded."""


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise CorruptImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def check_split_dir(root: Path, split: str) -> Path:
    """Validate `root/split` as an ImageFolder split; return it.

    Raises a clear error when the root or the split is missing, when the split has no class folders, or when a class
    folder holds no image.
    """
    if not root.exists():
        raise FileNotFoundError(
            f"data root {root} does not exist; set data.root to a directory with train/ and val/ class folders"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"data root {root} is not a directory")
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:10]
        raise FileNotFoundError(
            f"data root {root} has no {split}/ directory (expected {root}/{split}/<class>/<image>; "
            f"found directories: {found or 'none'})"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    extensions = tuple(IMG_EXTENSIONS)
    empty = []
    for cls in classes:
        with os.scandir(split_dir / cls) as it:
            if not any(e.is_file() and e.name.lower().endswith(extensions) for e in it):
                empty.append(cls)
    if empty:
        shown = ", ".join(str(split_dir / c) for c in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise FileNotFoundError(
            f"{len(empty)} empty class folder(s) in {split_dir}: {shown}{more} (no files with extensions "
            f"{', '.join(extensions)})"
        )
    return split_dir


class SafeImageFolder(Dataset):
    """An ImageFolder split that skips (or refuses) corrupt images.

    Args:
        root: The split directory (`<root>/train` or `<root>/val`).
        transform: Image transform.
        on_corrupt: "skip" or "error" (stop at the first corrupt file, naming it).
        max_corrupt: Stop once more than this many corrupt files were skipped (per loader process).
        drop_corrupt: With "skip": return a placeholder with label `IGNORE_LABEL` for a corrupt image (evaluation:
            dropped from the metrics) instead of the next readable image (training).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        on_corrupt: str = "skip",
        max_corrupt: int = 100,
        drop_corrupt: bool = False,
    ):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"data.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.folder = ImageFolder(str(root), transform=None, loader=_load_rgb)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.max_corrupt = int(max_corrupt)
        self.drop_corrupt = drop_corrupt
        self.corrupt_files: set[str] = set()
        # NOTE: shared memory, so the flags that loader workers set are seen by the main process
        self.skipped = torch.zeros(len(self.folder.samples), dtype=torch.bool).share_memory_()

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return self.folder.class_to_idx

    @property
    def corrupt_count(self) -> int:
        return len(self.corrupt_files)

    def take_skipped(self) -> list[str]:
        """The files skipped since the last call (in any loader process), and clear the record."""
        flagged = self.skipped.nonzero().flatten().tolist()
        self.skipped.zero_()
        return [self.folder.samples[i][0] for i in flagged]

    def __len__(self) -> int:
        return len(self.folder.samples)

    def _skip(self, index: int, path: str, err: CorruptImageError) -> None:
        if self.on_corrupt == "error":
            raise err
        self.skipped[index] = True
        if path not in self.corrupt_files:
            self.corrupt_files.add(path)
            what = "dropped from the metrics" if self.drop_corrupt else "replaced by the next image"
            log.warning(f"skipping corrupt image ({self.corrupt_count} so far, {what}): {err}")
        if self.corrupt_count > self.max_corrupt:
            raise CorruptImageError(
                f"more than {self.max_corrupt} corrupt images skipped (last: {path}); the dataset looks "
                f"damaged (raise data.max_corrupt to go on)"
            ) from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        for attempt in range(min(n, 16)):
            i = (index + attempt) % n
            path, target = self.folder.samples[i]
            try:
                img = _load_rgb(path)
            except CorruptImageError as e:
                self._skip(i, path, e)
                if self.drop_corrupt:
                    img, target = Image.new("RGB", (256, 256)), IGNORE_LABEL
                else:
                    continue
            return (self.transform(img) if self.transform is not None else img), target
        raise CorruptImageError(
            f"16 consecutive unreadable images starting at {self.folder.samples[index][0]}"
        )


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet-1K (or any ImageFolder dataset) with timm's transforms.

    Args:
        root: Directory with `train/` and `val/` class folders.
        num_classes: Expected number of class folders (checked).
        image_size: Train crop / eval crop size.
        batch_size: Per-device training batch size.
        eval_batch_size: Per-device validation batch size (default: `batch_size`).
        num_workers: DataLoader workers per device.
        pin_memory: Pin host memory.
        persistent_workers: Keep workers between epochs (only with num_workers > 0).
        crop_pct: Eval center-crop fraction (0.875: resize to 256, crop 224).
        interpolation: Resize interpolation.
        auto_augment: timm auto-augment policy string (None: off).
        color_jitter: Colour jitter strength (ignored by timm while auto-augment is on).
        re_prob: Random-erasing probability.
        re_mode: Random-erasing fill mode.
        re_count: Random-erasing count.
        hflip: Horizontal flip probability.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        mean: Normalisation mean.
        std: Normalisation std.
        on_corrupt: "skip" (log the file; training uses the next image, validation drops it from the metrics) or
            "error" (stop at the first corrupt file).
        max_corrupt: Give up after this many skipped files (per loader process).
        shuffle_seed: Seed of the epoch-deterministic shuffling (DDP ranks take interleaved shards of the same order).
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 1000,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        on_corrupt: str = "skip",
        max_corrupt: int = 100,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"data.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.data_train: SafeImageFolder | None = None
        self.data_val: SafeImageFolder | None = None

    def train_transform(self) -> Callable:
        hp = self.hparams
        return create_transform(
            input_size=hp.image_size,
            is_training=True,
            scale=tuple(hp.scale),
            ratio=tuple(hp.ratio),
            hflip=hp.hflip,
            color_jitter=hp.color_jitter,
            auto_augment=hp.auto_augment,
            interpolation=hp.interpolation,
            mean=tuple(hp.mean),
            std=tuple(hp.std),
            re_prob=hp.re_prob,
            re_mode=hp.re_mode,
            re_count=hp.re_count,
        )

    def eval_transform(self) -> Callable:
        hp = self.hparams
        return create_transform(
            input_size=hp.image_size,
            is_training=False,
            interpolation=hp.interpolation,
            crop_pct=hp.crop_pct,
            mean=tuple(hp.mean),
            std=tuple(hp.std),
        )

    @property
    def class_names(self) -> list[str]:
        """Class folder names in label order (read from `val/`)."""
        if self.data_val is None:
            self.setup("validate")
        assert self.data_val is not None
        return list(self.data_val.classes)

    def _split(self, split: str, transform: Callable) -> SafeImageFolder:
        split_dir = check_split_dir(self.root, split)
        ds = SafeImageFolder(
            split_dir,
            transform,
            self.hparams.on_corrupt,
            self.hparams.max_corrupt,
            drop_corrupt=split != "train",
        )
        if len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{split_dir} has {len(ds.classes)} class folders but data.num_classes={self.num_classes} "
                f"(set data.num_classes={len(ds.classes)} for a different dataset)"
            )
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.data_train is None:
            self.data_train = self._split("train", self.train_transform())
        if stage in (None, "fit", "validate", "test") and self.data_val is None:
            self.data_val = self._split("val", self.eval_transform())
        if (
            self.data_train is not None
            and self.data_val is not None
            and self.data_train.classes != self.data_val.classes
        ):
            diff = sorted(set(self.data_train.classes) ^ set(self.data_val.classes))[:5]
            raise ValueError(f"train/ and val/ of {self.root} have different class folders, e.g. {diff}")

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # train: epoch-seeded order, sharded over DDP ranks; eval: unpadded per-rank shards, so val metrics
            # count every sample exactly once (cednet_pl.data.samplers)
            sampler=(
                train_sampler(dataset, self.hparams.shuffle_seed, trainer=self.trainer)
                if train
                else exact_eval_sampler(dataset)
            ),
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=bool(hp.persistent_workers and hp.num_workers > 0),
            drop_last=train,
        )

    def take_skipped(self, split: str) -> list[str]:
        """Files of `split` ("train"/"val") skipped as corrupt since the last call (see `SkippedImagesReport`)."""
        ds = self.data_train if split == "train" else self.data_val
        return ds.take_skipped() if ds is not None else []

    def train_dataloader(self) -> DataLoader:
        assert self.data_train is not None, "call setup('fit') first"
        return self._loader(self.data_train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.data_val is not None, "call setup() first"
        return self._loader(self.data_val, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
