"""Evaluation entry point: `evaluate(cfg)` validates a checkpoint and writes `${paths.output_dir}/metrics.json`.

Console script `cednet-eval`::

    cednet-eval ckpt=logs/train/runs/<run>/checkpoints/last.ckpt            # model + data from the checkpoint
    cednet-eval ckpt=<run>/checkpoints/last.ckpt data.root=/other/imagenet trainer=gpu
    cednet-eval ckpt=cednet_next_tiny.pth model=cednet_next_tiny data=imagenet data.root=/datasets/imagenet

A Lightning checkpoint written by cednet-train stores its resolved model/data configs (`cednet_config`); they are
used as they are, except for what the command line changes: `model.<key>=`/`data.<key>=` overrides update single
fields and `data=<name>` / `model=<name>` replace the whole node. Any task works: the stored model `_target_`
names the LightningModule. A plain state_dict (`.pth`, e.g. a released ImageNet checkpoint) has no config: the
composed `cfg.model`/`cfg.data` are used and the weights load through timm (`pretrained_cfg_overlay=dict(file=)`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import cednet_pl  # noqa: F401  (registers the CEDNet timm models)
from cednet_pl.models.checkpoint import is_lightning_checkpoint, read_checkpoint
from cednet_pl.utils import (
    CONF_DIR,
    CONFIG_KEY,
    RankedLogger,
    extras,
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_node,
    instantiate_trainer,
    write_metrics,
)
from cednet_pl.utils.ranks import add_rank_hydra_overrides, setup_distributed_run
from cednet_pl.utils.run import plain, to_float_dict

log = RankedLogger(__name__)


def cli_overrides() -> list[str]:
    """The task overrides given on the command line (empty outside a Hydra run)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _override_targets(overrides: list[str]) -> tuple[set[str], dict[str, list[str]]]:
    """Split overrides into whole-node replacements (`model=x`, `data=x`, `experiment=x`) and dotted keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups: set[str] = set()
    keys: dict[str, list[str]] = {"model": [], "data": []}
    for ov in parsed:
        key = ov.key_or_group
        root = key.split(".", 1)[0].split("/", 1)[0]
        if key in ("model", "data", "experiment") or key.startswith("experiment"):
            groups.add("experiment" if key.startswith("experiment") else key)
        elif root in keys:
            keys[root].append(key)
    return groups, keys


def merge_with_overrides(
    stored: dict[str, Any], composed: DictConfig, node: str, overrides: list[str]
) -> dict[str, Any]:
    """The stored config of `node` ("model"/"data"), updated with what the command line changed.

    Args:
        stored: The checkpoint's resolved config of the node.
        composed: The composed eval config (holds the command-line values).
        node: "model" or "data".
        overrides: Command-line overrides.
    """
    groups, keys = _override_targets(overrides)
    if node in groups or "experiment" in groups:
        log.info(f"{node}: replaced by the command line's {node}/experiment choice")
        return plain(composed[node])
    result = OmegaConf.create(copy.deepcopy(stored))
    for key in keys[node]:
        value = OmegaConf.select(composed, key, throw_on_missing=False)
        OmegaConf.update(
            result,
            key[len(node) + 1 :],
            OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value,
            force_add=True,
        )
        log.info(f"{key} overridden from the command line")
    return plain(result)


def _module_class(model_cfg: dict[str, Any], path: Path) -> type[L.LightningModule]:
    """The LightningModule class a model config names (a clear error when it cannot be imported)."""
    target = str(model_cfg.get("_target_", ""))
    try:
        cls = hydra.utils.get_class(target)
    except (ImportError, ValueError) as err:
        raise ValueError(f"{path}: cannot import the model class {target!r} ({err})") from err
    return cls


def _task_of(model_cfg: dict[str, Any], path: Path) -> str:
    cls = _module_class(model_cfg, path)
    return str(getattr(cls, "task", cls.__name__))


def build_from_checkpoint(
    cfg: DictConfig, ckpt: dict[str, Any], path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and data configs for a Lightning checkpoint written by cednet-train."""
    stored = ckpt.get(CONFIG_KEY)
    if not isinstance(stored, dict) or "model" not in stored or "data" not in stored:
        raise ValueError(
            f"checkpoint {path} is a Lightning checkpoint without a `{CONFIG_KEY}` entry (not written by "
            f"cednet-train); evaluate its weights as a state_dict with model=<name> data=<name> instead"
        )
    overrides = cli_overrides()
    model_cfg = merge_with_overrides(stored["model"], cfg, "model", overrides)
    data_cfg = merge_with_overrides(stored["data"], cfg, "data", overrides)
    ckpt_task, new_task = _task_of(stored["model"], path), _task_of(model_cfg, path)
    if ckpt_task != new_task:
        raise ValueError(
            f"wrong-task checkpoint: {path} holds a {ckpt_task} model ({stored['model'].get('_target_')}) but the "
            f"requested model is {new_task} ({model_cfg.get('_target_')})"
        )
    return model_cfg, data_cfg


