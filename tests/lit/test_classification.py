"""ClassificationModule: deep supervision, mixup, optimizer groups, per-step schedule, EMA, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cednet_pl.lit.classification import ClassificationModule, build_net, revcol_compound_loss
from cednet_pl.lit.optim import build_optimizer, build_scheduler, resolve_lr, scale_lr

NANO = {"name": "cednet_next_nano", "num_classes": 10}


def _batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen), torch.arange(n) % 10


def test_net_built_by_name_and_hparams_are_plain() -> None:
    module = ClassificationModule(net=NANO, ema={"decay": 0.9})
    assert module.hparams["net"] == NANO
    assert isinstance(module.net, nn.Module) and module.num_stages == module.net.num_stages > 1
    assert all(k.startswith(("net.", "ema.module.")) for k in module.state_dict())


def test_deep_supervision_loss_is_weighted_mean_of_stage_losses() -> None:
    x, y = _batch()
    module = ClassificationModule(net=NANO, label_smoothing=0.0, stage_weights=[1.0, 3.0])
    module.eval()  # no drop path: deterministic forward
    loss = module.training_step((x, y), 0)
    stage = [nn.functional.cross_entropy(o, y) for o in module.net.forward_stage_logits(x)]
    assert loss.item() == pytest.approx((stage[0] + 3 * stage[1]).item() / 4, rel=1e-5)
    plain = ClassificationModule(net=NANO, label_smoothing=0.0, deep_supervision=False)
    # without deep supervision only the inference heads are built: the auxiliary ones are not loaded
    assert module.net.aux_heads and not plain.net.aux_heads
    aux = {k for k in module.net.state_dict() if k.startswith(("final_layers.0.", "norms.0.", "heads.0."))}
    assert aux and set(plain.net.state_dict()) == set(module.net.state_dict()) - aux
    plain.net.load_state_dict({k: v for k, v in module.net.state_dict().items() if k not in aux})
    plain.eval()
    assert plain.training_step((x, y), 0).item() == pytest.approx(stage[1].item(), rel=1e-5)


def test_baseline_without_stage_logits_trains_on_forward() -> None:
    module = ClassificationModule(net={"name": "test_convnext", "num_classes": 10}, stage_weights=None)
    assert not module.deep_supervision and module.num_stages == 1
    x, y = _batch()
    assert torch.isfinite(module.training_step((x, y), 0))


def test_stage_weights_length_checked() -> None:
    with pytest.raises(ValueError, match="stage_weights has 3 entries but cednet_next_nano has 2"):
        ClassificationModule(net=NANO, stage_weights=[1, 1, 1])


def test_unknown_net_lists_cednet_models() -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'cednet_next_giant'.*cednet_next_tiny"):
        build_net("cednet_next_giant")
    with pytest.raises(ValueError, match="needs a `name`"):
        ClassificationModule(net={"num_classes": 10})


def test_mixup_uses_soft_targets_and_handles_odd_batches() -> None:
    module = ClassificationModule(
        net=NANO, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5}
    )
    assert type(module.train_criterion).__name__ == "SoftTargetCrossEntropy"
    for n in (4, 3):
        x, y = _batch(n)
        assert torch.isfinite(module.training_step((x, y), 0))


def test_label_smoothing_without_mixup() -> None:
    module = ClassificationModule(net=NANO, label_smoothing=0.1)
    assert isinstance(module.train_criterion, nn.CrossEntropyLoss)
    assert module.train_criterion.label_smoothing == 0.1


def test_optimizer_no_decay_on_norms_biases_and_layer_decay() -> None:
    net = build_net("cednet_next_nano", num_classes=10)
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.ndim <= 1:
                assert group["weight_decay"] == 0.0, names[id(p)]
    scales = {names[id(p)].split(".")[0]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scales["stem"] < scales["stages"] < scales["heads"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_warmup_cosine_per_step_applies_lr_scale() -> None:
    net = build_net("cednet_next_nano", num_classes=10)
    opt = build_optimizer(net, lr=1e-3, layer_decay=0.5)
    sched = build_scheduler(opt, total_steps=100, steps_per_epoch=10, warmup_epochs=2, min_lr=1e-6)
    top = max(opt.param_groups, key=lambda g: g["lr_scale"])
    low = min(opt.param_groups, key=lambda g: g["lr_scale"])
    assert top["lr"] == 0.0  # warmup starts at 0
    sched.step_update(10)
    assert top["lr"] == pytest.approx(0.5e-3)  # half way through a 20-step warmup
    sched.step_update(20)
    assert top["lr"] == pytest.approx(1e-3)
    assert low["lr"] == pytest.approx(1e-3 * low["lr_scale"])
    sched.step_update(60)  # half way through the 80 cosine steps
    assert top["lr"] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.5)))
    sched.step_update(100)
    assert top["lr"] == pytest.approx(1e-6)


def test_lr_scaling_rule() -> None:
    assert scale_lr(4e-3, 4096, 1024) == pytest.approx(1e-3)
    assert resolve_lr(None, 4e-3, 4096, 128 * 8 * 4) == pytest.approx(4e-3)
    assert resolve_lr(2e-3, 4e-3, 4096, 64) == 2e-3
    with pytest.raises(ValueError, match="either `lr` or both"):
        resolve_lr(None, None, 4096, 64)


def test_ema_is_frozen_updated_and_evaluated() -> None:
    module = ClassificationModule(net=NANO, ema={"decay": 0.5})
    assert module.ema is not None
    assert not any(p.requires_grad for p in module.ema.parameters())
    before = [p.clone() for p in module.ema.module.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.ema.update(module.net, step=5)
    after = list(module.ema.module.parameters())
    assert all(torch.allclose(a, b + 0.5, atol=1e-6) for a, b in zip(after, before, strict=True))
    assert "acc1_ema" in module.val_metrics and "acc5_ema" in module.val_metrics


@pytest.mark.parametrize("name", ["cednet_next_nano", "revcol_tiny"])
def test_deep_supervision_checkpoint_loads_into_a_module_without_stage_heads(name) -> None:
    """A checkpoint trained with the stage heads (and EMA) evaluates with deep_supervision=false: the training-only
    heads are dropped; everything else must still match (strict load)."""
    net = {"name": name, "num_classes": 10}
    if name.startswith("revcol"):
        net["aux_heads"] = True
    trained = ClassificationModule(net=net, deep_supervision=True, ema={"decay": 0.5})
    plain_net = {**net, "aux_heads": False} if name.startswith("revcol") else net
    module = ClassificationModule(net=plain_net, deep_supervision=False, ema={"decay": 0.5})
    checkpoint = {"state_dict": trained.state_dict()}
    extra = set(checkpoint["state_dict"]) - set(module.state_dict())
    assert extra and {k.split(".")[0] for k in extra} == {"net", "ema"}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    key = next(k for k in module.state_dict() if k.startswith("net."))
    assert torch.equal(module.state_dict()[key], trained.state_dict()[key])
    # other mismatches still fail the strict load
    broken = {"state_dict": {**trained.state_dict(), "net.not_a_layer.weight": torch.zeros(1)}}
    module.on_load_checkpoint(broken)
    with pytest.raises(RuntimeError, match="not_a_layer"):
        module.load_state_dict(broken["state_dict"], strict=True)


def test_channels_last() -> None:
    module = ClassificationModule(net=NANO, channels_last=True)
    assert module.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _batch()
    assert torch.isfinite(module.training_step((x, y), 0))


def test_model_summary_flops_are_the_models_count() -> None:
    """Lightning's summary runs `example_input_array` (the data's image size, else the model's): true FLOPs."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from cednet_pl.models.complexity import count_macs

    module = ClassificationModule(net={"name": "cednet_next_nano", "num_classes": 10}, ema=None)
    module.setup("fit")  # no trainer: the model's default input size
    assert tuple(module.example_input_array.shape) == (1, 3, 224, 224)
    assert ModelSummary(module).total_flops == 2 * count_macs(module.net, (1, 3, 224, 224))


