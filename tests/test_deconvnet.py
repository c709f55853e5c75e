"""DeconvNet projections: a net worked by hand, autograd path == explicit path, batched == one at a time."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.methods.deconvnet import Chain, build_chain

from .helpers import assert_untouched, snapshot


class HandNet(nn.Module):
    """5x5 -> conv1 2x2 (filters A, B) -> ReLU -> max-pool 2 -> conv2 1x1 (A - B) -> ReLU."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, bias=False)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 1, 1, bias=False)
        self.relu2 = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]], [[[0.0, 1.0], [1.0, 0.0]]]]))
            self.conv2.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))


X = torch.tensor([[[[0.0, 2, 0, 0, 0],
                    [0, 0, 0, 1, 0],
                    [0, 1, 2, 0, 0],
                    [1, 2, 0, 0, 3],
                    [1, 2, 2, 2, 3]]]])
# conv1 (A = [[1, 2], [0, 1]], B = [[0, 1], [1, 0]]), all >= 0 so ReLU keeps them:
#   A = [[4, 2, 1, 0], [1, 2, 2, 1], [4, 5, 2, 3], [7, 4, 2, 9]]
#   B = [[2, 0, 0, 1], [0, 1, 3, 0], [2, 4, 0, 0], [3, 2, 2, 5]]
# pool1 (2x2): A = [[4, 2], [7, 9]], switches (0,0) (1,2) (3,0) (3,3)
#              B = [[2, 3], [4, 5]], switches (0,0) (1,2) (2,1) (3,3)
# conv2 = A - B = [[2, -1], [3, 4]]; relu2 = [[2, 0], [3, 4]]
B_UNPOOLED = [[2.0, 0, 0, 0], [0, 0, 3, 0], [0, 4, 0, 0], [0, 0, 0, 5]]  # pooled B at its switches, zeros elsewhere
# pool1 unit B, whole map: B^T stamps v at (i, j+1) and (i+1, j) of each switch (i, j); (2, 2) gets 3 + 4
POOL1_B_MAP = [[0.0, 2, 0, 0, 0], [2, 0, 0, 3, 0], [0, 0, 7, 0, 0], [0, 4, 0, 0, 5], [0, 0, 0, 5, 0]]
# relu2, strongest activation only (4 at (1, 1)): conv2^T sends +4 to A, -4 to B; unpooled to (3, 3) in both;
# rectification zeroes B's -4; A^T stamps 4 * [[1, 2], [0, 1]] at (3, 3)
RELU2_MAX = [[0.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 4, 8], [0, 0, 0, 0, 4]]
# relu2, whole map [[2, 0], [3, 4]]: B gets only negative signal (rectified away); A stamps 2 at (0,0), 3 at (3,0),
# 4 at (3,3) (its 0 at (1, 2) adds nothing)
RELU2_MAP = [[2.0, 4, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 0], [3, 6, 0, 4, 8], [0, 3, 0, 0, 4]]


@pytest.mark.parametrize("path", ["explicit", "autograd"])
def test_hand_worked_net(path):
    net = HandNet()
    before = snapshot(net)
    got = {
        "pool1_B_map": cs.deconvnet(net, X, "pool1", 1, mode="map", path=path),
        "relu2_max": cs.deconvnet(net, X, "relu2", [0], mode="max", path=path),
        "relu2_map": cs.deconvnet(net, X, "relu2", [0], mode="map", path=path),
    }
    assert got["relu2_max"].shape == (1, 1, 1, 5, 5)
    torch.testing.assert_close(got["pool1_B_map"][0, 0, 0], torch.tensor(POOL1_B_MAP), rtol=0, atol=0)
    torch.testing.assert_close(got["relu2_max"][0, 0, 0], torch.tensor(RELU2_MAX), rtol=0, atol=0)
    torch.testing.assert_close(got["relu2_map"][0, 0, 0], torch.tensor(RELU2_MAP), rtol=0, atol=0)
    assert_untouched(net, before)


