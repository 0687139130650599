"""Print the model-size table (the paper's Table A1 columns) as Markdown.

For every CEDNet variant and the Table A1 baselines timm provides, it builds the model with random
weights and reports the parameters of the inference path and the GFLOPs (multiply-accumulates, the
ConvNeXt/fvcore convention) at 224x224, beside the paper's numbers where the project documents them.

Examples::

    python scripts/model_table.py                          # all models (takes a few minutes on CPU)
    python scripts/model_table.py --models cednet_next_tiny convnext_tiny
    python scripts/model_table.py --markdown-out results/model_table.md
    python scripts/model_table.py --models cednet_next_tiny --seg-models cednet_t_cedhead   # one of each

The segmentation section (ADE20K heads, 150 classes, 512x512, ``--seg-models``) is printed by default when
``--models`` is not given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

import cednet_pl  # noqa: F401  (registers the CEDNet variants with timm)
from cednet_pl.models.complexity import count_macs, count_params
from cednet_pl.models.segmentation import ADE20K_MODELS as SEG_MODELS

CEDNET_MODELS = (
    "cednet_next_tiny",
    "cednet_next_small",
    "cednet_next_base",
    "cednet_next_tiny_unet",
    "cednet_next_tiny_hourglass",
    "cednet_next_tiny_fpnconv",
    "cednet_swin_tiny",
    "cednet_res50",
    "cednet_next_nano",
)
# Table A1 baselines available in timm (and MSG-Transformer, RevCol, ours). The paper names FocalNet-T/S/B without saying whether the small
# (srf) or large (lrf) receptive-field versions; timm has both, so both are listed.
BASELINE_MODELS = (
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "msg_tiny",  # MSG-Transformer: not in timm; cednet_pl.models.msg registers it
    "msg_small",
    "msg_base",
    "revcol_tiny",  # RevCol: not in timm; cednet_pl.models.revcol registers it
    "revcol_small",
    "revcol_base",
    "focalnet_tiny_srf",
    "focalnet_small_srf",
    "focalnet_base_srf",
    "focalnet_tiny_lrf",
    "focalnet_small_lrf",
    "focalnet_base_lrf",
    "hrnet_w32",
)
DEFAULT_MODELS = CEDNET_MODELS + BASELINE_MODELS

# Table A1 (params in M, "FLOPs" = GMACs) for the rows the project documents (design/cednet.md, sections 3
# and 1; design/baselines.md for MSG-Transformer and RevCol); other paper entries are left blank rather than quoted from memory.
TABLE_A1: dict[str, tuple[float, float]] = {
    "cednet_next_tiny": (34.0, 5.7),
    "cednet_next_small": (55.0, 9.8),
    "cednet_next_base": (95.0, 16.2),
    "cednet_next_tiny_unet": (34.0, 5.7),
    "cednet_next_tiny_hourglass": (34.0, 5.7),
    "convnext_tiny": (29.0, 4.5),
    "msg_tiny": (25.0, 3.8),
    "msg_small": (56.0, 8.4),
    "msg_base": (84.0, 14.2),
    "revcol_tiny": (30.0, 4.5),
    "revcol_small": (60.0, 9.0),
    "revcol_base": (138.0, 16.6),
}

FOOTNOTES = (
    "GFLOPs = 10^9 multiply-accumulates (one fused multiply-add counted as one FLOP, the fvcore/ConvNeXt "
    "convention that Table A1 uses), measured with torch.utils.flop_counter.FlopCounterMode (total / 2) on "
    "one {size}x{size} image; convs, linears/matmuls and attention are counted, norms and activations are not.",
    "Params = parameters of the inference path: for CEDNet without the training-only heads of all but the "
    "last cascade stage (deep supervision), as Table A1 counts them; buffers excluded.",
    "Paper = Table A1 of the CEDNet paper where the project documents it (design/cednet.md, design/baselines.md); "
    "blank otherwise. "
    "Table A1 prints 34M/5.7G for the UNet and Hourglass tiny variants too; the released definitions are smaller.",
    "FocalNet-T/S/B: the paper does not say srf or lrf; both timm versions are listed.",
    "RevCol-T/S/B: the inference model, without the training-only intermediate-supervision heads (cls_blocks.0-2, "
    "decoder_blocks) that the official ImageNet recipe trains and its checkpoints carry.",
)


SEG_IMG_SIZE = 512
SEG_FOOTNOTE = (
    "Segmentation: 150 classes (ADE20K), one {size}x{size} image, inference path (backbone + decode head; the "
    "auxiliary FCN head is training-only and not counted), GFLOPs = 10^9 multiply-accumulates as above."
)


@dataclass(frozen=True)
class Row:
    """One table row; ``params`` and ``macs`` are exact counts."""

    model: str
    params: int
    macs: int
    paper_params_m: float | None = None
    paper_gflops: float | None = None


def measure(name: str, img_size: int = 224) -> Row:
    """Build ``name`` (random init, 1000 classes, eval mode) and count its params and MACs.

    Raises:
        ValueError: ``name`` is not a timm model (after ``import cednet_pl``).
    """
    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: not registered with timm (CEDNet names start with 'cednet_')"
        )
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    params = count_params(model, inference_only=True)
    macs = count_macs(model, (1, 3, img_size, img_size))
    paper = TABLE_A1.get(name, (None, None))
    return Row(name, params, macs, paper[0], paper[1])


def measure_segmentation(name: str, img_size: int = SEG_IMG_SIZE) -> Row:
    """Build the segmentation model ``name`` of ``SEG_MODELS`` (no auxiliary head, eval) and count it."""
    from cednet_pl.models.segmentation import build_segmentor

    if name not in SEG_MODELS:
        raise ValueError(f"unknown segmentation model {name!r}; expected one of {sorted(SEG_MODELS)}")
    spec = SEG_MODELS[name]
    model = build_segmentor(dict(spec["backbone"]), 150, dict(spec["head"]), aux_head=None).eval()
    return Row(name, count_params(model), count_macs(model, (1, 3, img_size, img_size)))


def format_segmentation(rows: Iterable[Row], img_size: int = SEG_IMG_SIZE) -> str:
    """The segmentation section: a Markdown table and its footnote."""
    lines = [
        f"Segmentation (ADE20K heads) at {img_size}x{img_size}:",
        "",
        f"| model | params (M) | GFLOPs @{img_size} |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r.model} | {r.params / 1e6:.1f} | {r.macs / 1e9:.1f} |" for r in rows]
    lines += ["", SEG_FOOTNOTE.format(size=img_size)]
    return "\n".join(lines) + "\n"


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_markdown(rows: Iterable[Row], img_size: int = 224) -> str:
    """Render rows as a Markdown table followed by its footnotes (one line each)."""
    lines = [
        f"| model | params (M) | GFLOPs @{img_size} | paper params (M) | paper GFLOPs |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.params / 1e6:.1f} | {r.macs / 1e9:.2f} | "
            f"{_num(r.paper_params_m, '.0f')} | {_num(r.paper_gflops, '.1f')} |"
        )
    lines.append("")
    lines.extend(f"{i}. {note.format(size=img_size)}" for i, note in enumerate(FOOTNOTES, 1))
    return "\n".join(lines) + "\n"


def build_table(names: Sequence[str], img_size: int = 224, verbose: bool = False) -> list[Row]:
    """Measure every model in ``names`` (in order)."""
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(measure(name, img_size))
        if verbose:
            print(f"measured {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; returns the Markdown it printed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names (default: all)"
    )
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--seg-models",
        nargs="*",
        default=None,
        choices=sorted(SEG_MODELS),
        help="segmentation models at 512x512 (default: all when --models is not given, else none)",
    )
    p.add_argument("--markdown-out", type=Path, default=None, help="also write the table to this file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no per-model progress on stderr")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        p.error(f"unknown model(s) {unknown}: not registered with timm")
    text = format_markdown(build_table(args.models, args.img_size, verbose=not args.quiet), args.img_size)
    seg = args.seg_models
    if seg is None:
        seg = list(SEG_MODELS) if args.models == list(DEFAULT_MODELS) else []
    if seg:
        text += "\n" + format_segmentation([measure_segmentation(m) for m in seg])
    print(text, end="")
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text)
        print(f"wrote {args.markdown_out}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
