"""cednet-compare end to end on two tiny detectors, and its bad-input messages."""

import json
from dataclasses import replace

import pytest
import torch

from cednet_pl.analysis.compare import load_detector, main
from cednet_pl.analysis.quality import read_quality, write_quality
from cednet_pl.analysis.regions import read_curve


def test_compare_end_to_end(two_runs, capsys):
    base, (run_a, run_b) = two_runs
    out = base / "out"
    extra = f"third={run_a / 'checkpoints' / 'last.ckpt'}"
    args = [str(run_a), str(run_b), "--k", "3", "--panels", "2", "--out", str(out), "--num-thresholds", "21"]
    code = main([*args, "--model", extra])
    assert code == 0, capsys.readouterr().err
    qa, qb = (
        read_quality(run_a / "analysis" / "quality_val.json"),
        read_quality(run_b / "analysis" / "quality_val.json"),
    )
    sel = json.loads((out / "selection.json").read_text())
    gains = {i: qa.scores()[i] - qb.scores()[i] for i in qa.scores()}
    assert sel["image_ids"] == sorted(gains, key=lambda i: (-gains[i], i))[:3]
    names = ["cednet_next_nano (A)", "cednet_next_nano (B)"]
    curves = [
        read_curve(out / "regions" / f"{n.replace(' ', '_').replace('(', '_').replace(')', '_')}.json")
        for n in names
    ]
    assert [c.name for c in curves] == names and all(c.image_ids == sel["image_ids"] for c in curves)
    assert (out / "area_curves.png").stat().st_size > 1000
    assert len(list((out / "panels").glob("*.png"))) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and [m["name"] for m in summary["models"]] == [*names, "third"]
    # per side: mean image score on all and on the selected images, region area; the paper's direction
    sa, sb = qa.scores(), qb.scores()
    assert summary["a"]["mean_image_score"] == pytest.approx(sum(sa.values()) / len(sa))
    assert summary["a"]["mean_selected_score"] == pytest.approx(sum(sa[i] for i in sel["image_ids"]) / 3)
    assert summary["b"]["mean_selected_score"] == pytest.approx(sum(sb[i] for i in sel["image_ids"]) / 3)
    assert [summary["a"]["region_area"], summary["b"]["region_area"]] == pytest.approx(
        [c.auc for c in curves]
    )
    assert summary["a_regions_smaller"] == (curves[0].auc < curves[1].auc)
    assert [read_curve(m["curve"]).name for m in summary["models"]] == [*names, "third"]
    # the third model is A's checkpoint again: the same curve
    assert read_curve(out / "regions" / "third.json").area_fraction == pytest.approx(curves[0].area_fraction)


def test_compare_bad_inputs(two_runs, tmp_path, capsys):
    _, (run_a, run_b) = two_runs
    out = str(tmp_path / "out")

    assert main([str(run_a), str(run_b), "--k", "99", "--out", out]) == 2
    assert "top 99 images" in capsys.readouterr().err
    assert main([str(run_a), str(run_b), "--k", "99", "--clamp", "--out", out, "--select-only"]) == 0
    assert len(json.loads((tmp_path / "out" / "selection.json").read_text())["image_ids"]) == 6

    other = read_quality(run_b / "analysis" / "quality_val.json")
    shifted = replace(other, images=[replace(im, image_id=im.image_id + 10**6) for im in other.images])
    other_file = write_quality(shifted, tmp_path / "other_quality.json")
    assert (
        main([str(run_a), str(other_file), "--out", out, "--ckpt-b", str(run_b / "checkpoints/last.ckpt")])
        == 2
    )
    err = capsys.readouterr().err
    assert "no image in common" in err and "quality_val.json" in err and "other_quality.json" in err

    ids = tmp_path / "ids.txt"
    ids.write_text("123456789\n")
    assert main([str(run_a), str(run_b), "--images", str(ids), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "ids.txt names 1 image id(s)" in err and "[123456789]" in err

    not_det = tmp_path / "classifier.ckpt"
    torch.save(
        {
            "state_dict": {"net.head.fc.weight": torch.zeros(1)},
            "global_step": 0,
            "pytorch-lightning_version": "2.6.0",
            "cednet_config": {"model": {"_target_": "cednet_pl.lit.classification.ClassificationModule"}},
        },
        not_det,
    )
    assert main([str(run_a), str(run_b), "--k", "2", "--out", out, "--ckpt-b", str(not_det)]) == 2
    assert "is not a detector checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="plain state_dict"):
        load_detector(_plain_state_dict(tmp_path))


def _plain_state_dict(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"stem.0.weight": torch.zeros(1)}, path)
    return path


def test_compare_accepts_coco_results_files(two_runs, tmp_path, capsys):
    _, (run_a, run_b) = two_runs
    qa = read_quality(run_a / "analysis" / "quality_val.json")
    res_a, res_b = run_a / "coco_results_val.json", run_b / "coco_results_val.json"
    assert main([str(res_a), str(res_b), "--k", "2", "--select-only", "--out", str(tmp_path)]) == 2
    assert "pass --ann-file" in capsys.readouterr().err
    args = [str(res_a), str(res_b), "--k", "6", "--select-only", "--out", str(tmp_path)]
    assert main([*args, "--ann-file", qa.dataset.ann_file]) == 0
    from_results = json.loads((tmp_path / "selection.json").read_text())["image_ids"]
    assert main([str(run_a), str(run_b), "--k", "6", "--select-only", "--out", str(tmp_path / "q")]) == 0
    assert from_results == json.loads((tmp_path / "q" / "selection.json").read_text())["image_ids"]
