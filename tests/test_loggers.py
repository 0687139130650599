"""Logger configs (CSV, TensorBoard, W&B offline, MLflow local store): a resumed run continues the same logger run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cednet_pl.train import train
from cednet_pl.utils.loggers import run_id_of
from testlib import CrashAtEpoch, compose_config, with_extra_callback

TINY = [
    "trainer=cpu",
    "extras.print_config=false",
    "data.image_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "logger=[csv,tensorboard,wandb,mlflow]",
    "logger.wandb.offline=true",
]


def test_resumed_run_continues_every_logger(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    first = compose_config("train", [*TINY, "trainer.max_epochs=2"], tmp_path)
    with monkeypatch.context() as m:
        with_extra_callback(m, CrashAtEpoch(1))
        with pytest.raises(KeyError, match="simulated crash"):
            train(first)
    run = Path(first.paths.output_dir)
    # the same command again in the same run dir: ckpt_path=auto resumes from last.ckpt (epoch 1 only)
    resumed = compose_config("train", [*TINY, "trainer.max_epochs=2"], tmp_path)
    train(resumed)
    assert (run / "metrics.json").read_text().count("resumed_from") == 1

    # CSV: one version, both epochs' validation rows kept
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    with (run / "csv" / "version_0" / "metrics.csv").open() as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/acc1")}
    assert epochs == {"0", "1"}
    # TensorBoard: one version dir holding both runs' event files
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["version_0"]
    assert len(list((run / "tensorboard" / "version_0").glob("events.out.tfevents.*"))) == 2
    # W&B offline: both runs wrote the run id derived from the run dir (resume="allow" continues it)
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert offline and {p.name.rsplit("-", 1)[-1] for p in offline} == {run_id_of(run)}
    assert all(list(p.glob("*.wandb")) for p in offline)
    # MLflow local store: one run, validation metric history over both epochs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{run / 'mlruns'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val/acc1")
    assert len(history) == 2 and history[0].step < history[1].step


def test_csv_logger_keeps_rows_of_the_same_version(tmp_path: Path) -> None:
    from cednet_pl.utils.loggers import ResumableCSVLogger

    for step in (0, 1):
        logger = ResumableCSVLogger(tmp_path, name="csv", version=0)
        logger.log_metrics({"a": float(step), **({"b": 1.0} if step else {})}, step=step)
        logger.save()
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"]) for r in rows] == [("0", "0.0"), ("1", "1.0")] and rows[1]["b"] == "1.0"


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_logger_configs_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"logger={name}"], tmp_path)
    assert set(cfg.logger) == {name}
