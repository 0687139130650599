"""MSG-Transformer-T/S/B: exact sizes, official state_dict layout, the official forward by hand, the timm contract.

Official checkpoints are stood in for by files with exactly the official keys and shapes
(``reference/msg_*.keys.tsv``, including the int64 ``relative_position_index`` buffers) and random values.
The by-hand reference below follows ``design/baselines.md`` window by window with explicit softmax, so it
checks the region/window layout, the MSG shuffle and the bias placement independently of the batched code.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import cednet_pl  # noqa: F401  (registers the timm entry points)
from cednet_pl.models.complexity import count_macs, count_params
from cednet_pl.models.msg import (
    MSGTransformer,
    msg_checkpoint_filter_fn,
    msg_input_multiple,
    region_partition,
    region_reverse,
    shuffle_messengers,
)

VARIANTS = ("msg_tiny", "msg_small", "msg_base")
# small configuration for fast tests: window 2, shuffle (2, 2, 2, 1) -> inputs multiple of 64
SMALL = dict(
    embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=2, shuffle_size=(2, 2, 2, 1)
)


def _small(**kwargs: object) -> MSGTransformer:
    torch.manual_seed(0)
    return timm.create_model("msg_tiny", **{**SMALL, "num_classes": 5, **kwargs})


def _complexity(reference_dir: Path) -> dict[str, dict[str, int]]:
    with open(reference_dir / "baselines_complexity.tsv") as f:
        return {r.pop("model"): {k: int(v) for k, v in r.items()} for r in csv.DictReader(f, delimiter="\t")}


def _randomise(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# ----------------------------------------------------------------------------- sizes and layout
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_and_params_equal_official(
    variant: str, reference_keys: Callable, reference_dir: Path
) -> None:
    with torch.device("meta"):
        model = timm.create_model(variant)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = reference_keys(variant)
    assert list(keys) == list(ref)  # same keys in the same order
    assert keys == ref
    assert count_params(model) == _complexity(reference_dir)[variant]["params_all"]


def test_index_buffers_are_int64_and_persistent() -> None:
    model = _small()
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")}
    assert len(buffers) == sum(SMALL["depths"])
    assert all(v.dtype == torch.int64 and v.shape == (4, 4) for v in buffers.values())


@pytest.mark.parametrize(
    "variant", ["msg_tiny", *(pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS[1:])]
)
def test_macs_at_224(variant: str, reference_dir: Path) -> None:
    model = timm.create_model(variant)
    ref = _complexity(reference_dir)[variant]["macs_224_inference"]
    assert count_macs(model, (1, 3, 224, 224)) == pytest.approx(ref, rel=5e-3)


# ----------------------------------------------------------------------------- the official forward by hand
def _attention_by_hand(attn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + w*w, C)`` tokens of one window, MSG first; explicit softmax, bias entry by entry."""
    b, t, c = tokens.shape
    h = attn.num_heads
    q, k, v = attn.qkv(tokens).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    logits = (q * (c // h) ** -0.5) @ k.transpose(-2, -1)
    bias = torch.zeros(h, t, t)
    for i in range(t):
        for j in range(t):
            if i == 0:
                bias[:, i, j] = attn.rel_pos_msg[:, 1, 0, 0]
            elif j == 0:
                bias[:, i, j] = attn.rel_pos_msg[:, 0, 0, 0]
            else:
                bias[:, i, j] = attn.relative_position_bias_table[attn.relative_position_index[i - 1, j - 1]]
    out = torch.softmax(logits + bias, dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, t, c))


def _forward_by_hand(model: MSGTransformer, image: torch.Tensor) -> torch.Tensor:
    """Logits of the official model (one MSG token per window, regions of G x G windows) window by window."""
    ws = model.window_size
    patches = model.patch_embed.norm(model.patch_embed.proj(image).permute(0, 2, 3, 1))  # (B, H, W, C)
    g0 = model.shuffle_size[0]
    nh, nw = patches.shape[1] // ws, patches.shape[2] // ws
    # stage-0 MSG tokens: window (a, b) gets msg_tokens[(a % G) * G + b % G]
    msg = torch.stack(
        [torch.stack([model.msg_tokens[0, (a % g0) * g0 + b % g0, 0] for b in range(nw)]) for a in range(nh)]
    )
    msg = msg.unsqueeze(0).expand(patches.shape[0], -1, -1, -1)
    for s, layer in enumerate(model.layers):
        g = model.shuffle_size[s]
        nh, nw = patches.shape[1] // ws, patches.shape[2] // ws
        for block in layer.blocks:
            new_p, new_m = patches.clone(), msg.clone()
            for a in range(nh):
                for b in range(nw):
                    win = patches[:, a * ws : (a + 1) * ws, b * ws : (b + 1) * ws].flatten(1, 2)
                    tokens = torch.cat((msg[:, a, b][:, None], win), dim=1)
                    tokens = tokens + _attention_by_hand(block.attn, block.norm1(tokens))
                    new_m[:, a, b] = tokens[:, 0]
                    new_p[:, a * ws : (a + 1) * ws, b * ws : (b + 1) * ws] = tokens[:, 1:].reshape(
                        -1, ws, ws, win.shape[-1]
                    )
            if (
                g > 1
            ):  # window k of a region takes channel group k of every window's MSG token, in window order
                shuffled = new_m.clone()
                cg = new_m.shape[-1] // (g * g)
                for a in range(nh):
                    for b in range(nw):
                        k = (a % g) * g + b % g
                        base_a, base_b = a - a % g, b - b % g
                        for src in range(g * g):
                            sa, sb = base_a + src // g, base_b + src % g
                            shuffled[:, a, b, src * cg : (src + 1) * cg] = new_m[
                                :, sa, sb, k * cg : (k + 1) * cg
                            ]
                new_m = shuffled
            patches = new_p + block.mlp(block.norm2(new_p))
            msg = new_m + block.mlp(block.norm2(new_m))
        if layer.downsample is not None:
            down = layer.downsample
            patches = down.norm(down.reduction(patches.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            msg = down.norm(down.reduction(msg.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    return model.head(model.norm(msg[:, 0, 0]))


def test_forward_equals_official_by_hand() -> None:
    model = _small().eval()
    _randomise(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, ref = model(x), _forward_by_hand(model, x)
    assert ours.shape == (2, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_shuffle_exchanges_channel_groups() -> None:
    x = torch.arange(2 * 4 * 3 * 8, dtype=torch.float32).reshape(
        2, 4, 3, 8
    )  # 4 windows, 8 channels -> groups of 2
    y = shuffle_messengers(x)
    assert torch.equal(y[:, :, 1:], x[:, :, 1:])
    for i in range(4):
        for j in range(4):
            assert torch.equal(y[:, i, 0, 2 * j : 2 * j + 2], x[:, j, 0, 2 * i : 2 * i + 2])


def test_region_partition_layout_and_roundtrip() -> None:
    x = torch.randn(2, 8, 12, 3)  # window 2, shuffle 2 -> regions 2 x 3
    r = region_partition(x, 2, 2)
    assert r.shape == (12, 4, 4, 3)
    # region (1, 2) of image 1, window (0, 1) of that region, token (1, 0) of that window
    assert torch.equal(r[1 * 6 + 1 * 3 + 2, 0 * 2 + 1, 1 * 2 + 0], x[1, 4 + 0 + 1, 8 + 2 + 0])
    assert torch.equal(region_reverse(r, 2, 2, 8, 12), x)


def test_sdpa_attention_equals_explicit_softmax() -> None:
    model = _small()
    _randomise(model)
    attn = model.layers[1].blocks[0].attn
    tokens = torch.randn(3, 4, 5, 32)
    with torch.no_grad():
        ref = torch.stack([_attention_by_hand(attn, tokens[:, g]) for g in range(4)], dim=1)
        torch.testing.assert_close(attn(tokens), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- input sizes
def test_input_multiple() -> None:
    assert msg_input_multiple(7, (4, 4, 2, 1)) == 224
    assert timm.create_model("msg_tiny", num_classes=0).input_multiple == 224
    assert msg_input_multiple(2, SMALL["shuffle_size"]) == 64


@pytest.mark.parametrize("size", [(60, 64), (64, 96), (32, 32)])
def test_unsupported_sizes_name_size_and_multiple(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"input size {size[0]}x{size[1]} .*multiple of 64"):
        _small()(torch.randn(1, 3, *size))


def test_larger_inputs_average_the_last_stage_msg_tokens() -> None:
    model = _small(num_classes=0).eval()
    _randomise(model)
    x = torch.randn(1, 3, 128, 192)  # last stage 4 x 6 -> 2 x 3 windows, one MSG token each
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (1, 6 + 24, 128)
        torch.testing.assert_close(model(x), tokens[:, :6].mean(1))
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), tokens[:, 6:].mean(1))


# ----------------------------------------------------------------------------- checkpoints
def _load(variant: str, path: Path, **kwargs: object) -> nn.Module:
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _round_trip(variant: str, tmp_path: Path, random_state_dict: Callable, converter: ModuleType) -> None:
    sd = random_state_dict(variant)
    for wrapped, name in ((sd, "bare.pth"), ({"model": sd, "epoch": 299}, "official.pth")):
        torch.save(wrapped, tmp_path / name)
        model = _load(variant, tmp_path / name)
        loaded = model.state_dict()
        assert set(loaded) == set(sd)
        assert [k for k in sd if not torch.equal(loaded[k], sd[k])] == []
        del model
    dst = tmp_path / "converted.pth"
    assert converter.main([str(tmp_path / "official.pth"), str(dst), "--model", variant]) == 0
    out = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_official_checkpoint_round_trip_tiny(
    tmp_path: Path, random_state_dict: Callable, converter: ModuleType
) -> None:
    _round_trip("msg_tiny", tmp_path, random_state_dict, converter)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["msg_small", "msg_base"])
def test_official_checkpoint_round_trip(
    variant: str, tmp_path: Path, random_state_dict: Callable, converter: ModuleType
) -> None:
    _round_trip(variant, tmp_path, random_state_dict, converter)


def test_loaded_weights_give_the_official_outputs(tmp_path: Path) -> None:
    src = _small()
    _randomise(src, seed=3)
    torch.save({"model": src.state_dict()}, tmp_path / "small.pth")
    model = _load("msg_tiny", tmp_path / "small.pth", **SMALL, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _forward_by_hand(src.eval(), x), rtol=1e-4, atol=1e-4)


def test_wrong_variant_fails_naming_keys(tmp_path: Path, random_state_dict: Callable) -> None:
    torch.save({"model": random_state_dict("msg_tiny")}, tmp_path / "tiny.pth")
    with pytest.raises(
        RuntimeError, match=r"does not match msg_small[\s\S]*shape mismatch keys: msg_tokens: "
    ):
        _load("msg_small", tmp_path / "tiny.pth")
    with torch.device("meta"):
        base = timm.create_model("msg_base")
    with pytest.raises(
        RuntimeError, match=r"does not match msg_base[\s\S]*missing keys: layers\.2\.blocks\.12\."
    ):
        msg_checkpoint_filter_fn(random_state_dict("msg_tiny"), base)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(_small().state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RuntimeError, match=r"cut\.pth.*truncated"):
        _load("msg_tiny", path, **SMALL)


def test_misshaped_extra_and_missing_keys_are_named() -> None:
    model = _small()
    sd = dict(model.state_dict())
    sd["layers.1.blocks.0.attn.rel_pos_msg"] = torch.zeros(3, 2, 1, 1)
    sd["layers.9.extra"] = torch.zeros(1)
    del sd["norm.bias"]
    with pytest.raises(RuntimeError) as err:
        msg_checkpoint_filter_fn(sd, model)
    text = str(err.value)
    assert "layers.1.blocks.0.attn.rel_pos_msg: checkpoint (3, 2, 1, 1) vs model (2, 2, 1, 1)" in text
    assert "unexpected keys: layers.9.extra" in text and "missing keys: norm.bias" in text


def test_other_num_classes_and_features_only_load(tmp_path: Path) -> None:
    src = _small()
    _randomise(src)
    torch.save(src.state_dict(), tmp_path / "small.pth")
    with pytest.warns(UserWarning, match="other num_classes"):
        model = _load("msg_tiny", tmp_path / "small.pth", **{**SMALL, "num_classes": 3})
    assert torch.equal(model.layers[3].blocks[0].mlp.fc1.weight, src.layers[3].blocks[0].mlp.fc1.weight)
    feats = _load("msg_tiny", tmp_path / "small.pth", **SMALL, features_only=True)
    assert torch.equal(feats.model.msg_tokens, src.msg_tokens)


# ----------------------------------------------------------------------------- timm contract
def test_registered_with_official_cfg() -> None:
    assert set(VARIANTS) <= set(timm.list_models("msg_*"))
    cfg = timm.create_model("msg_tiny", num_classes=0).pretrained_cfg
    assert (
        cfg["input_size"] == (3, 224, 224)
        and cfg["first_conv"] == "patch_embed.proj"
        and cfg["classifier"] == "head"
    )


def test_forward_backward_every_parameter_gets_a_gradient() -> None:
    model = _small(drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # only the MSG token reaches the head, so the last block's patch-patch bias gets an all-zero gradient
    # (as in the official model); every other parameter gets a non-zero one
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == ["layers.3.blocks.0.attn.relative_position_bias_table"]


def test_drop_path_ramp() -> None:
    model = _small(drop_path_rate=0.5)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
        for b in model.blocks_in_ramp_order()
    ]
    assert rates == pytest.approx(torch.linspace(0, 0.5, sum(SMALL["depths"])).tolist())


def test_features_only_four_stages() -> None:
    model = timm.create_model("msg_tiny", **SMALL, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    two = timm.create_model("msg_tiny", **SMALL, features_only=True, out_indices=(1, 2))
    assert not hasattr(two.model.layers, "3") and two.model.layers[2].downsample is None
    assert [o.shape[1] for o in two(torch.randn(1, 3, 64, 64))] == [32, 64]


def test_forward_intermediates_match_forward_features() -> None:
    model = _small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
    assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
    torch.testing.assert_close(nhwc[0], inter[3].permute(0, 2, 3, 1))


def test_reset_classifier_and_pools() -> None:
    model = _small().eval()
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (1, 128)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 5, 128)
    with pytest.raises(ValueError, match="global_pool='max'"):
        model.reset_classifier(0, "max")


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    x = torch.randn(2, 3, 64, 64)
    grads = []
    outs = []
    for ckpt in (False, True):
        model = _small().train()
        model.set_grad_checkpointing(ckpt)
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_group_matcher_and_no_weight_decay() -> None:
    model = _small()
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher())
    # embedding, 5 blocks (timm merges the final norm into the last), 3 downsampling layers (after their stage), head
    assert len(groups) == 1 + 5 + 3 + 1
    assert [k for k, v in groups.items() if "layers.0.downsample.reduction.weight" in v] == [2]
    assert groups[0] == [
        "msg_tokens",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "patch_embed.norm.weight",
        "patch_embed.norm.bias",
    ]
    nwd = model.no_weight_decay()
    assert "layers.1.blocks.1.attn.rel_pos_msg" in nwd and "msg_tokens" not in nwd
    assert len(nwd) == 2 * sum(SMALL["depths"])


def test_torchscript_and_fx_equal_eager() -> None:
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)
        kw = {
            "leaf_modules": list(get_notrace_modules()),
            "autowrap_functions": list(get_notrace_functions()),
        }
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
        fx = create_feature_extractor(
            model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw
        )
        torch.testing.assert_close(next(iter(fx(x).values())), ref)


def test_invalid_configurations() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        MSGTransformer(depths=(1, 1), num_heads=(1, 1, 1), shuffle_size=(1, 1))
    with pytest.raises(ValueError, match=r"dim=24 is not divisible by shuffle_size\*\*2=16"):
        MSGTransformer(embed_dim=24, depths=(1,), num_heads=(1,), shuffle_size=(4,))
    with pytest.raises(ValueError, match="global_pool='max'"):
        MSGTransformer(global_pool="max")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_official_variants_forward_backward_at_224(variant: str) -> None:
    model = timm.create_model(variant, num_classes=10, drop_path_rate=0.1).train()
    out = model(torch.randn(1, 3, 224, 224))
    F.cross_entropy(out, torch.tensor([3])).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
