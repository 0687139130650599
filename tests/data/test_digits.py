"""The embedded digits DataModule."""

from __future__ import annotations

import pytest
import torch

from cednet_pl.data.digits import DigitsDataModule
from cednet_pl.data.samplers import EpochSeededSampler


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=32, batch_size=8)
    dm.setup("fit")
    return dm


def test_split_sizes_and_shapes(digits: DigitsDataModule) -> None:
    assert len(digits.data_train) + len(digits.data_val) == 1797
    assert len(digits.data_val) == 360
    x, y = next(iter(digits.val_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0
    assert set(y.tolist()) <= set(range(10))
    assert torch.equal(x[:, 0], x[:, 1])  # gray repeated to RGB


def test_fixed_stratified_split() -> None:
    a, b = DigitsDataModule(image_size=16), DigitsDataModule(image_size=16)
    a.setup("fit")
    b.setup("fit")
    assert torch.equal(a.data_val.labels, b.data_val.labels)
    assert torch.equal(a.data_val.images, b.data_val.images)
    counts = torch.bincount(a.data_val.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~36 per class


def test_train_loader_drops_last_and_is_epoch_deterministic(digits: DigitsDataModule) -> None:
    loader = digits.train_dataloader()
    assert loader.drop_last
    assert isinstance(loader.sampler, EpochSeededSampler) and loader.sampler.with_epoch
    first = next(iter(loader))
    again = next(iter(digits.train_dataloader()))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    loader.sampler.set_epoch(1)
    other = next(iter(loader))
    assert not torch.equal(first[1], other[1])


def test_augmentation_depends_on_epoch_and_index_only(digits: DigitsDataModule) -> None:
    ds = digits.data_train
    torch.manual_seed(0)
    a = ds[(5, 3)][0]
    torch.manual_seed(123)
    b = ds[(5, 3)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(5, 4)][0])
    plain = (ds.images[5] - 0.5) / 0.5
    assert not torch.equal(a[0], plain[0])
    val_item = digits.data_val[0][0]
    assert torch.equal(val_item[0], (digits.data_val.images[0][0] - 0.5) / 0.5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="10 classes"):
        DigitsDataModule(num_classes=1000)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
