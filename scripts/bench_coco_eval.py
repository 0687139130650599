"""Time COCO box evaluation with pycocotools and faster-coco-eval, and check that they agree.

Two ground truths: the embedded synthetic val set (``det_demo``'s, 200 images, generated if needed) and a
larger annotation-only set (default 2000 images, ~7 objects each, small/medium/large sizes, 10 categories).
Detections are the ground truth perturbed (jittered boxes, wrong classes, misses) plus random false positives,
up to ``--dets`` per image. Each backend evaluates the same results JSON (load + evaluate + accumulate +
summarize, the full ``evaluate_coco`` call); the best of ``--repeat`` wall times is reported, with the
largest absolute difference over the 12 numbers.

    python scripts/bench_coco_eval.py [--images 2000] [--dets 100] [--repeat 3] [--out bench_coco_eval.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from cednet_pl.data.synthetic_det import generate_synthetic_det
from cednet_pl.evaluation import COCO_STAT_NAMES, evaluate_coco, write_results_json


def annotation_only_set(path: Path, num_images: int, seed: int = 0) -> Path:
    """A COCO instances file without pixels: random boxes of all COCO size buckets on 640x480 images."""
    rng = random.Random(seed)
    images, annotations = [], []
    for i in range(num_images):
        images.append({"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "height": 480, "width": 640})
        for _ in range(rng.randint(1, 14)):
            side = rng.choice([rng.uniform(4, 32), rng.uniform(32, 96), rng.uniform(96, 400)])
            w, h = side * rng.uniform(0.5, 1.5), side * rng.uniform(0.5, 1.5)
            x, y = rng.uniform(0, 640 - min(w, 639)), rng.uniform(0, 480 - min(h, 479))
            w, h = min(w, 640 - x), min(h, 480 - y)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 2 * rng.randrange(10) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
    categories = [{"id": 2 * d + 1, "name": str(d)} for d in range(10)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def perturbed_results(ann_file: Path, max_dets: int, seed: int = 0) -> list[dict]:
    """Detections derived from the ground truth, plus false positives, at most ``max_dets`` per image."""
    rng = random.Random(seed)
    data = json.loads(ann_file.read_text())
    cats = [c["id"] for c in data["categories"]]
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    per_image: dict[int, list] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    results = []
    for image_id, anns in per_image.items():
        dets = []
        for ann in anns:
            if rng.random() < 0.1:
                continue
            x, y, w, h = ann["bbox"]
            for _ in range(rng.randint(1, 3)):
                j = [rng.gauss(0, 0.1) * s for s in (w, h, w, h)]
                cat = ann["category_id"] if rng.random() > 0.15 else rng.choice(cats)
                dets.append((cat, [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)], rng.random()))
        width, height = size[image_id]
        while len(dets) < max_dets and rng.random() < 0.97:
            w, h = rng.uniform(4, width / 3), rng.uniform(4, height / 3)
            dets.append(
                (
                    rng.choice(cats),
                    [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h],
                    rng.random() * 0.6,
                )
            )
        dets.sort(key=lambda d: -d[2])
        for cat, box, score in dets[:max_dets]:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [round(v, 3) for v in box],
                    "score": round(score, 5),
                }
            )
    return results


def bench(name: str, ann_file: Path, results_file: Path, repeat: int) -> dict:
    row: dict = {"set": name, "images": len(json.loads(ann_file.read_text())["images"])}
    row["detections"] = len(json.loads(results_file.read_text()))
    stats = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            stats[backend], _ = evaluate_coco(ann_file, results_file, backend=backend)
            times.append(time.perf_counter() - t0)
        row[f"{backend}_s"] = round(min(times), 3)
    diffs = [abs(stats["pycocotools"][k] - stats["faster_coco_eval"][k]) for k in COCO_STAT_NAMES]
    row["speedup"] = round(row["pycocotools_s"] / row["faster_coco_eval_s"], 2)
    row["max_abs_diff"] = max(diffs)
    row["identical"] = max(diffs) == 0.0
    row["map"] = stats["pycocotools"]["map"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=None, help="work dir (default: a temporary dir)")
    parser.add_argument("--images", type=int, default=2000, help="images of the larger annotation-only set")
    parser.add_argument("--dets", type=int, default=100, help="most detections per image")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        synthetic = generate_synthetic_det(root / "synthetic_det") / "annotations" / "instances_val.json"
        large = annotation_only_set(root / f"large_{args.images}.json", args.images)
        rows = []
        for name, ann in (("synthetic_det val", synthetic), (f"annotation-only {args.images}", large)):
            res = write_results_json(perturbed_results(ann, args.dets), root / f"{ann.stem}_results.json")
            rows.append(bench(name, ann, res, args.repeat))
            print(json.dumps(rows[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
