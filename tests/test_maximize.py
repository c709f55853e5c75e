"""Activation maximization, its regularizers and parametrizations, fooling images (methods/maximize.py, core/optim.py).

Tiny hand-built models with known optima; the regularizers against their equations on small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.imageops import gaussian_blur
from convscope.core.optim import (
    OUTPUT,
    Blur,
    ClipContribution,
    ClipNorm,
    Decay,
    FourierImage,
    Jitter,
    L2Penalty,
    PixelImage,
    RandomScale,
    clip_small_contribution,
    clip_small_norm,
    decay,
    make_generators,
    optimize_images,
)
from convscope.methods.maximize import (
    PRESETS,
    Regularization,
    activation_maximization,
    channel,
    fooling_image,
    logit,
    neuron,
)

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _conv_unit(k: int = 5, seed: int = 0) -> nn.Conv2d:
    """One conv unit whose response is the linear filter ``w`` (a fixed random 3 x k x k filter)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 1, k)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(1, 3, k, k))
    return conv


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 4))


# --------------------------------------------------------------------------- vanilla AM finds the filter


def test_vanilla_am_centre_neuron_converges_to_the_filter():
    # a(x) = <w, patch(x)> + b; maximizing a(x) - lambda ||x - c||^2 gives x - c = w / (2 lambda) on the centre
    # neuron's receptive field and 0 elsewhere (c = grey: the model takes RGB in [0, 1])
    model = nn.Sequential(_conv_unit(5))
    lam = 4.0
    r = activation_maximization(model, "0", [0], kind="neuron", regularize="none", lambda_l2=lam, optimizer="sgd",
                                lr=0.05, steps=60, size=9, progress=False)
    delta = r.x[0] - 0.5
    w = model[0].weight[0].detach()
    assert _cos(delta[:, 2:7, 2:7], w) > 0.95
    assert torch.allclose(delta[:, 2:7, 2:7], w / (2 * lam), atol=1e-3)
    outside = delta.clone()
    outside[:, 2:7, 2:7] = 0
    assert outside.abs().max() < 1e-3
    assert r.history.shape == (60, 1) and r.history[-1, 0] > r.history[0, 0]


def test_vanilla_am_channel_mean_converges_to_the_filter():
    model = nn.Sequential(_conv_unit(5, seed=3), nn.ReLU())
    r = activation_maximization(model, "0", 0, regularize="none", lambda_l2=4.0, optimizer="sgd", lr=0.05,
                                steps=60, size=5, init="mean", progress=False)
    assert _cos(r.x[0] - 0.5, model[0].weight[0].detach()) > 0.95


# --------------------------------------------------------------------------- regularizers = their equations


def test_decay_scales_by_one_minus_theta_exactly():
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(decay(x, 0.3), (1 - 0.3) * x)
    assert torch.equal(Decay(0.3).project(x, torch.randn_like(x), 7), (1 - 0.3) * x)


def test_decay_in_the_loop_when_the_gradient_is_zero():
    # a unit with zero weights: only the decay moves the image, delta_k = (1 - theta)^k delta_0
    conv = nn.Conv2d(3, 1, 3)
    nn.init.zeros_(conv.weight)
    model = nn.Sequential(conv)
    gens = make_generators(0, 2)
    x0 = 0.5 + 0.1 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    param = PixelImage(x0, cs.Preprocess.identity())
    optimize_images(model, channel("0", 0), param, steps=4, lr=0.1, optimizer="sgd",
                    regularizers=[Decay(0.25)], generators=gens, progress=False)
    assert torch.allclose(param.delta.detach(), (x0 - 0.5) * 0.75**4, atol=1e-7)


def test_blur_every_k_steps_equals_gaussian_blur():
    x, g = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)
    blur = Blur(1.0, every=3)
    assert torch.equal(blur.project(x, g, 0), gaussian_blur(x, 1.0))
    assert torch.equal(blur.project(x, g, 6), gaussian_blur(x, 1.0))
    assert torch.equal(blur.project(x, g, 1), x)
    assert torch.equal(blur.project(x, g, 5), x)


def test_clip_small_norm_zeroes_exactly_the_pixels_below_the_percentile():
    x = torch.randn(3, 3, 5, 7, dtype=torch.float64)
    out = clip_small_norm(x, 40)
    for i in range(3):
        norms = np.linalg.norm(x[i].numpy(), axis=0)
        small = norms < np.percentile(norms, 40)
        assert small.sum() > 0
        expect = x[i].numpy() * ~small[None]
        np.testing.assert_array_equal(out[i].numpy(), expect)
    assert torch.equal(ClipNorm(40).project(x, torch.zeros_like(x), 0), out)


