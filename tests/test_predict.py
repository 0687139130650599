"""cednet-predict: classification (top-k names/probs, CSV/JSON, EMA weights, eval transform) and detection (COCO
results JSON with category ids/names, drawn images) on image files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cednet_pl.eval import build_module
from cednet_pl.models.checkpoint import read_checkpoint, unwrap_state_dict
from cednet_pl.predict import predict, predict_detection, resolve_inputs
from cednet_pl.train import train
from testlib import TINY_DET, compose_config


def pcfg(make_cfg, *overrides: str) -> DictConfig:
    """A composed predict config writing under tmp_path."""
    return make_cfg("predict", ["extras.print_config=false", "data.num_workers=0", *overrides], fast=False)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three scikit-learn digits saved as 8-bit PNGs (0, 1, 2), in a folder with a non-image file."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images")
    digits = load_digits()
    files = []
    for d in range(3):
        arr = (digits.images[d] / 16.0 * 255).astype(np.uint8)
        path = root / "sub" / f"digit{d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).resize((32, 32)).save(path)
        files.append(path)
    (root / "notes.txt").write_text("not an image")
    return files


def test_resolve_inputs(digit_files: list[Path]) -> None:
    root = digit_files[0].parent.parent
    assert resolve_inputs(str(root)) == digit_files  # recursive, sorted, images only
    assert resolve_inputs(str(digit_files[1])) == [digit_files[1]]
    assert resolve_inputs(str(root / "sub" / "digit[01].png")) == digit_files[:2]
    with pytest.raises(FileNotFoundError, match="no image files found"):
        resolve_inputs(str(root / "missing*.png"))


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_predict_classification(trained_ckpt: Path, digit_files: list[Path], make_cfg, fmt: str) -> None:
    cfg = pcfg(make_cfg, f"ckpt={trained_ckpt}", f"input={digit_files[0].parent}", "top_k=3", f"format={fmt}")
    out = predict(cfg)
    assert out["task"] == "classification" and out["files"] == digit_files
    rows = out["predictions"]
    ckpt = read_checkpoint(trained_ckpt)
    assert ckpt["class_names"] == [str(d) for d in range(10)]  # stored by training
    # the EMA weights and the eval transform: the same probabilities as running the EMA net by hand
    module, _, data_cfg = build_module(cfg, ckpt, trained_ckpt)
    assert module.ema is not None
    ema_net = module.ema.module.eval()
    from cednet_pl.data.digits import DigitsDataModule

    transform = DigitsDataModule(image_size=int(data_cfg["image_size"])).eval_transform()
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in digit_files])
        probs = ema_net(x).softmax(-1)
        raw_probs = module.net.eval()(x).softmax(-1)
    assert not torch.allclose(probs, raw_probs)
    for row, p in zip(rows, probs, strict=True):
        top_p, top_i = p.topk(3)
        assert [t["label"] for t in row["top"]] == top_i.tolist()
        assert [t["name"] for t in row["top"]] == [str(i) for i in top_i.tolist()]
        assert [t["prob"] for t in row["top"]] == pytest.approx(top_p.tolist(), abs=1e-5)

    out_dir = Path(cfg.paths.output_dir)
    if fmt == "json":
        assert json.loads((out_dir / "predictions.json").read_text()) == rows
    else:
        with open(out_dir / "predictions.csv") as f:
            table = list(csv.reader(f))
        assert table[0] == [
            "file",
            "name1",
            "label1",
            "prob1",
            "name2",
            "label2",
            "prob2",
            "name3",
            "label3",
            "prob3",
        ]
        assert [r[0] for r in table[1:]] == [str(f) for f in digit_files]
        assert [r[1] for r in table[1:]] == [row["top"][0]["name"] for row in rows]


def test_predict_released_state_dict_and_raw_weights(
    trained_ckpt: Path, digit_files: list[Path], make_cfg, tmp_path: Path
) -> None:
    pth = tmp_path / "nano.pth"
    torch.save(unwrap_state_dict(read_checkpoint(trained_ckpt)), pth)
    cfg = pcfg(
        make_cfg,
        f"ckpt={pth}",
        "model=cednet_next_nano",
        "data.image_size=32",
        f"input={digit_files[2]}",
        "top_k=2",
    )
    rows = predict(cfg)["predictions"]
    raw = pcfg(make_cfg, f"ckpt={trained_ckpt}", f"input={digit_files[2]}", "top_k=2", "use_ema=false")
    # the released .pth holds the raw weights: the same as the Lightning checkpoint without EMA
    raw_top = predict(raw)["predictions"][0]["top"]
    assert [t["label"] for t in raw_top] == [t["label"] for t in rows[0]["top"]]
    assert [t["prob"] for t in raw_top] == pytest.approx([t["prob"] for t in rows[0]["top"]], abs=1e-5)
    with pytest.raises(ValueError, match="input="):
        predict(pcfg(make_cfg, f"ckpt={pth}"))


def test_predict_detection_writes_coco_results_and_drawings(tmp_path: Path) -> None:
    from analysis.conftest import tiny_detector  # RetinaNet-CEDNet-nano, 10 classes, 64 px test size

    module = tiny_detector()
    files = []
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 80), (72, 64)]):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        files.append(path)
    ids, names = [c * 3 + 1 for c in range(10)], [f"digit{c}" for c in range(10)]
    cfg = OmegaConf.create(
        {
            "device": "cpu",
            "batch_size": 2,
            "num_workers": 0,
            "score_thresh": 0.0,
            "format": "csv",
            "use_ema": True,
        }
    )
    results = predict_detection(module, files, ids, names, cfg, tmp_path / "out")
    with torch.no_grad():
        expected = module.net.eval()(
            [torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) / 255.0 for f in files]
        )
    assert len(results) == sum(len(d["boxes"]) for d in expected) > 0
    first = [r for r in results if r["image_id"] == 0]
    box = expected[0]["boxes"][0].tolist()
    assert first[0]["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=0.01)
    label = int(expected[0]["labels"][0])
    assert first[0]["category_id"] == ids[label] and first[0]["category_name"] == names[label]
    assert first[0]["file_name"] == str(files[0])
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == results
    drawn = sorted((tmp_path / "out" / "drawn").glob("*.png"))
    assert [Image.open(d).size for d in drawn] == [Image.open(f).size for f in files]


def test_predict_and_export_trained_detector(tmp_path: Path, make_cfg) -> None:
    """det_demo trained for one tiny epoch: the checkpoint names its categories; predict and export rebuild it."""
    from cednet_pl.export import export

    cfg = compose_config("train", [*TINY_DET, "trainer=cpu"], tmp_path / "train")
    train(cfg)
    ckpt_path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["category_names"] == [str(d) for d in range(10)] and len(ckpt["category_ids"]) == 10
    val_dir = tmp_path / "train" / "data" / "synthetic_det" / "val"  # the generated validation images
    assert len([f for f in val_dir.iterdir() if f.is_file()]) == 5
    out = predict(pcfg(make_cfg, f"ckpt={ckpt_path}", f"input={val_dir}", "score_thresh=0.0"))
    assert out["task"] == "detection"
    results = json.loads((Path(out["output_dir"]) / "detections.json").read_text())
    assert results == out["predictions"] and results
    assert {r["category_name"] for r in results} <= {str(d) for d in range(10)}
    assert {r["category_id"] for r in results} <= set(ckpt["category_ids"])
    ecfg = make_cfg("export", ["extras.print_config=false", f"ckpt={ckpt_path}", "format=onnx"], fast=False)
    meta = export(ecfg)
    assert meta["task"] == "detection" and meta["outputs"] == ["cls_logits", "bbox_regression"]
    assert meta["category_names"] == ckpt["category_names"]
