"""Training-step benchmark: CEDNet-NeXt-T against timm's ConvNeXt-T, in one process, interleaved.

One step = forward + cross-entropy loss + backward + AdamW step, train mode, on a fixed random batch
(default 8 x 3 x 224 x 224). Models alternate within every repetition (A, B, A, B, ...), so drifts in
machine load hit both alike. Reports the median step time, images/s, the step-time ratio against the
baseline and peak memory, and optionally the top ops of one profiled step (``--profile``).

The paired ratio is the median over repetitions of (step time / the baseline's step in the same repetition):
load that changes between repetitions cancels out of it. On CPU it also reports the process CPU time per step (``time.process_time``, all threads), whose
ratio is much less sensitive than wall time to other jobs on a shared machine.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over a step (reset before it). On CPU the
process RSS is sampled every millisecond from ``/proc/self/statm`` by a background thread during each
timed step; the table shows the peak RSS during the model's steps and that peak minus the RSS just
before the step. Both models live in the same process and the allocator keeps freed pages, so the
CPU numbers are an upper/lower bracket, not an exact per-model footprint.

Examples::

    python scripts/bench_models.py                       # CPU (or CUDA if present), 5 reps each
    python scripts/bench_models.py --device cpu --reps 3 --profile
    python scripts/bench_models.py --device cuda --amp bf16 --compile --batch-size 64
    python scripts/bench_models.py --models "revcol_tiny[save_memory=true]" revcol_tiny convnext_tiny
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F

import cednet_pl  # noqa: F401  (registers the CEDNet variants with timm)
from cednet_pl.models.blocks import DepthwiseConv2d
from cednet_pl.utils.bench import add_device_args, autocast, resolve_device, sync

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _RssSampler:
    """Samples RSS in a background thread while active; ``peak`` is the largest sample."""

    def __init__(self, interval_s: float = 1e-3) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@dataclass
class Runner:
    """One model with its optimizer and per-step measurements."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_mem: int = 0
    peak_mem_delta: int = 0


def train_step(
    runner: Runner, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str
) -> torch.Tensor:
    """Forward, cross-entropy, backward, optimizer step; returns the (detached) loss."""
    runner.optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss = F.cross_entropy(runner.model(x), y)
    loss.backward()
    runner.optimizer.step()
    return loss.detach()


