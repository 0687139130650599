"""Activation memory of RevCol's reversible training mode against the plain (non-reversible) one.

For each mode, one training step (forward, cross-entropy, backward) of a fresh model, random init, train mode, drop
path 0.1, on a fixed random batch (default 32 x 3 x 224 x 224):

- saved for backward: the bytes of every distinct tensor storage the autograd graph holds after the forward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded). Exact and independent of machine load: this is
  the activation memory the mode keeps.
- peak: (not on ``--device meta``, which counts the saved bytes of any batch without allocating them) on CUDA ``max_memory_allocated`` during the step minus the memory before it; on CPU the process RSS sampled
  every millisecond (``bench_models._RssSampler``) minus the RSS before the step. Every mode runs in its own
  subprocess, so the allocators do not share pages.

The step-time comparison with ConvNeXt-T uses ``scripts/bench_models.py`` (same harness, interleaved)::

    python scripts/bench_models.py --models revcol_tiny "revcol_tiny[save_memory=true]" convnext_tiny

Examples::

    python scripts/bench_revcol_memory.py                       # revcol_tiny, batch 32, 224, CPU (or CUDA)
    python scripts/bench_revcol_memory.py --device cuda --amp bf16
    python scripts/bench_revcol_memory.py --device meta          # saved bytes only, no memory needed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

import cednet_pl  # noqa: F401  (registers the RevCol variants with timm)
from cednet_pl.utils.bench import sync

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import _rss_bytes, _RssSampler  # the shared harness


def saved_activation_bytes(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False
) -> tuple[int, torch.Tensor]:
    """Forward + loss under a saved-tensor hook; returns (bytes of the distinct non-parameter storages saved for
    backward, the loss)."""
    # storages identified by their StorageImpl (``_cdata``), which also works on the meta device
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = F.cross_entropy(model(x), y)
    return sum(seen.values()), loss


def measure(
    variant: str, save_memory: bool, batch: int, img: int, device: str, amp: bool
) -> dict[str, float]:
    """One training step of ``variant`` in the given mode; memory numbers in bytes, time in seconds."""
    torch.manual_seed(0)
    dev = torch.device(device)
    with dev:
        model = timm.create_model(variant, drop_path_rate=0.1, save_memory=save_memory).train()
        x = torch.randn(batch, 3, img, img)
        y = torch.randint(0, 1000, (batch,))
    if dev.type == "meta":  # shapes only: the saved bytes without allocating them
        saved, _ = saved_activation_bytes(model, x, y, amp)
        return {"saved": saved, "peak": float("nan"), "seconds": float("nan")}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    with _RssSampler() as sampler:
        saved, loss = saved_activation_bytes(model, x, y, amp)
        loss.backward()
        sync(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else sampler.peak) - before
    return {"saved": saved, "peak": peak, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="revcol_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "meta"], default="auto")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--mode", choices=["reversible", "plain"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode is not None:  # child process: one mode, JSON on the last line
        result = measure(
            args.model,
            args.mode == "reversible",
            args.batch_size,
            args.img_size,
            args.device,
            args.amp == "bf16",
        )
        print(json.dumps(result))
        return {args.mode: result}

    print(
        f"torch {torch.__version__}, {args.model}, batch {args.batch_size} x 3 x {args.img_size}^2, "
        f"device {args.device}, amp {args.amp}, threads {args.threads or torch.get_num_threads()}, one process per mode"
    )
    results = {}
    for mode in ("reversible", "plain"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + (
            argv if argv is not None else sys.argv[1:]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_kind = "cuda max_memory_allocated" if args.device == "cuda" else "RSS sampled 1 ms"
    print(f"\n| mode | saved for backward (MiB) | peak - before step ({peak_kind}, MiB) | step (s) |")
    print("|---|---:|---:|---:|")
    shapes_only = args.device == "meta"
    for mode, r in results.items():
        peak = "n/a" if shapes_only else f"{r['peak'] / 2**20:,.0f}"
        step = "n/a" if shapes_only else f"{r['seconds']:.1f}"
        print(f"| {mode} | {r['saved'] / 2**20:,.0f} | {peak} | {step} |")
    rev, plain = results["reversible"], results["plain"]
    ratio = f"\nplain / reversible: saved for backward {plain['saved'] / rev['saved']:.1f}x"
    print(ratio + ("" if shapes_only else f", peak {plain['peak'] / rev['peak']:.1f}x"))
    return results


if __name__ == "__main__":
    main()
