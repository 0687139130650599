"""End-to-end train/eval on the digits: metrics files, eval reproduction, resume equality, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback

from cednet_pl.eval import evaluate
from cednet_pl.models.checkpoint import unwrap_state_dict
from cednet_pl.train import train
from cednet_pl.utils import NonFiniteLossError
from cednet_pl.utils.checkpoint import AtomicCheckpointIO, resolve_ckpt_path
from testlib import TINY_TRAIN, CrashAtEpoch, compose_config, with_extra_callback

TINY = TINY_TRAIN
BIN = Path(sys.executable).parent


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained_run(trained_ckpt: Path) -> Path:
    """The output dir of the tiny training run shared by the eval tests (tests/conftest.py)."""
    return trained_ckpt.parent.parent


def test_train_writes_checkpoints_and_metrics(trained_run: Path) -> None:
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    payload = _metrics(trained_run)
    metrics = payload["metrics"]
    for key in (
        "train/loss",
        "train/loss_stage0",
        "val/acc1",
        "val/acc5",
        "val/acc1_stage0",
        "val/acc1_ema",
        "train/throughput",
    ):
        assert key in metrics, key
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    assert metrics["train/throughput"] > 0
    assert Path(payload["best_model_path"]).is_file()
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["cednet_config"]["model"]["net"]["name"] == "cednet_next_nano"
    assert any(k.startswith("net.") for k in ckpt["state_dict"])
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["net"]["name"] == "cednet_next_nano"


def test_eval_reproduces_training_metrics(trained_run: Path, make_cfg) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = make_cfg("eval", [f"ckpt={ckpt}", "+trainer.limit_val_batches=2"])
    metrics, _ = evaluate(cfg)
    trained = _metrics(trained_run)["metrics"]
    for key in ("val/acc1", "val/acc5", "val/acc1_ema"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    assert metrics["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    written = _metrics(Path(cfg.paths.output_dir))
    assert written["metrics"]["val/acc1"] == metrics["val/acc1"]
    assert written["checkpoint_type"] == "lightning"


def test_eval_applies_cli_overrides_to_stored_config(trained_run: Path, make_cfg) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = make_cfg("eval", [f"ckpt={ckpt}", "data.eval_batch_size=7", "+trainer.limit_val_batches=1"])
    _, objects = evaluate(cfg)
    assert objects["datamodule"].eval_batch_size == 7
    assert objects["datamodule"].image_size == 32  # from the checkpoint, not eval.yaml's default 64


def test_eval_without_ema_rebuilds_from_checkpoint(trained_run: Path, make_cfg) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    metrics, objects = evaluate(
        make_cfg("eval", [f"ckpt={ckpt}", "ema=false", "+trainer.limit_val_batches=2"])
    )
    assert objects["model"].ema is None and "val/acc1_ema" not in metrics
    assert metrics["val/acc1"] == pytest.approx(_metrics(trained_run)["metrics"]["val/acc1"], abs=1e-6)


def test_eval_of_a_deep_supervision_checkpoint_without_stage_heads(trained_run: Path, make_cfg) -> None:
    """Trained with every stage's head; evaluated as the inference model (the last head): same val/acc1."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["deep_supervision"]
    metrics, objects = evaluate(
        make_cfg("eval", [f"ckpt={ckpt}", "model.deep_supervision=false", "+trainer.limit_val_batches=2"])
    )
    assert not objects["model"].net.aux_heads and not objects["model"].deep_supervision
    assert metrics["val/acc1"] == pytest.approx(_metrics(trained_run)["metrics"]["val/acc1"], abs=1e-6)


