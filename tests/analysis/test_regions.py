"""Input gradients (finite differences, batching) and area-vs-threshold curves."""

import pytest
import torch
from torch import nn

from cednet_pl.analysis.regions import (
    area_curves,
    area_fractions,
    default_thresholds,
    input_gradients,
    input_gradients_raw,
    normalize_maps,
    read_curve,
    reduce_channels,
    region_curve,
    write_curve,
)


class TinyDetectorLoss(nn.Module):
    """Per-image loss of a tiny conv net with a non-linear, size-independent pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, images, targets):
        losses = []
        for img, tgt in zip(images, targets, strict=True):
            feat = torch.tanh(self.conv(img[None]))
            logit = self.head(feat).mean()
            losses.append((logit - tgt) ** 2 + feat.square().mean())
        return torch.stack(losses)


def test_input_gradient_matches_finite_differences():
    model = TinyDetectorLoss().double().eval()
    img = torch.rand(3, 5, 6, dtype=torch.float64)
    (g,) = input_gradients_raw(model, [img], [0.3])
    eps = 1e-6
    for c, y, x in [(0, 0, 0), (1, 2, 3), (2, 4, 5), (0, 3, 1)]:
        plus, minus = img.clone(), img.clone()
        plus[c, y, x] += eps
        minus[c, y, x] -= eps
        with torch.no_grad():
            fd = (model([plus], [0.3]).sum() - model([minus], [0.3]).sum()) / (2 * eps)
        assert g[c, y, x].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)
    assert g.shape == img.shape
    assert all(p.grad is None for p in model.parameters())


def test_batched_gradients_equal_single_and_keep_sizes():
    model = TinyDetectorLoss().double().eval()
    imgs = [torch.rand(3, h, w, dtype=torch.float64) for h, w in [(5, 6), (7, 4), (5, 6), (3, 3)]]
    targets = [0.1, 0.2, 0.3, 0.4]
    batched = input_gradients(model, imgs, targets, batch_size=3, channel_reduce="l2")
    single = [
        input_gradients(model, [im], [t], channel_reduce="l2")[0] for im, t in zip(imgs, targets, strict=True)
    ]
    for b, s, im in zip(batched, single, imgs, strict=True):
        assert b.shape == im.shape[1:]
        torch.testing.assert_close(b, s)


def test_loss_fn_returning_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="scalar or one loss per image"):
        input_gradients(lambda ims, t: torch.stack([im.sum() for im in ims])[:1], [torch.rand(3, 2, 2)] * 2)


def test_reduce_channels():
    g = torch.tensor([[[1.0]], [[-3.0]], [[2.0]]])
    assert reduce_channels(g, "max").item() == 3.0
    assert reduce_channels(g, "sum").item() == 6.0
    assert reduce_channels(g, "l2").item() == pytest.approx(14**0.5)
    with pytest.raises(ValueError, match="channel_reduce"):
        reduce_channels(g, "mean")


def test_area_fractions_hand_computed_and_extremes():
    m = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    thr = torch.tensor([-0.1, 0.0, 0.2, 0.25, 0.5, 0.99, 1.0, 2.0], dtype=torch.float64)
    assert area_fractions(m, thr).tolist() == [1.0, 0.75, 0.75, 0.5, 0.25, 0.25, 0.0, 0.0]


def test_area_fractions_equal_the_definition_on_random_maps_with_ties():
    """The bucketized count is exactly the fraction of pixels strictly above each threshold."""
    torch.manual_seed(0)
    thr = default_thresholds(101)
    for gmap in (torch.rand(64, 48).pow(4), (torch.rand(33, 31) * 20).round() / 20, torch.zeros(5, 5)):
        brute = (gmap.flatten().double()[None] > thr[:, None]).double().mean(1)
        assert torch.equal(area_fractions(gmap, thr), brute)
        # thresholds in any order (and repeated) give the same fraction per threshold
        perm = torch.cat([torch.randperm(thr.numel()), torch.tensor([7, 7])])
        assert torch.equal(area_fractions(gmap, thr[perm]), brute[perm])


def test_area_curves_monotone_with_extremes():
    torch.manual_seed(0)
    maps = [torch.rand(17, 23).pow(3) * s for s in (0.001, 5.0, 300.0)]
    thr = default_thresholds(201)
    for mode in ("image", "global"):
        curves = area_curves(maps, thr, normalize=mode)
        assert curves.shape == (3, 201)
        assert (curves[:, 1:] <= curves[:, :-1]).all()
    curves = area_curves(maps, thr, normalize="image")
    assert torch.all(curves[:, -1] == 0.0)  # t = 1 = each map's max
    below = area_curves(maps, torch.tensor([-1e-9], dtype=torch.float64), normalize="image")
    assert torch.all(below == 1.0)  # t below every map's min
    normed = normalize_maps(maps, "image")
    assert all(n.max().item() == 1.0 for n in normed)
    glob = normalize_maps(maps, "global")
    assert max(n.max().item() for n in glob) == 1.0 and glob[0].max().item() < 1e-4


def test_zero_map_and_bad_normalize():
    assert area_curves([torch.zeros(3, 3)], torch.tensor([0.0, 0.5])).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="normalize"):
        normalize_maps([torch.ones(2, 2)], "max")


def test_region_curve_is_mean_and_round_trips(tmp_path):
    maps = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.5]])]
    c = region_curve("m", maps, [10, 20], thresholds=torch.tensor([0.0, 0.6, 1.0]))
    assert c.area_fraction == pytest.approx([(0.5 + 1.0) / 2, (0.5 + 0.75) / 2, 0.0])
    assert c.auc == pytest.approx(0.6 * (0.75 + 0.625) / 2 + 0.4 * 0.625 / 2)
    back = read_curve(write_curve(c, tmp_path / "c.json"))
    assert back == c