def test_clip_small_contribution_zeroes_exactly_the_pixels_below_the_percentile():
    x, g = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out = clip_small_contribution(x, g, 70)
    for i in range(2):
        contrib = np.abs((x[i] * g[i]).sum(0).numpy())  # |sum_c x * dA/dx|: Yosinski et al.'s theta_c_pct
        small = contrib < np.percentile(contrib, 70)
        np.testing.assert_array_equal(out[i].numpy(), x[i].numpy() * ~small[None])
    assert torch.equal(ClipContribution(70).project(x, g, 0), out)


def test_l2_penalty_is_lambda_squared_norm_per_image():
    d = torch.randn(2, 3, 4, 4)
    assert torch.allclose(L2Penalty(0.5).penalty(d), 0.5 * (d**2).sum((1, 2, 3)))


def test_presets_and_overrides():
    assert PRESETS["none"].regularizers() == [] and PRESETS["none"].transforms() == []
    assert PRESETS["simonyan"].regularizers() == [L2Penalty(PRESETS["simonyan"].lambda_l2)]
    kinds = [type(r).__name__ for r in PRESETS["yosinski"].regularizers()]
    assert kinds == ["Decay", "Blur", "ClipNorm", "ClipContribution"]
    with pytest.raises(cs.ConvscopeError, match="theta_n_pct"):
        Regularization(theta_n_pct=150)


# --------------------------------------------------------------------------- objectives


def test_class_objective_is_the_logit_not_the_softmax():
    # one plain gradient-ascent step from the mean image moves x by lr * d logit_c / dx = lr * W[c]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    w, lr, c = model[1].weight.detach(), 1e-3, 1
    r = activation_maximization(model, None, [c], regularize="none", optimizer="sgd", lr=lr, steps=1, size=4,
                                init="mean", progress=False)
    step = (r.x[0] - 0.5).flatten()
    assert torch.allclose(step, lr * w[c], atol=1e-7)
    x0 = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    (g_prob,) = torch.autograd.grad(F.softmax(model(x0), 1)[0, c], x0)
    assert not torch.allclose(step, lr * g_prob.flatten(), atol=1e-5)  # the softmax gradient points elsewhere
    assert torch.allclose(r.history[0], model(x0)[0, c].detach())  # the recorded value is the logit


def test_objective_algebra_and_neuron_positions():
    acts = {"a": torch.randn(2, 4, 5, 5), "b": torch.randn(2, 6), OUTPUT: torch.randn(2, 3)}
    obj = channel("a", 1) + 2 * neuron("b", 3) - neuron("a", 2, y=0, x=4) - 1.5 - logit(2) / 2
    expect = (acts["a"][:, 1].mean((1, 2)) + 2 * acts["b"][:, 3] - acts["a"][:, 2, 0, 4] - 1.5
              - acts[OUTPUT][:, 2] / 2)
    assert torch.allclose(obj(acts), expect)
    assert set(obj.layers) == {"a", "b", OUTPUT}
    assert torch.equal(neuron("a", 0)(acts), acts["a"][:, 0, 2, 2])  # centre by default
    assert torch.equal(channel("a", [3, 0])(acts), torch.stack([acts["a"][0, 3].mean(), acts["a"][1, 0].mean()]))
    assert torch.equal(sum([channel("b", 0), channel("b", 1)])(acts), acts["b"][:, 0] + acts["b"][:, 1])
    with pytest.raises(cs.TargetError, match="valid 0..3"):
        channel("a", 9)(acts)


def test_objective_combination_optimizes_and_forward_stops_after_deepest_layer():
    class Tripwire(nn.Module):
        def forward(self, x):
            raise AssertionError("the forward pass ran past the deepest layer the objective reads")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), Tripwire())
    obj = channel("2", 1) - 0.5 * channel("0", 3)
    r = activation_maximization(model, objective=[obj, channel("1", 0)], steps=3, size=12, progress=False)
    assert r.images.shape == (2, 3, 12, 12) and r.units is None
    assert r.names[0] == obj.name


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("parametrization", ["pixel", "fourier"])
def test_batch_of_units_equals_one_unit_at_a_time(parametrization):
    # float64: Adam rescales every gradient to a step of about lr, so float32 rounding differences between a batched
    # and a single convolution would be amplified where a gradient is nearly zero
    model = _tiny_cnn().double()
    kw = dict(steps=4, size=16, progress=False, parametrization=parametrization, jitter=2, scales=(0.9, 1.0, 1.1))
    if parametrization == "pixel":
        kw.update(regularize="yosinski", blur_every=2)
    units = [0, 3, 5]
    batch = activation_maximization(model, "2", units, **kw)
    for i, u in enumerate(units):
        one = activation_maximization(model, "2", [u], seed=i, **kw)  # image i draws from generator seed + i
        assert torch.allclose(batch.images[i], one.images[0], atol=1e-5)
        assert torch.allclose(batch.activations[i], one.activations[0], atol=1e-5)
    chunked = activation_maximization(model, "2", units, batch_size=2, **kw)
    assert torch.allclose(chunked.images, batch.images, atol=1e-5)
    assert not torch.allclose(batch.images[0], batch.images[1])


