"""``cednet-compare``: the paper's model-vs-model analysis end to end (CEDNet, arXiv 2302.06052, appendix B).

Given two runs of detectors on the same dataset (model A, expected better, and model B), each with its per-image
quality file (written by the DetectionQuality callback, ``callbacks=analysis``) and a checkpoint:

1. select the top-K images where A's image score exceeds B's the most (:mod:`cednet_pl.analysis.selection`) and
   write them to ``OUT/selection.json`` (or take the images of ``--images FILE``);
2. for A, B and any further ``--model NAME=CKPT``, run the input-gradient pass on those images
   (:func:`cednet_pl.analysis.detector.gradient_pass`) and write ``OUT/regions/<name>.json``;
3. draw all area-vs-threshold curves in ``OUT/area_curves.png`` (Figure A2) and side-by-side panels of the first
   ``--panels`` images in ``OUT/panels/`` (Figure A1: B left, A right);
4. write ``OUT/summary.json`` (files, checkpoints, timings; per side the mean image score on all images and on the
   selected ones and the area under its region curve; whether A's regions are smaller, the paper's direction).

A and B are run directories (``<run>/analysis/quality_val.json`` + ``<run>/checkpoints/last.ckpt``, or the
``ckpt`` of an evaluation run's ``metrics.json``), quality files (checkpoint from ``--ckpt-a``/``--ckpt-b`` or
the ``run_dir`` the file records) or COCO results JSONs (scored on every image of ``--ann-file``; checkpoints
from ``--ckpt-a``/``--ckpt-b``). Example::

    cednet-compare logs/det_demo/runs/<cednet> logs/det_demo_convnext/runs/<convnext> --k 50 --out compare/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cednet_pl.analysis.detector import gradient_pass, image_index
from cednet_pl.analysis.plots import plot_area_curves, save_comparison_panel
from cednet_pl.analysis.quality import QualityReport, finite_or_none, quality_from_coco, read_quality
from cednet_pl.analysis.regions import (
    CHANNEL_REDUCTIONS,
    NORMALIZATIONS,
    RegionCurve,
    default_thresholds,
    write_curve,
)
from cednet_pl.analysis.selection import (
    Selected,
    check_image_ids,
    read_image_ids,
    select_top_k,
    write_selection,
)

__all__ = [
    "SUMMARY_FORMAT",
    "RunInput",
    "build_parser",
    "load_detector",
    "main",
    "resolve_run",
    "run_compare",
]

QUALITY_NAME = "quality_val.json"
#: ``format`` of ``summary.json`` (read by scripts/appendix_b.py)
SUMMARY_FORMAT = "cednet-compare-summary/1"


@dataclass
class RunInput:
    """One side of the comparison.

    Args:
        quality: its per-image quality report.
        ckpt: its detector checkpoint (``None``: unknown).
        name: legend name.
    """

    quality: QualityReport
    ckpt: Path | None
    name: str


def _ckpt_of_run(run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        ckpt = json.loads(metrics.read_text()).get("ckpt")
        if ckpt and Path(ckpt).is_file():
            return Path(ckpt)
    return None


def resolve_run(
    path: str | Path,
    ckpt: str | Path | None,
    role: str,
    ann_file: str | None = None,
    image_root: str | None = None,
) -> RunInput:
    """Quality report + checkpoint of a run dir, a quality file or a COCO results file (with ``ann_file``).

    ``role`` (``A`` or ``B``) names the side in error messages.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        qfile = path / "analysis" / QUALITY_NAME
        if not qfile.is_file():
            raise FileNotFoundError(
                f"model {role}: run dir {path} has no analysis/{QUALITY_NAME}; train or evaluate it with "
                "callbacks=analysis (DetectionQuality) first, or pass the quality file itself"
            )
        quality = read_quality(qfile)
        found = _ckpt_of_run(path)
    elif path.is_file() and path.read_text()[:64].lstrip().startswith("["):
        if not ann_file:
            raise ValueError(
                f"model {role}: {path} is a COCO results file; pass --ann-file (and --image-root)"
            )
        quality = quality_from_coco(ann_file, path, image_root=image_root)
        found = None
    elif path.is_file():
        quality = read_quality(path)
        run_dir = quality.meta.get("run_dir")
        found = _ckpt_of_run(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else None
    else:
        raise FileNotFoundError(f"model {role}: {path} is neither a run dir nor a quality file")
    chosen = Path(ckpt).expanduser() if ckpt else found
    name = str(quality.meta.get("model_name") or path.name)
    return RunInput(quality=quality, ckpt=chosen, name=name)


def load_detector(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The DetectionModule of a ``cednet-train`` checkpoint, in eval mode, or a clear error if it is not one."""
    import hydra

    from cednet_pl.lit.detection import DETECTION_TASKS, DetectionModule
    from cednet_pl.models.checkpoint import CONFIG_KEY, is_lightning_checkpoint, read_checkpoint
    from cednet_pl.models.detection import detector_kind_of

    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    if not is_lightning_checkpoint(ckpt):
        raise ValueError(
            f"{path} is not a detector checkpoint: it is a plain state_dict; cednet-compare needs the Lightning "
            "checkpoint of a detection run (cednet-train with a retinanet model)"
        )
    target = str(((ckpt.get(CONFIG_KEY) or {}).get("model") or {}).get("_target_", ""))
    cls: Any = DetectionModule
    if target:
        try:
            cls = hydra.utils.get_class(target)
        except (ImportError, ValueError) as err:
            raise ValueError(f"{path}: cannot import its model class {target} ({err})") from err
    task = getattr(cls, "task", None)
    has_head = detector_kind_of(ckpt.get("state_dict", {})) is not None
    if task not in DETECTION_TASKS or not has_head:
        raise ValueError(
            f"{path} is not a detector checkpoint: it holds a {task or 'non-detection'} model "
            f"({target or 'no cednet_config'}); cednet-compare needs checkpoints of detection runs (DetectionModule)"
        )
    del ckpt
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", strict=True, weights_only=True)
    except TypeError as err:
        raise ValueError(f"{path}: its hyper_parameters do not rebuild {cls.__name__} ({err})") from err
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {cls.__name__}: {err}") from err
    return module.to(device).eval()


def _finite_mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values (images without a score stay out), ``None`` when there are none."""
    kept = [v for v in values if math.isfinite(v)]
    return finite_or_none(math.fsum(kept) / len(kept)) if kept else None


def _unique_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        name, k = n, 2
        while name in out:
            name, k = f"{n} ({k})", k + 1
        out.append(name)
    return out


def _dataset(quality: QualityReport, ann_file: str | None, image_root: str | None) -> Any:
    from cednet_pl.data.coco import COCODetection

    ann = ann_file or quality.dataset.ann_file
    root = image_root or quality.dataset.image_root
    if not root:
        raise ValueError(f"{quality.name} records no image directory; pass --image-root")
    return COCODetection(root, ann)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison described in the module docstring; returns the summary."""
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    a = resolve_run(args.a, args.ckpt_a, "A", args.ann_file, args.image_root)
    b = resolve_run(args.b, args.ckpt_b, "B", args.ann_file, args.image_root)
    name_a, name_b = args.name_a or a.name, args.name_b or b.name
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"

    if args.images:
        common = set(a.quality.scores()) & set(b.quality.scores())
        ids = check_image_ids(
            read_image_ids(args.images),
            common,
            f"image list {args.images}",
            f"{a.quality.name} and {b.quality.name}",
        )
        files = {im.image_id: im.file_name for im in a.quality.images}
        sa, sb = a.quality.scores(), b.quality.scores()
        selected = [Selected(i, files[i], sa[i], sb[i]) for i in ids]
    else:
        selected = select_top_k(a.quality, b.quality, args.k, clamp=args.clamp)
        ids = [s.image_id for s in selected]
    selection_path = write_selection(
        selected, out / "selection.json", a.quality, b.quality, k=len(ids), name_a=name_a, name_b=name_b
    )
    print(f"selected {len(ids)} images -> {selection_path}")
    if args.select_only:
        return {"selection": str(selection_path)}

    models: list[tuple[str, Path | None]] = [(name_a, a.ckpt), (name_b, b.ckpt)]
    for spec in args.model or []:
        if "=" not in spec:
            raise ValueError(f"--model expects NAME=CHECKPOINT, got {spec!r}")
        name, ckpt = spec.split("=", 1)
        models.append((name, Path(ckpt).expanduser()))
    for (name, ckpt), role in zip(models, ["A", "B"] + ["--model"] * (len(models) - 2), strict=True):
        if ckpt is None:
            raise ValueError(
                f"model {role} ({name}): no checkpoint found next to its quality file; pass --ckpt-{role.lower()}"
            )
    names = _unique_names([m[0] for m in models])

    dataset = _dataset(a.quality, args.ann_file, args.image_root)
    check_image_ids(ids, dataset.image_ids, "the selection", str(dataset.ann_file))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    panel_ids = ids[: max(0, args.panels)]
    thresholds = default_thresholds(args.num_thresholds)
    curves: list[RegionCurve] = []
    maps: dict[str, dict[int, torch.Tensor]] = {}
    summary_models = []
    for name, (_, ckpt) in zip(names, models, strict=True):
        module = load_detector(ckpt, device)
        ckpt_ids = getattr(module, "category_ids", None)
        if ckpt_ids is not None and list(ckpt_ids) != list(dataset.label_to_category_id):
            raise ValueError(
                f"{ckpt} was trained on categories {list(ckpt_ids)[:10]} but {dataset.ann_file} has "
                f"{dataset.label_to_category_id[:10]}: not the same dataset"
            )
        result = gradient_pass(
            module.net,
            dataset,
            ids,
            batch_size=args.batch_size,
            channel_reduce=args.channel_reduce,
            normalize=args.normalize,
            thresholds=thresholds,
            keep_maps=panel_ids,
            device=device,
        )
        curve = RegionCurve(
            name=name,
            thresholds=result.thresholds.tolist(),
            area_fraction=result.fractions.mean(dim=0).tolist(),
            area_fraction_std=result.fractions.std(dim=0, correction=0).tolist(),
            image_ids=ids,
            normalize=args.normalize,
            channel_reduce=args.channel_reduce,
            meta={"ckpt": str(ckpt), "seconds": result.seconds, "device": str(device)},
        )
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        curve_path = write_curve(curve, out / "regions" / f"{slug}.json")
        curves.append(curve)
        maps[name] = result.maps
        rate = len(ids) / max(result.seconds, 1e-9)
        print(
            f"{name}: region area {curve.auc:.4f} on {len(ids)} images ({result.seconds:.1f} s, {rate:.2f} img/s)"
        )
        summary_models.append(
            {
                "name": name,
                "ckpt": str(ckpt),
                "region_area": curve.auc,
                "curve": str(curve_path),
                "seconds": result.seconds,
            }
        )
        del module

    curves_path = plot_area_curves(
        curves,
        out / "area_curves.png",
        title=f"important regions on the top-{len(ids)} images ({name_a} > {name_b})",
    )
    qa, qb = a.quality.by_id(), b.quality.by_id()
    index = image_index(dataset)
    panel_paths = []
    for rank, iid in enumerate(panel_ids, 1):
        image, _ = dataset[index[iid]]
        panel_paths.append(
            str(
                save_comparison_panel(
                    out / "panels" / f"{rank:03d}_{iid}.png",
                    image,
                    (names[1], qb[iid], maps[names[1]][iid]),
                    (names[0], qa[iid], maps[names[0]][iid]),
                )
            )
        )
    gains = [s.gain for s in selected if not math.isnan(s.gain)]
    area_a, area_b = summary_models[0]["region_area"], summary_models[1]["region_area"]
    summary = {
        "format": SUMMARY_FORMAT,
        "a": {
            "name": names[0],
            "quality_file": a.quality.name,
            "mean_image_score": finite_or_none(a.quality.mean_score()),
            "mean_selected_score": _finite_mean([s.score_a for s in selected]),
            "region_area": area_a,
        },
        "b": {
            "name": names[1],
            "quality_file": b.quality.name,
            "mean_image_score": finite_or_none(b.quality.mean_score()),
            "mean_selected_score": _finite_mean([s.score_b for s in selected]),
            "region_area": area_b,
        },
        # the paper's direction (appendix B): the better detector's important regions are smaller
        "a_regions_smaller": bool(area_a < area_b),
        "selection": str(selection_path),
        "num_images": len(ids),
        "mean_gain": finite_or_none(math.fsum(gains) / len(gains)) if gains else None,
        "models": summary_models,
        "area_curves": str(curves_path),
        "panels": panel_paths,
        "normalize": args.normalize,
        "channel_reduce": args.channel_reduce,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"Figure A2 -> {curves_path}; {len(panel_paths)} Figure A1 panels -> {out / 'panels'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cednet-compare",
        description="Top-K images where detector A beats B, their input-gradient important regions (Figure A2) "
        "and side-by-side panels (Figure A1).",
    )
    p.add_argument(
        "a", help="model A (expected better): run dir, per-image quality file or COCO results JSON"
    )
    p.add_argument("b", help="model B: run dir, per-image quality file or COCO results JSON")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ckpt-a", help="checkpoint of A (default: <run>/checkpoints/last.ckpt)")
    p.add_argument("--ckpt-b", help="checkpoint of B")
    p.add_argument("--name-a", help="legend name of A (default: its backbone)")
    p.add_argument("--name-b", help="legend name of B")
    p.add_argument(
        "--model", action="append", metavar="NAME=CKPT", help="a further detector for the curves (repeatable)"
    )
    p.add_argument(
        "--k", type=int, default=1000, help="number of images (default 1000, as the paper on COCO)"
    )
    p.add_argument(
        "--clamp", action="store_true", help="keep all common images when fewer than K (else an error)"
    )
    p.add_argument("--images", help="analyse the images of this list file instead of selecting the top-K")
    p.add_argument("--select-only", action="store_true", help="only write the selection")
    p.add_argument(
        "--panels", type=int, default=8, help="side-by-side panels of the first N images (default 8)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward/backward pass")
    p.add_argument("--channel-reduce", choices=CHANNEL_REDUCTIONS, default="max")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="image")
    p.add_argument("--num-thresholds", type=int, default=101)
    p.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    p.add_argument("--ann-file", help="annotation file (default: the one the quality file of A records)")
    p.add_argument("--image-root", help="image directory (default: the one the quality file of A records)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; bad input ends with a one-line message and exit status 2."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            run_compare(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"cednet-compare: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
