"""Shared fixtures: Hydra config composition with outputs under tmp_path (lightning-hydra-template pattern)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from cednet_pl.utils.run import CONF_DIR

#: Overrides that make any composed run small and quiet on a CPU-only machine.
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


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Factory: `make_cfg("train", ["+experiment=cls_t"], fast=True)` -> composed config writing under tmp_path."""

    def _make(
        config_name: str = "train", overrides: list[str] | None = None, fast: bool = True
    ) -> DictConfig:
        return compose_config(config_name, [*(FAST_OVERRIDES if fast else []), *(overrides or [])], tmp_path)

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def cfg_train(make_cfg: Callable[..., DictConfig]) -> DictConfig:
    """The default training config (digits, CEDNet nano, CPU), cut down to a few batches of one epoch."""
    return make_cfg(
        "train",
        [
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2",
            "data.image_size=32",
        ],
    )


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
