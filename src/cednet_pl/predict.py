"""Prediction entry point: `predict(cfg)` runs a trained classifier or detector on image files.

Console script `cednet-predict`::

    cednet-predict ckpt=logs/train/runs/<run>/checkpoints/last.ckpt input=photos/              # a folder
    cednet-predict ckpt=last.ckpt input='photos/*.jpg' top_k=3 format=json device=cuda
    cednet-predict ckpt=cednet_next_tiny.pth model=cednet_next_tiny data=imagenet input=cat.jpg  # released .pth
    cednet-predict ckpt=<detector run>/checkpoints/last.ckpt input=street.jpg score_thresh=0.4

The module is rebuilt as cednet-eval rebuilds it (:func:`cednet_pl.eval.build_module`: a cednet-train checkpoint
carries its model/data configs; a plain state_dict needs `model=`). Outputs go to `${paths.output_dir}`:

- classification: `predictions.csv` (or `.json`, `format=json`): per image the top-k class names and
  probabilities. The checkpoint's EMA weights are used when it has them (`use_ema=true`); images go through the
  datamodule's evaluation transform (resize + center crop as in validation). Class names come from the checkpoint
  (stored since this version), else ImageNet's for 1000 classes, else the label indices.
- detection: `detections.json` (COCO results: `image_id`, `file_name`, `category_id`, `category_name`, `bbox`
  as x, y, w, h in pixels of the original image, `score`) and `drawn/<image>.png` with the boxes above
  `score_thresh` drawn with names and scores. The detector's own transform resizes (test sizes of the recipe).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import cednet_pl  # noqa: F401  (registers the CEDNet timm models)
from cednet_pl.eval import build_module
from cednet_pl.models.checkpoint import read_checkpoint
from cednet_pl.utils import CONF_DIR, RankedLogger, extras, instantiate_node

log = RankedLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def resolve_inputs(spec: str | Sequence[str]) -> list[Path]:
    """Image files of `spec`: a file, a folder (its images, recursively, sorted) or a glob pattern (or a list).

    Raises:
        FileNotFoundError: Nothing matches, naming `spec`.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in specs:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(
                f"input={item!r}: no image files found (expected a file, a folder with {IMAGE_EXTENSIONS} "
                "images or a glob pattern)"
            )
        files.extend(found)
    return files