# ---------------------------------------------------------------------- RevCol intermediate supervision
REVCOL = {"name": "revcol_tiny", "num_classes": 10, "save_memory": True}


def test_revcol_compound_loss_matches_the_official_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, generator=gen) for _ in range(4)]
    images = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3)]
    image, y = torch.rand(2, 3, 8, 8, generator=gen), torch.tensor([1, 3])
    total, terms = revcol_compound_loss(logits, images, image, y, nn.CrossEntropyLoss())
    ce, bce = nn.functional.cross_entropy, nn.functional.binary_cross_entropy_with_logits
    target = image.clamp(0.01, 0.99)
    expected = [
        bce(images[i], target) * (1 - i / 3) * 3.0 + ce(logits[i], y) * (i + 1) / 4 * 0.7 for i in range(3)
    ]
    expected.append(ce(logits[3], y))
    torch.testing.assert_close(torch.stack(terms), torch.stack(expected))
    torch.testing.assert_close(total, sum(expected))
    with pytest.raises(ValueError, match="4 logits need 3 images"):
        revcol_compound_loss(logits, images[:2], image, y, nn.CrossEntropyLoss())


def test_revcol_aux_loss_trains_and_logs_every_classifier() -> None:
    torch.manual_seed(0)
    module = ClassificationModule(net=REVCOL, revcol_aux_loss={"image_weight": 3.0}, label_smoothing=0.0)
    assert module.hparams["net"]["aux_heads"] is True and module.net.aux_heads
    assert {f"acc1_stage{i}" for i in range(4)} <= set(module.train_metrics)
    x, y = _batch(4, 32)
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        loss = module.training_step((x, y), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.9, losses
    # the reconstruction target is the input de-normalised with the ImageNet statistics (the defaults)
    assert module._img_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert module._img_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_revcol_aux_loss_composes_with_mixup_and_validates() -> None:
    module = ClassificationModule(
        net=REVCOL, revcol_aux_loss=True, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0}
    )
    x, y = _batch(4, 32)
    assert torch.isfinite(module.training_step((x, y), 0))
    module.eval()
    logits = module.stage_logits(x)
    assert len(logits) == 4
    torch.testing.assert_close(logits[-1], module.net(x))


def test_revcol_aux_loss_needs_a_revcol_net() -> None:
    with pytest.raises(ValueError, match="revcol_aux_loss needs a RevCol net with aux_heads=True"):
        ClassificationModule(net=NANO, revcol_aux_loss=True)
    with pytest.raises(ValueError, match="unknown keys"):
        ClassificationModule(net=REVCOL, revcol_aux_loss={"fcoe": 3.0})
