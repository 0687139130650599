"""Export entry point: `export(cfg)` writes a trained classifier or RetinaNet detector as ONNX or a torch.export program.

Console script `cednet-export`::

    cednet-export ckpt=logs/train/runs/<run>/checkpoints/last.ckpt format=onnx          # EMA weights if present
    cednet-export ckpt=last.ckpt format=torch_export use_ema=false
    cednet-export ckpt=cednet_next_tiny.pth model=cednet_next_tiny format=onnx           # a released state_dict
    cednet-export ckpt=<detector run>/checkpoints/last.ckpt format=onnx input_size=[512,512]

The module is rebuilt as cednet-eval rebuilds it (:func:`cednet_pl.eval.build_module`). What is exported:

- classifier: ``images (B, 3, H, W)`` normalised as in evaluation -> ``logits (B, num_classes)``;
- detector: the network of the RetinaNet (backbone pyramid + head) on a normalised, resized and padded batch
  ``images (B, 3, H, W)`` -> ``cls_logits (B, A, K)`` and ``bbox_regression (B, A, 4)`` over all anchors of all
  levels (torchvision's head layout). Resizing/normalisation (the detector's ``transform``), anchor generation,
  box decoding and NMS (torchvision's postprocessing) stay outside the exported graph.

The batch dimension is dynamic; the spatial size is the export size ``input_size`` (shape-dependent choices, e.g. the
Swin window shift or the cropped dilated kernel, are resolved for it). Both formats are verified right after export:
the file is run (onnxruntime / the loaded exported program) on a batch of another size and compared with the eager
module (``atol`` + ``rtol`` * |eager|, float32); the maximum difference goes into ``export.json`` next to the file,
with the input spec, normalisation and class / category names.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import cednet_pl  # noqa: F401  (registers the CEDNet timm models)
from cednet_pl.eval import build_module
from cednet_pl.models.checkpoint import read_checkpoint
from cednet_pl.utils import CONF_DIR, RankedLogger, extras

log = RankedLogger(__name__)

FORMATS = ("onnx", "torch_export")
#: verification tolerance of the exported file against the eager module (float32, CPU)
ATOL, RTOL = 1e-4, 1e-4


class DetectorNetwork(nn.Module):
    """The trainable network of a torchvision RetinaNet: backbone pyramid + head, outputs over all anchors."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.backbone(images).values()))
        return out["cls_logits"], out["bbox_regression"]


def exportable(module: Any, use_ema: bool = True) -> tuple[nn.Module, str, list[str]]:
    """The network to export from a LightningModule, its task, and its output names.

    Classification: the EMA copy when asked and present, else the raw network. Detection: :class:`DetectorNetwork`.
    """
    task = str(getattr(module, "task", "classification"))
    if task == "detection":
        return DetectorNetwork(module.net).eval(), task, ["cls_logits", "bbox_regression"]
    ema = getattr(module, "ema", None)
    if use_ema and ema is not None:
        log.info("exporting the EMA weights (use_ema=true)")
        return ema.module.eval(), task, ["logits"]
    if use_ema:
        log.info("the checkpoint has no EMA weights: exporting the raw weights")
    return module.net.eval(), task, ["logits"]


