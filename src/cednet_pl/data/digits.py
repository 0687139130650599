"""The embedded default dataset: scikit-learn's handwritten digits, upsampled to RGB images.

1797 real 8x8 grayscale digits (0-9) ship inside scikit-learn, so `cednet-train` runs anywhere with no download.
Images are scaled to [0, 1], upsampled (bilinear) to `image_size`, repeated to 3 channels and normalised to [-1, 1].
The train/val split is stratified and fixed by `split_seed`. Training augmentation is a light random affine
(rotation, scale, translation); no flips (digits are not mirror-symmetric).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cednet_pl.data.samplers import exact_eval_sampler, sample_seed, train_sampler


def load_digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as a (N, 1, image_size, image_size) float tensor in [0, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp_(0.0, 1.0), torch.as_tensor(bunch.target, dtype=torch.int64)


class DigitsDataset(Dataset):
    """In-memory digits with optional random-affine augmentation.

    Indexed by an int, or by `(index, epoch)` (from `EpochSeededSampler(with_epoch=True)`): the augmentation
    of a sample then depends only on `seed`, the epoch and the index, whichever process or iterator draws it.

    Args:
        images: (N, 1, H, W) tensor in [0, 1].
        labels: (N,) labels.
        augment: Apply the random affine.
        max_rotation: Max rotation in degrees.
        max_translate: Max translation as a fraction of the image size.
        scale_range: Min and max zoom.
        seed: Base seed of the per-sample augmentation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool = False,
        max_rotation: float = 12.0,
        max_translate: float = 0.1,
        scale_range: tuple[float, float] = (0.9, 1.1),
        seed: int = 0,
    ):
        self.images = images
        self.labels = labels
        self.augment = augment
        self.max_rotation = max_rotation
        self.max_translate = max_translate
        self.scale_range = tuple(scale_range)
        self.seed = int(seed)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _affine(self, img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        r = torch.rand(4, generator=generator)
        angle = math.radians((2 * r[0].item() - 1) * self.max_rotation)
        scale = self.scale_range[0] + r[1].item() * (self.scale_range[1] - self.scale_range[0])
        tx, ty = ((2 * r[2:] - 1) * 2 * self.max_translate).tolist()
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=img.dtype)
        grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
        return F.grid_sample(
            img.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img = self.images[index]
        if self.augment:
            generator = None
            if epoch is not None:
                generator = torch.Generator()
                generator.manual_seed(sample_seed(self.seed, epoch, index))
            img = self._affine(img, generator)
        img = (img - 0.5) / 0.5
        return img.expand(3, -1, -1).contiguous(), int(self.labels[index])


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn digits as a classification DataModule (10 classes, no download).

    Args:
        image_size: Output side length (the 8x8 digits are upsampled).
        batch_size: Per-device training batch size.
        eval_batch_size: Validation batch size (default: `batch_size`).
        val_fraction: Fraction of the 1797 images held out for validation (stratified).
        split_seed: Seed of the fixed train/val split.
        shuffle_seed: Seed of the per-epoch shuffling (epoch-deterministic, so resumed runs match).
        augment: Random affine augmentation of training images.
        num_workers: DataLoader workers (0 is fastest for this in-memory set).
        pin_memory: Pin host memory.
        persistent_workers: Keep workers alive between epochs (only with num_workers > 0).
        num_classes: Must be 10; present so configs can interpolate `${data.num_classes}`.
    """

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        num_classes: int = 10,
    ):
        super().__init__()
        if num_classes != 10:
            raise ValueError(f"the digits dataset has 10 classes, got data.num_classes={num_classes}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        self.save_hyperparameters(logger=False)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_classes = num_classes
        self.data_train: DigitsDataset | None = None
        self.data_val: DigitsDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """The digit of each label."""
        return [str(d) for d in range(10)]

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The evaluation pipeline for an image file: grey [0, 1], bilinear resize to `image_size`, 3 channels in
        [-1, 1] (as the validation images; dark digits on a light ground are inverted by the caller if needed)."""
        size = self.image_size

        def transform(img: Image.Image) -> torch.Tensor:
            x = TF.pil_to_tensor(img.convert("L")).float().div_(255.0)[None]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]
            return ((x - 0.5) / 0.5).expand(3, -1, -1).contiguous()

        return transform

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_tensors(self.image_size)
        idx = torch.arange(labels.shape[0]).numpy()
        train_idx, val_idx = train_test_split(
            idx,
            test_size=self.hparams.val_fraction,
            random_state=self.hparams.split_seed,
            stratify=labels.numpy(),
        )
        train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        self.data_train = DigitsDataset(
            images[train_idx], labels[train_idx], augment=self.hparams.augment, seed=self.hparams.shuffle_seed
        )
        self.data_val = DigitsDataset(images[val_idx], labels[val_idx], augment=False)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # train: epoch-seeded order, sharded over DDP ranks; eval: unpadded per-rank shards, so val metrics
            # count every sample exactly once (cednet_pl.data.samplers)
            # (train: (index, epoch) keys give per-sample augmentation seeds, exact on resume)
            sampler=(
                train_sampler(dataset, self.hparams.shuffle_seed, with_epoch=True, trainer=self.trainer)
                if train
                else exact_eval_sampler(dataset)
            ),
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=bool(self.hparams.persistent_workers and workers > 0),
            drop_last=train,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.data_train is not None, "call setup() first"
        return self._loader(self.data_train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.data_val is not None, "call setup() first"
        return self._loader(self.data_val, self.eval_batch_size, train=False)
