"""VisualBackProp (Bojarski et al. 2016) against a float64 hand computation with explicit window loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import ConvscopeError
from convscope.methods.visual_backprop import visual_backprop, visual_backprop_steps

from .helpers import assert_untouched, snapshot


def _hand_up(m: torch.Tensor, size: tuple[int, int], k: int, s: int, p: int) -> torch.Tensor:
    """Deconvolution of ones by its definition: input pixel i sums the deeper values o whose window
    [o*s - p, o*s - p + k - 1] covers it (one image, h x w -> size)."""
    out = torch.zeros(size, dtype=torch.float64)
    for i in range(size[0]):
        for j in range(size[1]):
            for a in range(m.shape[0]):
                for b in range(m.shape[1]):
                    if a * s - p <= i <= a * s - p + k - 1 and b * s - p <= j <= b * s - p + k - 1:
                        out[i, j] += m[a, b]
    return out


def _normalize(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min())


def _toy(pool: bool) -> nn.Sequential:
    torch.manual_seed(0)
    if pool:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                            nn.ReLU())
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                            nn.ReLU())
    for m in net:
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.bias, 0.0, 0.3)  # keep most units alive so the product is not all zero
    return net.double()


def test_two_layers_equal_hand_computation_float64():
    net = _toy(pool=False)
    x = torch.rand(2, 2, 12, 12, dtype=torch.float64)
    got = visual_backprop(net, x)
    assert got.shape == (2, 1, 12, 12) and got.dtype == torch.float64
    for n in range(2):
        a1 = torch.relu(net[0](x[n:n + 1]))            # 3 x 6 x 6
        a2 = torch.relu(net[2](a1))                    # 4 x 6 x 6
        m = _hand_up(a2[0].mean(0), (6, 6), 3, 1, 1) * a1[0].mean(0)   # conv2: k3 s1 p1
        m = _hand_up(m, (12, 12), 3, 2, 1)             # conv1: k3 s2 p1
        torch.testing.assert_close(got[n, 0], _normalize(m), rtol=1e-12, atol=1e-12)


def test_pool_and_conv_between_layers_compose_into_one_deconvolution():
    net = _toy(pool=True)
    x = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    _, steps = visual_backprop_steps(net, x)
    # maxpool (2, s2, p0) then conv (3, s1, p1): K = 2 + 2*2 = 6, S = 2, P = 0 + 1*2 = 2
    assert (steps[0].kernel, steps[0].stride, steps[0].padding) == ((6, 6), (2, 2), (2, 2))
    assert steps[0].modules == ("2", "3")
    a1 = torch.relu(net[0](x))
    a2 = torch.relu(net[3](net[2](a1)))
    m = _hand_up(a2[0].mean(0), (16, 16), 6, 2, 2) * a1[0].mean(0)
    m = _hand_up(m, (16, 16), 3, 1, 1)
    torch.testing.assert_close(visual_backprop(net, x)[0, 0], _normalize(m), rtol=1e-12, atol=1e-12)


class Functional(nn.Module):
    """Pooling outside modules: an integer ratio (kernel = stride = 2) and a non-integer one (bilinear)."""

    def __init__(self, adaptive: bool) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(2, 2, 1), nn.ReLU()
        self.adaptive = adaptive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(x))
        a = F.adaptive_avg_pool2d(a, 5) if self.adaptive else F.max_pool2d(a, 2)
        return self.relu2(self.conv2(a))


def test_fallbacks_integer_ratio_then_bilinear():
    x = torch.rand(1, 1, 16, 16)
    _, steps = visual_backprop_steps(Functional(adaptive=False), x)
    assert (steps[0].kernel, steps[0].stride, steps[0].padding, steps[0].modules) == ((2, 2), (2, 2), (0, 0), ())
    assert not steps[0].bilinear
    _, steps = visual_backprop_steps(Functional(adaptive=True), x)
    assert steps[0].bilinear and steps[0].size == (16, 16)
    out = visual_backprop(Functional(adaptive=True), x)
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()


def test_batch_equals_single_images_and_layers_choice():
    net = _toy(pool=True).float()
    x = torch.rand(3, 2, 16, 16)
    batch = visual_backprop(net, x)
    for n in range(3):
        torch.testing.assert_close(batch[n], visual_backprop(net, x[n:n + 1])[0])
    assert float(batch.amin()) == 0.0 and float(batch.amax()) == 1.0
    only_deep = visual_backprop(net, x, layers=["4"])  # one layer: its map deconvolved through both convs + pool
    assert only_deep.shape == (3, 1, 16, 16)
    assert not torch.allclose(only_deep, batch)


def test_bad_input_is_one_line_error_and_model_untouched():
    net = _toy(pool=True).float()
    x = torch.rand(1, 2, 16, 16)
    net[1].inplace = True
    before = snapshot(net)
    cases = [lambda: visual_backprop(net, x[0]), lambda: visual_backprop(net, x, layers=["nope"]),
             lambda: visual_backprop(nn.Sequential(nn.Flatten(), nn.Linear(512, 2)), x),
             lambda: visual_backprop(net, x[:, :1])]
    for call in cases:
        with pytest.raises(ConvscopeError) as e:
            call()
        assert "\n" not in str(e.value)
        assert_untouched(net, before)
    up = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 1),
                       nn.ReLU())
    with pytest.raises(ConvscopeError, match="shrink with depth"):
        visual_backprop(up, x)
    with pytest.raises(ConvscopeError, match="feature maps"):
        visual_backprop(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten(), nn.ReLU()), x, layers=["2"])
    visual_backprop(net, x)
    assert_untouched(net, before)
