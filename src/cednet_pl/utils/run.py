"""Run-level helpers shared by train.py and eval.py: config location, extras, metrics JSON."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cednet_pl.utils.logging import RankedLogger, print_config

log = RankedLogger(__name__)

#: Packaged Hydra configs (works for editable and regular installs; `--config-dir` adds a user dir on top).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def extras(cfg: DictConfig) -> None:
    """Optional run preliminaries driven by `cfg.extras`: silence warnings, print the config."""
    extra = cfg.get("extras") or {}
    if extra.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extra.get("print_config"):
        print_config(cfg)


def to_float_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert logged metrics (tensors or numbers) to plain floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float):
            out[str(key)] = float(value)
    return dict(sorted(out.items()))


@rank_zero_only
def write_metrics(
    path: str | Path, metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write metrics (plus optional extra info) as JSON; non-finite numbers become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (v if math.isfinite(v) else None) for k, v in to_float_dict(metrics).items()}
    payload = {"metrics": clean, **(dict(extra) if extra else {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    log.info(f"Metrics written to {path}")
    return path


def get_metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """Value of the metric a sweeper optimises (`optimized_metric`), or None when not requested."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    value = metrics[name]
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def plain(value: Any) -> Any:
    """Resolve an OmegaConf container (dict or list config) into plain python containers; other values as they are.

    Hyper-parameters and configs stored in checkpoints must be plain (weights-only loading refuses OmegaConf).
    """
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
