"""Shared test helpers (importable as `testlib`: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning import Callback
from omegaconf import DictConfig, open_dict
from PIL import Image

from cednet_pl.utils.run import CONF_DIR

#: Overrides that shrink the embedded detection set (det_demo/ins_demo) to 4 + 4 canvases of 128 px.
TINY_DET_DATA = [
    "data.num_train=4",
    "data.num_val=4",
    "data.image_size=128",
    "data.train_size=128",
    "data.test_min_size=128",
    "data.test_max_size=128",
    "data.digit_size=[20,40]",
    "data.num_digits=[1,3]",
    "data.batch_size=2",
    "data.val_batch_size=4",
]

#: Overrides that make any composed run small and quiet on a CPU-only machine.
#: a tiny but complete digits run (cednet_next_nano with EMA): 2 train batches, 2 val batches, 32x32 images
TINY_TRAIN = [
    "data.image_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "trainer.max_epochs=1",
]
FAST_OVERRIDES = ["trainer=cpu", "logger=none", "extras.print_config=false", "data.num_workers=0"]


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose `config_name` with `overrides`, route every output dir to `tmp_path` and register HydraConfig."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    out = tmp_path / "run"
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def make_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 40) -> Path:
    """Write a tiny ImageFolder dataset (train/ and val/) of random JPEGs."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size + 8, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"img_{i}.JPEG", quality=90)
    return root


class RankMetrics(Callback):
    """Write each rank's `val/*` callback metrics after every validation to `<out_dir>/rank<r>.json`.

    For tests that compare what every DDP rank computed (add it with `+callbacks.rank_metrics._target_=...`).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


class CrashAtEpoch(Callback):
    """Simulates a killed job: raises KeyError("simulated crash") when epoch `epoch` starts (after the previous
    epoch's checkpoint)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyError("simulated crash")


def with_extra_callback(monkeypatch, callback: Callback) -> None:
    """Make `cednet_pl.train.train` add `callback` to the configured ones (inside `monkeypatch`)."""
    import cednet_pl.train as train_mod

    original = train_mod.instantiate_callbacks
    monkeypatch.setattr(train_mod, "instantiate_callbacks", lambda cfg: [*original(cfg), callback])


#: seg_demo data cut down for tests: 64 px canvases with 1-2 digits, 64 px crops, batches of 2 (add
#: data.num_train / data.num_val and the evaluation window).
TINY_SEG_DATA = [
    "data.image_size=64",
    "data.digit_size=[20,40]",
    "data.num_digits=[1,2]",
    "data.crop_size=64",
    "data.scale=[128,64]",
    "data.batch_size=2",
    "data.val_batch_size=2",
]

#: det_demo (2 gloo processes by default) on a tiny synthetic set of its own 256 px canvases: 5 validation
#: images, an odd count. (Smaller canvases make P7 1x1, which GroupNorm(32) over 32 channels cannot normalise.)
TINY_DET = [
    "+experiment=det_demo",
    "data.num_train=4",
    "data.num_val=5",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "extras.print_config=false",
]


def annotations_by_image(ann_file):
    """``(sorted category ids, {image id: [annotations]})`` of a COCO file (every image, possibly empty)."""
    data = json.loads(ann_file.read_text())
    per_image = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    return sorted(c["id"] for c in data["categories"]), per_image


def perturbed_predictions(ann_file, seed, predict, false_positive):
    """Predictions from a COCO file's ground truth: per object (10% missed) ``predict(ann, rng)``, 15% with a
    wrong label, random scores; 0-2 ``false_positive(rng)`` per image with lower scores.

    Returns:
        ``(cat_ids, image_ids, [(predictions, scores, contiguous labels) per image])``.
    """
    import random

    rng = random.Random(seed)
    cat_ids, per_image = annotations_by_image(ann_file)
    image_ids, out = [], []
    for image_id, anns in per_image.items():
        preds, scores, labels = [], [], []
        for ann in anns:
            if rng.random() < 0.1:
                continue
            preds.append(predict(ann, rng))
            wrong = rng.random() < 0.15
            labels.append(rng.randrange(10) if wrong else cat_ids.index(ann["category_id"]))
            scores.append(rng.random())
        for _ in range(rng.randrange(3)):
            preds.append(false_positive(rng))
            labels.append(rng.randrange(10))
            scores.append(rng.random() * 0.5)
        image_ids.append(image_id)
        out.append((preds, scores, labels))
    return cat_ids, image_ids, out


def assert_coco_3x_recipe(
    cfg, name: str, model_name: str, drop_path: float, layer_decay: float | None
) -> None:
    """The COCO 3x recipe shared by the RetinaNet and Mask R-CNN experiments (released configs)."""
    assert cfg.task_name == name and cfg.data._target_.endswith("COCODataModule")
    assert cfg.model.backbone.model_name == model_name and cfg.model.backbone.drop_path_rate == drop_path
    assert cfg.model.optimizer.layer_decay == layer_decay and cfg.model.optimizer.lr == 1e-4
    assert cfg.model.optimizer.weight_decay == 0.05
    assert cfg.data.batch_size * cfg.trainer.devices == 16 and cfg.trainer.max_epochs == 36
    assert [round(m * 36) for m in cfg.model.scheduler.milestones] == [27, 33]
    assert (cfg.data.train_size, list(cfg.data.scale_range), cfg.data.copy_paste_prob) == (
        1024,
        [0.1, 2.0],
        0.5,
    )
    assert cfg.model.num_classes == 80 and "mixed" in cfg.trainer.precision
