"""Loading released / converted / Lightning checkpoints, and scripts/convert_checkpoint.py.

Released checkpoints are stood in for by files with exactly the released keys and shapes
(``reference/<variant>.keys.tsv``) and random values: module names equal the released keys, so a load
must reproduce every tensor bit for bit, with no renaming.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

from cednet_pl.models.cednet import CEDNet, checkpoint_filter_fn, load_checkpoint_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"
RELEASED = (
    "cednet_next_tiny",
    "cednet_next_small",
    "cednet_next_base",
    "cednet_next_tiny_unet",
    "cednet_next_tiny_hourglass",
    "cednet_next_tiny_fpnconv",
    "cednet_swin_tiny",
    "cednet_res50",
)
NANO = "cednet_next_nano"


def _load(variant: str, path: Path, **kwargs: object) -> torch.nn.Module:
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _assert_same(
    model_sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], keys: list[str] | None = None
) -> None:
    keys = list(ref) if keys is None else keys
    differing = [k for k in keys if not torch.equal(model_sd[k], ref[k].to(model_sd[k].dtype))]
    assert differing == []


@pytest.fixture
def nano_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    model = timm.create_model(NANO, aux_heads=True)  # the released layout: every stage's head
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


@pytest.fixture
def nano_file(tmp_path: Path, nano_sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "nano.pth"
    torch.save({"model": nano_sd, "epoch": 3}, path)
    return path


def _round_trip(variant: str, tmp_path: Path, random_state_dict: Callable, converter: ModuleType) -> None:
    sd = random_state_dict(variant)
    src = tmp_path / f"{variant}_released.pth"
    torch.save({"model": sd, "epoch": 299}, src)
    model = _load(variant, src, aux_heads=True)
    assert set(model.state_dict()) == set(sd)
    _assert_same(model.state_dict(), sd)
    # the inference model (default) loads the same file; the auxiliary heads are dropped with a logged note
    inference = _load(variant, src)
    assert set(inference.state_dict()) < set(sd)
    _assert_same(inference.state_dict(), sd, sorted(inference.state_dict()))
    del model, inference

    dst = tmp_path / f"{variant}_converted.pth"
    assert converter.main([str(src), str(dst), "--model", variant]) == 0
    out = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(out) == set(sd)
    _assert_same(out, sd)


def test_released_checkpoint_round_trip_tiny(
    tmp_path: Path, random_state_dict: Callable, converter: ModuleType
) -> None:
    _round_trip("cednet_next_tiny", tmp_path, random_state_dict, converter)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in RELEASED if v != "cednet_next_tiny"])
def test_released_checkpoint_round_trip(
    variant: str, tmp_path: Path, random_state_dict: Callable, converter: ModuleType
) -> None:
    _round_trip(variant, tmp_path, random_state_dict, converter)


def test_released_heads_load_into_either_model(nano_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A released checkpoint carries every stage's head: the training model loads them all; the inference model
    (default) loads the rest and drops the auxiliary heads with a logged note."""
    whole = _load(NANO, nano_file, aux_heads=True)
    with caplog.at_level("INFO", logger="cednet_pl.models.cednet"):
        inference = _load(NANO, nano_file)
    assert "auxiliary stage heads" in caplog.text and "aux_heads=False" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(inference.eval()(x), whole.eval()(x))
    assert len(whole.state_dict()) > len(inference.state_dict())


def test_lightning_checkpoint_loads(tmp_path: Path, nano_sd: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "last.ckpt"
    state = {f"net.{k}": v for k, v in nano_sd.items()}
    state["criterion.weight"] = torch.ones(3)  # a non-model entry of the LightningModule
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10, "hyper_parameters": {"lr": 0.1}}, path)
    _assert_same(_load(NANO, path, aux_heads=True).state_dict(), nano_sd)
    assert set(load_checkpoint_file(path)) == set(nano_sd)


def test_model_is_preferred_over_model_ema(tmp_path: Path, nano_sd: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "both.pth"
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in nano_sd.items()}
    torch.save({"model_ema": ema, "model": nano_sd}, path)
    _assert_same(_load(NANO, path, aux_heads=True).state_dict(), nano_sd)


def test_wrong_variant_fails_with_names(nano_file: Path) -> None:
    with pytest.raises(RuntimeError, match="cednet_next_tiny") as err:
        _load("cednet_next_tiny", nano_file)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "shape mismatch" in msg
    assert "stem.3.weight: checkpoint (32, 16, 3, 3) vs model (96, 32, 3, 3)" in msg


def test_truncated_file_names_the_file(tmp_path: Path, nano_file: Path) -> None:
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(nano_file.read_bytes()[:20000])
    with pytest.raises(RuntimeError, match="truncated") as err:
        _load(NANO, bad)
    assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")


