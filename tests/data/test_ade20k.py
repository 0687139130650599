"""ADE20K layout, label mapping, training pipeline, bad input; the embedded synthetic segmentation set."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cednet_pl.data.ade20k import (
    ADE20KDataModule,
    SegmentationFolder,
    SegmentationTrainTransform,
    generate_synthetic_seg,
)


def make_ade(root: Path, n: int = 3, size=(40, 56), split: str = "training") -> Path:
    """Tiny ADE20K-layout set: random JPEGs and label PNGs with values 0..150."""
    rng = np.random.default_rng(0)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / split / f"ADE_{i:03d}.jpg"
        )
        label = rng.integers(0, 151, (h, w), dtype=np.uint8)
        Image.fromarray(label, mode="L").save(root / "annotations" / split / f"ADE_{i:03d}.png")
    return root


def test_labels_map_zero_to_ignore_and_shift(tmp_path):
    root = make_ade(tmp_path)
    ds = SegmentationFolder(root, "training", num_classes=150)
    image, mask = ds[0]
    raw = np.asarray(Image.open(root / "annotations" / "training" / "ADE_000.png")).astype(np.int64)
    assert image.shape == (3, 40, 56) and image.dtype == torch.uint8
    expected = np.where(raw == 0, 255, raw - 1)
    assert torch.equal(mask, torch.from_numpy(expected))
    assert int(mask[mask != 255].max()) <= 149


def test_train_transform_crops_pads_and_keeps_labels_aligned():
    torch.manual_seed(0)
    h, w = 30, 50
    # label = column index // 10 (5 classes in vertical stripes); the image encodes the same stripes
    label = torch.arange(w).div(10, rounding_mode="floor").expand(h, w).clone()
    image = (label * 50).to(torch.uint8).expand(3, h, w).clone()
    kw = dict(
        ratio_range=(1.0, 1.0), crop_size=32, hflip_prob=1.0, photometric=False, mean=(0, 0, 0), std=(1, 1, 1)
    )
    # scale (50, 30) keeps the 50x30 image as it is: crop + flip must keep pixels and labels aligned exactly
    img, mask = SegmentationTrainTransform(scale=(50, 30), **kw)(
        tv_tensors.Image(image), tv_tensors.Mask(label)
    )
    assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and img.dtype == torch.float32
    assert (mask[30:] == 255).all() and (mask[:30] != 255).all()  # 30 rows padded to 32 with ignore
    valid = mask != 255
    assert torch.equal((img[0] * 255 / 50).round().long()[valid], mask[valid])
    # resized (bilinear image, nearest labels) to 32 x 53: labels still match away from the stripe edges
    img, mask = SegmentationTrainTransform(scale=(64, 32), **kw)(
        tv_tensors.Image(image), tv_tensors.Mask(label)
    )
    assert (mask != 255).all()
    agree = (img[0] * 255 / 50).round().long() == mask
    assert agree.float().mean() > 0.85
    # a crop larger than the image is padded with ignore
    t2 = SegmentationTrainTransform(scale=(20, 10), ratio_range=(1.0, 1.0), crop_size=32, photometric=False)
    img2, mask2 = t2(tv_tensors.Image(image), tv_tensors.Mask(label))
    assert img2.shape == (3, 32, 32) and (mask2[10:] == 255).all() and (mask2[:10, :16] != 255).all()


def test_cat_max_ratio_rejects_dominated_crops():
    torch.manual_seed(0)
    label = torch.zeros(64, 64, dtype=torch.int64)
    label[:, 48:] = 1  # class 1 only in the right quarter
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    t = SegmentationTrainTransform(
        scale=(64, 64), ratio_range=(1.0, 1.0), crop_size=32, photometric=False, hflip_prob=0
    )
    shares = []
    for _ in range(20):
        _, mask = t(tv_tensors.Image(image), tv_tensors.Mask(label))
        counts = torch.bincount(mask.flatten(), minlength=2).float()
        shares.append(float(counts.max() / counts.sum()))
    # 10 retries: almost every crop reaches the stripe (a uniformly random crop would in 17 of 33 positions)
    assert sum(s < 0.75 for s in shares) >= 18


def test_bad_input_errors(tmp_path):
    root = make_ade(tmp_path / "a")
    # label of another size
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="L").save(
        root / "annotations" / "training" / "ADE_001.png"
    )
    ds = SegmentationFolder(root, "training", num_classes=150)
    with pytest.raises(ValueError, match=r"ADE_001\.png is 10x10 .* image .*ADE_001\.jpg is 56x40"):
        ds.load(1)
    # values outside 0-150
    bad = np.zeros((40, 56), dtype=np.uint8)
    bad[0, :3] = [151, 200, 7]
    Image.fromarray(bad, mode="L").save(root / "annotations" / "training" / "ADE_002.png")
    with pytest.raises(ValueError, match=r"ADE_002\.png has values \[151, 200\] outside 0-150"):
        ds.load(2)
    # an image without its label
    (root / "annotations" / "training" / "ADE_000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no label file.*ADE_000\.png"):
        SegmentationFolder(root, "training", num_classes=150)
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        SegmentationFolder(tmp_path / "nothing", "training", num_classes=150)
    with pytest.raises(ValueError, match="2 names but num_classes is 150"):
        ADE20KDataModule(str(root), class_names=["a", "b"])


def test_datamodule_batches(tmp_path):
    root = make_ade(tmp_path, n=4, size=(48, 64))
    make_ade(root, n=3, size=(40, 56), split="validation")
    dm = ADE20KDataModule(str(root), batch_size=2, num_workers=0, crop_size=32, scale=(64, 48))
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32) and masks.dtype == torch.int64
    vimages, vmasks = next(iter(dm.val_dataloader()))
    assert len(vimages) == 1 and vimages[0].shape == (3, 40, 56) and vmasks[0].shape == (40, 56)


def test_synthetic_seg_labels_follow_the_masks(tmp_path):
    root = generate_synthetic_seg(
        tmp_path / "seg", num_train=3, num_val=2, image_size=64, digit_size=(16, 32), num_digits=(1, 2)
    )
    ds = SegmentationFolder(root, "validation", num_classes=11, reduce_zero_label=False, image_suffix=".png")
    assert len(ds) == 2
    import json

    coco = json.loads((root / "det" / "annotations" / "instances_val.json").read_text())
    first = coco["images"][0]
    digits = sorted((a["category_id"] - 1) // 2 for a in coco["annotations"] if a["image_id"] == first["id"])
    _, mask = ds.load(0)
    assert sorted(set(mask.unique().tolist()) - {0}) == sorted({d + 1 for d in digits})
    stamp = (root / "seg_manifest.json").stat().st_mtime_ns
    generate_synthetic_seg(
        tmp_path / "seg", num_train=3, num_val=2, image_size=64, digit_size=(16, 32), num_digits=(1, 2)
    )
    assert (root / "seg_manifest.json").stat().st_mtime_ns == stamp  # cached, not regenerated
