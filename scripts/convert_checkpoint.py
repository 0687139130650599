#!/usr/bin/env python
"""Convert a CEDNet, MSG-Transformer or RevCol checkpoint into a bare state_dict of the cednet-pl layout, verified.

Inputs: a released CEDNet checkpoint or an official MSG-Transformer one (``{'model': state_dict, ...}``; our module names are the
released names, so no key is renamed), a Lightning ``.ckpt`` of ours (``state_dict`` with the
``net.`` prefix) or a bare state_dict. The keys and shapes are checked against a freshly built
``--model`` (any missing/unexpected/mis-shaped key is an error) before anything is written.

Examples::

    python scripts/convert_checkpoint.py cednet_tiny.pth out/cednet_next_tiny.pth --model cednet_next_tiny
    python scripts/convert_checkpoint.py last.ckpt backbone.pth --model cednet_next_tiny --drop-heads
    python scripts/convert_checkpoint.py last.ckpt ema.pth --model cednet_next_nano --ema   # the EMA weights
    python scripts/convert_checkpoint.py msg_tiny_official.pth out/msg_tiny.pth --model msg_tiny
    python scripts/convert_checkpoint.py revcol_tiny_1k.pth out/revcol_tiny.pth --model revcol_tiny --inference-only

RevCol: the official ImageNet checkpoints carry the training-only ``cls_blocks.0-2`` / ``decoder_blocks``; they are
kept (verified against a model built with ``aux_heads=True``) unless ``--inference-only`` or ``--drop-heads``.

Load the output with ``timm.create_model(VARIANT, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import timm
import torch

import cednet_pl  # noqa: F401  (registers the CEDNet variants)
from cednet_pl.models.cednet import checkpoint_filter_fn
from cednet_pl.models.checkpoint import load_checkpoint_file
from cednet_pl.models.complexity import aux_head_prefixes
from cednet_pl.models.msg import msg_checkpoint_filter_fn
from cednet_pl.models.revcol import REVCOL_AUX_PREFIXES, revcol_checkpoint_filter_fn

HEAD_PREFIXES = ("final_layers.", "norms.", "heads.")
# model-name prefix -> (checkpoint check, head prefixes dropped by --drop-heads)
FAMILIES = {
    "cednet_": (checkpoint_filter_fn, HEAD_PREFIXES),
    "msg_": (msg_checkpoint_filter_fn, ("norm.", "head.")),
    "revcol_": (revcol_checkpoint_filter_fn, ("cls_blocks.", "decoder_blocks.")),
}


def convert(
    src: str,
    dst: str,
    model_name: str,
    drop_heads: bool = False,
    inference_only: bool = False,
    allow_pickle: bool = False,
    ema: bool = False,
) -> dict[str, torch.Tensor]:
    """Read ``src``, verify it against ``model_name``, write the bare state_dict to ``dst`` and return it.

    Args:
        src: Input checkpoint (released ``.pth``, Lightning ``.ckpt`` of ours or bare state_dict).
        dst: Output path (parent folders are created).
        model_name: CEDNet variant, MSG-Transformer or RevCol registered with timm, e.g. ``cednet_next_tiny``,
            ``msg_tiny``, ``revcol_tiny``.
        drop_heads: Drop all stage heads (``final_layers``/``norms``/``heads``): backbone-only weights.
        inference_only: Keep only the last stage's head (the training-only heads are dropped).
        allow_pickle: Read ``src`` with ``torch.load(weights_only=False)`` (trusted files only).
        ema: From a Lightning ``.ckpt``, take the EMA weights (``ema.module.*``) instead of the raw ones.

    Raises:
        ValueError: unknown ``model_name`` or conflicting options.
        RuntimeError: unreadable ``src`` or keys/shapes that do not match the variant.
    """
    if drop_heads and inference_only:
        raise ValueError("--drop-heads and --inference-only exclude each other")
    known = [m for prefix in FAMILIES for m in timm.list_models(prefix + "*")]
    if model_name not in known:
        raise ValueError(
            f"--model {model_name!r} is not a CEDNet variant, MSG-Transformer or RevCol; expected one of {known}"
        )
    filter_fn, head_prefixes = next(v for prefix, v in FAMILIES.items() if model_name.startswith(prefix))
    state_dict = load_checkpoint_file(src, weights_only=not allow_pickle, ema=ema)
    kwargs: dict[str, object] = {}
    if model_name.startswith("revcol_"):  # verify the training-only heads too when the checkpoint has them
        kwargs["aux_heads"] = any(k.startswith(REVCOL_AUX_PREFIXES) for k in state_dict)
    with torch.device("meta"):
        probe = timm.create_model(model_name)
    classifier = probe.pretrained_cfg["classifier"] + ".weight"
    if classifier in state_dict:
        kwargs["num_classes"] = state_dict[classifier].shape[0]
    if any(k.startswith(aux_head_prefixes(probe)) for k in state_dict):
        # keep the training-only heads the checkpoint carries (dropped below with --inference-only)
        kwargs["aux_heads"] = True
    with torch.device("meta"):
        model = timm.create_model(model_name, **kwargs)
    state_dict = filter_fn(state_dict, model)

    if drop_heads:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head_prefixes)}
    elif inference_only:
        aux = aux_head_prefixes(model)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(aux)}

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(state_dict, dst)
    return state_dict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="released .pth, Lightning .ckpt of ours, or a bare state_dict")
    parser.add_argument("dst", help="output .pth (bare state_dict)")
    parser.add_argument(
        "--model", required=True, help="CEDNet variant, MSG-Transformer or RevCol, e.g. cednet_next_tiny"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--drop-heads", action="store_true", help="drop every stage head (backbone only)")
    group.add_argument("--inference-only", action="store_true", help="keep only the last stage's head")
    parser.add_argument(
        "--ema", action="store_true", help="take the EMA weights of a Lightning .ckpt (ema.module.*)"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="torch.load with weights_only=False (trusted files only)"
    )
    args = parser.parse_args(argv)
    try:
        sd = convert(
            args.src, args.dst, args.model, args.drop_heads, args.inference_only, args.allow_pickle, args.ema
        )
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    print(f"wrote {args.dst}: {len(sd)} tensors, {n:,} values, verified against {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
