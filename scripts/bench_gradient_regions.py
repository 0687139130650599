"""Benchmark GradientRegions: images/s of the input-gradient pass vs one validation pass, on CPU by default.

Both passes run the same detector on the same synthetic validation images (the det_demo canvases, 256 px), for
each detector asked for (default: both detectors of the appendix-B comparison, ``det_demo`` = RetinaNet-CEDNet-nano
and ``det_demo_convnext`` = its matched ConvNeXt + FPN, built from the experiments' model configs):

- validation: eval mode, inference mode, ``forward_with_loss`` (what ``DetectionModule.validation_step`` runs);
- gradient regions: :func:`cednet_pl.analysis.detector.gradient_pass` (eval mode, loss backpropagated to the
  input pixels, maps reduced to area curves), as the GradientRegions callback runs it.

    python scripts/bench_gradient_regions.py                      # det_demo and det_demo_convnext detectors
    python scripts/bench_gradient_regions.py --experiment det_demo_convnext --num-images 64 --threads 2
    python scripts/bench_gradient_regions.py --backbone convnext_atto  # a timm trunk + FPN, 64 channels
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

#: the two detectors of the appendix-B comparison (scripts/appendix_b.py)
DEFAULT_EXPERIMENTS = ("det_demo", "det_demo_convnext")


def experiment_detector(experiment: str, size: int) -> DetectionModule:
    """The detector of an experiment config (``det_demo``, ``det_demo_convnext``) at ``size`` px canvases."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cednet_pl.utils.run import CONF_DIR

    overrides = [f"+experiment={experiment}", f"data.test_min_size={size}", f"data.test_max_size={size}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    return instantiate(cfg.model)


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
    p.add_argument(
        "--experiment",
        action="append",
        help="detector of this experiment (repeatable; default: det_demo and det_demo_convnext)",
    )
    p.add_argument("--backbone", help="instead: cednet_* (pyramid) or a timm model (+FPN), 64 channels")
    p.add_argument("--ckpt", help="instead: a trained detection checkpoint")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="canvas side (det_demo: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (best kept), after one warm-up")
    p.add_argument("--data-root", help="cache dir of the synthetic set (default: a temporary dir)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.ckpt:
        from cednet_pl.analysis.compare import load_detector

        detectors = [(Path(args.ckpt).name, load_detector(args.ckpt))]
    elif args.backbone:
        detectors = [(args.backbone, build_detector(args.backbone, args.size))]
    else:
        detectors = [(e, experiment_detector(e, args.size)) for e in args.experiment or DEFAULT_EXPERIMENTS]

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic_det(
            Path(args.data_root or tmp) / "bench_synthetic_det",
            num_train=1,
            num_val=args.num_images,
            image_size=args.size,
        )
        dataset = COCODetection(root / "val", root / "annotations" / "instances_val.json")
        ids = list(dataset.image_ids)
        n = len(ids)
        print(
            f"{n} images {args.size}x{args.size}, batch {args.batch_size}, {torch.get_num_threads()} threads, cpu"
        )
        for label, module in detectors:
            net = module.net
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
            print(f"{label}: RetinaNet-{name} ({params:.2f} M params)")
            print(f"  validation pass      : {v:7.2f} s  {n / v:7.2f} img/s")
            print(f"  gradient regions pass: {g:7.2f} s  {n / g:7.2f} img/s")
            print(f"  cost relative to one validation pass: {g / v:.2f}x")


if __name__ == "__main__":
    main()
