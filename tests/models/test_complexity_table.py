"""scripts/model_table.py: Markdown structure and numbers agree with count_params / count_macs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm

from cednet_pl.models.complexity import count_macs, count_params

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "model_table.py"
MODELS = ("cednet_next_nano", "test_convnext")
IMG = 64


@pytest.fixture(scope="module")
def model_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_table", SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def markdown(model_table: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("table") / "sub" / "table.md"
    text = model_table.main(
        ["--models", *MODELS, "--img-size", str(IMG), "--markdown-out", str(out), "--quiet"]
    )
    return text, out


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_markdown_structure(markdown: tuple[str, Path]) -> None:
    text, out = markdown
    rows = _table_rows(text)
    assert rows[0] == ["model", "params (M)", f"GFLOPs @{IMG}", "paper params (M)", "paper GFLOPs"]
    assert all(re.fullmatch(r"-+:?", cell) for cell in rows[1])
    assert [r[0] for r in rows[2:]] == list(MODELS)
    assert all(len(r) == 5 for r in rows)
    assert "multiply-accumulates" in text and "fvcore" in text  # the convention is stated
    assert out.read_text() == text


def test_numbers_agree_with_complexity_helpers(markdown: tuple[str, Path]) -> None:
    rows = {r[0]: r for r in _table_rows(markdown[0])[2:]}
    for name in MODELS:
        model = timm.create_model(name, pretrained=False, num_classes=1000)
        params = count_params(model, inference_only=True)
        macs = count_macs(model, (1, 3, IMG, IMG))
        assert rows[name][1] == f"{params / 1e6:.1f}"
        assert rows[name][2] == f"{macs / 1e9:.2f}"
        assert rows[name][3] == rows[name][4] == ""  # no paper numbers for these


def test_measure_counts_inference_path_only(model_table: ModuleType) -> None:
    row = model_table.measure("cednet_next_nano", img_size=IMG)
    model = timm.create_model("cednet_next_nano", num_classes=1000)
    whole = timm.create_model("cednet_next_nano", num_classes=1000, aux_heads=True)
    assert row.params == count_params(model) == count_params(whole, inference_only=True) < count_params(whole)
    assert row.macs == count_macs(model, (1, 3, IMG, IMG)) > 0


def test_paper_columns_and_unknown_model(model_table: ModuleType) -> None:
    text = model_table.format_markdown(
        [model_table.Row("cednet_next_tiny", 33_826_152, 5_690_526_208, 34.0, 5.7)]
    )
    assert _table_rows(text)[2] == ["cednet_next_tiny", "33.8", "5.69", "34", "5.7"]
    assert model_table.TABLE_A1["convnext_tiny"] == (29.0, 4.5)
    assert model_table.TABLE_A1["revcol_base"] == (138.0, 16.6)
    assert {"revcol_tiny", "revcol_small", "revcol_base"} <= set(model_table.DEFAULT_MODELS)
    assert set(model_table.TABLE_A1) <= set(model_table.DEFAULT_MODELS)
    assert all(timm.is_model(name) for name in model_table.DEFAULT_MODELS)
    with pytest.raises(ValueError, match="unknown model 'not_a_model'"):
        model_table.measure("not_a_model")


def test_msg_rows_equal_the_official_counts(model_table: ModuleType) -> None:
    row = model_table.measure("msg_tiny")
    assert (row.params, row.macs) == (25_086_116, 3_820_863_488)  # reference/baselines_complexity.tsv
    assert (row.paper_params_m, row.paper_gflops) == (25.0, 3.8)
    assert {"msg_small", "msg_base"} <= set(model_table.DEFAULT_MODELS)
