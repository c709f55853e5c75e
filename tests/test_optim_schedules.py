"""Schedules of the shared image-optimization loop (issue 22): the step size of step k is ``lr * lr_schedule(k)`` and a
:class:`Scheduled` penalty weighs ``schedule(k) * penalty`` at step k, checked against a float64 hand computation of
plain gradient ascent; the closed forms of :func:`cosine_decay` and :func:`geometric`; bad schedules refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.core.optim import Decay, Objective, PixelImage, TotalVariation, optimize_images
from convscope.core.optim.loop import cosine_decay, geometric
from convscope.core.optim.regularizers import Scheduled

STEPS = 10


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).double()


def _start() -> torch.Tensor:
    return 0.5 + 0.05 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _objective() -> Objective:
    return Objective(lambda acts: acts["1"][:, 0].mean((1, 2)) - acts["1"][:, 2].mean((1, 2)), ["1"], "c0 - c2")


def test_closed_forms():
    lr = cosine_decay(STEPS, 0.5, floor=0.1)
    assert [lr(k) for k in range(5)] == [1.0] * 5  # constant before the last half
    for k in range(5, STEPS):
        assert lr(k) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 5) / 5)), abs=1e-15)
    assert cosine_decay(STEPS, 0.0)(STEPS - 1) == 1.0  # nothing decayed
    w = geometric(1e-2, 1e-4, STEPS)
    assert w(0) == pytest.approx(1e-2) and w(STEPS - 1) == pytest.approx(1e-4)
    assert w(3) == pytest.approx(1e-2 * (1e-2) ** (3 / 9))
    held = geometric(1e-2, 1e-4, STEPS, fraction=0.5)  # annealed over the first 5 steps, then held
    assert held(4) == pytest.approx(1e-4) and held(9) == pytest.approx(1e-4) and held(2) == pytest.approx(1e-3)


def test_lr_and_penalty_weight_follow_their_schedules_exactly():
    model, x0 = _net(), _start()
    pre = cs.Preprocess.identity()
    lr, lr_at = 0.05, cosine_decay(STEPS, 0.5)
    w_at = geometric(0.3, 3e-3, STEPS)
    param = PixelImage(x0.clone(), pre)
    res = optimize_images(model, _objective(), param, steps=STEPS, lr=lr, optimizer="sgd", lr_schedule=lr_at,
                          regularizers=[Scheduled(TotalVariation(1.0), w_at)], progress=False)
    # by hand, float64: x <- x + lr_k * d/dx [J(x) - w_k TV(x - c) / (H W)], w_k and lr_k from the closed forms
    c = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    x = x0.clone()
    for k in range(STEPS):
        lr_k = lr * (1.0 if k < 5 else 0.5 * (1 + math.cos(math.pi * (k - 5) / 5)))
        w_k = 0.3 * 0.01 ** (k / (STEPS - 1))
        xr = x.clone().requires_grad_(True)
        a = model(xr)
        d = xr - c
        tv = ((d[..., :-1, 1:] - d[..., :-1, :-1]) ** 2 + (d[..., 1:, :-1] - d[..., :-1, :-1]) ** 2).sum((1, 2, 3))
        j = a[:, 0].mean((1, 2)) - a[:, 2].mean((1, 2)) - w_k * tv / 64
        g, = torch.autograd.grad(j.sum(), xr)
        x = (x + lr_k * g).clamp(0, 1)
    assert torch.allclose(res.x, x, atol=1e-12, rtol=0)
    # and the schedules mattered: constant lr and weight end elsewhere
    plain = optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=STEPS, lr=lr, optimizer="sgd",
                            regularizers=[TotalVariation(0.3)], progress=False)
    assert (plain.x - x).abs().max() > 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_per_image_step_factors_equal_each_image_alone(optimizer):
    """A schedule returning one factor per image gives image i the step ``lr * factor_i``: the same pixels as
    optimizing it alone with that step size and a plain schedule."""
    model, x0 = _net(), _start()
    pre = cs.Preprocess.identity()
    curve = cosine_decay(STEPS, 0.5)
    both = optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=STEPS, lr=0.1,
                           optimizer=optimizer, progress=False,
                           lr_schedule=lambda k: torch.tensor([1.0, 0.25 * curve(k)], dtype=torch.float64))
    first = optimize_images(model, _objective(), PixelImage(x0[:1].clone(), pre), steps=STEPS, lr=0.1,
                            optimizer=optimizer, progress=False)
    second = optimize_images(model, _objective(), PixelImage(x0[1:].clone(), pre), steps=STEPS, lr=0.025,
                             optimizer=optimizer, lr_schedule=curve, progress=False)
    assert torch.allclose(both.x, torch.cat([first.x, second.x]), atol=1e-12, rtol=0)
    assert (first.x - x0[:1]).abs().max() > 3 * (second.x - x0[1:]).abs().max()  # the factors mattered
    with pytest.raises(cs.ConvscopeError, match="one per image"):
        optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=1, lr=0.1, progress=False,
                        lr_schedule=lambda k: torch.ones(3))


def test_adam_lr_schedule_of_zero_freezes_the_images():
    model, x0 = _net(), _start()
    pre = cs.Preprocess.identity()
    three = optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=3, lr=0.05, progress=False)
    frozen = optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=STEPS, lr=0.05,
                             lr_schedule=lambda k: 1.0 if k < 3 else 0.0, progress=False)
    assert torch.equal(frozen.x, three.x) and frozen.history.shape[0] == STEPS
    assert (three.x - x0).abs().max() > 1e-3


def test_bad_schedules_are_refused():
    model, x0 = _net(), _start()
    pre = cs.Preprocess.identity()
    with pytest.raises(cs.ConvscopeError, match="finite factor"):
        optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=2, lr=0.05,
                        lr_schedule=lambda k: float("nan"), progress=False)
    with pytest.raises(cs.ConvscopeError, match="finite factor"):
        optimize_images(model, _objective(), PixelImage(x0.clone(), pre), steps=2, lr=0.05,
                        regularizers=[Scheduled(TotalVariation(1.0), lambda k: -1.0)], progress=False)
    with pytest.raises(cs.ConvscopeError, match="penalty regularizer"):
        Scheduled(Decay(0.1), geometric(1.0, 0.1, 5))
    with pytest.raises(cs.ConvscopeError, match="> 0"):
        geometric(0.0, 1e-4, 5)
    with pytest.raises(cs.ConvscopeError, match="fraction"):
        cosine_decay(5, 1.5)
