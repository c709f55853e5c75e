"""Receptive-field boxes from translation equivariance equal the per-location gradient boxes at every location (or
the check refuses them); the top-k pictures share each image's load and forward pass and come out unchanged."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.applications.deconv import ImageSet, tensor_images
from convscope.atlas.builder import Context, RenderTop, WorkerSpec
from convscope.methods.deconvnet import deconvnet_rows
from convscope.methods.topk import TopKPatches, box_cache, render_patches

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """Batch norm, ReLU, a stride-2 convolution and a residual sum: no analytic chain."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 5, stride=2, padding=2)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.c4 = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        h = torch.relu(h + self.c3(h))
        return torch.relu(self.c4(h))


class Flipped(Residual):
    """The map mirrored left-right: boxes move against the location, which the equivariance check must refuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        h = torch.relu(h + self.c3(h))
        return torch.relu(self.c4(h.flip(-1)))


def _toy(cls: type[Residual] = Residual) -> Residual:
    torch.manual_seed(0)
    net = cls()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _every_location(net: nn.Module, layer: str, size: tuple[int, int]) -> list[list[int]]:
    h, w = cs.layer_features(net, torch.zeros(1, 3, *size), layer)[layer].shape[-2:]
    return [[y, x] for y in range(h) for x in range(w)]


def _passes(net: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []
    return rows, net.register_forward_pre_hook(lambda m, i: rows.append(len(i[0])))


@pytest.mark.parametrize(("layer", "size"), [("c2", (32, 32)), ("c3", (29, 37)), ("c4", (29, 37))])
def test_shifted_boxes_equal_gradient_boxes_at_every_location_of_a_residual_toy(layer, size):
    net = _toy()
    locs = _every_location(net, layer, size)
    ref = cs.receptive_fields(net, layer, locs, size, method="gradient")  # one gradient row per location
    fresh = copy.deepcopy(net)
    rows, hook = _passes(fresh)
    try:
        got = cs.receptive_fields(fresh, layer, locs, size)  # "auto": no chain here, so the shift
    finally:
        hook.remove()
    assert box_cache(fresh, layer, size, torch.float32, torch.device("cpu")).shifted is True
    assert torch.equal(got, ref)
    # a handful of gradient rows (<= 11 locations x 4 images) instead of 4 per location
    assert sum(rows) <= 2 + 11 * 4 < 4 * len(locs) or len(locs) <= 11
    # the boxes really move: c2 (stride 2, 5 x 5 over c1's 3 x 3) sees rows 2y - 3 .. 2y + 3, clipped
    if layer == "c2":
        y, x = 5, 6
        assert got[locs.index([y, x])].tolist() == [2 * y - 3, 2 * x - 3, 2 * y + 4, 2 * x + 4]


def test_the_check_refuses_a_mirrored_map_and_the_boxes_come_location_by_location():
    net = _toy(Flipped)
    size = (32, 32)
    locs = _every_location(net, "c4", size)
    ref = cs.receptive_fields(net, "c4", locs, size, method="gradient")
    fresh = copy.deepcopy(net)
    got = cs.receptive_fields(fresh, "c4", locs, size)
    assert box_cache(fresh, "c4", size, torch.float32, torch.device("cpu")).shifted is False
    assert torch.equal(got, ref)
    assert ref[0, 1] > ref[7, 1]  # (0, 0) sees the right edge of the image: the mirrored map


@pytest.mark.parametrize("layer", ["blocks.3", "blocks.5"])
def test_shifted_boxes_equal_gradient_boxes_at_every_location_of_lite0(lite0, layer):
    size = (64, 64)
    net = copy.deepcopy(lite0)  # its own box cache
    locs = _every_location(net, layer, size)
    ref = cs.receptive_fields(net, layer, locs, size, method="gradient")
    fresh = copy.deepcopy(lite0)
    got = cs.receptive_fields(fresh, layer, locs, size)
    assert box_cache(fresh, layer, size, torch.float32, torch.device("cpu")).shifted is True
    assert torch.equal(got, ref)


def test_deconvnet_rows_equal_one_image_per_row(lite0):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    imgs = torch.tensor([2, 0, 2, 2, 1, 0])
    units = torch.tensor([5, 3, 5, 7, 1, 0])  # a repeated (image, unit) row too
    shared = deconvnet_rows(lite0, x, "blocks.3", imgs, units, batch_size=2)
    alone = cs.deconvnet(lite0, x[imgs], "blocks.3", units[:, None], batch_size=2)[:, 0]  # a forward per row
    scale = float(alone.abs().amax())
    assert scale > 0
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6 * scale)
    assert torch.equal(shared[0], shared[2])


def test_top_k_pictures_and_lists_unchanged_with_each_image_loaded_once():
    """The atlas's top-k task against the way it was computed before: every row its own image load and forward
    pass, boxes location by location."""
    net = _toy()
    torch.manual_seed(2)
    x = torch.randn(5, 3, 32, 32)
    plain = tensor_images(x, net)
    loaded: list[int] = []
    data = ImageSet(plain.names, lambda ids: (loaded.extend(ids), plain.load(ids))[1], plain.source)
    result = cs.top_k_activations(net, x, "c3", k=4)["c3"]
    units = (0, 2, 3, 5)
    out = RenderTop("c3", units, result, "percentile", 8).run(Context(copy.deepcopy(net), WorkerSpec(b""), data))
    assert sorted(loaded) == sorted(set(result.image_ids[list(units)].flatten().tolist()))

    ids = result.image_ids[list(units)].reshape(-1)
    rows = x[ids]
    boxes = cs.receptive_fields(net, "c3", result.locations[list(units)].reshape(-1, 2), (32, 32),
                                method="gradient").view(len(units), 4, 4)
    proj = cs.deconvnet(net, rows, "c3", torch.tensor(units).repeat_interleave(4)[:, None], mode="max")[:, 0]
    pixels = rows.clamp(0, 1)  # no preprocess: the identity denormalizer
    for j, u in enumerate(units):
        crop = [tuple(int(v) for v in boxes[j, i]) for i in range(4)]
        before = TopKPatches([u], boxes[j:j + 1],
                             [[pixels[4 * j + i, :, t:b, le:r] for i, (t, le, b, r) in enumerate(crop)]],
                             [[proj[4 * j + i, :, t:b, le:r] for i, (t, le, b, r) in enumerate(crop)]])
        want = np.asarray(render_patches(before, "percentile"))
        got = np.asarray(Image.open(io.BytesIO(out[u]["png"])))
        assert got.shape == want.shape and np.array_equal(got, want)
        assert [e["box"] for e in out[u]["top"]] == [list(c) for c in crop]
        assert [e["image"] for e in out[u]["top"]] == result.image_ids[u].tolist()
        assert out[u]["max_activation"] == float(result.values[u, 0])
