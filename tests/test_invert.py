"""Regularized inversion (methods/invert.py), its priors (core/optim.py) and feature perturbations (methods/perturb.py).

An orthogonal 1x1 convolution is exactly invertible: inversion must give the input back. The priors against their
formulas computed by hand on small tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.core.optim import AlphaNorm, TotalVariation, alpha_norm, total_variation
from convscope.errors import ConvscopeError, LayerNotFoundError
from convscope.methods.invert import default_hyperparameters, invert, layer_depths
from convscope.methods.perturb import binarize, drop_least, dropout, perturbation_study

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _orthogonal_net() -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1, bias=False)
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    with torch.no_grad():
        conv.weight.copy_(q.view(3, 3, 1, 1))
    return nn.Sequential(conv)


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _images(n: int = 2, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, 3, size, size, generator=g)  # RGB in [0, 1], away from the box edges


# --------------------------------------------------------------------------- the priors, by hand


def test_alpha_norm_matches_formula():
    x = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    assert alpha_norm(x, 6).item() == pytest.approx(1 + 64 + 0.5**6)
    assert alpha_norm(x, 1).item() == pytest.approx(3.5)
    reg = AlphaNorm(lambda_alpha=3.0, alpha=2, B=2.0)  # 3 * sum (x / 2)^2 / (H W)
    assert reg.penalty(x).item() == pytest.approx(3 * (1 + 4 + 0.25) / 4 / 4)


def test_total_variation_matches_formula():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0], [1.0, 5.0, 4.0]]]])
    # (i, j) over the top-left 2 x 2: ((x[i, j+1] - x[i, j])^2 + (x[i+1, j] - x[i, j])^2)
    terms = [(1 - 0) ** 2 + (2 - 0) ** 2, (3 - 1) ** 2 + (2 - 1) ** 2, (2 - 2) ** 2 + (1 - 2) ** 2,
             (0 - 2) ** 2 + (5 - 2) ** 2]
    assert total_variation(x, 2).item() == pytest.approx(sum(terms))
    assert total_variation(x, 1).item() == pytest.approx(sum(t ** 0.5 for t in terms))
    two = torch.cat([x, 2 * x], 1)  # channels add up; batch rows stay apart
    assert total_variation(torch.cat([two, x.repeat(1, 2, 1, 1)]), 2).tolist() == pytest.approx(
        [5 * sum(terms), 2 * sum(terms)])
    reg = TotalVariation(lambda_tv=2.0, beta=2, V=0.5)
    assert reg.penalty(x).item() == pytest.approx(2 * sum(terms) / 0.25 / 9)


def test_total_variation_gradient_is_finite_on_flat_images_for_beta_1():
    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    total_variation(x, 1.0).sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- inversion


def test_orthogonal_layer_is_inverted_exactly():
    model = _orthogonal_net()
    x0 = _images(2, 8)
    before = snapshot(model)
    res = invert(model, x0, "0", steps=300, lambda_alpha=1e-6, lambda_tv=1e-6, jitter=0, lr=0.02, progress=False)
    assert_untouched(model, before)
    assert res.images.shape == (2, 3, 8, 8) and res.layers == ["0", "0"]
    assert (res.images - x0).abs().max() < 0.01
    assert res.error.max() < 1e-4
    # the error is ||W(x - x0)||^2 / ||W x0||^2 = ||x - x0||^2 / ||x0||^2 (W orthogonal)
    expect = (res.x - x0).pow(2).flatten(1).sum(1) / x0.pow(2).flatten(1).sum(1)
    assert torch.allclose(res.error, expect, rtol=1e-3, atol=1e-9)


def test_target_features_are_inverted_instead():
    model = _orthogonal_net()
    x0, other = _images(1, 8, seed=0), _images(1, 8, seed=1)
    target = model(other).detach()
    res = invert(model, x0, ["0"], target_features={"0": target}, steps=300, lambda_alpha=0, lambda_tv=0, jitter=0,
                 lr=0.02, progress=False)
    assert (res.images - other).abs().max() < 0.01


def test_batched_layers_equal_one_layer_at_a_time():
    model = _tiny_cnn()
    x = _images(2, 12)
    kw = dict(steps=4, lambda_alpha=1e-3, jitter=2, seed=3, progress=False)
    both = invert(model, x, ["1", "3"], lambda_tv=0.1, **kw)
    one = [invert(model, x, [name], lambda_tv=0.1, **kw) for name in ("1", "3")]
    assert both.layers == ["1", "1", "3", "3"] and both.image_index.tolist() == [0, 1, 0, 1]
    assert torch.allclose(both.x, torch.cat([r.x for r in one]), atol=1e-5)
    assert torch.allclose(both.error, torch.cat([r.error for r in one]), rtol=1e-4, atol=1e-7)
    assert torch.equal(both.for_layer("3"), both.images[2:])


def test_default_hyperparameters_step_shrinks_with_depth():
    model = _tiny_cnn()
    d = layer_depths(model, ["0", "3", "5"], _images(1, 12))
    assert 0 < d["0"] < d["3"] < d["5"] == 1.0
    shallow, deep = default_hyperparameters(d["0"], 112), default_hyperparameters(1.0, 112)
    lr_shallow = shallow.lr if isinstance(shallow.lr, tuple) else (shallow.lr,)
    assert min(lr_shallow) > deep.lr and shallow.lr_decay > deep.lr_decay and shallow.jitter <= deep.jitter
    res = invert(model, _images(1, 12), "3,5", steps=2, progress=False)  # defaults picked per layer
    assert res.images.shape == (2, 3, 12, 12) and torch.isfinite(res.error).all()


def test_invert_errors_name_the_fix():
    model = _tiny_cnn()
    x = _images(1, 12)
    with pytest.raises(LayerNotFoundError):
        invert(model, x, "nope", steps=1)
    with pytest.raises(ConvscopeError, match="one per image"):
        invert(model, x, "1", steps=1, seed=[1, 2])
    with pytest.raises(ConvscopeError, match="target_features"):
        invert(model, x, "1", steps=1, target_features={"3": torch.zeros(1, 8, 6, 6)})
    with pytest.raises(ConvscopeError, match="N x 3 x H x W"):
        invert(model, x[0], "1", steps=1)


# --------------------------------------------------------------------------- perturbations


def _norm(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).norm(dim=1)


def test_binarize_keeps_signs_one_magnitude_and_the_norm():
    a = torch.tensor([[3.0, 0.0, -1.0, 2.0], [0.0, 0.0, 5.0, 0.0]])
    b = binarize(a)
    assert torch.allclose(_norm(b), _norm(a))
    m0 = (9 + 1 + 4) ** 0.5 / 3 ** 0.5
    assert torch.allclose(b[0], torch.tensor([m0, 0.0, -m0, m0]))
    assert torch.allclose(b[1], torch.tensor([0.0, 0.0, 5.0, 0.0]))


def test_dropout_zeroes_half_and_rescales_the_rest_uniformly():
    a = torch.rand(3, 16, 8, 8) + 0.1
    d = dropout(a, 0.5, seed=1)
    assert torch.allclose(_norm(d), _norm(a))
    kept = d != 0
    assert 0.4 < kept.float().mean() < 0.6
    ratio = d[kept] / a[kept]
    for i in range(3):  # one scale per image
        r = d[i][kept[i]] / a[i][kept[i]]
        assert torch.allclose(r, r[0].expand_as(r))
    assert ratio.min() > 1
    assert torch.equal(d, dropout(a, 0.5, seed=1)) and not torch.equal(d, dropout(a, 0.5, seed=2))


def test_drop_least_drops_the_weakest_maps():
    a = torch.zeros(1, 4, 2, 2)
    for c, v in enumerate([4.0, 1.0, 3.0, 2.0]):
        a[0, c] = v
    d = drop_least(a, 0.5)
    assert torch.allclose(_norm(d), _norm(a))
    assert d[0, 1].abs().sum() == 0 and d[0, 3].abs().sum() == 0
    assert torch.allclose(d[0, 0] / 4, d[0, 2] / 3) and d[0, 0, 0, 0] > 4
    fc = drop_least(torch.tensor([[1.0, 5.0, 2.0, 4.0]]))  # a fully connected code: units are the maps
    assert fc[0, 0] == 0 and fc[0, 2] == 0 and torch.allclose(_norm(fc), torch.tensor([46 ** 0.5]))


def test_perturbation_study_regularized_reports_errors_against_the_unperturbed():
    model = _tiny_cnn()
    before = snapshot(model)
    study = perturbation_study(model, _images(2, 12), "3", steps=3, progress=False)
    assert_untouched(model, before)
    assert study.kinds == ["none", "binarize", "dropout", "drop_least"]
    assert study.images.shape == (4, 2, 3, 12, 12)
    assert torch.equal(study.image_error[0], torch.zeros(2)) and (study.image_error[1:] > 0).all()
    assert torch.isfinite(study.feature_error).all()
