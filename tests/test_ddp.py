"""2-process CPU DDP without Slurm: Lightning's own launcher re-runs `cednet-train` for local rank 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from slurm_helpers import job_env

from testlib import TINY_DET, TINY_SEG_DATA

#: Same tiny digits run as the Slurm tests (tests/slurm/slurm_helpers.py): odd validation set of 351 images.
TINY_TRAIN = [
    "data.image_size=32",
    "data.augment=false",
    "data.val_fraction=0.195",
    "data.eval_batch_size=88",
    "data.batch_size=16",
    "+trainer.limit_train_batches=4",
    "trainer.max_epochs=1",
    "trainer.deterministic=true",
    "+trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "extras.print_config=false",
]


def _run(cli: list[str], tmp_path: Path) -> str:
    """Run a console script in tmp_path (logs and data under it, no Slurm variables); its output, checked rc 0."""
    # tests/ on the path: `testlib.RankMetrics` can be added as a callback
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = job_env(tmp_path, {"PYTHONPATH": path})
    proc = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_local_ddp_two_processes_lightning_launcher(tmp_path: Path) -> None:
    """`cednet-train trainer=ddp_cpu` outside Slurm: 2 gloo ranks, one run dir, outputs by rank zero only."""
    out = _run(["cednet-train", "trainer=ddp_cpu", *TINY_TRAIN], tmp_path)
    for rank in (0, 1):
        assert (
            len(re.findall(rf"Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2", out)) == 1
        ), out[-3000:]
    assert "Starting with 2 processes" in out

    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    # rank 1 wrote nothing into the run dir: no second job log, no second .hydra, no extra checkpoint dir
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "checkpoints",
        "csv",
        "metrics.json",
        "train.log",
    ]
    assert len(list((tmp_path / "logs").rglob("metrics.json"))) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    acc = metrics["metrics"]["val/acc1"]
    assert abs(acc * 351 - round(acc * 351)) < 1e-3  # correct / 351: each validation image counted once


def test_det_demo_ddp_gathers_every_image_once_and_eval_agrees(tmp_path: Path) -> None:
    """det_demo's default 2-process run: the COCO results of both ranks are gathered (each val image once) and
    `cednet-eval` of its checkpoint in one process gives the same 12 numbers, and the same val losses (means over
    exactly the 5 images) that both ranks computed."""
    run = tmp_path / "run"
    probe = [
        "+callbacks.rank_metrics._target_=testlib.RankMetrics",
        f"+callbacks.rank_metrics.out_dir={tmp_path / 'ranks'}",
    ]
    out = _run(["cednet-train", *TINY_DET, f"hydra.run.dir={run}", *probe], tmp_path)
    assert "Starting with 2 processes" in out
    report = json.loads((run / "coco_metrics_val.json").read_text())
    assert report["num_images"] == 5, report
    val = json.loads((tmp_path / "data" / "synthetic_det" / "annotations" / "instances_val.json").read_text())
    results = json.loads((run / "coco_results_val.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in val["images"]}

    _run(
        ["cednet-eval", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'eval'}"],
        tmp_path,
    )
    again = json.loads((tmp_path / "eval" / "coco_metrics_val.json").read_text())
    assert again["num_images"] == 5 and again["metrics"] == report["metrics"]
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("val/loss", "val/loss_classification", "val/loss_bbox_regression"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-5), key
        assert ranks[1][key] == pytest.approx(single[key], rel=1e-5), key


#: seg_demo (2 gloo processes by default) on 5 validation canvases of 64 px: an odd count over 2 ranks.
TINY_SEG = [
    "+experiment=seg_demo",
    "data.num_train=4",
    "data.num_val=5",
    *TINY_SEG_DATA,
    "model.evaluation.crop=64",
    "model.evaluation.stride=43",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "extras.print_config=false",
]


def test_seg_demo_ddp_counts_every_pixel_once_and_eval_agrees(tmp_path: Path) -> None:
    """seg_demo's default 2-process run: the confusion matrices of both ranks are summed (each val image once) and
    `cednet-eval` of its checkpoint in one process gives the same mIoU and per-class IoU."""
    run = tmp_path / "run"
    out = _run(["cednet-train", *TINY_SEG, f"hydra.run.dir={run}"], tmp_path)
    assert "Starting with 2 processes" in out
    report = json.loads((run / "per_class_iou_val.json").read_text())
    assert report["pixels"] == 5 * 64 * 64
    _run(
        [
            "cednet-eval",
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "trainer=cpu",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        tmp_path,
    )
    again = json.loads((tmp_path / "eval" / "per_class_iou_val.json").read_text())
    assert again["pixels"] == report["pixels"]
    assert again["metrics"] == pytest.approx(report["metrics"], abs=1e-6)
    for name, scores in report["per_class"].items():
        for key, value in scores.items():
            other = again["per_class"][name][key]
            assert (value is None and other is None) or value == pytest.approx(other, abs=1e-6)
