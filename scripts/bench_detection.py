"""Training-step and inference time of CEDNet-NeXt-T vs ConvNeXt-T+FPN under RetinaNet or Mask R-CNN (CPU or CUDA).

Both detectors use the same detector (``--arch retinanet``: head, anchors, losses; ``--arch maskrcnn``: RPN, RoI
heads, mask head) and differ only in the backbone: CEDNet-T's neck-free pyramid (P3-P7; Mask R-CNN: the two-stage
form P2-P6) vs ConvNeXt-T + FPN (P6/P7 from C5; Mask R-CNN: C2-C5 + max-pool P6). Mask R-CNN targets get
box-shaped masks. A training step is forward + losses + backward +
AdamW step on ``--batch`` images of ``--size`` x ``--size`` with a few boxes each; inference is the eval forward
(with postprocessing). The two models are run interleaved (A, B, A, B, ...) after a warm-up step each, so
machine-load changes hit both; the median of ``--rounds`` and the ratio come from one run. On CUDA the models run
channels_last under bf16 autocast (``--amp none`` for fp32) and the peak of ``torch.cuda.max_memory_allocated`` over
the timed training steps is reported.

    python scripts/bench_detection.py [--size 512] [--batch 2] [--rounds 5] [--threads 2] [--out bench.json]
    python scripts/bench_detection.py --device cuda --size 1024 --batch 16 --rounds 10
    python scripts/bench_detection.py --arch maskrcnn --size 1024 --batch 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from cednet_pl.lit.detection import build_backbone
from cednet_pl.models.detection import build_maskrcnn, build_retinanet
from cednet_pl.utils.bench import add_device_args, autocast, configure, resolve_device, sync

CEDNET_T = {"kind": "cednet", "model_name": "cednet_next_tiny", "drop_path_rate": 0.2}
CONVNEXT_T = {"kind": "timm_fpn", "model_name": "convnext_tiny", "drop_path_rate": 0.4}
#: per --arch: the builder and the two backbones (CEDNet first)
ARCHS = {
    "retinanet": (
        build_retinanet,
        {"retinanet_cednet_next_tiny": CEDNET_T, "retinanet_convnext_tiny_fpn": CONVNEXT_T},
    ),
    "maskrcnn": (
        build_maskrcnn,
        {
            "maskrcnn_cednet_next_tiny": {**CEDNET_T, "p2_level": True, "num_extra_levels": 1},
            "maskrcnn_convnext_tiny_fpn": {
                **CONVNEXT_T,
                "out_indices": (0, 1, 2, 3),
                "extra_levels": "maxpool",
            },
        },
    ),
}


def make_batch(
    size: int, batch: int, seed: int = 0, masks: bool = False
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(6, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, xy + wh], 1)
        target = {"boxes": boxes, "labels": torch.randint(80, (6,), generator=g)}
        if masks:
            m = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(m, boxes.int().tolist(), strict=True):
                mask[y0:y1, x0:x1] = 1
            target["masks"] = m
        targets.append(target)
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="retinanet")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    add_device_args(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(parser, args)
    cuda = device.type == "cuda"
    memory_format = configure(device, args.threads)

    def clock() -> float:
        sync(device)
        return time.perf_counter()

    nets, opts = {}, {}
    build, models = ARCHS[args.arch]
    for name, cfg in models.items():
        net = build(build_backbone(**cfg), 80, min_size=args.size, max_size=args.size, size_divisible=128)
        nets[name] = net.to(device, memory_format=memory_format)
        opts[name] = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images, targets = make_batch(args.size, args.batch, masks=args.arch == "maskrcnn")
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    peak_mem = dict.fromkeys(nets, 0)

    def train_step(name: str) -> float:
        net, opt = nets[name].train(), opts[name]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock()
        with autocast(device, args.amp):
            losses = net(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        t1 = clock()
        if cuda:
            peak_mem[name] = max(peak_mem[name], torch.cuda.max_memory_allocated(device))
        return t1 - t0

    @torch.no_grad()
    def infer(name: str) -> float:
        net = nets[name].eval()
        t0 = clock()
        with autocast(device, args.amp):
            net(images)
        return clock() - t0

    train_t: dict[str, list[float]] = {n: [] for n in nets}
    infer_t: dict[str, list[float]] = {n: [] for n in nets}
    for name in nets:  # warm-up
        train_step(name)
        infer(name)
    for r in range(args.rounds):
        order = list(nets) if r % 2 == 0 else list(reversed(nets))
        for name in order:
            train_t[name].append(train_step(name))
            infer_t[name].append(infer(name))

    a, b = list(nets)
    report = {
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "amp": args.amp,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "params_M": {n: round(sum(p.numel() for p in net.parameters()) / 1e6, 2) for n, net in nets.items()},
        "train_step_s_median": {n: round(statistics.median(v), 3) for n, v in train_t.items()},
        "infer_s_median": {n: round(statistics.median(v), 3) for n, v in infer_t.items()},
    }
    if cuda:
        report["train_peak_mem_MiB"] = {n: round(v / 2**20) for n, v in peak_mem.items()}
    else:
        # NOTE: the process's peak resident memory (both models, both passes), the CPU stand-in for CUDA's peak
        report["process_peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["train_ratio_cednet_over_convnext"] = round(
        statistics.median(train_t[a]) / statistics.median(train_t[b]), 3
    )
    report["train_ratio_per_round"] = [round(x / y, 3) for x, y in zip(train_t[a], train_t[b], strict=True)]
    report["infer_ratio_cednet_over_convnext"] = round(
        statistics.median(infer_t[a]) / statistics.median(infer_t[b]), 3
    )
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
