"""Rank-aware logging and config printing."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


class RankedLogger(logging.LoggerAdapter):
    """A logger that prefixes messages with the process rank and can log on rank zero only.

    Args:
        name: Logger name.
        rank_zero_only: If True, messages are emitted on global rank zero only.
        extra: Extra context for the adapter.
    """

    def __init__(
        self, name: str = __name__, rank_zero_only: bool = True, extra: Mapping[str, Any] | None = None
    ):
        super().__init__(logging.getLogger(name), extra=extra)
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        rank = getattr(rank_zero_only, "rank", 0) or 0
        if self.rank_zero_only and rank != 0:
            return
        msg, kwargs = self.process(msg, kwargs)
        self.logger.log(level, f"[rank: {rank}] {msg}", *args, **kwargs)


def config_to_yaml(cfg: DictConfig, resolve: bool = True) -> str:
    """Render a config as YAML, falling back to unresolved values when interpolations cannot resolve."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=resolve)
    except Exception:
        return OmegaConf.to_yaml(cfg, resolve=False)


@rank_zero_only
def print_config(
    cfg: DictConfig, keys: tuple[str, ...] = ("data", "model", "callbacks", "logger", "trainer")
) -> None:
    """Print the main config groups (rich tree when rich is available), rank zero only."""
    try:
        import rich
        import rich.syntax
        import rich.tree
    except ImportError:
        print(config_to_yaml(cfg))
        return
    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    shown = [k for k in keys if k in cfg] + [k for k in cfg if k not in keys and k != "hydra"]
    for key in shown:
        value = cfg[key]
        text = config_to_yaml(value) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
