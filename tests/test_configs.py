"""Config composition: defaults, every experiment, every model, error messages for unknown names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import cednet_pl  # noqa: F401
from cednet_pl.train import train
from cednet_pl.utils.run import CONF_DIR
from testlib import make_image_folder

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("cls_*.yaml"))
IN1K_EXPERIMENTS = [e for e in EXPERIMENTS if e != "cls_digits"]
CLS_MODELS = sorted(
    p.stem
    for p in (CONF_DIR / "model").glob("*.yaml")
    if not p.stem.startswith(("retinanet", "maskrcnn", "classifier", "seg"))
)


def test_expected_experiments_exist() -> None:
    expected = {"cls_t", "cls_s", "cls_b", "cls_t_unet", "cls_t_hourglass", "cls_hrnet_w32", "cls_digits"}
    expected |= {f"cls_{fam}_{s}" for fam in ("convnext", "swin", "focalnet", "msg", "revcol") for s in "tsb"}
    assert expected <= set(EXPERIMENTS)


def test_repo_root_conf_symlink() -> None:
    root_conf = Path(__file__).resolve().parent.parent / "conf"
    assert root_conf.resolve() == CONF_DIR


def test_train_default_config(make_cfg) -> None:
    cfg = make_cfg("train", fast=False)
    assert cfg.data._target_ == "cednet_pl.data.digits.DigitsDataModule"
    assert cfg.model._target_ == "cednet_pl.lit.classification.ClassificationModule"
    assert cfg.model.net.name == "cednet_next_nano"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.hydra.job.chdir is False
    assert cfg.ckpt_path == "auto"
    assert cfg.trainer.default_root_dir == cfg.paths.output_dir
    assert cfg.callbacks.model_checkpoint.dirpath == f"{cfg.paths.output_dir}/checkpoints"
    OmegaConf.resolve(cfg.model)
    assert cfg.model.net.num_classes == 10


def test_eval_default_config(make_cfg) -> None:
    cfg = make_cfg("eval", ["ckpt=/some/file.ckpt"])
    assert cfg.ckpt == "/some/file.ckpt"
    assert cfg.task_name == "eval"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(make_cfg, name: str) -> None:
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert cfg.task_name == name
    assert timm.is_model(cfg.model.net.name), cfg.model.net.name
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    assert "# Run" in text and "cednet-train +experiment=" + name in text
    if name in IN1K_EXPERIMENTS:
        # one shared recipe, no per-experiment drift
        assert cfg.data._target_ == "cednet_pl.data.imagenet.ImageNetDataModule"
        assert cfg.trainer.max_epochs == 300 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.model.optimizer.lr is None
        assert (cfg.model.optimizer.base_lr, cfg.model.optimizer.base_batch_size) == (4e-3, 4096)
        assert cfg.model.optimizer.weight_decay == 0.05
        assert cfg.model.scheduler.warmup_epochs == 20 and cfg.model.scheduler.min_lr == 1e-6
        assert cfg.model.label_smoothing == 0.1
        assert cfg.model.mixup.mixup_alpha == 0.8 and cfg.model.mixup.cutmix_alpha == 1.0
        assert cfg.model.mixup.switch_prob == 0.5
        assert cfg.model.ema.decay == 0.9999
        assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.interpolation == "bicubic"
        assert cfg.data.re_prob == 0.25 and cfg.data.re_mode == "pixel" and cfg.data.crop_pct == 0.875
        assert cfg.data.image_size == 224
        assert "Paper: Table A1" in text


@pytest.mark.parametrize(("name", "drop_path"), [("cls_t", 0.1), ("cls_s", 0.4), ("cls_b", 0.5)])
def test_cednet_drop_path(make_cfg, name: str, drop_path: float) -> None:
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert cfg.model.net.drop_path_rate == drop_path


@pytest.mark.parametrize(("name", "drop_path"), [("cls_msg_t", 0.1), ("cls_msg_s", 0.3), ("cls_msg_b", 0.5)])
def test_msg_drop_path(make_cfg, name: str, drop_path: float) -> None:
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    assert cfg.model.net.name == "msg_" + {"t": "tiny", "s": "small", "b": "base"}[name[-1]]
    assert cfg.model.net.drop_path_rate == drop_path


@pytest.mark.parametrize(
    ("name", "drop_path"), [("cls_revcol_t", 0.1), ("cls_revcol_s", 0.3), ("cls_revcol_b", 0.4)]
)
def test_revcol_experiments_train_reversibly_with_aux_loss(make_cfg, name: str, drop_path: float) -> None:
    cfg = make_cfg("train", [f"+experiment={name}"], fast=False)
    net = cfg.model.net
    assert net.name == "revcol_" + {"t": "tiny", "s": "small", "b": "base"}[name[-1]]
    assert net.drop_path_rate == drop_path and net.save_memory is True and net.aux_heads is True
    aux = cfg.model.revcol_aux_loss
    assert (aux.image_weight, aux.class_weight) == (3.0, 0.7)
    assert list(aux.mean) == list(cfg.data.mean) and list(aux.std) == list(cfg.data.std)
    assert "reported numbers come from this setting" in (CONF_DIR / "experiment" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", CLS_MODELS)
def test_model_configs_name_timm_models(make_cfg, name: str) -> None:
    cfg = make_cfg("train", [f"model={name}"])
    assert timm.is_model(cfg.model.net.name)


def test_unknown_experiment_lists_options(make_cfg) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_cfg("train", ["+experiment=cls_nope"])
    message = str(err.value)
    assert "experiment/cls_nope" in message and "cls_t" in message and "cls_convnext_t" in message


def test_unknown_model_config_lists_options(make_cfg) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_cfg("train", ["model=cednet_next_huge"])
    assert "cednet_next_tiny" in str(err.value)


SLOW_FDR = [e for e in IN1K_EXPERIMENTS if e != "cls_t"]


def _fast_dev_run(make_cfg, tmp_path: Path, experiment: str, image_size: int) -> dict:
    root = make_image_folder(tmp_path / "imagefolder", classes=2, per_class=2, size=image_size + 8)
    cfg = make_cfg(
        "train",
        [
            f"+experiment={experiment}",
            f"data.root={root}",
            "data.num_classes=2",
            f"data.image_size={image_size}",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.pin_memory=false",
            "trainer=cpu",
            "trainer.precision=32-true",
            "+trainer.fast_dev_run=true",
            "model.channels_last=false",
        ],
    )
    metrics, objects = train(cfg)
    assert objects["model"].mixup_fn is not None
    return metrics


def test_cls_t_fast_dev_run_on_tiny_image_folder(make_cfg, tmp_path: Path) -> None:
    metrics = _fast_dev_run(make_cfg, tmp_path, "cls_t", 64)
    assert {"train/loss", "train/loss_stage0", "train/loss_stage2", "val/acc1", "val/acc1_ema"} <= set(
        metrics
    )
    assert all(map(math.isfinite, (metrics["train/loss"], metrics["val/loss"])))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FDR)
def test_experiment_fast_dev_run(make_cfg, tmp_path: Path, name: str) -> None:
    size = 224 if "swin" in name or "msg" in name else 64  # Swin and MSG are built for their 224 input
    metrics = _fast_dev_run(make_cfg, tmp_path, name, size)
    assert math.isfinite(metrics["train/loss"])