def timed_step(runner: Runner, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str) -> None:
    """Run one step, record its wall time and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        sync(device)
        t0 = time.perf_counter()
        train_step(runner, x, y, device, amp)
        sync(device)
        runner.times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device)
        runner.peak_mem = max(runner.peak_mem, peak)
        runner.peak_mem_delta = max(runner.peak_mem_delta, peak - base)
        return
    base = _rss_bytes()
    with _RssSampler() as sampler:
        c0, t0 = time.process_time(), time.perf_counter()
        train_step(runner, x, y, device, amp)
        runner.times.append(time.perf_counter() - t0)
        runner.cpu_times.append(time.process_time() - c0)
    runner.peak_mem = max(runner.peak_mem, sampler.peak)
    runner.peak_mem_delta = max(runner.peak_mem_delta, sampler.peak - base)


def use_our_depthwise_convs(model: torch.nn.Module) -> int:
    """Swap every stride-1 'same' depthwise ``nn.Conv2d`` of ``model`` for :class:`DepthwiseConv2d` (same
    weights; on CPU its weight gradient is faster); returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for child_name, conv in list(parent.named_children()):
            if type(conv) is not torch.nn.Conv2d:
                continue
            k, d = conv.kernel_size[0], conv.dilation[0]
            same = (
                conv.padding == (d * (k // 2),) * 2 and conv.stride == (1, 1) and conv.kernel_size == (k, k)
            )
            depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.dilation == (d, d)
            if not (same and depthwise and conv.padding_mode == "zeros"):
                continue
            new = DepthwiseConv2d(conv.in_channels, k, d, bias=conv.bias is not None)
            new.load_state_dict(conv.state_dict())
            setattr(parent, child_name, new)
            swapped += 1
    return swapped


def parse_model_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``'revcol_tiny[save_memory=true,aux_heads=false]'`` -> ``('revcol_tiny', {'save_memory': True, ...})``:
    a timm name with optional ``create_model`` kwargs (ints, floats, true/false, else strings)."""
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ValueError(f"model spec {spec!r}: expected NAME[key=value,...]")
    name, _, body = spec[:-1].partition("[")
    kwargs: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"model spec {spec!r}: {item!r} is not key=value")
        lowered = value.lower()
        if lowered in ("true", "false"):
            kwargs[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = value
    return name, kwargs


def build_runner(name: str, args: argparse.Namespace, device: torch.device) -> Runner:
    """Create model (random init) + AdamW on ``device``; ``name`` may carry kwargs (:func:`parse_model_spec`)."""
    model_name, kwargs = parse_model_spec(name)
    model = timm.create_model(
        model_name, pretrained=False, num_classes=args.num_classes, drop_path_rate=args.drop_path, **kwargs
    )
    if args.our_dwconv:
        print(f"{name}: {use_our_depthwise_convs(model)} depthwise convs swapped for DepthwiseConv2d")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    if args.compile:
        model = torch.compile(model)
    return Runner(name, model, optimizer)


def profile_step(
    runner: Runner, x: torch.Tensor, y: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> str:
    """Profile one training step and return the key_averages table (top ``--profile-rows`` ops)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    with profile(activities=activities, record_shapes=args.profile_shapes) as prof:
        train_step(runner, x, y, device, args.amp)
        sync(device)
    averages = prof.key_averages(group_by_input_shape=args.profile_shapes)
    return averages.table(sort_by=sort_by, row_limit=args.profile_rows)


def op_type(key: str, shapes: list) -> str:
    """Operator type of a profiler entry (CPU ops), for the per-type comparison of ``--op-types``."""
    if key in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix multiplies"
    if key in ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution"):
        weight = shapes[2] if key == "aten::convolution_backward" else shapes[1]
        return "depthwise convs" if len(weight) == 4 and weight[1] == 1 else "dense convs"
    if "gelu" in key:
        return "GELU"
    if "layer_norm" in key:
        return "LayerNorm"
    if key in ("aten::copy_", "aten::clone"):
        return "copies"
    if key.split("::")[-1].rstrip("_") in ("add", "mul", "sum", "div") or "upsample" in key:
        return "element-wise, upsampling"
    return "other"


def op_type_table(runners: list, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str) -> str:
    """Profile one training step of every model; Markdown table of self CPU seconds per operator type."""
    from torch.profiler import ProfilerActivity, profile

    per_model = {}
    for runner in runners:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            train_step(runner, x, y, device, amp)
            sync(device)
            wall = time.perf_counter() - start
        totals = {"whole step (profiled wall)": wall}
        for e in prof.key_averages(group_by_input_shape=True):
            kind = op_type(e.key, e.input_shapes)
            totals[kind] = totals.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        per_model[runner.name] = totals
    names = [r.name for r in runners]
    base = per_model[names[-1]]
    lines = ["| operator type | " + " | ".join(f"{n} (s)" for n in names) + f" | ratio vs {names[-1]} |"]
    lines.append("|---|" + "---:|" * (len(names) + 1))
    first = per_model[names[0]]
    for kind in sorted(first, key=lambda k: (k != "whole step (profiled wall)", -first[k])):
        cells = " | ".join(f"{per_model[n].get(kind, 0.0):.3f}" for n in names)
        ratio = f"{first[kind] / base[kind]:.2f}x" if base.get(kind) else "-"
        lines.append(f"| {kind} | {cells} | {ratio} |")
    return "\n".join(lines)


def _fmt_mem(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["cednet_next_tiny", "convnext_tiny"],
        help="timm model names, optionally with create_model kwargs: revcol_tiny[save_memory=true]",
    )
    p.add_argument(
        "--baseline", default=None, help="model the ratio is taken against (default: the last one)"
    )
    add_device_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--drop-path", type=float, default=0.1, help="drop_path_rate of every model (default 0.1)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument(
        "--our-dwconv",
        action="store_true",
        help="give every model (the baseline too) our DepthwiseConv2d: the ratio at equal depthwise kernels",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of the first model")
    p.add_argument("--profile-model", default=None, help="model to profile (default: the first one)")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--profile-shapes", action="store_true", help="group the profile by input shape")
    p.add_argument(
        "--op-types",
        action="store_true",
        help="profile one step of every model and print self CPU time per operator type (CPU only)",
    )
    args = p.parse_args(argv)
    resolve_device(p, args)
    if args.reps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--reps must be >= 1, --warmup >= 0, --batch-size >= 1")
    args.baseline = args.baseline or args.models[-1]
    if args.baseline not in args.models:
        p.error(f"--baseline {args.baseline!r} is not one of --models {args.models}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; returns the median step time (s) per model."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, device {device} ({dev_name}), "
        f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, loadavg before {_load()}"
    )
    print(
        f"batch {args.batch_size} x 3 x {args.img_size}^2, channels_last={args.channels_last}, amp={args.amp}, "
        f"compile={args.compile}, drop_path={args.drop_path}, warmup {args.warmup}, reps {args.reps} (interleaved)"
    )

    runners = [build_runner(name, args, device) for name in args.models]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(
        memory_format=memory_format
    )
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    for _ in range(args.warmup):
        for r in runners:
            train_step(r, x, y, device, args.amp)
    sync(device)
    for _ in range(args.reps):
        for r in runners:
            timed_step(r, x, y, device, args.amp)

    medians = {r.name: statistics.median(r.times) for r in runners}
    base = medians[args.baseline]
    mem_kind = "cuda max_memory_allocated" if device.type == "cuda" else "RSS sampled 1 ms"
    cpu_cols = device.type == "cpu"
    base_times = runners[args.models.index(args.baseline)].times
    header = (
        f"| model | median step (s) | min step (s) | images/s | ratio vs {args.baseline} | paired ratio |"
    )
    header += " CPU s/step | CPU-time ratio |" if cpu_cols else ""
    header += f" peak mem ({mem_kind}) | peak - before step |"
    print()
    print(header)
    print("|---" + "|---:" * (header.count("|") - 2) + "|")
    cpu_base = statistics.median(runners[args.models.index(args.baseline)].cpu_times) if cpu_cols else 0.0
    for r in runners:
        med = medians[r.name]
        paired = statistics.median(t / tb for t, tb in zip(r.times, base_times, strict=True))
        line = (
            f"| {r.name} | {med:.3f} | {min(r.times):.3f} | {args.batch_size / med:.1f} | {med / base:.2f}x |"
            f" {paired:.2f}x |"
        )
        if cpu_cols:
            cpu = statistics.median(r.cpu_times)
            line += f" {cpu:.3f} | {cpu / cpu_base:.2f}x |"
        print(line + f" {_fmt_mem(r.peak_mem)} | {_fmt_mem(r.peak_mem_delta)} |")
    print(
        f"\nloadavg after {_load()}; step times per model: "
        + "; ".join(f"{r.name}: " + ", ".join(f"{t:.3f}" for t in r.times) for r in runners)
    )
    if cpu_cols:
        print(
            "CPU s/step = process CPU time (all threads) of the step: less sensitive to other load on the "
            "machine than wall time; on an idle machine wall-time ratio ~ CPU-time ratio."
        )

    if args.profile:
        name = args.profile_model or args.models[0]
        runner = next((r for r in runners if r.name == name), None)
        if runner is None:
            raise SystemExit(f"--profile-model {name!r} is not one of --models {args.models}")
        print(f"\nprofile of one training step of {name} (sorted by self time):")
        print(profile_step(runner, x, y, device, args))
    if args.op_types:
        print("\nself CPU time of one training step per operator type:")
        print(op_type_table(runners, x, y, device, args.amp))
    return medians


if __name__ == "__main__":
    main()