def test_transforms_draw_per_image_and_match_their_definition():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    gens = make_generators(0, 2)
    out = Jitter(2)(x, gens)
    check = make_generators(0, 2)
    for i in range(2):
        dy, dx = torch.randint(-2, 3, (2,), generator=check[i]).tolist()
        assert torch.equal(out[i], torch.roll(x[i], (dy, dx), dims=(1, 2)))
    assert torch.allclose(RandomScale([1.0])(x, gens), x, atol=1e-5)  # scale 1: identity resampling


# --------------------------------------------------------------------------- parametrizations


@pytest.mark.parametrize("decorrelate", [True, False])
def test_fourier_round_trip(decorrelate):
    rgb = 0.05 + 0.9 * torch.rand(2, 3, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    param = FourierImage.from_pixels(rgb, cs.Preprocess.identity(), decorrelate=decorrelate)
    assert param.spectrum.shape == (2, 3, 7, 9 // 2 + 1, 2)
    assert torch.allclose(param.pixels(), rgb, atol=1e-10)


def test_fourier_images_stay_in_unit_range_and_match_x():
    model = _tiny_cnn()
    pre = cs.Preprocess(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    r = activation_maximization(model, "2", [1, 2], parametrization="fourier", steps=5, lr=0.5, size=16,
                                preprocess=pre, progress=False)
    assert r.images.min() >= 0 and r.images.max() <= 1
    assert torch.allclose(pre.normalize(r.images), r.x, atol=1e-5)
    with pytest.raises(cs.ConvscopeError, match="pixel parametrization"):
        activation_maximization(model, "2", [1], parametrization="fourier", regularize="yosinski", steps=1,
                                size=16, progress=False)


def test_pixel_images_stay_in_the_valid_box():
    model = _tiny_cnn()
    pre = cs.Preprocess(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    r = activation_maximization(model, "2", [1], regularize="none", lr=1.0, steps=3, size=16, preprocess=pre,
                                progress=False)
    rgb = pre.denormalize(r.x)
    assert rgb.min() >= -1e-6 and rgb.max() <= 1 + 1e-6
    assert torch.allclose(r.images, rgb.clamp(0, 1))


# --------------------------------------------------------------------------- fooling images, hygiene


def test_fooling_reaches_the_confidence_on_demo_net(demo):
    before = snapshot(demo)
    targets = [5, 4]
    r = fooling_image(demo, targets, confidence=0.9999, max_steps=300, progress=False)
    assert r.images.shape == (2, 3, 112, 112)
    assert bool(r.success.all()) and (r.steps >= 0).all() and (r.steps < 300).all()
    assert (r.probabilities >= 0.9999).all()
    assert r.predicted.tolist() == targets and r.target.tolist() == targets
    with torch.no_grad():
        p = F.softmax(demo(r.x), 1)[torch.arange(2), torch.tensor(targets)]
    assert torch.allclose(p, r.probabilities, atol=1e-6)
    assert r.history.shape[0] == int(r.steps.max()) and r.history.shape[1] == 2
    # an image stops changing once confident: alone (same seed) it ends exactly where it ended in the batch
    first = int(r.steps.argmin())
    alone = fooling_image(demo, [targets[first]], max_steps=300, seed=first, progress=False)
    assert alone.steps.tolist() == [int(r.steps[first])]
    # float32 convolutions round differently at batch 1 and batch 2 on some CPUs (AVX2 vs AVX-512 kernels), and
    # Adam's normalized steps amplify that to ~1e-3 after a few steps: equal up to that, not bit for bit
    assert torch.allclose(alone.x[0], r.x[first], atol=5e-3)
    assert_untouched(demo, before)


def test_model_untouched_on_success_and_error():
    model = _tiny_cnn()
    model.train()
    model[0].requires_grad_(False)
    before = snapshot(model)
    activation_maximization(model, "3", [0, 1], steps=2, size=16, progress=False)
    assert_untouched(model, before)
    with pytest.raises(cs.TargetError, match="out of range"):
        activation_maximization(model, "3", [0, 99], steps=2, size=16, progress=False)
    assert_untouched(model, before)
    with pytest.raises(cs.LayerNotFoundError):
        activation_maximization(model, "conv9", [0], steps=2, size=16, progress=False)
    assert_untouched(model, before)
