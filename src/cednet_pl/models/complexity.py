"""Parameter and MAC counting.

Convention: one MAC is one fused multiply-add, i.e. ``torch.utils.flop_counter.FlopCounterMode``'s
total divided by 2. This equals fvcore's "flop" count for convs and matmuls (which is what
ConvNeXt/CEDNet tables print as "FLOPs"): ConvNeXt-T at 224 is ~4.46 G here, 4.47 G in fvcore. Only
ops FlopCounterMode registers are counted (convs, matmuls/linears, scaled-dot-product attention);
norms, activations, pooling, interpolation and element-wise adds are not, and conv biases are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["aux_head_prefixes", "count_macs", "count_params"]

_HEAD_PREFIXES = ("final_layers", "norms", "heads")


def aux_head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the training-only heads: every cascade stage but the last of a CEDNet, or a model's own
    ``training_only_prefixes`` (RevCol's intermediate supervision)."""
    own = getattr(model, "training_only_prefixes", None)
    if own is not None:
        return tuple(own)
    num_stages = getattr(model, "num_stages", None)
    if num_stages is None:
        return ()
    return tuple(f"{p}.{s}." for p in _HEAD_PREFIXES for s in range(num_stages - 1))


def count_params(model: nn.Module, inference_only: bool = False) -> int:
    """Number of parameters (buffers excluded).

    Args:
        model: Any module; for a CEDNet (has ``num_stages``) ``inference_only`` applies.
        inference_only: Exclude the heads of all but the last cascade stage (they only serve deep
            supervision in training; Table A1 of the paper counts the inference path).
    """
    skip = aux_head_prefixes(model) if inference_only else ()
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip))


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of ``model(x)`` (the inference path) for one input of ``input_size``.

    The model runs once in eval mode on a zero tensor on the model's device; its train/eval mode is
    restored afterwards. Returns ``FlopCounterMode`` total flops // 2 (see the module docstring).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(*input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