class ImageFiles(Dataset):
    """Image files read as RGB; each item is `(transform(image), index)`."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        return self.transform(image), index


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _progress(iterable: Any, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def class_names_for(ckpt: dict[str, Any], num_classes: int, datamodule: Any = None) -> list[str]:
    """Names of the classifier's labels: the checkpoint's, else ImageNet's for 1000 classes, else the indices."""
    names = ckpt.get("class_names")
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_descriptions())
    try:
        names = getattr(datamodule, "class_names", None)
    except (FileNotFoundError, ValueError):  # a datamodule whose data is not on this machine
        names = None
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def predict_classification(
    module: Any, files: list[Path], transform: Callable, names: list[str], cfg: DictConfig, out_dir: Path
) -> list[dict[str, Any]]:
    """Top-k names and probabilities per image; written as CSV or JSON under `out_dir`."""
    net = module.net
    ema = getattr(module, "ema", None)
    if cfg.use_ema and ema is not None:
        net = ema.module
        log.info("using the checkpoint's EMA weights (use_ema=true)")
    elif cfg.use_ema:
        log.info("the checkpoint has no EMA weights: using the raw weights")
    device = _device(cfg.device)
    net = net.to(device).eval()
    k = min(int(cfg.top_k), len(names))
    loader = DataLoader(ImageFiles(files, transform), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for x, idx in _progress(loader, len(loader), "classify"):
            probs = net(x.to(device)).float().softmax(dim=-1)
            top_p, top_i = probs.topk(k, dim=-1)
            for i, p_row, c_row in zip(idx.tolist(), top_p.tolist(), top_i.tolist(), strict=True):
                rows.append(
                    {
                        "file": str(files[i]),
                        "top": [
                            {"label": c, "name": names[c], "prob": round(p, 6)}
                            for p, c in zip(p_row, c_row, strict=True)
                        ],
                    }
                )
    if cfg.format == "json":
        (out_dir / "predictions.json").write_text(json.dumps(rows, indent=1))
    else:
        with open(out_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["file", *[c for r in range(1, k + 1) for c in (f"name{r}", f"label{r}", f"prob{r}")]]
            )
            for row in rows:
                writer.writerow(
                    [row["file"], *[v for t in row["top"] for v in (t["name"], t["label"], t["prob"])]]
                )
    return rows


def _as_lists(batch: list[tuple[Any, int]]) -> tuple[tuple[Any, ...], ...]:
    """Collate images of different sizes into a tuple of images and a tuple of indices."""
    return tuple(zip(*batch, strict=True))


def predict_detection(
    module: Any,
    files: list[Path],
    category_ids: list[int],
    category_names: list[str],
    cfg: DictConfig,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """COCO-style results JSON with the checkpoint's category ids/names (instance segmentation: plus each
    detection's mask as COCO RLE under ``segmentation``), and the images with drawn boxes."""
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import draw_bounding_boxes

    device = _device(cfg.device)
    net = module.net.to(device).eval()
    loader = DataLoader(
        ImageFiles(files, pil_to_tensor),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_as_lists,
    )
    drawn_dir = out_dir / "drawn"
    drawn_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for images, idx in _progress(loader, len(loader), "detect"):
            dets = net([im.to(device).float().div(255.0) for im in images])
            for image, i, det in zip(images, idx, dets, strict=True):
                boxes, scores, labels = det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu()
                rles = masks_to_rle(det["masks"].cpu()) if "masks" in det else None
                for n, (box, score, label) in enumerate(
                    zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)
                ):
                    x0, y0, x1, y1 = box
                    row = {
                        "image_id": i,
                        "file_name": str(files[i]),
                        "category_id": int(category_ids[label]),
                        "category_name": category_names[label],
                        "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                        "score": round(float(score), 5),
                    }
                    if rles is not None:
                        row["segmentation"] = rles[n]
                    results.append(row)
                keep = scores >= cfg.score_thresh
                captions = [
                    f"{category_names[int(lb)]} {float(s):.2f}"
                    for lb, s in zip(labels[keep], scores[keep], strict=True)
                ]
                drawn = draw_bounding_boxes(image, boxes[keep], labels=captions, colors="red", width=2)
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(
                    drawn_dir / f"{i:05d}_{files[i].stem}.png"
                )
    (out_dir / "detections.json").write_text(json.dumps(results))
    return results


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Mask R-CNN's soft masks ``(N, 1, H, W)`` as COCO RLE (threshold 0.5, counts as str), as in evaluation."""
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > 0.5).numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def predict_segmentation(
    module: Any, files: list[Path], transform: Callable, names: list[str], out_dir: Path, device: torch.device
) -> list[dict[str, Any]]:
    """One label PNG per image (class index per pixel, at the image's resolution, through the module's evaluation
    inference: sliding window / multi-scale as configured) under ``masks/``, and per image the pixel share of
    each predicted class in ``segmentation.json``."""
    module = module.to(device).eval()
    mask_dir = out_dir / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    if len(names) > 256:
        raise ValueError(f"{len(names)} classes do not fit the 8-bit label PNGs cednet-predict writes")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for i, path in enumerate(_progress(files, len(files), "segment")):
            with Image.open(path) as im:
                image = transform(im.convert("RGB"))
            label = module.predict_logits(image.to(device)).argmax(0).cpu()
            out = mask_dir / f"{i:05d}_{path.stem}.png"
            Image.fromarray(label.numpy().astype(np.uint8), mode="L").save(out)
            counts = torch.bincount(label.flatten(), minlength=len(names))
            shares = {
                names[c]: round(float(n) / label.numel(), 6) for c, n in enumerate(counts.tolist()) if n
            }
            rows.append({"file": str(path), "mask": str(out), "class_shares": shares})
    (out_dir / "segmentation.json").write_text(json.dumps({"class_names": names, "images": rows}, indent=1))
    return rows


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run the checkpoint `cfg.ckpt` on `cfg.input` and write the predictions under `cfg.paths.output_dir`.

    Returns:
        `task`, `files`, `predictions` (rows or COCO results) and `output_dir`.
    """
    if cfg.get("ckpt") in (None, "", "???") or OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("cednet-predict needs ckpt=PATH (a cednet-train .ckpt or a state_dict .pth)")
    if cfg.get("input") in (None, "", "???") or OmegaConf.is_missing(cfg, "input"):
        raise ValueError("cednet-predict needs input=FILE_OR_FOLDER_OR_GLOB")
    if cfg.format not in ("csv", "json"):
        raise ValueError(f"format={cfg.format!r}; expected csv or json")
    files = resolve_inputs(OmegaConf.to_container(cfg.input) if OmegaConf.is_config(cfg.input) else cfg.input)
    path = Path(str(cfg.ckpt)).expanduser()
    ckpt = read_checkpoint(path, weights_only=not cfg.get("allow_pickle", False))
    module, _, data_cfg = build_module(cfg, ckpt, path, ema=bool(cfg.use_ema))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = str(getattr(module, "task", "classification"))
    log.info(f"{task} checkpoint {path}: {len(files)} image(s) -> {out_dir}")
    if task in ("detection", "instance_segmentation"):
        num = module.num_classes
        ids = list(ckpt.get("category_ids") or module.category_ids or range(1, num + 1))
        names = [
            str(n) for n in (ckpt.get("category_names") or module.category_names or [str(c) for c in ids])
        ]
        preds = predict_detection(module, files, ids, names, cfg, out_dir)
    else:
        datamodule = instantiate_node(data_cfg, "datamodule")
        transform = getattr(datamodule, "eval_transform", None)
        if transform is None:
            raise ValueError(
                f"the data config {data_cfg.get('_target_')} has no eval_transform(): cannot preprocess image files"
            )
        if task == "segmentation":
            names = module.class_names or class_names_for(ckpt, module.num_classes, datamodule)
            preds = predict_segmentation(module, files, transform(), names, out_dir, _device(cfg.device))
        else:
            names = class_names_for(ckpt, module.num_classes, datamodule)
            preds = predict_classification(module, files, transform(), names, cfg, out_dir)
    return {"task": task, "files": files, "predictions": preds, "output_dir": out_dir}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    extras(cfg)
    out = predict(cfg)
    print(f"{out['task']}: {len(out['files'])} image(s), predictions in {out['output_dir']}")


def main() -> None:
    """`cednet-predict` console script (Hydra CLI)."""
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    _hydra_main()


if __name__ == "__main__":
    main()