def test_unpooling_puts_values_at_the_switches():
    pool = nn.Sequential(OrderedDict(pool=nn.MaxPool2d(2)))
    h_b = torch.tensor([[[[2.0, 0, 0, 1], [0, 1, 3, 0], [2, 4, 0, 0], [3, 2, 2, 5]]]])  # HandNet's B map
    got = cs.deconvnet(pool, h_b, "pool", 0, mode="map", path="explicit")[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor(B_UNPOOLED), rtol=0, atol=0)
    # overlapping windows that share a switch add up (the transpose of max pooling): 4 windows pick the centre
    shared = nn.Sequential(OrderedDict(pool=nn.MaxPool2d(2, stride=1)))
    x = torch.tensor([[[[1.0, 0, 0], [0, 5, 0], [0, 0, 2]]]])
    got = cs.deconvnet(shared, x, "pool", 0, mode="map", path="explicit")[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([[0.0, 0, 0], [0, 20, 0], [0, 0, 0]]), rtol=0, atol=0)


def test_inplace_relus_give_the_same_projection():
    a = cs.deconvnet(HandNet(), X, "relu2", 0, mode="map", path="explicit")
    net = HandNet(inplace=True)
    before = snapshot(net)
    torch.testing.assert_close(cs.deconvnet(net, X, "relu2", 0, mode="map", path="explicit"), a)
    torch.testing.assert_close(cs.deconvnet(net, X, "relu2", 0, mode="map", path="autograd"), a)
    assert_untouched(net, before)


