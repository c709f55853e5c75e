"""Guided backpropagation, the DeconvNet rule and guided Grad-CAM: by hand, against a slow reference, on lite0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs

from .helpers import assert_untouched, snapshot


class FunctionalReLU(nn.Module):
    """A functional in-place relu_ (no ReLU module to hook: the rule must still apply)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone().relu_()


class HandNet(nn.Module):
    """3x3 image -> conv 2x2 (2 filters) -> ReLU -> conv 2x2 (2 outputs = 2 classes) -> flatten."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, bias=False)
        self.act = act
        self.conv2 = nn.Conv2d(2, 2, 2, bias=False)
        w2 = torch.tensor([[[1.0, -1.0], [2.0, 1.0]], [[-1.0, 3.0], [1.0, -2.0]]])
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]], [[[0.0, 1.0], [-1.0, 0.0]]]]))
            self.conv2.weight.copy_(torch.stack([w2, -w2]))  # class 1 = -class 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x))).flatten(1)


# x = [[1, 2, 0], [0, 3, -1], [2, 1, -2]]
# hidden h_A = x_ij - x_{i+1,j+1} = [[-2, 3], [-1, 5]]; h_B = x_{i,j+1} - x_{i+1,j} = [[2, -3], [1, -2]]
# forward masks: A [[0, 1], [0, 1]], B [[1, 0], [1, 0]]; the signal arriving at the hidden layer is W2 (class 0)
# filter A at (i, j) sends g to (i, j) and -g to (i+1, j+1); filter B sends g to (i, j+1) and -g to (i+1, j)
X = torch.tensor([[[[1.0, 2.0, 0.0], [0.0, 3.0, -1.0], [2.0, 1.0, -2.0]]]])
EXPECTED = {
    # class 0. plain: W2 * mask -> A (0,1): -1, (1,1): 1; B (0,0): -1, (1,0): 1
    "gradient": [[[0.0, -2.0, 0.0], [1.0, 2.0, 1.0], [-1.0, 0.0, -1.0]]],
    # guided: max(W2, 0) * mask -> A (1,1): 1; B (1,0): 1
    "guided": [[[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, -1.0]]],
    # deconvnet: max(W2, 0) -> A [[1, 0], [2, 1]], B [[0, 3], [1, 0]], no forward mask
    "deconvnet": [[[1.0, 0.0, 3.0], [2.0, -2.0, 0.0], [-1.0, -2.0, -1.0]]],
}
EXPECTED_CLASS1_GUIDED = [[[0.0, 2.0, 0.0], [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]  # max(-W2, 0) * mask


ACTS = {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "relu6": nn.ReLU6,
        "functional_relu_": FunctionalReLU}
METHODS = {"gradient": cs.gradient, "guided": cs.guided_backprop, "deconvnet": cs.deconvnet_rule}


@pytest.mark.parametrize("act, rule", [pytest.param(a, r, id=f"{a}-{r}") for a in ACTS for r in METHODS])
def test_two_layer_net_by_hand(act, rule):
    net = HandNet(ACTS[act]())
    got = METHODS[rule](net, X, target=[[0, 1]])  # two classes, one call
    assert got.shape == (1, 2, 1, 3, 3)
    torch.testing.assert_close(got[0, 0], torch.tensor(EXPECTED[rule]), msg=f"{rule} with {act}")
    if rule == "guided":
        torch.testing.assert_close(got[0, 1], torch.tensor(EXPECTED_CLASS1_GUIDED))
    if rule == "gradient":
        torch.testing.assert_close(got[0, 1], -torch.tensor(EXPECTED["gradient"]))


class SmallCNN(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> ReLU -> linear (float64)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(6 * 4 * 4, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x))))).flatten(1))


def reference_backprop(net: SmallCNN, x: torch.Tensor, cls: int, rule: str | None) -> torch.Tensor:
    """Explicit per-layer backward with masks and max-pool switches; no autograd."""
    with torch.no_grad():
        f1 = net.conv1(x)
        p, switches = F.max_pool2d(f1.clamp(min=0), 2, return_indices=True)
        f2 = net.conv2(p)

        def relu_back(r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            if rule is None:
                return r * (f > 0)
            if rule == "deconvnet":
                return r.clamp(min=0)
            return r.clamp(min=0) * (f > 0)  # guided

        r = net.fc.weight[cls].expand(x.shape[0], -1).reshape(f2.shape)  # d score / d relu2 output
        r = relu_back(r, f2)
        r = F.conv_transpose2d(r, net.conv2.weight, padding=1)  # back through conv2
        r = F.max_unpool2d(r, switches, 2, output_size=f1.shape[-2:])  # to the max locations
        r = relu_back(r, f1)
        return F.conv_transpose2d(r, net.conv1.weight, padding=1)


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_small_cnn_against_slow_reference(rule):
    net = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fn = {None: cs.gradient, "guided": cs.guided_backprop, "deconvnet": cs.deconvnet_rule}[rule]
    got = fn(net, x, target=[[0, 3]] * 3)
    for j, cls in enumerate([0, 3]):
        torch.testing.assert_close(got[:, j], reference_backprop(net, x, cls, rule))
    if rule is not None:  # the rule matters on this input
        assert (got - cs.gradient(net, x, target=[[0, 3]] * 3)).abs().max() > 1e-3


def test_inplace_relu_equals_out_of_place():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out_of_place, in_place = SmallCNN(), SmallCNN(inplace=True)
    for fn in (cs.guided_backprop, cs.deconvnet_rule, cs.gradient):
        torch.testing.assert_close(fn(in_place, x, 1), fn(out_of_place, x, 1))
    assert in_place.relu1.inplace and in_place.relu2.inplace


def test_batch_equals_per_image_and_k_equals_singles():
    net = SmallCNN()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    many = cs.deconvnet_rule(net, x, target=[[2, 0, 1], [1, 1, 3]])
    for i, row in enumerate([[2, 0, 1], [1, 1, 3]]):
        for j, cls in enumerate(row):
            torch.testing.assert_close(many[i, j], cs.deconvnet_rule(net, x[i : i + 1], target=cls)[0, 0])


def test_guided_gradcam_is_guided_times_upsampled_gradcam():
    net = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    before = snapshot(net)
    ggc = cs.guided_gradcam(net, x, target=cs.top_k(2), layer="relu2")
    top2 = net(x).topk(2, dim=1).indices
    guided = cs.guided_backprop(net, x, target=top2)
    # Grad-CAM by hand at relu2 (4x4), bilinearly upsampled to 8x8
    a = net.relu2(net.conv2(net.pool(net.relu1(net.conv1(x))))).detach().requires_grad_(True)
    out = net.fc(a.flatten(1))
    cams = []
    for j in range(2):
        (g,) = torch.autograd.grad(out.gather(1, top2[:, j : j + 1]).sum(), a, retain_graph=True)
        cams.append(F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach())
    cam = F.interpolate(torch.cat(cams, 1), size=(8, 8), mode="bilinear", align_corners=False)
    assert ggc.shape == (2, 2, 3, 8, 8)
    torch.testing.assert_close(ggc, guided * cam[:, :, None])
    assert_untouched(net, before)


def test_guided_and_deconv_differ_from_gradient_on_lite0(lite0):
    """EfficientNet-Lite uses ReLU6: the rules must reach it (Captum's hooks on nn.ReLU would not)."""
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    before = snapshot(lite0)
    plain = cs.gradient(lite0, x, 281)
    guided = cs.guided_backprop(lite0, x, 281)
    deconv = cs.deconvnet_rule(lite0, x, 281)
    scale = plain.abs().max()
    assert (guided - plain).abs().max() > 0.1 * scale
    assert (deconv - plain).abs().max() > 0.1 * scale
    assert (guided - deconv).abs().max() > 0.1 * scale
    assert_untouched(lite0, before)


def test_errors():
    net = SmallCNN()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(cs.LayerNotFoundError, match="relu2"):
        cs.guided_gradcam(net, x, layer="relu9")
    with pytest.raises(cs.ConvscopeError, match="N x C x H x W"):
        cs.guided_gradcam(net, x, layer="fc")
    with pytest.raises(cs.TargetError, match="out of range"):
        cs.guided_backprop(net, x, target=4)
