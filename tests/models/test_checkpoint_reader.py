"""The one checkpoint reader: layouts it unwraps, and weights-only loading that runs no code from a file."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

from cednet_pl.models.checkpoint import (
    CheckpointReadError,
    load_checkpoint_file,
    read_checkpoint,
    unwrap_state_dict,
)
from cednet_pl.models.detection import load_classification_state_dict


class _Payload:
    """Unpickling this object writes `marker` (what a crafted checkpoint could do with any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A released-looking checkpoint whose unpickling would run code; returns (file, marker)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_every_reader_refuses_code_in_a_file(crafted: tuple[Path, Path]) -> None:
    path, marker = crafted
    readers = {
        "read_checkpoint": lambda: read_checkpoint(path),
        "load_checkpoint_file": lambda: load_checkpoint_file(path),
        "detection backbone": lambda: load_classification_state_dict(path),
        "timm pretrained file": lambda: timm.create_model(
            "cednet_next_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
        ),
    }
    for name, read in readers.items():
        with pytest.raises(CheckpointReadError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg and "weights_only=False" in msg and "--allow-pickle" in msg, name
        assert not marker.exists(), f"{name} ran code from the file"


def test_trusting_a_file_is_explicit(crafted: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = crafted
    sd = load_checkpoint_file(path, weights_only=False)
    assert marker.read_text() == "ran"
    assert set(sd) == {"w"}


def test_eval_refuses_code_in_a_checkpoint(crafted: tuple[Path, Path], make_cfg) -> None:
    from cednet_pl.eval import evaluate

    path, marker = crafted
    with pytest.raises(CheckpointReadError, match="allow_pickle=true"):
        evaluate(make_cfg("eval", [f"ckpt={path}"]))
    assert not marker.exists()


def test_converter_refuses_code_without_allow_pickle(
    crafted: tuple[Path, Path], tmp_path: Path, converter: ModuleType
) -> None:
    path, marker = crafted
    out = tmp_path / "out.pth"
    assert converter.main([str(path), str(out), "--model", "cednet_next_nano"]) == 1
    assert not marker.exists()


def test_lightning_raw_and_ema_weights(tmp_path: Path) -> None:
    raw, ema = {"a": torch.zeros(2)}, {"a": torch.ones(2)}
    state = {"net.a": raw["a"], "ema.module.a": ema["a"], "criterion.weight": torch.ones(1)}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 3, "pytorch-lightning_version": "2.6"}, path)
    assert torch.equal(load_checkpoint_file(path)["a"], raw["a"])
    assert torch.equal(load_checkpoint_file(path, ema=True)["a"], ema["a"])
    assert set(load_checkpoint_file(path)) == {"a"}
    with pytest.raises(RuntimeError, match="no EMA weights"):
        unwrap_state_dict({"state_dict": {"net.a": raw["a"]}}, ema=True)
    # DDP prefix, {"model": sd} and a bare state_dict
    assert set(unwrap_state_dict({"model": {"module.a": raw["a"]}})) == {"a"}
    assert set(unwrap_state_dict({"a": raw["a"]})) == {"a"}


def test_non_dict_and_non_tensor_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointReadError, match=r"list\.pth holds a list"):
        read_checkpoint(path)
    with pytest.raises(RuntimeError, match="no model state_dict"):
        unwrap_state_dict({"epoch": 3}, source="x.pth")
