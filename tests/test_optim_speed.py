"""The faster pieces of the image-optimization loop (issue 21): they must give what the plain definitions give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import convscope as cs
from convscope.core.optim import (
    Jitter,
    PixelImage,
    clip_small_contribution,
    clip_small_norm,
    make_generators,
    optimize_images,
)
from convscope.methods.maximize import channel


def test_jitter_forward_and_gradient_are_a_per_image_roll():
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 2, 6, 7, dtype=torch.float64)
    out = Jitter(3)(x, make_generators(5, 3))
    shifts = [torch.randint(-3, 4, (2,), generator=g).tolist() for g in make_generators(5, 3)]
    ref = torch.stack([torch.roll(x[i], tuple(s), dims=(1, 2)) for i, s in enumerate(shifts)])
    assert torch.equal(out, ref)
    g_out, = torch.autograd.grad(out, x, go)
    g_ref, = torch.autograd.grad(ref, x, go)
    assert torch.equal(g_out, g_ref)  # the inverse permutation: exact, no scatter-add
    assert any(s != [0, 0] for s in shifts)
    assert torch.autograd.gradcheck(lambda t: Jitter(3)(t, make_generators(5, 3)), (x,))


@pytest.mark.parametrize("pct", [0.0, 3.0, 20.0, 50.0, 81.5, 100.0])
def test_clipping_percentiles_match_numpy_with_ties(pct):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    x[:, :, :3] = 0.25  # many equal norms
    grad = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    out_n, out_c = clip_small_norm(x, pct), clip_small_contribution(x, grad, pct)
    for i in range(2):
        norms = np.sqrt((x[i].numpy() ** 2).sum(0))
        contrib = np.abs((x[i].numpy() * grad[i].numpy()).sum(0))
        for out, v in ((out_n, norms), (out_c, contrib)):
            small = v < np.percentile(v, pct)
            assert np.array_equal(out[i].numpy(), np.where(small[None], 0.0, x[i].numpy()))


def test_adam_steps_match_the_closed_form_and_callback_sees_each_step():
    # a 1x1 convolution with fixed weights: the gradient w.r.t. the pixels is constant, so Adam's bias-corrected
    # step is lr * g / (|g| + eps) every time (Kingma & Ba 2015, Alg. 1)
    conv = nn.Conv2d(3, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]]).view(2, 3, 1, 1))
    model = nn.Sequential(conv)
    pre = cs.Preprocess.identity()
    param = PixelImage(torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64), pre)
    seen: list[tuple[int, torch.Tensor]] = []
    lr, steps = 0.01, 5
    res = optimize_images(model, channel("0", [0, 1]), param, steps=steps, lr=lr,
                          callback=lambda k, p: seen.append((k, p().detach().clone())), progress=False)
    g = conv.weight.detach()[:, :, 0, 0] / 16  # d mean / d pixel, per image's unit
    step = lr * g / (g.abs() + 1e-8)
    want = 0.5 + steps * step.view(2, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(res.x, want, atol=1e-12, rtol=0)
    assert [k for k, _ in seen] == list(range(1, steps + 1))
    assert torch.equal(seen[-1][1], res.x)
    assert torch.allclose(seen[0][1], 0.5 + step.view(2, 3, 1, 1).expand(2, 3, 4, 4), atol=1e-12, rtol=0)
