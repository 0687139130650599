"""Depthwise 7x7 conv on CPU: oneDNN's weight gradient vs :class:`DepthwiseConv2d`'s, at CEDNet-T's shapes.

For every map of CEDNet-T's blocks at a 224 input (batch 8, channels-last), times the forward, the input gradient
and the weight gradient of oneDNN (``aten.convolution_backward``) and the weight gradient that
``DepthwiseConv2d``'s backward uses (``depthwise_weight_grad``: a depthwise conv with the output gradient as the
kernel), median of ``--reps``.

    python scripts/bench_dwconv.py [--threads 2] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cednet_pl.models.blocks import depthwise_weight_grad

# (channels, map side, dilation, kernel): CEDNet-T's depthwise convs at 224 (the dilated one cropped to 5x5)
SHAPES = [(96, 56, 1, 7), (192, 28, 1, 7), (352, 14, 1, 7), (512, 7, 1, 7), (512, 7, 3, 5)]


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bench_shape(c: int, side: int, d: int, k: int, batch: int, reps: int) -> str:
    pad = d * (k // 2)
    x = torch.randn(batch, c, side, side).to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    w = torch.randn(c, 1, k, k)

    def onednn(mask: list[bool]) -> object:
        return torch.ops.aten.convolution_backward(
            g, x, w, [c], [1, 1], [pad, pad], [d, d], False, [0, 0], c, mask
        )

    def ours() -> torch.Tensor:
        return depthwise_weight_grad(x, g, (pad, pad), d)

    torch.testing.assert_close(ours(), onednn([False, True, False])[1], rtol=1e-4, atol=1e-3)
    fwd = _median_ms(lambda: F.conv2d(x, w, padding=pad, dilation=d, groups=c), reps)
    gi = _median_ms(lambda: onednn([True, False, False]), reps)
    gw = _median_ms(lambda: onednn([False, True, False]), reps)
    gw_ours = _median_ms(ours, reps)
    return f"| {c} x {side} x {side}, {k}x{k}, {d} | {fwd:.2f} | {gi:.2f} | {gw:.2f} | {gw_ours:.2f} | {gw / gw_ours:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, channels-last, median ms")
    print(
        "| C x H x W, kernel, dilation | forward | input grad | weight grad (oneDNN) | weight grad (ours) | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    # one untimed pass over all shapes first: as in a training step after warm-up, the allocator then serves
    # these buffers from memory it already holds (a fresh process maps and zero-fills new pages for each one,
    # which doubled some of the timings here)
    for c, side, d, k in SHAPES:
        _bench_shape(c, side, d, k, args.batch, 1)
    for c, side, d, k in SHAPES:
        print(_bench_shape(c, side, d, k, args.batch, args.reps))


if __name__ == "__main__":
    main()
