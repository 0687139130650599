"""Shared fixtures: composed Hydra configs writing under tmp_path (helpers live in tests/testlib.py)."""

from __future__ import annotations

import os

# NOTE: before torch loads OpenMP: spin-waiting threads make CPU tests several times slower on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from testlib import FAST_OVERRIDES, TINY_TRAIN, compose_config


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


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of one tiny digits training run (`TINY_TRAIN`), shared by the train/eval, predict and export
    tests."""
    from cednet_pl.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_config(
        "train", ["trainer=cpu", "logger=none", "extras.print_config=false", *TINY_TRAIN], tmp
    )
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
