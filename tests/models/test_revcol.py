"""RevCol-T/S/B (cednet_pl.models.revcol): exact sizes, the timm contract, released checkpoints, reversible mode.

Released checkpoints are stood in for by files with exactly the official keys and shapes
(``reference/revcol_*.keys.tsv``) and random values. The official forward is restated functionally below
(``_official_forward``, from the equations of ``design/baselines.md``) and must equal the model's output.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch.utils.flop_counter import FlopCounterMode

from cednet_pl.models.complexity import count_macs, count_params
from cednet_pl.models.revcol import REVCOL_AUX_PREFIXES, RevCol, revcol_checkpoint_filter_fn

VARIANTS = ("revcol_tiny", "revcol_small", "revcol_base")
AUX = REVCOL_AUX_PREFIXES
IMG = 32  # smallest input (stride 32): keeps the fast tests cheap


@pytest.fixture(scope="module")
def baselines_ref(reference_dir: Path) -> dict[str, dict[str, int]]:
    with open(reference_dir / "baselines_complexity.tsv") as f:
        return {
            row.pop("model"): {k: int(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")
        }


def _meta(variant: str, **kwargs: object) -> RevCol:
    with torch.device("meta"):
        return timm.create_model(variant, **kwargs)


def _tiny(**kwargs: object) -> RevCol:
    torch.manual_seed(0)
    return timm.create_model("revcol_tiny", **{"num_classes": 10, **kwargs})


# ---------------------------------------------------------------------- exact sizes
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_and_params_equal_official(
    variant: str, reference_keys: Callable, baselines_ref: dict
) -> None:
    expected = reference_keys(variant)
    model = _meta(variant, aux_heads=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert count_params(model) == baselines_ref[variant]["params_all"]
    plain = _meta(variant)
    assert set(plain.state_dict()) == {k for k in expected if not k.startswith(AUX)}
    assert count_params(plain) == baselines_ref[variant]["params_inference"]


@pytest.mark.parametrize(
    "variant",
    [
        "revcol_tiny",
        pytest.param("revcol_small", marks=pytest.mark.slow),
        pytest.param("revcol_base", marks=pytest.mark.slow),
    ],
)
def test_macs_within_half_percent(variant: str, baselines_ref: dict) -> None:
    """Counted on the meta device (no real compute), so the base model costs nothing."""
    model = _meta(variant)
    assert count_macs(model) == pytest.approx(baselines_ref[variant]["macs_224_inference"], rel=0.005)
    aux = _meta(variant, aux_heads=True).eval()
    with FlopCounterMode(display=False) as counter:
        aux.forward_aux(torch.zeros(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() // 2 == pytest.approx(baselines_ref[variant]["macs_224"], rel=0.005)


def test_structure_facts() -> None:
    model = _meta("revcol_base", drop_path_rate=0.4)
    assert model.num_columns == 16 and model.dims == (72, 144, 288, 576) and model.depths == (1, 1, 3, 2)
    assert model.drop_path_rates == pytest.approx(torch.linspace(0, 0.4, 7).tolist())
    # the same ramp in every column, indexed by the block's position within the column
    for column in (model.subnet0, model.subnet15):
        assert column.level2.blocks[2].drop_path.drop_prob == pytest.approx(0.4 * 4 / 6)
        assert column.level0.blocks[0].dwconv.kernel_size == (3, 3)
    assert model.subnet0.level0.fusion.up is None and model.subnet1.level3.fusion.up is None
    assert model.subnet1.level0.fusion.up is not None


# ---------------------------------------------------------------------- timm contract
def test_forward_backward_every_parameter_gets_a_gradient() -> None:
    model = _tiny(drop_path_rate=0.1)
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    assert out.shape == (2, 10)
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.forward_features(x).shape == (2, 512, 1, 1)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)


def test_forward_is_the_last_aux_logits_and_aux_heads_train() -> None:
    model = _tiny(aux_heads=True)
    x = torch.randn(2, 3, 64, 64)
    logits, images = model.forward_aux(x)
    assert [tuple(t.shape) for t in logits] == [(2, 10)] * 4
    assert [tuple(t.shape) for t in images] == [(2, 3, 64, 64)] * 3
    torch.testing.assert_close(logits[-1], model(x))
    (sum(t.mean() for t in logits) + sum(t.mean() for t in images)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(RuntimeError, match="aux_heads=True"):
        _tiny().forward_aux(x)


def test_timm_cfg_reset_classifier_and_pools() -> None:
    model = _tiny()
    cfg = model.pretrained_cfg
    assert dict(model.named_modules())[cfg["first_conv"]].in_channels == 3
    assert dict(model.named_modules())[cfg["classifier"]].out_features == 10
    assert model.get_classifier() is model.cls_blocks[3].classifier[1]
    x = torch.randn(1, 3, IMG, IMG)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 512, 1, 1)
    model.reset_classifier(4, "avg")
    assert model(x).shape == (1, 4) and model.num_classes == 4
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, "bogus")


def test_features_only() -> None:
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 16),
        (1, 128, 8, 8),
        (1, 256, 4, 4),
        (1, 512, 2, 2),
    ]
    assert not any(k.startswith("cls_blocks") for k in model.state_dict())
    two = timm.create_model("revcol_tiny", features_only=True, out_indices=(2, 3))
    assert two.feature_info.reduction() == [16, 32]


def test_group_matcher_orders_stem_columns_head() -> None:
    model = _meta("revcol_tiny", aux_heads=True)
    groups = group_parameters(model, model.group_matcher())
    order = {name: gid for gid, names in groups.items() for name in names}
    assert (
        order["stem.0.weight"] < order["subnet0.alpha0"] < order["subnet1.alpha0"] < order["subnet3.alpha0"]
    )
    assert order["subnet3.level3.blocks.1.gamma"] < order["cls_blocks.3.classifier.1.weight"]
    assert order["cls_blocks.0.classifier.1.weight"] == order["cls_blocks.3.classifier.1.weight"]


def test_grad_checkpointing_same_gradients() -> None:
    x = torch.randn(2, 3, IMG, IMG)
    grads = []
    for enable in (False, True):
        model = _tiny()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_torchscript_and_fx_match_eager() -> None:
    from timm.layers import _fx
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _tiny().eval()
    x = torch.randn(1, 3, IMG, IMG)
    ref = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), ref)
    kwargs = {"leaf_modules": list(_fx._leaf_modules), "autowrap_functions": list(_fx._autowrap_functions)}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    fx = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs
    )
    torch.testing.assert_close(next(iter(fx(x).values())), ref)
    fx.train()
    next(iter(fx(x).values())).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_alphas_are_clamped_like_the_official_code() -> None:
    model = _tiny()
    with torch.no_grad():
        model.subnet1.alpha0[0, :3] = torch.tensor([1e-5, -1e-6, 0.0])[:, None, None]
    model(torch.randn(1, 3, IMG, IMG))
    assert model.subnet1.alpha0[0, :3, 0, 0].tolist() == pytest.approx([1e-3, -1e-3, 0.0])


# ---------------------------------------------------------------------- reversible mode
def _train_grads(
    save_memory: bool, x: torch.Tensor, drop_path: float = 0.0, autocast: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    model = _tiny(drop_path_rate=drop_path, save_memory=save_memory, aux_heads=True)
    with torch.no_grad():  # non-trivial layer scales, so every branch matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, images = model.forward_aux(xx)
        loss = sum(t.float().square().mean() for t in logits) + sum(t.float().square().mean() for t in images)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, xx.grad


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("drop_path", "autocast", "tol"), [(0.0, False, 1e-4), (0.5, False, 1e-4), (0.3, True, 5e-2)]
)
def test_reversible_gradients_equal_plain(drop_path: float, autocast: bool, tol: float) -> None:
    x = torch.randn(2, 3, 64, 64)
    loss, grads, gx = _train_grads(False, x, drop_path, autocast)
    loss_rev, grads_rev, gx_rev = _train_grads(True, x, drop_path, autocast)
    assert loss_rev == loss  # the same forward (drop path masks replayed from the same RNG stream)
    worst = {n: _max_rel(grads_rev[n], g) for n, g in grads.items()}
    assert max(worst.values()) < tol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert _max_rel(gx_rev, gx) < tol
    if drop_path:
        assert _train_grads(False, x, 0.0, autocast)[0] != loss  # drop path was active


def test_reversible_keeps_no_activations_and_gives_input_gradients() -> None:
    model = _tiny(save_memory=True).train()
    x = torch.randn(2, 3, IMG, IMG, requires_grad=True)
    out = model(x)
    names = {type(fn).__name__ for fn in _walk(out.grad_fn)}
    assert "_ReversibleColumnBackward" in names and "GeluBackward0" not in names  # no block graph kept
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.shape == x.shape and gx.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # torch.autograd.grad: no side effects
    model.eval()
    ref = model(x)
    model.train()
    torch.testing.assert_close(model(x), ref)  # forward is the same in train mode (no drop path)


def _walk(fn: object, seen: set | None = None) -> list:
    seen = set() if seen is None else seen
    out = []
    stack = [fn]
    while stack:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        out.append(f)
        stack.extend(n for n, _ in getattr(f, "next_functions", ()))
    return out


# ---------------------------------------------------------------------- released checkpoints
def _released(
    random_state_dict: Callable, variant: str = "revcol_tiny", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors with the official keys/shapes, scaled to keep a many-column forward well-conditioned."""
    sd = random_state_dict(variant, seed)
    for k, v in sd.items():
        if k.endswith("alpha0") or k.endswith(("alpha1", "alpha2", "alpha3")):
            sd[k] = v.abs() * 0.5 + 0.2
        elif k.endswith("gamma"):
            sd[k] = v * 0.1
        elif v.ndim >= 2:
            sd[k] = v * 0.05
    return sd