def build_for_state_dict(cfg: DictConfig, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and data configs for a plain state_dict (released weights): load them through timm."""
    model_cfg = plain(cfg.model)
    net = model_cfg.get("net")
    if not isinstance(net, dict) or "name" not in net:
        raise ValueError(
            f"{path} is a plain state_dict; the chosen model ({model_cfg.get('_target_')}) has no `net.name` to "
            f"load it into. Pass a classification model, e.g. model=cednet_next_tiny"
        )
    net["pretrained"] = True
    net["pretrained_cfg_overlay"] = {**(net.get("pretrained_cfg_overlay") or {}), "file": str(path.resolve())}
    model_cfg["ema"] = None
    return model_cfg, plain(cfg.data)


def build_module(
    cfg: DictConfig, ckpt: dict[str, Any], path: Path, ema: bool = True
) -> tuple[L.LightningModule, dict[str, Any], dict[str, Any]]:
    """The LightningModule of a checkpoint (already read into ``ckpt``), with its model and data configs.

    A Lightning checkpoint of cednet-train is rebuilt with ``load_from_checkpoint`` (its stored configs, updated by
    the command line); a plain state_dict is loaded through timm into the composed ``cfg.model`` (a classifier).
    Used by cednet-eval, cednet-predict and cednet-export.

    Args:
        cfg: Composed config with ``model``/``data`` (and ``allow_pickle``).
        ckpt: The checkpoint as read by :func:`~cednet_pl.models.checkpoint.read_checkpoint`.
        path: Its file.
        ema: Keep the checkpoint's EMA copy (classification); False builds the module without it.
    """
    weights_only = not cfg.get("allow_pickle", False)
    if not is_lightning_checkpoint(ckpt):
        model_cfg, data_cfg = build_for_state_dict(cfg, path)
        return instantiate_node(model_cfg, "model"), model_cfg, data_cfg
    model_cfg, data_cfg = build_from_checkpoint(cfg, ckpt, path)
    if not ema:
        model_cfg["ema"] = None
    # hyper-parameters from the checkpoint (save_hyperparameters), updated with the merged config's values
    cls = _module_class(model_cfg, path)
    init_kwargs = {k: v for k, v in model_cfg.items() if k != "_target_"}
    try:
        model = cls.load_from_checkpoint(
            path, map_location="cpu", strict=True, weights_only=weights_only, **init_kwargs
        )
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit the model {model_cfg.get('_target_')}: {err}"
        ) from err
    return model, model_cfg, data_cfg


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate the checkpoint `cfg.ckpt` and write the metrics JSON.

    Args:
        cfg: The composed `eval.yaml` config.

    Returns:
        The metrics and the objects built.
    """
    if cfg.get("ckpt") in (None, "", "???") or OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("cednet-eval needs ckpt=PATH (a cednet-train .ckpt or a state_dict .pth)")
    path = Path(str(cfg.ckpt)).expanduser()
    weights_only = not cfg.get("allow_pickle", False)
    ckpt = read_checkpoint(path, weights_only=weights_only)
    output_dir = Path(cfg.paths.output_dir)
    # Slurm/DDP layout check (fails fast on tasks/nodes vs devices mismatches), quiet non-zero ranks
    setup_distributed_run(cfg.trainer, output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    model, model_cfg, data_cfg = build_module(cfg, ckpt, path, ema=cfg.get("ema", True))
    lightning_ckpt = is_lightning_checkpoint(ckpt)
    del ckpt
    datamodule: L.LightningDataModule = instantiate_node(data_cfg, "datamodule")

    with open_dict(cfg):
        cfg.model = model_cfg
        cfg.data = data_cfg
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks, loggers)
    results = trainer.validate(model=model, datamodule=datamodule, verbose=True)
    metrics = to_float_dict(results[0] if results else trainer.callback_metrics)
    extra = {
        "ckpt": str(path.resolve()),
        "checkpoint_type": "lightning" if lightning_ckpt else "state_dict",
        "model": model_cfg.get("net", {}).get("name") if isinstance(model_cfg.get("net"), dict) else None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", metrics, extra)
        for key, value in metrics.items():
            print(f"{key}: {value:.6f}")
    return metrics, {"cfg": cfg, "model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


def main() -> None:
    """`cednet-eval` console script (Hydra CLI)."""
    # ranks > 0 (srun tasks, Lightning's launcher children) write no .hydra/ copy and no log file into the run dir
    add_rank_hydra_overrides(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
