"""Training entry point: `train(cfg)` builds data, model, callbacks, loggers and trainer from the config and fits.

Console script `cednet-train` (Hydra CLI, configs shipped in `cednet_pl/conf`). Examples::

    cednet-train                                   # CEDNet nano on the embedded scikit-learn digits, CPU
    cednet-train +experiment=cls_t data.root=/datasets/imagenet trainer.devices=8
    cednet-train hydra.run.dir=logs/train/runs/my_run   # rerun in an interrupted run's dir: resumes (ckpt_path=auto)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

import cednet_pl  # noqa: F401  (registers the CEDNet timm models)
from cednet_pl.utils import (
    CONF_DIR,
    RankedLogger,
    extras,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_node,
    instantiate_trainer,
    resolve_ckpt_path,
    write_metrics,
)
from cednet_pl.utils.checkpoint import checkpoint_dir
from cednet_pl.utils.ranks import add_rank_hydra_overrides, setup_distributed_run
from cednet_pl.utils.run import plain, to_float_dict

log = RankedLogger(__name__)


def resolve_monitor(cfg: DictConfig, model: L.LightningModule) -> None:
    """Fill `cfg.monitor` / `cfg.monitor_mode` from the LightningModule's `monitor` / `monitor_mode` when null."""
    with open_dict(cfg):
        if cfg.get("monitor") is None:
            cfg.monitor = getattr(model, "monitor", None) or "val/loss"
        if cfg.get("monitor_mode") is None:
            cfg.monitor_mode = getattr(model, "monitor_mode", None) or (
                "max" if "acc" in cfg.monitor else "min"
            )


def log_hyperparameters(cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer) -> None:
    """Send the resolved config and parameter counts to every logger."""
    if not trainer.loggers:
        return
    hparams: dict[str, Any] = {
        k: plain(cfg[k]) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in ("model", "data", "trainer", "callbacks")
        if k in cfg
    }
    for key in ("task_name", "tags", "seed", "ckpt_path", "monitor"):
        hparams[key] = OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg.get(key)) else cfg.get(key)
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (and optionally test) a model as configured.

    Args:
        cfg: The composed `train.yaml` config.

    Returns:
        The final metrics (also written to `${paths.output_dir}/metrics.json`) and the objects built.
    """
    output_dir = Path(cfg.paths.output_dir)
    # Slurm/DDP layout check (fails fast on tasks/nodes vs devices mismatches), quiet non-zero ranks
    setup_distributed_run(cfg.trainer, output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = instantiate_node(cfg.data, "datamodule")
    model: L.LightningModule = instantiate_node(cfg.model, "model")
    resolve_monitor(cfg, model)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks, loggers)
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }
    log_hyperparameters(cfg, model, trainer)

    extra: dict[str, Any] = {"output_dir": str(output_dir)}
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        log.info(f"Starting training{f' from {ckpt_path}' if ckpt_path else ''}")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(to_float_dict(trainer.callback_metrics))
        extra["resumed_from"] = ckpt_path
        extra["global_step"] = trainer.global_step
        extra["epochs"] = trainer.current_epoch
        if trainer.checkpoint_callback is not None:
            best = trainer.checkpoint_callback.best_model_path
            extra["best_model_path"] = best or None
            last = checkpoint_dir(output_dir) / "last.ckpt"
            extra["last_model_path"] = str(last) if last.is_file() else None
            score = trainer.checkpoint_callback.best_model_score
            extra["best_model_score"] = float(score) if score is not None else None
    if cfg.get("test", False):
        best = extra.get("best_model_path")
        log.info(f"Testing {best or 'the current weights'}")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(to_float_dict(trainer.callback_metrics))
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", metrics, extra)
    log.info(f"Output dir: {output_dir}")
    return metrics, objects


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


def main() -> float | None:
    """`cednet-train` console script (Hydra CLI)."""
    # ranks > 0 (srun tasks, Lightning's launcher children) write no .hydra/ copy and no log file into the run dir
    add_rank_hydra_overrides(sys.argv)
    return _hydra_main()


if __name__ == "__main__":
    main()