def _official_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, num_columns: int, depths: tuple
) -> torch.Tensor:
    """The official inference forward, restated from the equations (channels-first LN computed by hand)."""

    def ln_cf(t: torch.Tensor, p: str) -> torch.Tensor:
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        return (
            sd[p + ".weight"][:, None, None] * (t - u) / torch.sqrt(s + 1e-6) + sd[p + ".bias"][:, None, None]
        )

    def block(t: torch.Tensor, p: str) -> torch.Tensor:
        h = F.conv2d(t, sd[p + ".dwconv.weight"], sd[p + ".dwconv.bias"], padding=1, groups=t.shape[1])
        h = h.permute(0, 2, 3, 1)
        h = F.layer_norm(h, h.shape[-1:], sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[p + ".pwconv1.weight"], sd[p + ".pwconv1.bias"]))
        h = sd[p + ".gamma"] * F.linear(h, sd[p + ".pwconv2.weight"], sd[p + ".pwconv2.bias"])
        return t + h.permute(0, 3, 1, 2)

    def level(col: int, lvl: int, lower: torch.Tensor, upper: torch.Tensor | None) -> torch.Tensor:
        p = f"subnet{col}.level{lvl}"
        t = lower
        if lvl > 0:
            t = ln_cf(
                F.conv2d(lower, sd[p + ".fusion.down.0.weight"], sd[p + ".fusion.down.0.bias"], stride=2),
                p + ".fusion.down.1",
            )
        if col > 0 and lvl < 3:
            q = p + ".fusion.up.channel_reschedule"
            u = F.linear(upper.permute(0, 2, 3, 1), sd[q + ".0.weight"], sd[q + ".0.bias"])
            u = F.layer_norm(u, u.shape[-1:], sd[q + ".1.weight"], sd[q + ".1.bias"], 1e-6).permute(
                0, 3, 1, 2
            )
            t = t + F.interpolate(u, scale_factor=2, mode="nearest")
        for i in range(depths[lvl]):
            t = block(t, f"{p}.blocks.{i}")
        return t

    x = ln_cf(F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"], stride=4), "stem.1")
    c: list = [0, 0, 0, 0]
    for col in range(num_columns):
        a = [sd[f"subnet{col}.alpha{i}"] for i in range(4)]
        a = [v.sign() * v.abs().clamp(min=1e-3) for v in a]
        c[0] = a[0] * c[0] + level(col, 0, x, c[1])
        c[1] = a[1] * c[1] + level(col, 1, c[0], c[2])
        c[2] = a[2] * c[2] + level(col, 2, c[1], c[3])
        c[3] = a[3] * c[3] + level(col, 3, c[2], None)
    h = F.layer_norm(
        c[3].mean((2, 3)),
        (c[3].shape[1],),
        sd["cls_blocks.3.classifier.0.weight"],
        sd["cls_blocks.3.classifier.0.bias"],
        1e-6,
    )
    return F.linear(h, sd["cls_blocks.3.classifier.1.weight"], sd["cls_blocks.3.classifier.1.bias"])


@pytest.mark.parametrize("wrap", [False, True])
def test_released_checkpoint_loads_and_matches_official_forward(
    wrap: bool, random_state_dict: Callable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = _released(random_state_dict)
    sd["subnet2.alpha1"][0, :2] = torch.tensor([2e-4, -5e-5])[:, None, None]  # clamped to +-1e-3 at forward
    path = tmp_path / "revcol_tiny.pth"
    torch.save({"model": sd, "epoch": 300} if wrap else sd, path)
    with caplog.at_level(logging.INFO, logger="cednet_pl.models.revcol"):
        model = timm.create_model("revcol_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert "training-only" in caplog.text  # cls_blocks.0-2 / decoder_blocks dropped with a note
    msd = model.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items() if k in msd)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _official_forward(sd, x, 4, (2, 2, 4, 2)), rtol=1e-4, atol=1e-4)

    aux = timm.create_model(
        "revcol_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), aux_heads=True
    )
    asd = aux.state_dict()
    assert sorted(asd) == sorted(sd) and all(torch.equal(asd[k], v) for k, v in sd.items())
    feats = timm.create_model(
        "revcol_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True
    )
    assert all(torch.equal(v, sd[k]) for k, v in feats.model.state_dict().items())


def test_checkpoint_without_aux_heads_into_aux_model_warns(random_state_dict: Callable) -> None:
    sd = {k: v for k, v in _released(random_state_dict).items() if not k.startswith(AUX)}
    model = _meta("revcol_tiny", aux_heads=True)
    with pytest.warns(UserWarning, match="no intermediate-supervision heads"):
        out = revcol_checkpoint_filter_fn(sd, model)
    assert set(out) == set(sd)


def test_checkpoint_errors_name_the_problem(random_state_dict: Callable, tmp_path: Path) -> None:
    sd = _released(random_state_dict)
    with pytest.raises(RuntimeError, match=r"missing keys: subnet4\.alpha0"):
        revcol_checkpoint_filter_fn(sd, _meta("revcol_small"))
    bad = dict(sd, **{"subnet1.level2.blocks.0.pwconv1.weight": torch.zeros(3, 3)})
    with pytest.raises(
        RuntimeError, match=r"subnet1\.level2\.blocks\.0\.pwconv1\.weight: checkpoint \(3, 3\)"
    ):
        revcol_checkpoint_filter_fn(bad, _meta("revcol_tiny"))
    path = tmp_path / "cut.pth"
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="truncated"):
        timm.create_model("revcol_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_checkpoint_other_num_classes_keeps_fresh_classifiers(random_state_dict: Callable) -> None:
    sd = _released(random_state_dict)
    model = _meta("revcol_tiny", num_classes=10)
    with pytest.warns(UserWarning, match="other num_classes"):
        out = revcol_checkpoint_filter_fn(sd, model)
    assert "cls_blocks.3.classifier.1.weight" not in out and "cls_blocks.3.classifier.0.weight" in out


def test_convert_checkpoint_script(random_state_dict: Callable, tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_revcol", script)
    assert spec is not None and spec.loader is not None
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)

    sd = _released(random_state_dict)
    src, full, inference = tmp_path / "released.pth", tmp_path / "full.pth", tmp_path / "inference.pth"
    torch.save({"model": sd}, src)
    assert converter.main([str(src), str(full), "--model", "revcol_tiny"]) == 0
    assert sorted(torch.load(full)) == sorted(sd)  # the aux heads are kept by default
    assert converter.main([str(src), str(inference), "--model", "revcol_tiny", "--inference-only"]) == 0
    out = torch.load(inference)
    assert sorted(out) == sorted(k for k in sd if not k.startswith(AUX))
    model = timm.create_model(
        "revcol_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(inference))
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in out.items())
    assert converter.main([str(src), str(tmp_path / "x.pth"), "--model", "revcol_small"]) == 1


def test_reversible_mode_saves_much_less_for_backward() -> None:
    """scripts/bench_revcol_memory.py's measure (bytes of the storages the graph keeps), at a tiny size."""
    import importlib.util
    import sys

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_revcol_memory", scripts / "bench_revcol_memory.py"
        )
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(scripts))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    plain, _ = bench.saved_activation_bytes(_tiny(drop_path_rate=0.1), x, y)
    rev, loss = bench.saved_activation_bytes(_tiny(drop_path_rate=0.1, save_memory=True), x, y)
    # the reversible graph keeps each column's four outputs (2 x (64*16*16 + ... + 512*2*2) floats), plus the stem's
    # and the head's own activations
    per_column = 2 * (64 * 256 + 128 * 64 + 256 * 16 + 512 * 4) * 4
    assert 4 * per_column < rev < 6 * per_column
    assert plain > 10 * rev
    loss.backward()
