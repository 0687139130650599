"""ImageFolder/ImageNet DataModule: layout validation, corrupt images, transforms."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cednet_pl.data.imagenet import IGNORE_LABEL, CorruptImageError, ImageNetDataModule
from testlib import make_image_folder


def _dm(root: Path, **kwargs) -> ImageNetDataModule:
    args = {"num_classes": 2, "image_size": 32, "batch_size": 2, "num_workers": 0, "pin_memory": False}
    return ImageNetDataModule(root=str(root), **{**args, **kwargs})


def test_loads_with_convnext_transforms(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    dm = _dm(root)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 32, 32)
    assert dm.train_dataloader().drop_last and not dm.val_dataloader().drop_last
    text = repr(dm.train_transform())
    assert "RandAugment" in text and "RandomErasing" in text and "bicubic" in text.lower()
    eval_text = repr(dm.eval_transform())
    assert "CenterCrop" in eval_text and "size=36" in eval_text  # 32 / 0.875 -> 36


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data root .*nowhere does not exist"):
        _dm(tmp_path / "nowhere").setup("fit")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path: Path, split: str) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=1)
    for p in sorted((root / split).rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / split).rmdir()
    with pytest.raises(FileNotFoundError, match=rf"has no {split}/ directory"):
        _dm(root).setup("fit")


def test_empty_class_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=1)
    (root / "train" / "n_empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"1 empty class folder\(s\) in .*train: .*n_empty"):
        _dm(root, num_classes=3).setup("fit")


def test_class_count_mismatch(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=1)
    with pytest.raises(ValueError, match=r"has 2 class folders but data.num_classes=1000"):
        _dm(root, num_classes=1000).setup("fit")


def test_corrupt_image_skipped_with_counted_warning(tmp_path: Path, caplog) -> None:
    root = make_image_folder(tmp_path / "ds")
    bad = root / "train" / "n00000000" / "img_1.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    dm = _dm(root)
    dm.setup("fit")
    ds = dm.data_train
    with caplog.at_level(logging.WARNING, logger="cednet_pl.data.imagenet"):
        x, y = ds[1]
    assert re.search(
        r"skipping corrupt image \(1 so far, replaced by the next image\).*img_1\.JPEG", caplog.text
    )
    assert x.shape == (3, 32, 32) and y == 0  # the next image of the class
    assert ds.corrupt_count == 1
    ds[1]
    assert ds.corrupt_count == 1  # counted once per file
    assert dm.take_skipped("train") == [str(bad)] and dm.take_skipped("train") == []


def test_corrupt_validation_image_is_dropped_not_replaced(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    bad = root / "val" / "n00000001" / "img_2.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    dm = _dm(root)
    dm.setup("validate")
    x, y = dm.data_val[6]  # class 1, image 2
    assert y == IGNORE_LABEL and x.shape == (3, 32, 32)
    assert dm.take_skipped("val") == [str(bad)]


def test_skipped_images_reported_per_epoch_and_left_out_of_val_metrics(make_cfg, tmp_path: Path) -> None:
    """A run with one corrupt training and one corrupt validation image, read by a loader worker process."""
    from cednet_pl.train import train

    root = make_image_folder(tmp_path / "ds")
    (root / "train" / "n00000000" / "img_1.JPEG").write_bytes(b"broken")
    (root / "val" / "n00000001" / "img_2.JPEG").write_bytes(b"broken")
    cfg = make_cfg(
        "train",
        [
            "data=imagenet",
            f"data.root={root}",
            "data.num_classes=2",
            "data.image_size=32",
            "data.batch_size=4",
            "data.eval_batch_size=8",
            "data.num_workers=1",
            "data.pin_memory=false",
            "data.persistent_workers=false",
            "trainer.max_epochs=2",
        ],
    )
    metrics, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = [line.split("\t") for line in (run / "skipped_images.tsv").read_text().splitlines()]
    assert sorted((r[0], r[1]) for r in rows) == [("train", "0"), ("train", "1"), ("val", "0"), ("val", "1")]
    assert {Path(r[2]).name for r in rows} == {"img_1.JPEG", "img_2.JPEG"}
    assert metrics["data/skipped_train"] == 1 and metrics["data/skipped_val"] == 1
    # 7 readable validation images: every accuracy is k / 7
    assert abs(metrics["val/acc1"] * 7 - round(metrics["val/acc1"] * 7)) < 1e-4


def test_corrupt_image_error_mode_and_limit(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    bad = root / "train" / "n00000000" / "img_1.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    dm = _dm(root, on_corrupt="error")
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*img_1\.JPEG"):
        dm.data_train[1]
    dm = _dm(root, max_corrupt=0)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match="more than 0 corrupt images"):
        dm.data_train[1]
    with pytest.raises(ValueError, match="on_corrupt"):
        _dm(root, on_corrupt="ignore")


def test_recipe_randaugment_survives_posterize_to_zero_bits():
    """rand-m9-mstd0.5-inc1 can draw magnitude 10, where increasing posterize keeps 0 bits (Pillow refuses 0)."""
    from PIL import Image
    from timm.data import auto_augment

    import cednet_pl.data.imagenet  # noqa: F401  (installs the posterize op)

    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={})
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (0, 0, 0)
    op4 = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=0, hparams={})
    assert op4(Image.new("RGB", (8, 8), (200, 100, 50))).getpixel((0, 0)) == (192, 96, 48)
