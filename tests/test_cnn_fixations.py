"""CNN fixations (Mopuri et al. 2017) on hand-built nets whose fixations are known in advance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.errors import ConvscopeError
from convscope.methods.cnn_fixations import cnn_fixations

from .helpers import assert_untouched, snapshot


def _centre(conv: nn.Conv2d, out_ch: int, value: float, at: tuple[int, int] = (1, 1)) -> None:
    conv.weight.data[out_ch, :, at[0], at[1]] = value


def chain_net() -> nn.Sequential:
    """conv (identity map, negated map) -> ReLU -> max pool 2 -> flatten -> fc (three pooled cells) -> ReLU -> fc."""
    conv = nn.Conv2d(1, 2, 3, padding=1)
    conv.weight.data.zero_()
    conv.bias.data.zero_()
    _centre(conv, 0, 1.0)
    _centre(conv, 1, -1.0)
    fc1 = nn.Linear(2 * 4 * 4, 3)
    fc1.weight.data.zero_()
    fc1.bias.data.zero_()
    for unit, (r, c) in enumerate([(0, 0), (3, 3), (3, 0)]):  # pooled channel-0 cells read by the hidden units
        fc1.weight.data[unit, r * 4 + c] = 1.0
    fc2 = nn.Linear(3, 2)
    fc2.weight.data = torch.tensor([[1.0, 1.0, -1.0], [0.0, 0.0, 1.0]])
    fc2.bias.data.zero_()
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(), fc1, nn.ReLU(), nn.Dropout(),
                         fc2)


def _points(t: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(p) for p in t.tolist()}


@pytest.mark.parametrize("rule", ["max", "positive"])
def test_chain_finds_the_hand_predicted_pixels(rule):
    x = torch.zeros(1, 1, 8, 8)
    for r, c in [(1, 1), (6, 6), (6, 1)]:
        x[0, 0, r, c] = 1.0
    x[0, 0, 0, 7] = 0.5  # a bright pixel no hidden unit reads
    res = cnn_fixations(chain_net(), x, target=[[0, 1]], rule=rule)
    # class 0 = h0 + h1 - h2: h0 and h1 contribute positively -> pooled (0,0), (3,3) -> pixels (1,1), (6,6)
    assert _points(res.points[0][0]) == {(1, 1), (6, 6)}
    assert _points(res.points[0][1]) == {(6, 1)}  # class 1 = h2 -> pooled (3,0) -> pixel (6,1)
    assert res.density.shape == (1, 2, 8, 8) and res.targets.tolist() == [[0, 1]]
    assert torch.allclose(res.density.amax(dim=(2, 3)), torch.ones(1, 2))
    assert res.density[0, 0, 1, 1] > res.density[0, 0, 6, 1]


class Residual(nn.Module):
    """s = relu(conv_a x) + relu(conv_b relu(conv_a x)); conv_b doubles its input shifted one column right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.conv_a.weight.data.zero_()
        self.conv_b.weight.data.zero_()
        _centre(self.conv_a, 0, 1.0)
        _centre(self.conv_b, 0, 2.0, at=(1, 0))  # out(y, x) = 2 in(y, x - 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(64, 2, bias=False)  # one hidden unit per read cell (FC on a volume keeps one input each)
        self.fc.weight.data.zero_()
        self.fc.weight.data[0, 1 * 8 + 2] = 1.0  # s(1, 2): only the shifted branch is non-zero there
        self.fc.weight.data[1, 5 * 8 + 5] = 1.0  # s(5, 5): only the skip branch is non-zero there
        self.out = nn.Linear(2, 1, bias=False)
        self.out.weight.data.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.conv_a(x))
        s = a + self.relu(self.conv_b(a))
        return self.out(self.relu(self.fc(torch.flatten(s, 1))))


def test_residual_addition_follows_the_larger_branch():
    x = torch.zeros(2, 1, 8, 8)
    x[:, 0, 1, 1] = x[:, 0, 5, 5] = 1.0
    res = cnn_fixations(Residual(), x, target=0, sigma=0.0)
    for n in range(2):  # s(1,2) -> shifted branch -> a(1,1) -> pixel (1,1); s(5,5) -> skip -> pixel (5,5)
        assert _points(res.points[n][0]) == {(1, 1), (5, 5)}
    assert torch.equal(res.density[0, 0] > 0, x[0, 0] > 0)


def test_demo_net_batch_equals_single_images_and_cap():
    torch.manual_seed(0)
    model = cs.load_model("demo_net")
    x = torch.rand(2, 3, 64, 64)
    res = cnn_fixations(model, x, target=cs.top_k(2))
    assert res.density.shape == (2, 2, 64, 64)
    for n in range(2):
        single = cnn_fixations(model, x[n:n + 1], target=res.targets[n:n + 1])
        for k in range(2):
            assert torch.equal(single.points[0][k], res.points[n][k])
            pts = res.points[n][k]
            assert len(pts) > 0 and pts.min() >= 0 and pts.max() < 64
    capped = cnn_fixations(model, x, rule="positive", max_points=5)
    assert 0 < len(capped.points[0][0]) <= 5 * 3  # at most 5 neurons kept per layer, each pixel has 3 channels


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(x), x], 1).flatten(1))