class PlainNet(nn.Module):
    """Conv (stride 2, odd size), ReLU, max-pool (overlapping, padded), grouped dilated conv, ReLU, linear (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.relu3 = nn.ReLU()
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))
        return self.relu3(self.fc(torch.flatten(h, 1)))  # a functional flatten between modules


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "relu2", "relu3"])
@pytest.mark.parametrize("mode", ["max", "map"])
def test_autograd_path_equals_explicit_path_on_plain_net(layer, mode):
    net = PlainNet()
    x = torch.randn(2, 3, 15, 15, dtype=torch.float64)
    assert isinstance(build_chain(net, x[:1], layer), Chain)
    units = [[0, 3], [2, 1]]
    a = cs.deconvnet(net, x, layer, units, mode=mode, path="explicit")
    b = cs.deconvnet(net, x, layer, units, mode=mode, path="autograd")
    assert a.abs().amax() > 0
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", ["features.relu1", "features.conv3", "classifier.fc7"])
def test_autograd_path_equals_explicit_path_on_demo_net(demo, layer):
    # demo_net has LRN (norm1) between pool1 and conv2. Neither path inverts it: the explicit path passes the
    # signal through, and the autograd path replaces LRN's gradient by the identity, so they agree above norm1 too
    x = torch.randn(2, 3, 112, 112)
    a = cs.deconvnet(demo, x, layer, [5, 7], path="explicit")
    b = cs.deconvnet(demo, x, layer, [5, 7], path="autograd")
    assert a.abs().amax() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().amax()))


def test_lrn_gradient_would_differ(demo):
    # the pass-through is a choice, not a no-op: LRN's true gradient (with its cross-channel terms) gives a
    # different projection
    x = torch.randn(1, 3, 112, 112)
    ours = cs.deconvnet(demo, x, "features.conv2", 3, path="autograd")[0, 0]
    xx = x.clone().requires_grad_(True)
    with cs.probe(demo, "features.conv2", relu_rule="deconvnet", stop_after="features.conv2") as p:
        p.forward(demo, xx)
        act = p.activations["features.conv2"]
        sig = torch.zeros_like(act)
        flat = act[0, 3].flatten()
        sig[0, 3].view(-1)[flat.argmax()] = flat.max()
        (g,) = torch.autograd.grad(act, xx, sig)
    assert ours.abs().amax() > 0
    assert not torch.allclose(ours, g[0], rtol=1e-3, atol=1e-3 * float(g.abs().max()))


@pytest.mark.parametrize("path", ["explicit", "autograd"])
def test_batched_units_equal_one_at_a_time(demo, path):
    x = torch.randn(3, 3, 64, 64)  # conv layers take any size
    table = torch.tensor([[1, 4, 9], [0, 1, 2], [7, 7, 3]])
    layer = "features.relu2"
    batched = cs.deconvnet(demo, x, layer, table, path=path, batch_size=4)  # chunks cut across images
    assert batched.shape == (3, 3, 3, 64, 64)
    for i in range(3):
        for j in range(3):
            one = cs.deconvnet(demo, x[i:i + 1], layer, int(table[i, j]), path=path, batch_size=1)
            torch.testing.assert_close(batched[i, j], one[0, 0], rtol=1e-5, atol=1e-7)


def test_projection_stays_inside_the_receptive_field(demo):
    x = torch.randn(1, 3, 112, 112)
    layer = "features.relu3"
    proj = cs.deconvnet(demo, x, layer, [2], mode="max")[0, 0]
    with torch.no_grad(), cs.probe(demo, layer) as p:
        demo(x)
    idx = int(p.activations[layer][0, 2].flatten().argmax())
    w = p.activations[layer].shape[-1]
    top, left, bottom, right = cs.receptive_field(demo, layer, (idx // w, idx % w), (112, 112))
    inside = torch.zeros(112, 112, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    support = proj.abs().sum(0) > 0
    assert support.any() and not (support & ~inside).any()


def test_lite0_takes_the_autograd_path(lite0):
    x = torch.randn(1, 3, 224, 224)
    reason = build_chain(lite0, x, "blocks.2")
    assert isinstance(reason, str) and "stem.conv" in reason
    with pytest.raises(cs.ConvscopeError, match="path='autograd'"):
        cs.deconvnet(lite0, x, "blocks.2", 0, path="explicit")
    before = snapshot(lite0)
    auto = cs.deconvnet(lite0, x, "blocks.2", [0, 5])
    torch.testing.assert_close(auto, cs.deconvnet(lite0, x, "blocks.2", [0, 5], path="autograd"))
    assert_untouched(lite0, before)
    # mode="max" projects one position: the signal reaches only that position's receptive field
    box = cs.receptive_field(lite0, "blocks.2", (10, 10), (224, 224))
    assert box[2] - box[0] < 224 and box[3] - box[1] < 224


def test_errors_name_the_fix():
    net = HandNet()
    with pytest.raises(cs.TargetError, match="valid 0..1"):
        cs.deconvnet(net, X, "pool1", [0, 2])
    with pytest.raises(cs.TargetError, match="1 images"):
        cs.deconvnet(net, X, "pool1", [[0], [1]])
    with pytest.raises(cs.ConvscopeError, match="'max'"):
        cs.deconvnet(net, X, "pool1", 0, mode="maximum")
    with pytest.raises(cs.LayerNotFoundError, match="pool1"):
        cs.deconvnet(net, X, "pool", 0)
    with pytest.raises(cs.ConvscopeError, match="N x C x H x W"):
        cs.deconvnet(net, X[0], "pool1", 0)


def test_unit_backprop_rules_on_the_hand_worked_net():
    """From relu2's strongest activation (the signal is its value, 4, at (1, 1), pooled from (3, 3) in both maps):
    conv2^T sends +4 to A and -4 to B; the guided rule drops B's negative signal at relu1 (both relu1 inputs there are
    positive, so it equals the DeconvNet result), the plain gradient keeps it (B^T stamps -4)."""
    net = HandNet()
    guided = cs.unit_backprop(net, X, "relu2", 0, rule="guided")[0, 0, 0]
    torch.testing.assert_close(guided, torch.tensor(RELU2_MAX))
    grad = cs.unit_backprop(net, X, "relu2", 0, rule="gradient")[0, 0, 0]
    expected = torch.tensor(RELU2_MAX)
    expected[3, 4] -= 4
    expected[4, 3] -= 4
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(cs.unit_backprop(net, X, "relu2", 0, rule="deconvnet"),
                               cs.deconvnet(net, X, "relu2", 0, path="autograd"))


def test_unit_backprop_of_a_logit_equals_guided_backprop_of_that_class(demo):
    x = torch.randn(2, 3, 112, 112)
    before = snapshot(demo)
    with torch.no_grad():
        logits, top = demo(x).max(1)  # positive: the guided rule is not odd, so a negative signal would differ
    assert (logits > 0).all()
    ours = cs.unit_backprop(demo, x, "classifier.fc8", top[:, None], rule="guided")[:, 0]
    # the projected signal is the unit's activation (as in deconvnet), i.e. the logit times d logit / d x
    ref = cs.guided_backprop(demo, x, target=top)[:, 0] * logits[:, None, None, None]
    assert ours.abs().amax() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert_untouched(demo, before)
    with pytest.raises(cs.ConvscopeError, match="rule"):
        cs.unit_backprop(demo, x, "classifier.fc8", 0, rule="lrp")
