"""Build callbacks, loggers and the trainer from Hydra configs."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from cednet_pl.utils.checkpoint import AtomicCheckpointIO
from cednet_pl.utils.logging import RankedLogger

log = RankedLogger(__name__)


def _instantiate_named(cfg: DictConfig | None, kind: str, base: type) -> list[Any]:
    """Instantiate every `_target_` node of a dict config (null entries are skipped)."""
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"`{kind}` config must be a dict of named `_target_` nodes, got {type(cfg).__name__}")
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"`{kind}.{name}` must be a config with a `_target_`, got: {node!r}")
        log.info(f"Instantiating {kind[:-1] if kind.endswith('s') else kind} <{node._target_}> ({name})")
        obj = hydra.utils.instantiate(node)
        if obj is None:
            continue
        if not isinstance(obj, base):
            raise TypeError(f"`{kind}.{name}` built {type(obj).__name__}, expected a {base.__name__}")
        objects.append(obj)
    return objects


def instantiate_node(cfg: Any, what: str) -> Any:
    """`hydra.utils.instantiate`, re-raising the constructor's own error (clearer than Hydra's wrapper).

    Nested configs reach the constructor as plain dicts/lists (`_convert_="all"`), so what a module stores with
    `save_hyperparameters` is plain and its checkpoints load with `torch.load(weights_only=True)`.

    Args:
        cfg: A `_target_` config (DictConfig or dict).
        what: What is being built, for the log line ("model", "datamodule").
    """
    target = cfg.get("_target_") if hasattr(cfg, "get") else None
    log.info(f"Instantiating {what} <{target}>")
    try:
        return hydra.utils.instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError | RuntimeError | OSError | TypeError | KeyError):
            raise cause from e
        raise


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate the callbacks of `cfg.callbacks` (a dict of named `_target_` nodes)."""
    return _instantiate_named(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate the loggers of `cfg.logger` (a dict of named `_target_` nodes)."""
    return _instantiate_named(cfg, "logger", Logger)


def instantiate_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> Trainer:
    """Instantiate `cfg.trainer`, adding an atomic checkpoint writer unless a CheckpointIO plugin is given.

    `trainer.plugins` may be a list of `_target_` nodes (e.g. a SLURM cluster environment); they are kept.
    """
    trainer_cfg = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(trainer_cfg, dict)
    plugins_cfg = trainer_cfg.pop("plugins", None) or []
    if isinstance(plugins_cfg, dict):
        plugins_cfg = [p for p in plugins_cfg.values() if p is not None]
    plugins = [hydra.utils.instantiate(p) if isinstance(p, dict) else p for p in plugins_cfg]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if not loggers:
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        if dropped:
            log.warning("no logger configured: dropping LearningRateMonitor (it needs one)")
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    log.info(f"Instantiating trainer <{trainer_cfg.get('_target_')}>")
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)