class Branchy(Concat):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            x = -x
        return self.fc(torch.cat([self.conv(x), x], 1).flatten(1))


def test_unsupported_and_bad_input_are_one_line_errors_model_untouched():
    net = chain_net()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    before = snapshot(net)
    x = torch.rand(1, 1, 8, 8)
    calls = [(lambda: cnn_fixations(net, x[0]), "N x C x H x W"),
             (lambda: cnn_fixations(net, x, target=lambda o: o[:, 0]), "class indices"),
             (lambda: cnn_fixations(net, x, target=10 ** 6), "out of range"),
             (lambda: cnn_fixations(net, x, rule="all"), "rule"),
             (lambda: cnn_fixations(net, x, max_points=0), "max_points"),
             (lambda: cnn_fixations(net, torch.rand(1, 2, 8, 8)), "failed on input")]
    for call, words in calls:
        with pytest.raises(ConvscopeError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
        assert_untouched(net, before)
    with pytest.raises(ConvscopeError, match="'cat'"):
        cnn_fixations(Concat(), torch.rand(1, 1, 4, 4))
    with pytest.raises(ConvscopeError, match="cannot trace Branchy"):
        cnn_fixations(Branchy(), torch.rand(1, 1, 4, 4))
    up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ConvscopeError, match="Upsample"):
        cnn_fixations(up, torch.rand(1, 1, 4, 4))
    net.train()
    before = snapshot(net)
    cnn_fixations(net, x)
    assert_untouched(net, before)


class SamePad(nn.Conv2d):
    """A convolution padding its input itself, TensorFlow "SAME" style (as EfficientNet-Lite's SamePadConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_same_padded_convolution_of_efficientnet_lite_is_unravelled():
    """lite0's stride-2 convolutions pad (0, 1) per axis from the input size; torch.fx cannot trace that forward,
    so every convolution is one traced node and unravelled with the padding it applies. A 3 x 3 stride-2
    SamePadConv2d on 8 x 8 reads rows / cols 2y .. 2y + 2 (zero row / col 8 at the bottom / right): output (3, 3)
    picks the bright pixel (7, 7), the last real one of its window."""
    from convscope.models.efficientnet import SamePadConv2d

    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.fill_(1.0)
    fc = nn.Linear(16, 1, bias=False)
    fc.weight.data.zero_()
    fc.weight.data[0, 3 * 4 + 3] = 1.0  # reads output (3, 3)
    net = nn.Sequential(conv, nn.ReLU6(), nn.Flatten(), fc)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 7, 7], x[0, 0, 6, 6] = 1.0, 0.5
    res = cnn_fixations(net, x, target=0, sigma=0.0)
    assert _points(res.points[0][0]) == {(7, 7)}
    x[0, 0, 7, 7] = 0.2  # now (6, 6) contributes most
    assert _points(cnn_fixations(net, x, target=0).points[0][0]) == {(6, 6)}
    net[0] = SamePad(1, 1, 3, stride=2, bias=False)  # a custom forward: its padding is unknown
    net[0].weight.data.fill_(1.0)
    with pytest.raises(ConvscopeError, match="cannot unravel layer '0' .SamePad.: its zero padding") as e:
        cnn_fixations(net, x, target=0)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_lite0_fixations_inside_the_image(lite0):
    """EfficientNet-Lite0 (TF "SAME" convolutions, residual adds, ReLU6, global pooling) on two bundled photos at
    224 px, two targets each: fixations inside the image, density maps of the image's shape peaking at 1, one
    image alone gives the same points, the model is left as it came (about 5 s)."""
    x = cs.load_images([cs.sample_image("chelsea"), cs.sample_image("rocket")], lite0)
    before = snapshot(lite0)
    res = cnn_fixations(lite0, x, target=cs.top_k(2))
    assert_untouched(lite0, before)
    assert res.density.shape == (2, 2, 224, 224) and res.targets.shape == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(res.targets, lite0(x).topk(2, dim=1).indices)
    for n in range(2):
        for k in range(2):
            pts = res.points[n][k]
            assert len(pts) > 0 and pts.min() >= 0 and pts.max() < 224
            assert float(res.density[n, k].max()) == pytest.approx(1.0)
            assert all(res.density[n, k, r, c] > 0.5 for r, c in pts.tolist())
    single = cnn_fixations(lite0, x[1:], target=res.targets[1:])
    assert all(torch.equal(single.points[0][k], res.points[1][k]) for k in range(2))