def test_eval_released_state_dict(trained_run: Path, make_cfg, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    pth = tmp_path / "nano.pth"
    torch.save(unwrap_state_dict(ckpt), pth)
    cfg = make_cfg(
        "eval",
        [
            f"ckpt={pth}",
            "model=cednet_next_nano",
            "data.image_size=32",
            "data.eval_batch_size=32",
            "+trainer.limit_val_batches=2",
        ],
    )
    metrics, _ = evaluate(cfg)
    assert metrics["val/acc1"] == pytest.approx(_metrics(trained_run)["metrics"]["val/acc1"], abs=1e-6)
    assert _metrics(Path(cfg.paths.output_dir))["checkpoint_type"] == "state_dict"


def test_eval_missing_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("eval", [f"ckpt={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist"):
        evaluate(cfg)


def test_eval_truncated_checkpoint(trained_run: Path, make_cfg, tmp_path: Path) -> None:
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    cfg = make_cfg("eval", [f"ckpt={bad}"])
    with pytest.raises(ValueError, match=r"truncated\.ckpt could not be read.*truncated"):
        evaluate(cfg)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cfg = make_cfg("eval", [f"ckpt={empty}"])
    with pytest.raises(ValueError, match="empty"):
        evaluate(cfg)


def test_eval_wrong_task_checkpoint(trained_run: Path, make_cfg, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["cednet_config"]["model"]["_target_"] = "cednet_pl.lit.detection.DetectionModule"
    path = tmp_path / "det.ckpt"
    torch.save(ckpt, path)
    cfg = make_cfg("eval", [f"ckpt={path}", "model=cednet_next_nano"])
    with pytest.raises(ValueError, match="wrong-task checkpoint"):
        evaluate(cfg)


def test_eval_foreign_lightning_checkpoint(trained_run: Path, make_cfg, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["cednet_config"]
    path = tmp_path / "foreign.ckpt"
    torch.save(ckpt, path)
    cfg = make_cfg("eval", [f"ckpt={path}"])
    with pytest.raises(ValueError, match="not written by cednet-train"):
        evaluate(cfg)


def test_eval_state_dict_of_wrong_model(trained_run: Path, make_cfg, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    pth = tmp_path / "nano.pth"
    torch.save(unwrap_state_dict(ckpt), pth)
    cfg = make_cfg("eval", [f"ckpt={pth}", "model=cednet_next_tiny", "data.image_size=32"])
    with pytest.raises(RuntimeError, match="does not match"):
        evaluate(cfg)


def test_unknown_model_name_lists_cednets(make_cfg) -> None:
    cfg = make_cfg("train", ["model.net.name=cednet_next_huge", *TINY])
    with pytest.raises(ValueError, match=r"unknown model name 'cednet_next_huge'.*cednet_next_tiny"):
        train(cfg)


def test_ckpt_path_last_requires_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) is None
    assert resolve_ckpt_path(None, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)


class _PoisonAtEpoch(Callback):
    """Makes every weight NaN when epoch `epoch` starts, so the next loss is not finite."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.net.parameters():
                    p.fill_(float("nan"))


def test_resume_matches_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    overrides = [
        "trainer=cpu",
        "logger=none",
        "extras.print_config=false",
        *TINY,
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "+trainer.limit_val_batches=1",
    ]
    overrides = [o for o in overrides if o != "+trainer.limit_val_batches=2"]
    # "best" = lowest epoch: epoch 1 is not the best, yet last.ckpt must hold epoch 1
    full_cfg = compose_config("train", [*overrides, "monitor=epoch", "monitor_mode=min"], tmp_path / "full")
    full, _ = train(full_cfg)
    full_dir = Path(full_cfg.paths.output_dir)
    assert Path(_metrics(full_dir)["best_model_path"]).name == "epoch_000.ckpt"
    last = torch.load(full_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)

    cfg = compose_config("train", overrides, tmp_path / "resumed")
    with monkeypatch.context() as m:
        with_extra_callback(m, CrashAtEpoch(1))
        with pytest.raises(KeyError, match="simulated crash"):
            train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # same run dir, ckpt_path=auto (the default): picks up last.ckpt
    cfg = compose_config("train", overrides, tmp_path / "resumed")
    resumed, _ = train(cfg)
    assert _metrics(run_dir)["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    for key in ("val/acc1", "val/acc5", "val/loss", "val/acc1_ema", "train/loss", "train/lr"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_config(
        "train",
        ["trainer=cpu", "logger=none", "extras.print_config=false", *TINY, "trainer.max_epochs=3"],
        tmp_path,
    )
    with_extra_callback(monkeypatch, _PoisonAtEpoch(1))
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss .* at global step 2 \(epoch 1, batch 0\)"
    ):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_atomic_checkpoint_write_keeps_old_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (any pickling error)
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_console_script_from_any_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [str(BIN / "cednet-train"), "+experiment=cls_t", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    assert "cednet_next_tiny" in out and "rand-m9-mstd0.5-inc1" in out
    assert not any(tmp_path.iterdir())  # nothing written to the launch dir


@pytest.mark.slow
def test_console_scripts_train_and_fail_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [str(BIN / "cednet-train"), "debug=fdr", "data.image_size=32", "extras.print_config=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    runs = list((tmp_path / "logs" / "debug" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    bad = subprocess.run(
        [str(BIN / "cednet-eval"), f"ckpt={tmp_path / 'missing.ckpt'}", "extras.print_config=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "missing.ckpt does not exist" in bad.stderr + bad.stdout