def test_extra_missing_and_misshaped_keys_fail(tmp_path: Path, nano_sd: dict[str, torch.Tensor]) -> None:
    cases = {
        "unexpected": {**nano_sd, "stages.9.extra.weight": torch.zeros(2)},
        "missing": {k: v for k, v in nano_sd.items() if k != "stages.1.0.encoder.2.0.gamma"},
        "shape mismatch": {**nano_sd, "stages.0.0.dwconv.weight": torch.zeros(32, 1, 5, 5)},
    }
    names = {"unexpected": "stages.9.extra.weight", "missing": "stages.1.0.encoder.2.0.gamma"}
    names["shape mismatch"] = "stages.0.0.dwconv.weight"
    for kind, sd in cases.items():
        path = tmp_path / f"{kind}.pth"
        torch.save({"model": sd}, path)
        with pytest.raises(RuntimeError, match=f"1 {kind} keys: {names[kind]}") as err:
            _load(NANO, path)
        assert NANO in str(err.value)


def test_load_into_features_only_and_other_heads(nano_file: Path, nano_sd: dict[str, torch.Tensor]) -> None:
    backbone = [k for k in nano_sd if not k.startswith(("final_layers", "norms", "heads"))]
    features = _load(NANO, nano_file, features_only=True)
    _assert_same(features.model.state_dict(), nano_sd, backbone)

    with pytest.warns(UserWarning, match="other num_classes"):
        other = _load(NANO, nano_file, num_classes=10, aux_heads=True)
    _assert_same(other.state_dict(), nano_sd, [k for k in nano_sd if not k.startswith("heads.")])
    assert other.heads[-1].weight.shape == (10, 256)

    headless = _load(NANO, nano_file, num_classes=0, aux_heads=True)
    _assert_same(headless.state_dict(), nano_sd, [k for k in nano_sd if not k.startswith("heads.")])

    gray = _load(NANO, nano_file, in_chans=1)
    assert gray.stem[0].weight.shape == (16, 1, 3, 3)


def test_filter_fn_is_strict_on_a_bare_state_dict(nano_sd: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(NANO, aux_heads=True)
    assert set(checkpoint_filter_fn({"model": nano_sd}, model)) == set(nano_sd)
    with pytest.raises(RuntimeError, match="missing"):
        checkpoint_filter_fn({k: v for k, v in nano_sd.items() if not k.startswith("stem.")}, model)


def test_converter_inference_only_and_drop_heads(
    tmp_path: Path, nano_file: Path, nano_sd: dict[str, torch.Tensor], converter: ModuleType
) -> None:
    inf = tmp_path / "inference.pth"
    assert converter.main([str(nano_file), str(inf), "--model", NANO, "--inference-only"]) == 0
    keys = set(torch.load(inf, weights_only=True))
    assert keys == {k for k in nano_sd if not k.startswith(("final_layers.0.", "norms.0.", "heads.0."))}
    model: CEDNet = _load(NANO, inf)  # the inference model: exactly these keys, no note
    assert set(model.state_dict()) == keys
    _assert_same(model.state_dict(), nano_sd, sorted(keys))
    with pytest.warns(UserWarning, match="auxiliary"):
        model = _load(NANO, inf, aux_heads=True)
    _assert_same(model.state_dict(), nano_sd, sorted(keys))

    backbone = tmp_path / "backbone.pth"
    assert converter.main([str(nano_file), str(backbone), "--model", NANO, "--drop-heads"]) == 0
    keys = set(torch.load(backbone, weights_only=True))
    assert keys == {k for k in nano_sd if not k.startswith(("final_layers", "norms", "heads"))}
    features = _load(NANO, backbone, features_only=True)
    _assert_same(features.model.state_dict(), nano_sd, sorted(keys))
    with pytest.raises(RuntimeError, match=r"8 missing keys: final_layers\.1\.0\.weight"):
        _load(NANO, backbone)


def test_converter_errors(
    tmp_path: Path, nano_file: Path, converter: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.pth"
    assert converter.main([str(nano_file), str(out), "--model", "cednet_next_tiny"]) == 1
    assert "does not match cednet_next_tiny" in capsys.readouterr().err
    assert converter.main([str(nano_file), str(out), "--model", "resnet50"]) == 1
    assert "not a CEDNet variant, MSG-Transformer or RevCol" in capsys.readouterr().err
    assert converter.main([str(tmp_path / "missing.pth"), str(out), "--model", NANO]) == 1
    assert "missing.pth" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_converter_cli(tmp_path: Path, nano_file: Path) -> None:
    out = tmp_path / "sub" / "nano.pth"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(nano_file), str(out), "--model", NANO],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verified against cednet_next_nano" in proc.stdout
    assert out.is_file()


def test_converter_takes_the_ema_weights(trained_ckpt: Path, tmp_path: Path, converter: ModuleType) -> None:
    out = tmp_path / "ema.pth"
    assert converter.main([str(trained_ckpt), str(out), "--model", NANO, "--ema"]) == 0
    sd = torch.load(out, weights_only=True)
    ema, raw = load_checkpoint_file(trained_ckpt, ema=True), load_checkpoint_file(trained_ckpt)
    assert set(sd) == set(ema) and all(torch.equal(sd[k], ema[k]) for k in sd)
    assert any(not torch.equal(sd[k], raw[k]) for k in sd if sd[k].is_floating_point())
