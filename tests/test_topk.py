"""Top-k activations against brute force, receptive fields by hand, dead units, first-layer filters, rendering."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs

from .helpers import assert_untouched, hook_count, snapshot


class SmallNet(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> ReLU -> global pool -> linear."""

    def __init__(self, dead_unit: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(5, 4)
        if dead_unit is not None:
            with torch.no_grad():
                self.conv2.bias.fill_(5.0)  # every other unit clearly alive
                self.conv2.bias[dead_unit] = -1e6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x))))).amax((2, 3)))


LAYERS = ["relu1", "conv2", "fc"]


def _brute_force(net: nn.Module, x: torch.Tensor, layer: str, k: int):
    """Every activation of the whole dataset at once; per unit the k images with the largest spatial maximum."""
    with torch.no_grad(), cs.probe(net, layer) as p:
        net(x)
    a = p.activations[layer]
    flat = a.flatten(2) if a.dim() == 4 else a[:, :, None]
    vals, pos = flat.max(2)  # N x C
    width = a.shape[-1] if a.dim() == 4 else 1
    top = vals.T.topk(k, dim=1)  # C x k
    p_top = pos.T.gather(1, top.indices)
    return top.values, top.indices, torch.stack([p_top // width, p_top % width], -1)


def test_top_k_equals_brute_force_across_batches():
    net = SmallNet()
    x = torch.randn(13, 3, 12, 12)
    before = snapshot(net)
    got = cs.top_k_activations(net, x, LAYERS, k=4, batch_size=5)  # batches of 5, 5, 3
    assert_untouched(net, before)
    for layer in LAYERS:
        values, ids, locs = _brute_force(net, x, layer, 4)
        r = got[layer]
        assert r.images_seen == 13 and r.values.shape == (values.shape[0], 4)
        torch.testing.assert_close(r.values, values)  # batch size changes float rounding only
        assert torch.equal(r.image_ids, ids), layer
        assert torch.equal(r.locations, locs), layer
    assert torch.equal(got["fc"].locations, torch.zeros(4, 4, 2, dtype=torch.long))


def test_streams_of_batches_and_ids():
    net = SmallNet()
    x = torch.randn(9, 3, 12, 12)
    ref = cs.top_k_activations(net, x, "conv2", k=3, batch_size=4)["conv2"]
    plain = cs.top_k_activations(net, (x[i:i + 2] for i in range(0, 9, 2)), "conv2", k=3)["conv2"]
    named = cs.top_k_activations(net, [(x[:5], list(range(100, 105))), (x[5:], torch.arange(105, 109))],
                                 "conv2", k=3)["conv2"]
    singles = cs.top_k_activations(net, list(x), "conv2", k=3)["conv2"]  # C x H x W items
    for r in (plain, singles):
        assert torch.equal(r.image_ids, ref.image_ids) and torch.equal(r.locations, ref.locations)
        torch.testing.assert_close(r.values, ref.values)
    assert torch.equal(named.image_ids, ref.image_ids + 100) and torch.equal(named.locations, ref.locations)
    assert cs.top_k_activations(net, x[:2], "conv2", k=9)["conv2"].values.shape == (5, 2)  # k capped at N


def test_stream_failure_restores_the_model():
    net = SmallNet()
    before = snapshot(net)

    def stream():
        yield torch.randn(2, 3, 12, 12)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        cs.top_k_activations(net, stream(), ["relu1", "fc"])
    assert_untouched(net, before)
    with pytest.raises(cs.ConvscopeError, match="integers"):
        cs.top_k_activations(net, [(torch.randn(2, 3, 12, 12), ["a.jpg", "b.jpg"])], "fc")
    with pytest.raises(cs.ConvscopeError, match="one size"):
        cs.top_k_activations(net, [torch.randn(2, 3, 12, 12), torch.randn(2, 3, 16, 16)], "relu1")
    assert hook_count(net) == 0


def test_dead_units():
    net = SmallNet(dead_unit=3)
    x = torch.rand(6, 3, 12, 12)
    dead = cs.dead_units(net, x, ["conv2", "relu2", "relu1"], batch_size=4)
    assert dead["conv2"].units.tolist() == [3] and dead["relu2"].units.tolist() == [3]
    assert dead["relu1"].units.tolist() == [] and dead["relu2"].fraction == pytest.approx(1 / 5)
    assert dead["conv2"].max_activation[3] < -1e5 and dead["relu2"].max_activation[3] == 0
    # the same pass as top-k; a tolerance counts barely-active units as dead
    top = cs.top_k_activations(net, x, "relu2", k=2)["relu2"]
    assert torch.equal(top.dead_units().units, dead["relu2"].units)
    weakest = float(top.values[:, 0].min())
    assert top.dead_units(tol=weakest + 1e-6).units.numel() >= 1


def test_receptive_field_of_demo_net_by_hand(demo):
    # conv1: kernel 7, stride 2, padding 3. Output (y, x) sees input rows 2y - 3 .. 2y + 3, clipped to the image
    assert cs.receptive_field(demo, "features.conv1", (0, 0), (112, 112)) == (0, 0, 4, 4)
    assert cs.receptive_field(demo, "features.conv1", (5, 7), (112, 112)) == (7, 11, 14, 18)
    # pool1 (3, stride 2, pad 1) over conv1: pool (y) -> conv1 rows 2y - 1 .. 2y + 1 -> input 4y - 5 .. 4y + 5
    assert cs.receptive_field(demo, "features.pool1", (4, 4), (112, 112)) == (11, 11, 22, 22)
    assert cs.receptive_field(demo, "classifier.fc6", (0, 0), (112, 112)) == (0, 0, 112, 112)


@pytest.mark.parametrize("layer", ["features.pool1", "features.conv2", "features.relu5"])
def test_analytic_receptive_field_equals_gradient_support(demo, layer):
    locs = [(0, 0), (3, 2), (6, 6)]
    a = cs.receptive_fields(demo, layer, locs, (112, 112), method="analytic")
    g = cs.receptive_fields(demo, layer, locs, (112, 112), method="gradient")
    assert torch.equal(a, g)


def test_receptive_field_errors(demo, lite0):
    with pytest.raises(cs.ConvscopeError, match="0 <= y < 56"):
        cs.receptive_field(demo, "features.conv1", (56, 0), (112, 112))
    with pytest.raises(cs.ConvscopeError, match="method='gradient'"):
        cs.receptive_field(lite0, "blocks.1", (0, 0), (224, 224), method="analytic")


def test_top_k_patches_and_render(demo):
    x = torch.rand(6, 3, 112, 112)
    before = snapshot(demo)
    layer = "features.relu2"
    top = cs.top_k_activations(demo, x, layer, k=2)[layer]
    units = (top.values[:, -1] > 0).nonzero().flatten()[:2].tolist()  # active in both images
    found = cs.top_k_patches(demo, x, top, units=units)
    for j, u in enumerate(units):
        for r in range(2):
            t, left, b, right = found.boxes[j, r].tolist()
            i = int(top.image_ids[u, r])
            pixels = demo.preprocess.denormalize(x[i]).clamp(0, 1)  # the model's own preprocess, inverted
            torch.testing.assert_close(found.patches[j][r], pixels[:, t:b, left:right])
            proj = cs.deconvnet(demo, x[i:i + 1], layer, u, mode="max")[0, 0]
            crop = found.projections[j][r]
            torch.testing.assert_close(crop, proj[:, t:b, left:right])
            assert crop.abs().sum() > 0 and crop.abs().sum() == pytest.approx(float(proj.abs().sum()))  # all inside
    img = cs.render_top_k(demo, x, top, units=units)
    plain = cs.render_top_k(demo, x, top, units=units, projections=False)
    assert_untouched(demo, before)
    assert isinstance(img, Image.Image) and img.height == plain.height and img.width > plain.width
    with pytest.raises(cs.ConvscopeError, match="units in 0..127"):
        cs.render_top_k(demo, x, top, units=[128])


def test_first_layer_filters(demo):
    img = cs.first_layer_filters(demo)
    ref = cs.filter_grid(demo.features.conv1.weight)
    assert img.size == ref.size and img.tobytes() == ref.tobytes()
    with pytest.raises(cs.ConvscopeError, match="convolution"):
        cs.first_layer_filters(demo, "features.relu1")


@pytest.mark.parametrize("channels_last", [False, True])
def test_running_top_k_update_skips_locations_that_cannot_enter(channels_last):
    """update() looks up locations only for maps whose maximum can still enter; with ties (ReLU zeros, rounded
    values) and many small batches it must keep exactly what one merge of every candidate keeps."""
    from convscope.methods.topk import RunningTopK

    g = torch.Generator().manual_seed(3)
    a = (torch.randn(40, 6, 5, 7, generator=g) * 2).round().relu()  # many equal maxima, some all-zero maps
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    ids = torch.arange(139, 99, -1)  # later images have smaller ids, so they win ties
    run = RunningTopK("x", 5)
    for s in range(0, 40, 3):
        run.update(a[s:s + 3], ids[s:s + 3])
    ref = RunningTopK("x", 5)
    ref.merge(*RunningTopK.candidates("x", a.contiguous()), ids)
    assert torch.equal(run.values, ref.values) and torch.equal(run.ids, ref.ids)
    assert torch.equal(run.locs, ref.locs)
