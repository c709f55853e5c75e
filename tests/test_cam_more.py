"""Layer-CAM and Score-CAM against float64 hand computations (explicit loops over images, targets, channels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.methods.cam import gradcam_weights, layercam, scorecam, weighted_maps

from .helpers import assert_untouched, snapshot


class PoolNet(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> ReLU ("act", 6 x 6 for 12 px) -> global average pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            self.conv2.bias[4] = -100.0  # channel 4 is dead: a constant (zero) map
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(self.pool(self.act1(self.conv1(x))))).mean((2, 3)))


@pytest.fixture
def net() -> PoolNet:
    return PoolNet().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _acts(net: PoolNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.act(net.conv2(net.pool(net.act1(net.conv1(x.clone())))))


def test_layercam_by_hand(net, x):
    targets = [[0, 2], [1, 0]]
    got = layercam(net, x, target=targets, layer="act", upsample=False)
    assert got.shape == (2, 2, 6, 6)
    a = _acts(net, x)
    expect = torch.zeros(2, 2, 6, 6, dtype=torch.float64)
    for i in range(2):
        for j, c in enumerate(targets[i]):
            ai = a[i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net.fc(ai.mean((2, 3)))[0, c], ai)
            m = torch.zeros(6, 6, dtype=torch.float64)
            for k in range(5):  # Jiang et al. Eq. 4-6: w_kij = ReLU(g_kij); M = ReLU(sum_k w_k * A_k)
                m += torch.clamp(g[0, k], min=0) * a[i, k]
            expect[i, j] = torch.clamp(m, min=0)
    torch.testing.assert_close(got, expect)
    up = layercam(net, x, target=targets, layer="act")
    torch.testing.assert_close(up, F.interpolate(expect, size=(12, 12), mode="bilinear", align_corners=False))


def test_layercam_on_gap_net_is_gradcam_with_positive_weights(net, x):
    """With a GAP head the gradient is constant over positions, so Layer-CAM = ReLU(sum_k ReLU(w_k) A_k) / hw."""
    a = _acts(net, x)
    w = net.fc.weight.detach()[[2, 0]]  # targets 2, 0
    expect = torch.stack([F.relu((F.relu(w[i])[:, None, None] * a[i]).sum(0)) / 36 for i in range(2)])[:, None]
    torch.testing.assert_close(layercam(net, x, target=[2, 0], layer="act", upsample=False), expect)


def test_template_per_channel_and_per_pixel_weights_agree(net, x):
    a = _acts(net, x)
    w = torch.randn(3, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(weighted_maps(w, a), weighted_maps(w[..., None, None].expand(3, 2, 5, 6, 6), a))
    g = torch.randn(3, 2, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(weighted_maps(gradcam_weights(a, g), a, relu=False),
                               torch.einsum("knc,nchw->nkhw", g.mean((-2, -1)), a))


def _scorecam_by_hand(net: PoolNet, x: torch.Tensor, targets: list[list[int]], score: str) -> torch.Tensor:
    a = _acts(net, x)
    n, c = a.shape[:2]
    out = torch.zeros(n, len(targets[0]), 6, 6, dtype=torch.float64)
    for i in range(n):
        for j, cls in enumerate(targets[i]):
            s = torch.zeros(c, dtype=torch.float64)
            for k in range(c):
                up = F.interpolate(a[i, k][None, None], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
                lo, hi = up.min(), up.max()
                h = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)  # Eq. 6, min-max normalization
                with torch.no_grad():
                    logits = net(x[i : i + 1] * h)[0]
                s[k] = logits[cls] if score == "logit" else torch.softmax(logits, 0)[cls]
            alpha = torch.exp(s) / torch.exp(s).sum()  # Algorithm 1: softmax over the channels
            m = torch.zeros(6, 6, dtype=torch.float64)
            for k in range(c):
                m += alpha[k] * a[i, k]
            out[i, j] = torch.clamp(m, min=0)
    return out


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_scorecam_by_hand(net, x, score):
    targets = [[0, 2], [1, 1]]
    expect = _scorecam_by_hand(net, x, targets, score)
    got = scorecam(net, x, target=targets, layer="act", batch_size=3, upsample=False, score=score)
    torch.testing.assert_close(got, expect)
    assert got.abs().sum() > 0
    torch.testing.assert_close(scorecam(net, x, target=targets, layer="act", score=score),
                               F.interpolate(expect, size=(12, 12), mode="bilinear", align_corners=False))


def test_scorecam_batches_bounded_and_independent_of_batch_size(net, x):
    sizes: list[int] = []
    h = net.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    try:
        ref = scorecam(net, x, target=cs.top_k(2), layer="act", batch_size=4)
    finally:
        h.remove()
    assert sizes[0] == 2 and max(sizes[1:]) <= 4 and sum(sizes[1:]) == 2 * 5  # N x C masked images
    for bs in (1, 7, 100):
        torch.testing.assert_close(scorecam(net, x, target=cs.top_k(2), layer="act", batch_size=bs), ref)
    # top_class is the clean image's class on every masked copy
    torch.testing.assert_close(scorecam(net, x, layer="act")[:, 0], ref[:, 0])


def test_scorecam_callable_scores(net, x):
    def margin(out: torch.Tensor) -> torch.Tensor:
        return out[:, 1] - out[:, 0]

    got = scorecam(net, x, target=margin, layer="act", upsample=False)
    a = _acts(net, x)
    for i in range(2):
        s = torch.zeros(5, dtype=torch.float64)
        for k in range(5):
            up = F.interpolate(a[i, k][None, None], size=(12, 12), mode="bilinear", align_corners=False)
            h = (up - up.min()) / (up.max() - up.min()) if up.max() > up.min() else torch.zeros_like(up)
            with torch.no_grad():
                s[k] = margin(net(x[i : i + 1] * h))[0]
        expect = F.relu((torch.softmax(s, 0)[:, None, None] * a[i]).sum(0))
        torch.testing.assert_close(got[i, 0], expect)


def test_bad_input_one_line(net, x):
    for call, match in [
        (lambda: scorecam(net, x, layer="act", score="prob"), "score='prob'"),
        (lambda: scorecam(net, x, layer="act", batch_size=0), "batch_size=0"),
        (lambda: scorecam(net, x, layer="fc"), "convolutional"),
        (lambda: scorecam(net, x[0], layer="act"), "N x C x H x W"),
        (lambda: scorecam(net, x, target=10**6, layer="act"), "out of range"),
        (lambda: layercam(net, x, layer="fc"), "convolutional"),
        (lambda: layercam(net, x, layer="actt"), "actt"),
    ]:
        with pytest.raises(cs.ConvscopeError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_model_untouched(net, x):
    net.train()
    net.conv1.weight.requires_grad_(False)
    net.fc.bias.grad = torch.ones_like(net.fc.bias)
    before = snapshot(net)
    layercam(net, x, target=cs.top_k(2), layer="act")
    assert_untouched(net, before)
    scorecam(net, x, target=cs.top_k(2), layer="act", batch_size=3)
    assert_untouched(net, before)
    calls = []

    def fails_later(out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("target failed later")
        return out[:, 0]

    with pytest.raises(RuntimeError, match="failed later"):
        scorecam(net, x, target=fails_later, layer="act", batch_size=2)
    assert_untouched(net, before)
    with pytest.raises(cs.ConvscopeError):
        layercam(net, x, target=10**6, layer="act")
    assert_untouched(net, before)


def test_default_layer_and_progress(net, x, capsys):
    net, x = net.float(), x.float()  # the default layer is found with a float32 probe image
    assert scorecam(net, x, progress=True).shape == (2, 1, 12, 12)  # default layer: the last feature map ("act")
    assert "scorecam" in capsys.readouterr().err
    torch.testing.assert_close(layercam(net, x), layercam(net, x, layer="act"))
