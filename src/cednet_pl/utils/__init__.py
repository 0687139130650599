"""Shared helpers for training and evaluation entry points."""

from cednet_pl.utils.callbacks import (
    ConfigInCheckpoint,
    EpochSeed,
    FiniteLossGuard,
    NonFiniteLossError,
    progress_bar,
)
from cednet_pl.utils.checkpoint import (
    CONFIG_KEY,
    AtomicCheckpointIO,
    resolve_ckpt_path,
)
from cednet_pl.utils.instantiate import (
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_node,
    instantiate_trainer,
)
from cednet_pl.utils.logging import RankedLogger, print_config
from cednet_pl.utils.run import CONF_DIR, extras, get_metric_value, write_metrics

__all__ = [
    "CONFIG_KEY",
    "CONF_DIR",
    "AtomicCheckpointIO",
    "ConfigInCheckpoint",
    "EpochSeed",
    "FiniteLossGuard",
    "NonFiniteLossError",
    "RankedLogger",
    "extras",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "instantiate_node",
    "instantiate_trainer",
    "print_config",
    "progress_bar",
    "resolve_ckpt_path",
    "write_metrics",
]
