"""Fixtures of the model tests: the released reference key/size tables and small CEDNet models.

The reference tables live in ``tests/models/reference`` (copied from ``shared/reference`` so a clean
clone has them); ``CEDNET_REFERENCE_DIR`` points the tests at another copy.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

import cednet_pl  # noqa: F401  (registers the timm entry points)
from cednet_pl.models.cednet import CEDNet

CONVERT_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"


def _reference_dir() -> Path:
    """Folder of the reference tables (``$CEDNET_REFERENCE_DIR`` or the in-repo copy)."""
    return Path(os.environ.get("CEDNET_REFERENCE_DIR", Path(__file__).parent / "reference"))


def _read_reference_keys(variant: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a released checkpoint (empty shape for ``num_batches_tracked``)."""
    path = _reference_dir() / f"{variant}.keys.tsv"
    lines = path.read_text().splitlines()
    assert lines[0] == "key\tshape", f"{path}: unexpected header {lines[0]!r}"
    out = {}
    for line in lines[1:]:
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return out


def _read_complexity() -> dict[str, dict[str, int]]:
    """``{model: {params_all, params_inference, macs_224}}`` from ``model_complexity.tsv``."""
    with open(_reference_dir() / "model_complexity.tsv") as f:
        return {
            row.pop("model"): {k: int(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")
        }


def _random_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with the released keys/shapes of ``variant`` and random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _read_reference_keys(variant).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("relative_position_index"):
            sd[key] = torch.randint(0, 10, shape, generator=gen)
        else:
            sd[key] = torch.randn(shape, generator=gen)
    return sd


@pytest.fixture(scope="module")
def converter() -> ModuleType:
    """``scripts/convert_checkpoint.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", CONVERT_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def make_nano() -> Callable[..., CEDNet]:
    """Factory of seeded ``cednet_next_nano`` training models: 10 classes and every stage's head (``aux_heads``)
    unless overridden."""

    def _make(**kwargs: object) -> CEDNet:
        torch.manual_seed(0)
        return timm.create_model("cednet_next_nano", **{"num_classes": 10, "aux_heads": True, **kwargs})

    return _make


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the reference tables."""
    return _reference_dir()


@pytest.fixture(scope="session")
def reference_keys() -> Callable[[str], dict[str, tuple[int, ...]]]:
    """``reference_keys(variant)`` -> ``{key: shape}`` of the released checkpoint."""
    return _read_reference_keys


@pytest.fixture(scope="session")
def complexity_ref() -> dict[str, dict[str, int]]:
    """``{model: {params_all, params_inference, macs_224}}`` of the released definitions."""
    return _read_complexity()


@pytest.fixture(scope="session")
def random_state_dict() -> Callable[..., dict[str, torch.Tensor]]:
    """``random_state_dict(variant, seed=0)``: released keys/shapes with random values."""
    return _random_state_dict
