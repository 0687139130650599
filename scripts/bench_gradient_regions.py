"""Benchmark GradientRegions: images/s of the input-gradient pass vs one validation pass, on CPU by default.

Both passes run the same detector on the same synthetic validation images (the det_demo canvases, 256 px):

- validation: eval mode, inference mode, ``forward_with_loss`` (what ``DetectionModule.validation_step`` runs);
- gradient regions: :func:`cednet_pl.analysis.detector.gradient_pass` (eval mode, loss backpropagated to the
  input pixels, maps reduced to area curves), as the GradientRegions callback runs it.

    python scripts/bench_gradient_regions.py                      # RetinaNet-CEDNet-nano, det_demo sizes
    python scripts/bench_gradient_regions.py --backbone convnext_atto --num-images 64 --threads 2
    python scripts/bench_gradient_regions.py --ckpt logs/analysis_demo/cednet_nano/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cednet_pl.analysis.detector import eval_mode, gradient_pass
from cednet_pl.data.coco import COCODetection
from cednet_pl.data.synthetic_det import generate_synthetic_det
from cednet_pl.lit.detection import DetectionModule


def build_detector(backbone: str, size: int) -> DetectionModule:
    kind = "cednet" if backbone.startswith("cednet") else "timm_fpn"
    spec = {"kind": kind, "model_name": backbone, "out_channels": 64, "drop_path_rate": 0.0}
    if kind == "timm_fpn":
        spec["out_indices"] = [1, 2, 3]
    return DetectionModule(
        backbone=spec,
        num_classes=10,
        detector={
            "min_size": size,
            "max_size": size,
            "size_divisible": 32,
            "anchor_base_sizes": [16, 32, 64, 128, 256],
        },
    )


def validation_pass(net: torch.nn.Module, dataset: COCODetection, ids: list[int], batch_size: int) -> float:
    index = {int(i): k for k, i in enumerate(dataset.image_ids)}
    start = time.perf_counter()
    with eval_mode(net), torch.inference_mode():
        for lo in range(0, len(ids), batch_size):
            samples = [dataset[index[i]] for i in ids[lo : lo + batch_size]]
            net.forward_with_loss([s[0] for s in samples], [s[1] for s in samples])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="cednet_next_nano", help="cednet_* (pyramid) or a timm model (+FPN)")
    p.add_argument("--ckpt", help="a trained detection checkpoint instead of a random detector")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="canvas side (det_demo: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (best kept), after one warm-up")
    p.add_argument("--data-root", help="cache dir of the synthetic set (default: a temporary dir)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic_det(
            Path(args.data_root or tmp) / "bench_synthetic_det",
            num_train=1,
            num_val=args.num_images,
            image_size=args.size,
        )
        dataset = COCODetection(root / "val", root / "annotations" / "instances_val.json")
        if args.ckpt:
            from cednet_pl.analysis.compare import load_detector

            module = load_detector(args.ckpt)
        else:
            torch.manual_seed(0)
            module = build_detector(args.backbone, args.size)
        net = module.net
        ids = list(dataset.image_ids)
        n = len(ids)

        val_s, grad_s = [], []
        for rep in range(args.reps + 1):
            v = validation_pass(net, dataset, ids, args.batch_size)
            g = gradient_pass(net, dataset, ids, batch_size=args.batch_size).seconds
            if rep:
                val_s.append(v)
                grad_s.append(g)
    v, g = min(val_s), min(grad_s)
    name = module.hparams["backbone"]["model_name"]
    params = sum(q.numel() for q in net.parameters()) / 1e6
    print(
        f"RetinaNet-{name} ({params:.2f} M params), {n} images {args.size}x{args.size}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, device cpu"
    )
    print(f"validation pass      : {v:7.2f} s  {n / v:7.2f} img/s")
    print(f"gradient regions pass: {g:7.2f} s  {n / g:7.2f} img/s")
    print(f"cost relative to one validation pass: {g / v:.2f}x")


if __name__ == "__main__":
    main()
