"""Tiny detection setup shared by the analysis tests: RetinaNet-CEDNet-nano on a 64-pixel synthetic digits set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cednet_pl.callbacks import DetectionQuality
from cednet_pl.data.synthetic_det import SyntheticDetDataModule
from cednet_pl.lit.detection import DetectionModule

SIZE = 64


def tiny_datamodule(root: Path, **kwargs) -> SyntheticDetDataModule:
    return SyntheticDetDataModule(
        root=str(root),
        num_train=4,
        num_val=6,
        image_size=SIZE,
        num_digits=(1, 2),
        digit_size=(16, 28),
        empty_prob=0.0,
        batch_size=2,
        val_batch_size=4,
        num_workers=0,
        pin_memory=False,
        train_size=SIZE,
        scale_range=(0.9, 1.1),
        copy_paste_prob=0.0,
        test_min_size=SIZE,
        test_max_size=SIZE,
        size_divisible=32,
        **kwargs,
    )


def tiny_detector(seed: int = 0) -> DetectionModule:
    torch.manual_seed(seed)
    return DetectionModule(
        backbone={
            "kind": "cednet",
            "model_name": "cednet_next_nano",
            "out_channels": 64,
            "drop_path_rate": 0.1,
        },
        num_classes=10,
        detector={
            "min_size": SIZE,
            "max_size": SIZE,
            "size_divisible": 32,
            "anchor_base_sizes": [16, 32, 64, 128, 256],
            "score_thresh": 0.0,
        },
        scheduler={"name": "constant"},
    )


def make_trainer(run_dir: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(run_dir, name="csv", version=""),
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


@pytest.fixture(scope="session")
def det_root(tmp_path_factory) -> Path:
    """Directory of the tiny synthetic set (generated once per session)."""
    root = tmp_path_factory.mktemp("synthetic_det")
    dm = tiny_datamodule(root)
    dm.prepare_data()
    return root


@pytest.fixture(scope="session")
def tiny(det_root):
    """Factories of the tiny setup: ``tiny.datamodule()``, ``tiny.detector(seed)``, ``tiny.trainer(dir, cbs)``."""
    return SimpleNamespace(
        datamodule=lambda **kwargs: tiny_datamodule(det_root, **kwargs),
        detector=tiny_detector,
        trainer=make_trainer,
        root=det_root,
    )


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, tiny):
    """Two validate-only runs (different random detectors) with quality files, COCO metrics and checkpoints."""
    base = tmp_path_factory.mktemp("compare")
    runs = []
    for seed in (0, 1):
        run = base / f"run{seed}"
        trainer = tiny.trainer(run, [DetectionQuality()])
        module = tiny.detector(seed)
        trainer.validate(module, datamodule=tiny.datamodule(), verbose=False)
        ckpt = run / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(ckpt)
        # as cednet-train writes it: the run's configs (plain containers) stored in the checkpoint
        saved = torch.load(ckpt, weights_only=True)
        saved["cednet_config"] = {
            "model": {"_target_": "cednet_pl.lit.detection.DetectionModule"},
            "data": {"num_digits": [1, 2]},
        }
        torch.save(saved, ckpt)
        runs.append(run)
    return base, runs
