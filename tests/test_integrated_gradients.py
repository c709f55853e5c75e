"""Integrated Gradients: completeness, Captum, a closed form, batching, bad input, model state."""

from __future__ import annotations

import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.methods.integrated_gradients import (
    IntegratedGradientsResult,
    adaptive_quadrature,
    integrated_gradients,
    quadrature,
    segment_residuals,
)

from .helpers import assert_untouched, snapshot
from .peers import captum_attr


class SmallNet(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> softplus -> global average pool -> linear (4 classes)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.Softplus()
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).mean((2, 3)))


class Quadratic(nn.Module):
    """f_k(x) = sum(w_k * x^2) for two weight sets: gradient 2 w_k x, linear along any straight path."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w[None] * x[:, None] ** 2).flatten(2).sum(2)


def _images(n: int = 2, size: int = 16, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_quadrature_rules():
    for method in ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"):
        a, w = quadrature(7, method)
        assert a.shape == w.shape == (7,) and a.dtype == torch.float64
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        # every rule integrates a linear function of alpha exactly except left / right
        exact = float((w * (3 + 5 * a)).sum())
        assert (abs(exact - 5.5) < 1e-12) == (method not in ("riemann_left", "riemann_right"))
    # Gauss-Legendre with m nodes is exact for degree 2m - 1
    a, w = quadrature(4)
    torch.testing.assert_close((w * a**7).sum(), torch.tensor(1 / 8, dtype=torch.float64))
    with pytest.raises(cs.ConvscopeError, match="adaptive_quadrature"):
        quadrature(4, "adaptive")


def test_adaptive_quadrature_by_hand():
    """F at t = 0, 1/4, .., 1: 0, 0, 0, 3, 3 -> slopes 0, 0, 12, 0; slope changes 0, 12, 12 at the inner knots,
    half to each side: kink content 0, 6, 12, 6 -> shares 0, 1/4, 1/2, 1/4; with half the mass uniform (1/8 each):
    0.125, 0.25, 0.375, 0.25. Four points of mass 1/4: cuts at 0.375 (interval 1 from cdf 0.125), 0.5 + 0.125 /
    0.375 / 4 and 0.75; the points are the midpoints, the weights the lengths."""
    f = torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0])
    a, w = adaptive_quadrature(f, 4, uniform_share=0.5, power=1.0)
    cut = 0.5 + 0.125 / 0.375 / 4
    torch.testing.assert_close(w, torch.tensor([0.375, cut - 0.375, 0.75 - cut, 0.25], dtype=torch.float64))
    torch.testing.assert_close(a, torch.tensor([0.1875, (0.375 + cut) / 2, (cut + 0.75) / 2, 0.875],
                                               dtype=torch.float64))
    # two targets: a constant one counts as uniform, the pair averaged -> the same mass without a uniform share
    a2, w2 = adaptive_quadrature(torch.stack([f, torch.full_like(f, 2.0)], 1), 4, uniform_share=0.0, power=1.0)
    torch.testing.assert_close((a2, w2), (a, w))
    # a straight line: no kinks, uniform midpoints; the default share and power keep every weight positive
    a3, w3 = adaptive_quadrature(torch.linspace(0, 5, 9), 8)
    torch.testing.assert_close(a3, (torch.arange(8, dtype=torch.float64) + 0.5) / 8)
    a4, w4 = adaptive_quadrature(torch.rand(33, 3, generator=torch.Generator().manual_seed(0)) ** 8, 16)
    assert (w4 > 0).all() and (a4.diff() > 0).all() and abs(float(w4.sum()) - 1) < 1e-12
    for bad, match in [(torch.tensor([1.0]), "M >= 1"), (torch.tensor([0.0, float("nan")]), "not finite")]:
        with pytest.raises(cs.ConvscopeError, match=match):
            adaptive_quadrature(bad, 4)


class Steep(nn.Module):
    """conv 3 -> 8 with positive weights x ``gain`` and negative biases -> ReLU6 -> global mean -> linear (2
    classes), float64. From the zero baseline each of the 2048 units switches on and saturates within a short
    stretch of the path, so the score moves for alpha in about [0, 0.2] and stays flat after (like lite0 at 224 px,
    steeper and simpler)."""

    def __init__(self, gain: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=g) * gain / 13.5)
            self.conv.bias.copy_(-torch.rand(8, generator=g) * 3)
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g))
            self.fc.bias.zero_()
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_adaptive_default_beats_uniform_steps_on_a_steep_relu_net(one_thread):
    """64 steps, both classes: the adaptive default is within 1 % of completeness (measured 0.16 %), the uniform
    trapezoid and midpoint rules are not (1.5 %, 1.6 %): their 64 evenly spaced points put about 13 in the stretch
    where the score moves."""
    net = Steep(50.0, 1).eval()
    x = 0.5 + 0.5 * torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    res = integrated_gradients(net, x, target=[[0, 1]], steps=64, return_error=True)
    assert (res.scores - res.baseline_scores).abs().min() > 5
    assert res.relative_error.max() <= 0.01, res.relative_error
    for method in ("riemann_trapezoid", "riemann_middle"):
        uniform = integrated_gradients(net, x, target=[[0, 1]], steps=64, method=method, return_error=True)
        assert uniform.relative_error.max() > 0.01, (method, uniform.relative_error)
    # the same attributions as many uniform steps (the integral itself), closer than 64 uniform steps get
    ref = integrated_gradients(net, x, target=[[0, 1]], steps=2048, method="riemann_middle")
    err = (res.attributions - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    uniform_err = (uniform.attributions - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert (err < uniform_err).all(), (err, uniform_err)


def test_closed_form_quadratic_model_float64():
    """f = sum(w x^2): IG_i = w_i (x_i^2 - x'_i^2) exactly with the trapezoid rule (the gradient is linear in
    alpha); the left rule misses half a step: (x - x') 2 w (x' + (x - x')(m - 1) / (2m))."""
    shape = (3, 5, 5)
    model = Quadratic(shape)
    x = _images(2, 5, torch.float64)
    base = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w = model.w.detach()
    expect = w[None] * (x[:, None] ** 2 - base[:, None] ** 2)  # N K C H W
    for steps in (2, 3, 10):
        got = integrated_gradients(model, x, target=[[0, 1], [1, 0]], baseline=base, steps=steps,
                                   method="riemann_trapezoid")
        torch.testing.assert_close(got, torch.stack([expect[0], expect[1].flip(0)]), rtol=1e-12, atol=1e-12)
    m = 6
    left = integrated_gradients(model, x, target=[[0, 1], [0, 1]], baseline=base, steps=m, method="riemann_left")
    d = (x - base)[:, None]
    torch.testing.assert_close(left, d * 2 * w[None] * (base[:, None] + d * (m - 1) / (2 * m)), rtol=1e-12,
                               atol=1e-12)


def test_completeness_within_one_percent_small_net():
    net = SmallNet().eval()
    x = _images()
    res = integrated_gradients(net, x, target=[[0, 3], [2, 1]], steps=64, return_error=True)
    assert isinstance(res, IntegratedGradientsResult)
    assert res.attributions.shape == (2, 2, 3, 16, 16)
    delta = res.scores - res.baseline_scores
    assert delta.abs().min() > 0.05, "the test needs targets whose score moves along the path"
    torch.testing.assert_close(res.error, (res.attributions.flatten(2).sum(2) - delta).abs())
    assert res.relative_error.max() < 0.01, res.relative_error
    torch.testing.assert_close(res.targets, torch.tensor([[0, 3], [2, 1]]))
    with torch.no_grad():
        torch.testing.assert_close(res.scores, net(x).gather(1, res.targets))
        torch.testing.assert_close(res.baseline_scores, net(torch.zeros(1, 3, 16, 16)).expand(2, 4).gather(
            1, res.targets))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_right", "riemann_trapezoid"])
def test_equals_captum(method, one_thread):
    attr = captum_attr()
    net = SmallNet().eval()
    x = _images()
    base = 0.3 * _images(1, seed=7)
    targets = [[1, 3], [0, 2]]
    steps = 16
    ours = integrated_gradients(net, x, target=targets, baseline=base, steps=steps, method=method)
    ig = attr.IntegratedGradients(net)
    theirs = torch.stack([ig.attribute(x, baselines=base.expand_as(x), target=[t[j] for t in targets], n_steps=steps,
                                       method=method) for j in range(2)], dim=1)
    if method == "riemann_trapezoid":  # Captum's trapezoid steps are 1/m (weights sum to (m-1)/m), ours 1/(m-1)
        theirs = theirs * steps / (steps - 1)
    cos = F.cosine_similarity(ours.flatten(1), theirs.flatten(1), dim=1)
    assert cos.min() >= 0.999, cos
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_independent_of_batch_size(one_thread):
    net = SmallNet().eval()
    x = _images(3)
    ref = integrated_gradients(net, x, target=cs.top_k(2), steps=7, batch_size=1000, method="gausslegendre")
    adaptive = integrated_gradients(net, x, target=cs.top_k(2), steps=7, batch_size=1000)
    for bs in (1, 2, 4, 5):  # N > batch_size splits a step into image slices; others split the steps unevenly
        torch.testing.assert_close(integrated_gradients(net, x, target=cs.top_k(2), steps=7, batch_size=bs,
                                                        method="gausslegendre"), ref, rtol=1e-5, atol=1e-6)
        # the adaptive points follow the pre-pass scores, whose float32 rounding depends on the batch: close
        torch.testing.assert_close(integrated_gradients(net, x, target=cs.top_k(2), steps=7, batch_size=bs),
                                   adaptive, rtol=1e-3, atol=1e-5)


def test_rows_per_pass_are_bounded(one_thread):
    net = SmallNet().eval()
    sizes: list[int] = []
    h = net.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    try:
        integrated_gradients(net, _images(3), target=0, steps=10, batch_size=4, method="riemann_middle")
        fixed = sizes[:]
        sizes.clear()
        integrated_gradients(net, _images(3), target=0, steps=10, batch_size=4, method="kink", path_samples=6)
        kink = sizes[:]
        sizes.clear()
        integrated_gradients(net, _images(3), target=0, steps=10, batch_size=4)
        adaptive = sizes[:]
    finally:
        h.remove()
    assert fixed[0] == 6  # images and baselines in one pass (targets, F(x), F(x'))
    assert max(fixed[1:]) <= 4 and sum(fixed[1:]) == 30  # all 3 x 10 path points, at most 4 rows a pass
    assert kink[0] == 6 and max(kink[1:]) <= 4
    assert sum(kink[1:]) == 3 * 5 + 30  # forward pre-pass at 5 inner points of each path, then the gradients
    assert adaptive[0] == 6 and max(adaptive[1:]) <= 4
    assert sum(adaptive[1:]) == 30  # no pre-pass: each path's 10 gradient points, the grid refined from them


def test_top_class_pinned_on_clean_image_and_callable_scores(one_thread):
    net = SmallNet().eval()
    x = _images()
    top = net(x).argmax(1)
    torch.testing.assert_close(integrated_gradients(net, x, steps=8), integrated_gradients(net, x, target=top.tolist(),
                                                                                           steps=8))

    def margin(out: torch.Tensor) -> torch.Tensor:
        return out[:, 1] - out[:, 0]

    class Margin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return margin(self.net(t))[:, None]

    res = integrated_gradients(net, x, target=margin, steps=8, return_error=True)
    torch.testing.assert_close(res.attributions, integrated_gradients(Margin(), x, target=0, steps=8))
    assert res.targets is None and res.scores.shape == (2, 1)


def test_baselines_none_float_tensor(one_thread):
    net = SmallNet().eval()
    x = _images()
    zeros = integrated_gradients(net, x, target=0, baseline=torch.zeros(3, 1, 1), steps=4)
    torch.testing.assert_close(integrated_gradients(net, x, target=0, steps=4), zeros)
    torch.testing.assert_close(integrated_gradients(net, x, target=0, baseline=0.0, steps=4), zeros)
    half = integrated_gradients(net, x, target=0, baseline=0.5, steps=4)
    torch.testing.assert_close(half, integrated_gradients(net, x, target=0, baseline=torch.full((1,), 0.5), steps=4))
    # a model that normalizes its input: None stays the zero tensor, a float is a normalized grey level
    net.preprocess = types.SimpleNamespace(normalize=lambda t: (t - 0.25) / 0.5)
    try:
        torch.testing.assert_close(integrated_gradients(net, x, target=0, steps=4), zeros)
        torch.testing.assert_close(integrated_gradients(net, x, target=0, baseline=0.0, steps=4),
                                   integrated_gradients(net, x, target=0, baseline=torch.tensor(-0.5), steps=4))
        torch.testing.assert_close(integrated_gradients(net, x, target=0, baseline=0.75, steps=4),
                                   integrated_gradients(net, x, target=0, baseline=torch.tensor(1.0), steps=4))
    finally:
        del net.preprocess


class LogMean(nn.Module):
    """log of the mean positive part: -inf on the zero baseline, so the path's scores are not all finite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.clamp_min(0).flatten(1).mean(1, keepdim=True)
        return torch.cat([m.log(), m], 1)


@pytest.mark.parametrize("method", ["adaptive", "kink"])
def test_non_finite_path_scores_raise_instead_of_nan(method):
    """Both rules that evaluate the baseline's end of the path refuse its -inf score in one line (the adaptive
    rule through the probe's output check, the kink rule's pre-pass by its own): no NaN attributions come back."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    with pytest.raises(cs.ConvscopeError, match="inf|not finite") as err:
        integrated_gradients(LogMean(), x, target=0, steps=8, method=method)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps=0"),
    ({"steps": 2.5}, "steps=2.5"),
    ({"steps": 1, "method": "riemann_trapezoid"}, "steps >= 2"),
    ({"method": "simpson"}, "method='simpson'"),
    ({"baseline": torch.zeros(2, 3, 8, 8)}, "broadcast"),
    ({"baseline": "black"}, "baseline='black'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"target": 10**6}, "out of range"),
])
def test_bad_input_one_line_error(kwargs, match):
    net = SmallNet().eval()
    with pytest.raises(cs.ConvscopeError, match=match) as e:
        integrated_gradients(net, _images(), **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(cs.ConvscopeError, match="tensor"):
        integrated_gradients(net, "image")  # type: ignore[arg-type]


def test_model_untouched_after_call_and_after_raise(one_thread):
    net = SmallNet()
    net.train()
    net.conv1.weight.requires_grad_(False)
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    before = snapshot(net)
    x = _images()
    integrated_gradients(net, x, target=cs.top_k(2), steps=4, batch_size=3, return_error=True)
    assert_untouched(net, before)
    calls = []

    def fails_later(out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("target failed later")
        return out[:, 0]

    with pytest.raises(RuntimeError, match="failed later"):
        integrated_gradients(net, x, target=fails_later, steps=8, batch_size=2)
    assert_untouched(net, before)
    with pytest.raises(cs.ConvscopeError):
        integrated_gradients(net, x, baseline=torch.zeros(5, 3, 1, 1))
    assert_untouched(net, before)


def test_progress_bar_reports_steps(capsys):
    net = SmallNet().eval()
    integrated_gradients(net, _images(1), target=0, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "integrated gradients" in err and "3/3" in err


def test_works_inside_no_grad():
    net = SmallNet().eval()
    x = _images()
    ref = integrated_gradients(net, x, target=1, steps=4)
    with torch.no_grad():
        torch.testing.assert_close(integrated_gradients(net, x, target=1, steps=4), ref)


def test_segment_residuals_by_hand_float64():
    """F(a) = |a - 0.3| on [0, 1] (one kink): on the grid 0, 0.5, 1 the first segment's trapezoid gets
    0.5 * (-1 + 1) / 2 = 0 against F(0.5) - F(0) = 0.2 - 0.3 = -0.1, the second is exact (no kink)."""
    a = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    f = (a - 0.3).abs()[:, None]
    g = torch.sign(a - 0.3)[:, None]
    r = segment_residuals(a, f, g)
    torch.testing.assert_close(r, torch.tensor([[-0.1], [0.0]], dtype=torch.float64))
    # the residuals of any grid sum to the total completeness error of the trapezoid rule on it
    a2 = torch.tensor([0.0, 0.1, 0.25, 0.7, 1.0], dtype=torch.float64)
    f2, g2 = (a2 - 0.3).abs()[:, None], torch.sign(a2 - 0.3)[:, None]
    w = torch.zeros_like(a2)
    w[:-1] += (a2[1:] - a2[:-1]) / 2
    w[1:] += (a2[1:] - a2[:-1]) / 2
    total = (f2[-1] - f2[0]) - (w[:, None] * g2).sum(0)
    torch.testing.assert_close(segment_residuals(a2, f2, g2).sum(0), total)


def test_adaptive_refines_where_the_residual_is(one_thread):
    """A float64 net whose score moves only in a narrow stretch of the path: with the same 32 points, the refined
    grid's completeness error is far below the evenly spaced trapezoid's (the same rule on a fixed grid)."""
    net = Steep(50.0, 1).eval()
    x = 0.5 + 0.5 * torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    res = integrated_gradients(net, x, target=[[0, 1]], steps=32, return_error=True)
    even = integrated_gradients(net, x, target=[[0, 1]], steps=32, method="riemann_trapezoid", return_error=True)
    assert res.relative_error.max() < even.relative_error.max() / 3, (res.relative_error, even.relative_error)


@pytest.mark.slow
def test_completeness_lite0(lite0):
    """The 7 bundled photos at 224 px in one call, top class, zero baseline, 64 steps of the adaptive default: the
    completeness error is within 1 % on the median photo and 2 % on every one (measured: 0.03-1.47 %, median
    0.6 %; Gauss-Legendre 1.8-14 %, median 3.3 %; the table is in docs/attribution.md). About 45 s on one idle
    core."""
    names = ["chelsea", "rocket", "coffee", "astronaut", "motorcycle", "china", "flower"]
    x = cs.load_images([cs.sample_image(n) for n in names], lite0)
    assert x.shape[-2:] == (224, 224)
    t0 = time.perf_counter()
    res = integrated_gradients(lite0, x, steps=64, return_error=True)
    elapsed = time.perf_counter() - t0
    assert res.attributions.shape == (7, 1, 3, 224, 224)
    assert (res.scores - res.baseline_scores).abs().min() > 1.0
    err = res.relative_error.flatten()
    assert err.median() <= 0.01 and err.max() <= 0.02, (err, elapsed)
