"""Training-step time of CEDNet-T + CEDHead vs UperNet on CEDNet-T vs UperNet on ConvNeXt-T (CPU or CUDA).

A training step is forward (decode + auxiliary FCN head) + cross-entropy (aux weight 0.4) + backward + AdamW step
on ``--batch`` random ``--size`` x ``--size`` images with random labels of 150 classes (the ADE20K models of
``cednet_pl.models.segmentation.ADE20K_MODELS``). The models run interleaved (A, B, C, C, B, A, ...) after a
warm-up step each, so machine-load changes hit all of them; medians of ``--rounds`` and the ratios to CEDHead come
from one run. On CPU the process CPU time of each step is reported too (wall time on a shared machine is
disturbed by other processes; CPU time much less). On CUDA the models run channels_last under bf16 autocast
(``--amp none`` for fp32) and the peak ``torch.cuda.max_memory_allocated`` of the timed steps is reported.

    python scripts/bench_segmentation.py [--size 512] [--batch 2] [--rounds 3] [--threads 2] [--out bench.json]
    python scripts/bench_segmentation.py --device cuda --batch 16 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cednet_pl.models.segmentation import ADE20K_MODELS, build_segmentor
from cednet_pl.utils.bench import add_device_args, autocast, configure, resolve_device, sync


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(ADE20K_MODELS), choices=list(ADE20K_MODELS))
    add_device_args(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(parser, args)
    cuda = device.type == "cuda"
    memory_format = configure(device, args.threads)

    nets, opts = {}, {}
    for name in args.models:
        spec = ADE20K_MODELS[name]
        net = build_segmentor(dict(spec["backbone"]), 150, dict(spec["head"]), {"channels": 256})
        nets[name] = net.to(device, memory_format=memory_format).train()
        opts[name] = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(
        device, memory_format=memory_format
    )
    labels = torch.randint(0, 150, (args.batch, args.size, args.size), generator=g).to(device)
    peak_mem = dict.fromkeys(nets, 0)

    def train_step(name: str) -> tuple[float, float]:
        net, opt = nets[name], opts[name]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(device, args.amp):
            logits, aux = net(images, with_aux=True)
        loss = F.cross_entropy(logits.float(), labels) + 0.4 * F.cross_entropy(aux.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if cuda:
            peak_mem[name] = max(peak_mem[name], torch.cuda.max_memory_allocated(device))
        return wall, cpu

    wall_t: dict[str, list[float]] = {n: [] for n in nets}
    cpu_t: dict[str, list[float]] = {n: [] for n in nets}
    for name in nets:  # warm-up
        train_step(name)
    for r in range(args.rounds):
        for name in list(nets) if r % 2 == 0 else list(reversed(nets)):
            wall, cpu = train_step(name)
            wall_t[name].append(wall)
            cpu_t[name].append(cpu)

    first = args.models[0]
    med_wall = {n: statistics.median(v) for n, v in wall_t.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu_t.items()}
    report = {
        "size": args.size,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "amp": args.amp,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "params_M": {n: round(sum(p.numel() for p in net.parameters()) / 1e6, 2) for n, net in nets.items()},
        "train_step_wall_s_median": {n: round(v, 3) for n, v in med_wall.items()},
        f"train_wall_ratio_to_{first}": {n: round(v / med_wall[first], 3) for n, v in med_wall.items()},
    }
    if not cuda:
        report["train_step_cpu_s_median"] = {n: round(v, 3) for n, v in med_cpu.items()}
        report[f"train_cpu_ratio_to_{first}"] = {n: round(v / med_cpu[first], 3) for n, v in med_cpu.items()}
    else:
        report["train_peak_mem_MiB"] = {n: round(v / 2**20) for n, v in peak_mem.items()}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
