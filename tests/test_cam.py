"""CAM / Grad-CAM / Grad-CAM++ against hand computations from captured activations and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs

from .helpers import assert_untouched, snapshot


class GapNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: CAM's architecture."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def _manual(net: GapNet, x: torch.Tensor, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = net.act(net.conv(x)).detach().requires_grad_(True)
    y = net.fc(a.mean((2, 3)))
    (g,) = torch.autograd.grad(y[:, cls].sum(), a)
    return a.detach(), g


def test_gradcam_by_hand():
    net = GapNet().eval()
    x = torch.randn(2, 3, 8, 8)
    maps = cs.gradcam(net, x, target=2, layer="act", upsample=False)
    a, g = _manual(net, x, 2)
    expect = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    torch.testing.assert_close(maps, expect)


def test_cam_equals_classifier_weighting_and_gradcam_on_gap_net():
    net = GapNet().eval()
    x = torch.randn(2, 3, 8, 8)
    c = cs.cam(net, x, target=[1, 3], layer="act", upsample=False)
    a = net.act(net.conv(x)).detach()
    expect = torch.stack([(net.fc.weight[k][:, None, None] * a[i]).sum(0) for i, k in enumerate([1, 3])])[:, None]
    torch.testing.assert_close(c, expect)
    # on a GAP net Grad-CAM weights are the classifier weights / (H*W): ReLU(CAM) / HW
    g = cs.gradcam(net, x, target=[1, 3], layer="act", upsample=False)
    torch.testing.assert_close(g, F.relu(c) / 64)


def test_gradcam_pp_by_hand():
    net = GapNet().eval()
    x = torch.randn(1, 3, 8, 8)
    a, g = _manual(net, x, 0)
    w = torch.zeros(6)
    for k in range(6):  # Chattopadhay et al. Eq. 19, element by element
        s = a[0, k].sum()
        num = g[0, k] ** 2
        den = 2 * g[0, k] ** 2 + s * g[0, k] ** 3
        alpha = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
        w[k] = (alpha * F.relu(g[0, k])).sum()
    expect = F.relu((w[:, None, None] * a[0]).sum(0))[None, None]
    torch.testing.assert_close(cs.gradcam_pp(net, x, target=0, layer="act", upsample=False), expect)


def test_many_targets_equal_one_by_one(lite0):
    x = cs.load_images([cs.sample_image("chelsea")], lite0)
    targets = [[281, 282, 285, 967]]
    batched = cs.gradcam(lite0, x, target=targets, layer="blocks.15")
    for j, t in enumerate(targets[0]):
        single = cs.gradcam(lite0, x, target=t, layer="blocks.15")
        torch.testing.assert_close(batched[:, j : j + 1], single, rtol=1e-4, atol=1e-6)


def test_batch_equals_per_image(demo):
    x = torch.randn(3, 3, 112, 112)
    both = cs.gradcam(demo, x, target=[0, 1, 2], layer="features.relu5")
    for i in range(3):
        torch.testing.assert_close(both[i : i + 1], cs.gradcam(demo, x[i : i + 1], target=i, layer="features.relu5"),
                                   rtol=1e-4, atol=1e-6)


def test_cam_on_lite0_head_and_model_untouched(lite0):
    before = snapshot(lite0)
    x = cs.load_images([cs.sample_image("chelsea")], lite0)
    maps = cs.gradcam(lite0, x, target=cs.top_class)
    assert maps.shape == (1, 1, 224, 224) and maps.max() > 0
    c = cs.cam(lite0, x, target=cs.top_k(2), layer="head.act")
    assert c.shape == (1, 2, 224, 224)
    assert_untouched(lite0, before)


def test_cam_errors(lite0):
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(cs.ConvscopeError, match="gradcam"):
        cs.cam(lite0, x, layer="blocks.10")
    with pytest.raises(cs.TargetError, match="out of range"):
        cs.gradcam(lite0, x, target=1000, layer="head.act")
    with pytest.raises(cs.LayerNotFoundError, match="head.act"):
        cs.gradcam(lite0, x, layer="head.actt")


def test_gradcam_works_inside_no_grad(demo):
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    ref = cs.gradcam(demo, x, target=0, layer="features.relu5")
    with torch.no_grad():
        got = cs.gradcam(demo, x, target=0, layer="features.relu5")
    torch.testing.assert_close(got, ref)
