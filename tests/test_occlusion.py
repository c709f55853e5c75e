"""Occlusion sensitivity against a naive Python loop over window positions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.methods.occlusion import window_positions

from .helpers import assert_untouched, snapshot


class Net(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global average pool -> linear (float64)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


def naive(net: Net, x: torch.Tensor, targets: list[list[int]], window: tuple[int, int], stride: tuple[int, int],
          fill: torch.Tensor, layer_out=None):
    """One occluded copy at a time; maps averaged over the windows covering each pixel."""
    n, _, height, width = x.shape
    (wh, ww), (sh, sw) = window, stride
    rows = list(range(0, height - wh + 1, sh))
    cols = list(range(0, width - ww + 1, sw))
    rows += [height - wh] if rows[-1] != height - wh else []
    cols += [width - ww] if cols[-1] != width - ww else []
    k = len(targets[0])
    maps = torch.zeros(n, k, height, width, dtype=x.dtype)
    counts = torch.zeros(height, width, dtype=x.dtype)
    scores = torch.zeros(n, k, len(rows), len(cols), dtype=x.dtype)
    units = torch.zeros(n, len(rows), len(cols), dtype=x.dtype)
    with torch.no_grad():
        clean = net(x)
        unit = [int(layer_out(x[i : i + 1])[0].flatten(1).amax(1).argmax()) for i in range(n)] if layer_out else None
        for a, r in enumerate(rows):
            for b, c in enumerate(cols):
                counts[r : r + wh, c : c + ww] += 1
                for i in range(n):
                    occ = x[i : i + 1].clone()
                    occ[:, :, r : r + wh, c : c + ww] = fill[i : i + 1, :, r : r + wh, c : c + ww]
                    out = net(occ)[0]
                    for j, t in enumerate(targets[i]):
                        scores[i, j, a, b] = out[t]
                        maps[i, j, r : r + wh, c : c + ww] += clean[i, t] - out[t]
                    if layer_out:
                        units[i, a, b] = layer_out(occ)[0, unit[i]].sum()
    return maps / counts, scores, rows, cols, unit, units


def _act1(net: Net):
    return lambda t: net.act1(net.conv1(t))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_equals_naive_loop(x):
    net = Net().eval()
    targets = [[0, 2], [1, 1]]
    maps, scores, rows, cols, unit, units = naive(net, x, targets, (4, 3), (3, 2), torch.full_like(x, 0.5), _act1(net))
    assert rows == [0, 3, 6] and cols == [0, 2, 4, 6]  # 6 + 4 = 10: flush with the bottom edge already; 6 + 3 = 9
    for batch_size in (1, 7, 1000):
        res = cs.occlusion(net, x, targets, window=(4, 3), stride=(3, 2), fill=0.5, batch_size=batch_size,
                           layer="act1")
        assert res.rows == rows and res.cols == cols
        torch.testing.assert_close(res.maps, maps)
        torch.testing.assert_close(res.scores, scores)
        torch.testing.assert_close(res.clean_scores, net(x).gather(1, torch.tensor(targets)).detach())
        assert res.unit.tolist() == unit
        torch.testing.assert_close(res.strongest_unit, units)
        torch.testing.assert_close(res.unit_activation,
                                   torch.stack([_act1(net)(x)[i, u].sum() for i, u in enumerate(unit)]).detach())


def test_last_window_flush_with_the_edge_and_every_pixel_covered(x):
    assert window_positions(10, 4, 4) == [0, 4, 6]
    assert window_positions(8, 8, 3) == [0]
    net = Net()
    res = cs.occlusion(net, x, 0, window=4, stride=4, fill="mean")
    fill = x.mean((2, 3), keepdim=True).expand_as(x)
    maps, scores, rows, cols, _, _ = naive(net, x, [[0], [0]], (4, 4), (4, 4), fill)
    assert res.rows == rows == [0, 4, 6] and res.cols == cols == [0, 4, 5]
    torch.testing.assert_close(res.maps, maps)
    torch.testing.assert_close(res.scores, scores)


def test_fill_grey_goes_through_the_preprocess(x):
    net = Net()
    net.preprocess = cs.Preprocess(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.5))
    grey = ((0.5 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor([0.2, 0.25, 0.5])).double().view(1, 3, 1, 1)
    a = cs.occlusion(net, x, 1, window=5, stride=5, fill=0.5)
    b = cs.occlusion(net, x, 1, window=5, stride=5, fill=grey)
    torch.testing.assert_close(a.maps, b.maps)
    maps, *_ = naive(net, x, [[1], [1]], (5, 5), (5, 5), grey.expand_as(x))
    torch.testing.assert_close(a.maps, maps)


def test_top_class_fixed_on_the_clean_image_and_predicted(x):
    net = Net()
    res = cs.occlusion(net, x, cs.top_class, window=5, stride=5)
    top = net(x).argmax(1)
    assert res.targets.tolist() == top[:, None].tolist()
    ref = cs.occlusion(net, x, top.tolist(), window=5, stride=5)
    torch.testing.assert_close(res.maps, ref.maps)
    assert res.predicted.shape == (2, 2, 2) and res.predicted.dtype == torch.long


def test_callable_scores_on_occluded_copies(x):
    net = Net()
    res = cs.occlusion(net, x, lambda out: out[:, 2] - out[:, 0], window=5, stride=5, fill=0.0)
    a = cs.occlusion(net, x, 2, window=5, stride=5, fill=0.0)
    b = cs.occlusion(net, x, 0, window=5, stride=5, fill=0.0)
    assert res.targets is None
    torch.testing.assert_close(res.maps, a.maps - b.maps)


def test_one_forward_per_chunk_and_model_untouched(x):
    net = Net()
    net.train()
    before = snapshot(net)
    calls = []
    h = net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        res = cs.occlusion(net, x, [[0, 1, 2]] * 2, window=5, stride=5, batch_size=3)
    finally:
        h.remove()
    assert calls == [2, 3, 3, 2], "clean pass, then ceil(2 images x 4 positions / 3) passes for all 3 targets"
    assert res.maps.shape == (2, 3, 10, 9) and res.scores.shape == (2, 3, 2, 2)
    assert_untouched(net, before)


def test_occluding_the_evidence_drops_the_score():
    """A net that sums the top-left quadrant of channel 0: only windows there lower the score."""
    class Quadrant(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t[:, :1, :4, :4].sum((1, 2, 3))[:, None]

    x = torch.ones(1, 3, 8, 8)
    res = cs.occlusion(Quadrant(), x, 0, window=2, stride=2, fill=0.0)
    m = res.maps[0, 0]
    assert (m[:4, :4] == 4).all() and (m[4:] == 0).all() and (m[:, 4:] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 11}, "larger than the image"),
    ({"window": 0}, "window"),
    ({"stride": (2,)}, "stride"),
    ({"fill": "grey"}, "fill"),
    ({"fill": torch.zeros(2, 3)}, "broadcast"),
    ({"batch_size": 0}, "batch_size"),
    ({"layer": "conv9"}, "conv1"),
    ({"target": 3}, "out of range"),
])
def test_errors_name_the_fix(x, kwargs, match):
    kwargs = {"target": 0, "window": 4, **kwargs}
    with pytest.raises(cs.ConvscopeError, match=match):
        cs.occlusion(Net(), x, **kwargs)
