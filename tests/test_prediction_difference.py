"""Prediction difference analysis (Zintgraf et al. 2017) against closed forms and a float64 hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.errors import ConvscopeError
from convscope.methods.prediction_difference import prediction_difference

from .helpers import assert_untouched, snapshot

N_TRAIN = 100_000


class RegionNet(nn.Module):
    """Two classes; p(class 1) = 0.5 + 0.1 * mean of the top-left 4x4 region (all channels), exactly (the logits
    are log-probabilities). Nothing else in the image matters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = 0.5 + self.scale * self.drop(x[:, :, :4, :4]).mean(dim=(1, 2, 3))
        return torch.stack([torch.log1p(-q), torch.log(q)], dim=1)


def _q(img: torch.Tensor) -> float:
    return 0.5 + 0.1 * float(img[:, :4, :4].mean())


def _log_odds(p: float) -> float:
    p = (p * N_TRAIN + 1) / (N_TRAIN + 2)
    return math.log2(p / (1 - p))


def _smooth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 2, 4, 4, generator=g, dtype=torch.float64)
    return F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False) \
        + 0.05 * torch.randn(n, 2, 16, 16, generator=g, dtype=torch.float64)


def test_marginal_with_one_data_image_is_the_closed_form_and_zero_outside_the_region():
    net, x, d = RegionNet(), _smooth(2, 0), _smooth(1, 1)
    got = prediction_difference(net, x, target=1, window=4, stride=2, conditional=False, data=d, samples=3)
    assert got.shape == (2, 1, 16, 16) and got.dtype == torch.float64
    for n in range(2):  # Algorithm 1 by hand: every window, WE added to its pixels, divided by the counts
        total, counts = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 16, dtype=torch.float64)
        for r in range(0, 13, 2):
            for c in range(0, 13, 2):
                alt = x[n].clone()
                alt[:, r:r + 4, c:c + 4] = d[0, :, r:r + 4, c:c + 4]
                total[r:r + 4, c:c + 4] += _log_odds(_q(x[n])) - _log_odds(_q(alt))
                counts[r:r + 4, c:c + 4] += 1
        torch.testing.assert_close(got[n, 0], total / counts, rtol=1e-9, atol=1e-12)
    assert torch.all(got[:, :, 7:, :] == 0) and torch.all(got[:, :, :, 7:] == 0)
    assert got[:, :, :4, :4].abs().min() > 0


def test_conditional_matches_the_gaussian_conditional_mean_by_hand():
    net, data = RegionNet(), _smooth(40, 2)
    x = _smooth(1, 3)
    x[:, :, :4, :4] += 1.0  # the region is brighter than its frame predicts: evidence for class 1
    got = prediction_difference(net, x, target=1, window=4, stride=4, padding=2, samples=400, data=data, clip=False)
    # the fitted Gaussian of 8x8 patches, per channel, by hand
    patches = torch.stack([data[:, :, r:r + 8, c:c + 8].reshape(40, 2, 64) for r in range(9) for c in range(9)], 1)
    expected_window = torch.empty(2, 4, 4, dtype=torch.float64)
    inner = torch.zeros(8, 8, dtype=torch.bool)
    inner[:4, :4] = True  # the window at (0, 0): the patch is flush with the corner, the window off-centre in it
    i, f = inner.flatten(), ~inner.flatten()
    for ch in range(2):
        v = patches[:, :, ch].reshape(-1, 64)
        mu, cov = v.mean(0), torch.cov(v.T)
        frame = x[0, ch, :8, :8].flatten()[f]
        cond = mu[i] + cov[i][:, f] @ torch.linalg.inv(cov[f][:, f]) @ (frame - mu[f])
        expected_window[ch] = cond.reshape(4, 4)
    alt = x[0].clone()
    alt[:, :4, :4] = expected_window  # p(c|x) is linear in the window: E[p] = p(conditional mean)
    we = _log_odds(_q(x[0])) - _log_odds(_q(alt))
    assert we > 0.5
    assert abs(float(got[0, 0, :4, :4].mean()) - we) < 0.02
    assert torch.all(got[0, 0, :4, :4] == got[0, 0, 0, 0])
    assert got[0, 0, 4:, :].abs().max() < 1e-9 and got[0, 0, :, 4:].abs().max() < 1e-9


def test_batch_size_and_seed():
    net, x = RegionNet(), _smooth(2, 4)
    kw = dict(target=cs.top_k(2), window=4, stride=3, padding=1, samples=3, seed=5)
    ref = prediction_difference(net, x, batch_size=1, **kw)
    for bs in (7, 1000):
        torch.testing.assert_close(prediction_difference(net, x, batch_size=bs, **kw), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref[:, 0], -ref[:, 1], rtol=1e-9, atol=1e-12)  # two classes: WE_0 = -WE_1
    assert not torch.allclose(prediction_difference(net, x, **{**kw, "seed": 6}), ref)


def test_bad_input_one_line_errors_and_model_untouched():
    net, x = RegionNet(), _smooth(1, 5)
    net.train()
    net.scale.grad = torch.ones((), dtype=torch.float64)
    before = snapshot(net)
    bad = [dict(window=20), dict(window=4, padding=7), dict(conditional=False), dict(samples=0),
           dict(target=lambda o: o[:, 0]), dict(data=torch.rand(2, 3, 16, 16)), dict(stride=0),
           dict(target=10 ** 6)]
    for kw in bad:
        with pytest.raises(ConvscopeError) as e:
            prediction_difference(net, x, **{"window": 4, **kw})
        assert "\n" not in str(e.value)
        assert_untouched(net, before)
    prediction_difference(net, x, window=8, stride=8, samples=2)
    assert_untouched(net, before)
