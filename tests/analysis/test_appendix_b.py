"""scripts/appendix_b.py: the table/figures from real cednet-compare outputs, the training overrides, and (slow)
the whole command on a tiny setting."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from cednet_pl.analysis.compare import main as compare_main
from cednet_pl.analysis.quality import read_quality
from testlib import compose_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "appendix_b.py"


@pytest.fixture(scope="module")
def appendix_b():
    spec = importlib.util.spec_from_file_location("appendix_b", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["appendix_b"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


def _ap(run: Path) -> float:
    return json.loads((run / "coco_metrics_val.json").read_text())["metrics"]["val/map"]


def test_table_and_figures_from_real_compare_outputs(appendix_b, two_runs, tmp_path):
    _, (run_a, run_b) = two_runs
    out = tmp_path / "ab"
    rows = []
    for seed, (a, b) in enumerate([(run_a, run_b), (run_b, run_a)]):
        cmp_dir = out / f"seed{seed}" / "compare"
        args = appendix_b.build_parser().parse_args(["--k", "6", "--panels", "1", "--num-thresholds", "11"])
        assert compare_main(appendix_b.compare_args(a, b, cmp_dir, args)) == 0
        rows.append(appendix_b.seed_row(seed, a, b, cmp_dir))

    summary = json.loads((out / "seed0" / "compare" / "summary.json").read_text())
    qa = read_quality(run_a / "analysis" / "quality_val.json")
    r0, r1 = rows
    assert r0["a"]["name"] == "CEDNet-nano" and r0["b"]["name"] == "ConvNeXt-atto/2+FPN"
    assert r0["a"]["ap"] == _ap(run_a) and r0["b"]["ap"] == _ap(run_b)
    assert r0["a"]["quality_all"] == pytest.approx(qa.mean_score())
    assert r0["a"]["quality_selected"] == summary["a"]["mean_selected_score"]
    assert r0["a"]["region_area"] == summary["a"]["region_area"] != r0["b"]["region_area"]
    # seed 1 swaps the two runs; K = all 6 images, so the same detectors give the same areas, in the other columns
    assert r1["a"]["region_area"] == pytest.approx(r0["b"]["region_area"])
    assert r0["a_regions_smaller"] != r1["a_regions_smaller"]

    table = appendix_b.write_report(out, rows, {"command": "test", "overrides": []})
    text = table.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 2 + 1  # header, two seeds, mean
    seed0 = lines[1].split(" | ")
    assert seed0[2] == f"{r0['a']['ap']:.3f}" and seed0[8] == f"{r0['a']['region_area']:.4f}"
    assert seed0[-1].rstrip(" |") == ("yes" if r0["a_regions_smaller"] else "**no**")
    assert lines[-1].rstrip(" |").endswith("1 of 2")
    assert "holds in 1 of 2 seeds; it does NOT hold in 1." in text
    assert (out / "area_curves_all_seeds.png").stat().st_size > 1000
    for ref in ("area_curves_all_seeds.png", "seed0/compare/area_curves.png", "seed1/compare/panels/"):
        assert f"({ref}" in text
    saved = json.loads((out / appendix_b.JSON_NAME).read_text())
    assert [s["seed"] for s in saved["seeds"]] == [0, 1]

    (out / "seed0" / "compare" / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"summary\.json is missing"):
        appendix_b.seed_row(0, run_a, run_b, out / "seed0" / "compare")
    with pytest.raises(ValueError, match="at least one seed"):
        appendix_b.markdown_table([])


def test_training_overrides_compose(appendix_b, tmp_path):
    """The shrinking options are valid overrides of both experiments and reach the config."""
    args = appendix_b.build_parser().parse_args(
        ["--epochs", "2", "--num-train", "8", "--num-val", "6", "--canvas", "64", "--trainer", "cpu"]
    )
    overrides = appendix_b.shrink_overrides(args)
    for det in appendix_b.DETECTORS:
        cmd = appendix_b.train_command(det, 1, tmp_path / det.key, overrides)
        hydra_args = [a for a in cmd[3:] if not a.startswith("hydra.")]
        cfg = compose_config("train", hydra_args, tmp_path)
        assert cfg.seed == 1 and cfg.trainer.max_epochs == 2 and cfg.trainer.check_val_every_n_epoch == 2
        assert cfg.data.num_train == 8 and cfg.data.image_size == cfg.data.test_max_size == 64
        assert cfg.trainer.devices == 1 and cfg.callbacks.gradient_regions is None
        assert cfg.callbacks.detection_quality is not None
    # no option: the recipe over DEFAULT_EPOCHS (both detectors alike); --epochs 0: exactly det_demo's recipe
    default = appendix_b.shrink_overrides(appendix_b.build_parser().parse_args([]))
    epochs = appendix_b.DEFAULT_EPOCHS
    assert default == [f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={epochs}"]
    assert appendix_b.shrink_overrides(appendix_b.build_parser().parse_args(["--epochs", "0"])) == []


def test_reuse_refuses_a_run_with_other_overrides(appendix_b, tmp_path):
    """A finished run is reused only if it was trained with the same overrides (else the table would mix)."""
    run = tmp_path / "seed0" / "cednet"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    det = appendix_b.DETECTORS[0]
    made = appendix_b.train_command(det, 0, run, ["trainer.max_epochs=9"])
    (run / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {a}\n" for a in made[3:] if not a.startswith("hydra."))
    )
    assert appendix_b.train(det, 0, run, ["trainer.max_epochs=9"]) == 0.0
    with pytest.raises(SystemExit, match=r"trainer\.max_epochs=14"):
        appendix_b.train(det, 0, run, ["trainer.max_epochs=14"])


@pytest.mark.slow
def test_appendix_b_end_to_end_tiny(appendix_b, tmp_path):
    """The one command on a tiny setting (~30 s on 2 busy cores): two trainings, compare, table; then reuse."""
    argv = ["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--seeds", "1"]
    argv += ["--epochs", "1", "--num-train", "8", "--num-val", "8", "--canvas", "64", "--trainer", "cpu"]
    argv += ["--k", "4", "--panels", "1", "--num-thresholds", "11"]
    table = appendix_b.main(argv)
    saved = json.loads((tmp_path / "out" / appendix_b.JSON_NAME).read_text())
    (row,) = saved["seeds"]
    for side, key in (("a", "cednet"), ("b", "convnext")):
        run = tmp_path / "out" / "seed0" / key
        assert row[side]["ap"] == _ap(run) and (run / "checkpoints" / "last.ckpt").is_file()
    assert row["num_images"] == 4 and "| 0 | 4 |" in table.read_text()
    assert saved["settings"]["timings_s"][0]["cednet"] > 0
    # a second call reuses the finished trainings
    shutil.rmtree(tmp_path / "out" / "seed0" / "compare")
    appendix_b.main(argv)
    again = json.loads((tmp_path / "out" / appendix_b.JSON_NAME).read_text())
    assert again["settings"]["timings_s"][0]["cednet"] == 0.0
    assert again["seeds"][0]["a"]["region_area"] == pytest.approx(row["a"]["region_area"])