def export_network(
    net: nn.Module, example: torch.Tensor, fmt: str, path: Path, output_names: list[str]
) -> dict[str, Any]:
    """Export `net` (input `images`, dynamic batch) to `path` and verify the file against eager outputs.

    Returns:
        ``{"file", "format", "max_abs_diff", "atol", "rtol"}``.

    Raises:
        ValueError: unknown format.
        RuntimeError: the exported file's outputs differ from the eager module's beyond the tolerance.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
    net = net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            with warnings.catch_warnings():
                # the TorchScript-based exporter warns on shape-dependent Python branches: they are resolved for the
                # export size, which is the documented contract (dynamic batch, fixed H x W)
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    input_names=["images"],
                    output_names=output_names,
                    dynamic_axes={name: {0: "batch"} for name in ["images", *output_names]},
                    opset_version=17,
                    dynamo=False,
                )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
    check = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    diff = max_abs_diff = 0.0
    with torch.no_grad():
        expected = net(check)
        got = run_exported(path, fmt, check)
    expected = list(expected) if isinstance(expected, tuple | list) else [expected]
    for e, g in zip(expected, got, strict=True):
        diff = (g - e).abs().max().item()
        max_abs_diff = max(max_abs_diff, diff)
        if not torch.allclose(g, e, atol=ATOL, rtol=RTOL):
            raise RuntimeError(
                f"{path}: exported outputs differ from the eager module by up to {diff:.3g} "
                f"(tolerance atol={ATOL} + rtol={RTOL} * |eager|)"
            )
    return {"file": str(path), "format": fmt, "max_abs_diff": max_abs_diff, "atol": ATOL, "rtol": RTOL}


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported file on `images` (onnxruntime on CPU, or the loaded exported program)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]
    program = torch.export.load(str(path))
    out = program.module()(images)
    return list(out) if isinstance(out, tuple | list) else [out]


def _input_size(cfg: DictConfig, module: Any, task: str, data_cfg: dict[str, Any]) -> tuple[int, int]:
    size = cfg.get("input_size")
    if size:
        h, w = (int(size), int(size)) if isinstance(size, int | str) else (int(size[0]), int(size[1]))
        return h, w
    if task == "detection":
        t = module.net.transform
        side = int(t.max_size) if isinstance(t.max_size, int) else int(max(t.max_size))
        div = int(t.size_divisible)
        side = (side + div - 1) // div * div
        return side, side
    if data_cfg.get("image_size"):
        return int(data_cfg["image_size"]), int(data_cfg["image_size"])
    _, h, w = module.net.pretrained_cfg["input_size"]
    return int(h), int(w)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint `cfg.ckpt` as `cfg.format` into `cfg.paths.output_dir`; returns the metadata."""
    if cfg.get("ckpt") in (None, "", "???") or OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("cednet-export needs ckpt=PATH (a cednet-train .ckpt or a state_dict .pth)")
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; expected one of {FORMATS}")
    path = Path(str(cfg.ckpt)).expanduser()
    ckpt = read_checkpoint(path, weights_only=not cfg.get("allow_pickle", False))
    module, _, data_cfg = build_module(cfg, ckpt, path, ema=bool(cfg.use_ema))
    net, task, output_names = exportable(module, bool(cfg.use_ema))
    h, w = _input_size(cfg, module, task, data_cfg)
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    out_dir = Path(cfg.paths.output_dir)
    file = out_dir / ("model.onnx" if cfg.format == "onnx" else "model.pt2")
    info = export_network(net, example, str(cfg.format), file, output_names)
    meta: dict[str, Any] = {
        **info,
        "ckpt": str(path.resolve()),
        "task": task,
        "ema": bool(cfg.use_ema and getattr(module, "ema", None) is not None),
        "input": {"name": "images", "shape": ["batch", 3, h, w]},
        "outputs": output_names,
    }
    if task == "detection":
        t = module.net.transform
        meta |= {
            "image_mean": list(t.image_mean),
            "image_std": list(t.image_std),
            "category_ids": ckpt.get("category_ids") or module.category_ids,
            "category_names": ckpt.get("category_names") or module.category_names,
            "postprocessing": "outside: torchvision RetinaNet anchors, box decoding, score threshold, NMS",
        }
    else:
        meta["class_names"] = ckpt.get("class_names")
        meta["data"] = {k: v for k, v in data_cfg.items() if k in ("image_size", "mean", "std", "crop_pct")}
    (out_dir / "export.json").write_text(json.dumps(meta, indent=1))
    log.info(f"wrote {file} (max |exported - eager| = {info['max_abs_diff']:.2e})")
    return meta


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    extras(cfg)
    meta = export(cfg)
    print(f"{meta['task']} exported to {meta['file']} (max abs diff vs eager {meta['max_abs_diff']:.2e})")


def main() -> None:
    """`cednet-export` console script (Hydra CLI)."""
    _hydra_main()


if __name__ == "__main__":
    main()
