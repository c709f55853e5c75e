"""Gradient saliency, gradient x input and SmoothGrad against finite differences and naive loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs

from .helpers import assert_untouched, snapshot


class TinyNet(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> tanh -> linear, float64: small enough for finite differences."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.Tanh()
        self.fc = nn.Linear(4 * 3 * 3, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).flatten(1))


@pytest.fixture
def net() -> TinyNet:
    return TinyNet().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def finite_differences(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of ``f(x)`` (N x K) w.r.t. every input element: N x K x C x H x W, one batched call."""
    n, numel = x.shape[0], x[0].numel()
    eye = torch.eye(numel, dtype=x.dtype).reshape(numel, *x.shape[1:])
    plus = (x[:, None] + eps * eye).reshape(-1, *x.shape[1:])
    minus = (x[:, None] - eps * eye).reshape(-1, *x.shape[1:])
    with torch.no_grad():
        d = (f(plus, numel) - f(minus, numel)) / (2 * eps)  # (N * numel) x K
    return d.reshape(n, numel, -1).permute(0, 2, 1).reshape(n, -1, *x.shape[1:])


def _class_scores(net: nn.Module, targets: torch.Tensor):
    def f(batch: torch.Tensor, reps: int) -> torch.Tensor:
        return net(batch).gather(1, targets.repeat_interleave(reps, 0))
    return f


def test_gradient_equals_finite_differences(net, x):
    targets = torch.tensor([[0, 2], [1, 0]])
    g = cs.gradient(net, x, targets)
    assert g.shape == (2, 2, 3, 6, 6)
    torch.testing.assert_close(g, finite_differences(_class_scores(net, targets), x), rtol=1e-6, atol=1e-8)


def test_saliency_is_max_abs_gradient_over_channels(net, x):
    fd = finite_differences(_class_scores(net, torch.tensor([[2], [2]])), x)
    torch.testing.assert_close(cs.saliency(net, x, target=2), fd.abs().amax(2), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(cs.saliency(net, x, target=2, reduce="sum"), fd.abs().sum(2), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(cs.saliency(net, x, target=2, abs=False, reduce="mean"), fd.mean(2), rtol=1e-6,
                               atol=1e-8)


def test_input_x_gradient(net, x):
    fd = finite_differences(_class_scores(net, torch.tensor([[1], [1]])), x)
    torch.testing.assert_close(cs.input_x_gradient(net, x, target=1), x[:, None] * fd, rtol=1e-6, atol=1e-8)


def test_callable_scores_target(net, x):
    """A callable returning scores: d(out_1 - out_0)/dx."""
    def margin(out: torch.Tensor) -> torch.Tensor:
        return out[:, 1] - out[:, 0]

    fd = finite_differences(lambda b, reps: margin(net(b))[:, None], x)
    torch.testing.assert_close(cs.gradient(net, x, margin), fd, rtol=1e-6, atol=1e-8)


def test_top_class_is_each_images_argmax(net, x):
    top = net(x).argmax(1)
    torch.testing.assert_close(cs.gradient(net, x), cs.gradient(net, x, top.tolist()))


def test_k_targets_one_forward_equal_k_single_calls(net, x):
    calls = []
    h = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        many = cs.gradient(net, x, [[0, 1, 2], [2, 1, 0]])
    finally:
        h.remove()
    assert len(calls) == 1, "K targets must cost one forward pass"
    for j in range(3):
        single = cs.gradient(net, x, [[0, 1, 2][j], [2, 1, 0][j]])
        torch.testing.assert_close(many[:, j : j + 1], single)


def test_batch_equals_per_image(net, x):
    both = cs.saliency(net, x, target=[0, 2])
    for i, t in enumerate([0, 2]):
        torch.testing.assert_close(both[i : i + 1], cs.saliency(net, x[i : i + 1], target=t))


def test_input_and_model_untouched_and_works_under_no_grad(net, x):
    net.train()
    before = snapshot(net)
    xr = x.clone().requires_grad_(True)
    with torch.no_grad():
        g = cs.gradient(net, xr, 0)
    assert g.abs().sum() > 0 and xr.grad is None and torch.equal(xr.detach(), x)
    assert_untouched(net, before)


def test_smoothgrad_sigma_zero_is_the_gradient(net, x):
    torch.testing.assert_close(cs.smoothgrad(net, x, target=1, n=4, sigma=0.0), cs.gradient(net, x, 1))


def test_smoothgrad_equals_naive_loop(net, x):
    """Mean of gradients at x + sigma * (max - min) * noise, one x-shaped draw per sample from the seeded generator."""
    n, sigma, seed = 5, 0.2, 3
    gen = torch.Generator().manual_seed(seed)
    span = (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).view(-1, 1, 1, 1)
    top = net(x).argmax(1, keepdim=True)  # the clean image's class for every noisy copy
    ref = sum(cs.gradient(net, x + sigma * span * torch.randn(x.shape, generator=gen, dtype=x.dtype), top)
              for _ in range(n)) / n
    for batch_size in (1, 4, 64):  # chunking does not change the result
        got = cs.smoothgrad(net, x, n=n, sigma=sigma, seed=seed, batch_size=batch_size)
        torch.testing.assert_close(got, ref)


def test_smoothgrad_reproducible_and_leaves_global_rng_alone(net, x):
    state = torch.random.get_rng_state()
    a = cs.smoothgrad(net, x, target=0, n=3, seed=7)
    b = cs.smoothgrad(net, x, target=0, n=3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, cs.smoothgrad(net, x, target=0, n=3, seed=8))
    torch.testing.assert_close(a, cs.smoothgrad(net, x, target=0, n=3, seed=torch.Generator().manual_seed(7)))


def test_smoothgrad_guided(net, x):
    torch.testing.assert_close(cs.smoothgrad(net, x, target=0, n=2, sigma=0.0, relu_rule="guided"),
                               cs.guided_backprop(net, x, target=0))


@pytest.mark.parametrize("call, match", [
    (lambda n, x: cs.saliency(n, x, reduce="median"), "reduce"),
    (lambda n, x: cs.saliency(n, x[0]), "N x C x H x W"),
    (lambda n, x: cs.smoothgrad(n, x, n=0), "positive"),
    (lambda n, x: cs.smoothgrad(n, x, sigma=-1.0), "sigma"),
    (lambda n, x: cs.smoothgrad(n, x, batch_size=0), "batch_size"),
    (lambda n, x: cs.smoothgrad(n, x, relu_rule="zennit"), "relu_rule"),
    (lambda n, x: cs.gradient(n, x.long()), "floating-point"),
    (lambda n, x: cs.gradient(n, x, target=3), "out of range"),
])
def test_errors_name_the_fix(net, x, call, match):
    with pytest.raises(cs.ConvscopeError, match=match):
        call(net, x)
