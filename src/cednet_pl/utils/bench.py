"""Device and mixed-precision set-up shared by the benchmark scripts (``scripts/bench_*.py``).

:func:`add_device_args` adds ``--device`` and ``--amp`` to a parser; :func:`resolve_device` turns ``auto`` into
CUDA when present, defaults ``--amp`` to bf16 on CUDA and returns the device; :func:`autocast` is the matching
autocast context; :func:`configure` sets threads, seed and cuDNN autotuning and picks the memory
format; :func:`sync` waits for queued CUDA work before a clock is read.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

__all__ = ["add_device_args", "autocast", "configure", "resolve_device", "sync"]


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (auto, cpu, cuda) and ``--amp`` (none, bf16; default bf16 on CUDA) to ``parser``."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--amp", choices=["none", "bf16"], default=None, help="autocast (default: bf16 on CUDA)"
    )


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Resolve ``args.device`` (``auto``: CUDA when available) and ``args.amp`` in place; return the device.

    Exits through ``parser.error`` when ``--device cuda`` is asked for and no CUDA device is available.
    """
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.amp is None:
        args.amp = "bf16" if args.device == "cuda" else "none"
    return torch.device(args.device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``amp="bf16"``, a no-op context for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"amp={amp!r}; expected 'none' or 'bf16'")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure(device: torch.device, threads: int | None, seed: int = 0) -> torch.memory_format:
    """Set the CPU threads (None: torch's default), the seed and cuDNN autotuning (CUDA only); return the memory
    format the models and inputs should use (channels_last on CUDA, contiguous on CPU)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    return torch.channels_last if cuda else torch.contiguous_format
