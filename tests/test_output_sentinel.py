"""One name for "the model output" (core.layers.OUTPUT / is_output) and the Regularization passed whole to the
optimization loop (core/optim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope.core.optim as optim
from convscope.core.images import Preprocess
from convscope.core.layers import OUTPUT, is_output, layer_or_output
from convscope.core.optim import (
    AlphaNorm,
    Decay,
    Jitter,
    PixelImage,
    RandomScale,
    Regularization,
    TotalVariation,
    make_generators,
    make_param,
    optimize_images,
)
from convscope.errors import ConvscopeError
from convscope.methods.maximize import activation_maximization, logit

pytestmark = pytest.mark.usefixtures("one_thread")

SPELLINGS = [None, "", OUTPUT, "@output", "logits", "output"]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


class _Named(nn.Module):
    """A model with a layer called ``output`` (so ``"output"`` names that layer, ``"logits"`` still the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
        self.output = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x)).mean((2, 3))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_is_the_output(spelling):
    model = _net()
    assert is_output(spelling) and is_output(spelling, model)
    assert layer_or_output(model, spelling) == OUTPUT
    assert optim.OUTPUT is OUTPUT  # the loop reads the same key


def test_layers_are_not_the_output():
    model = _net()
    for name in ("0", "4", "features", "@out", " logits"):
        assert not is_output(name, model)
    assert layer_or_output(model, "1") == "1"
    assert is_output(model, model) and not is_output(model[0], model)


def test_a_layer_named_output_wins_over_the_alias():
    model = _Named()
    assert not is_output("output", model) and layer_or_output(model, "output") == "output"
    assert is_output("logits", model) and is_output("output")  # without a model: the alias
    res = activation_maximization(model, "output", [1], steps=2, size=12, regularize="none", progress=False)
    assert res.layer == "output" and res.names == ["channel('output', 1)"]


def test_activation_maximization_of_the_logits_is_the_same_for_every_spelling():
    model = _net()
    runs = [activation_maximization(model, s, [0, 2], steps=3, size=12, regularize="none", progress=False)
            for s in SPELLINGS]
    for r in runs:
        assert r.layer is None and r.names == ["logit(0)", "logit(2)"]
        assert torch.equal(r.x, runs[0].x)
    # the objective is the logit itself: recompute it on the final images
    with torch.no_grad():
        out = model(runs[0].x)
    assert torch.allclose(runs[0].activations, out[[0, 1], [0, 2]], atol=1e-6)


def test_the_loop_returns_the_output_under_the_sentinel():
    model = _net()
    pre = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    gens = make_generators(0, 2)
    param = make_param("pixel", "noise", 2, (12, 12), pre, gens, torch.zeros(()))
    res = optimize_images(model, logit([1, 2]), param, steps=0, lr=0.1, generators=gens, progress=False)
    with torch.no_grad():
        out = model(res.x)
    assert res.output is not None and torch.allclose(res.output, out)
    assert OUTPUT not in res.activations


def test_regularization_passed_whole_equals_its_pieces():
    reg = Regularization(lambda_l2=1e-3, lambda_alpha=0.1, alpha=4.0, B=0.5, lambda_tv=0.2, beta=1.5, V=0.1,
                         theta_decay=0.1, jitter=2, scales=(0.9, 1.1))
    assert reg.regularizers() == [optim.L2Penalty(1e-3), AlphaNorm(0.1, 4.0, 0.5), TotalVariation(0.2, 1.5, 0.1),
                                  Decay(0.1)]
    assert [type(t) for t in reg.transforms()] == [Jitter, RandomScale]
    model = _net()
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    xs = []
    for whole in (True, False):
        gens = make_generators(3, 2)
        param = make_param("pixel", "noise", 2, (12, 12), pre, gens, torch.zeros(()))
        kw = ({"regularization": reg} if whole else
              {"regularizers": reg.regularizers(), "transforms": reg.transforms()})
        xs.append(optimize_images(model, logit([0, 1]), param, steps=4, lr=0.05, generators=gens, progress=False,
                                  **kw).x)
    assert isinstance(param, PixelImage) and torch.equal(xs[0], xs[1])
    assert not torch.equal(xs[0], make_param("pixel", "noise", 2, (12, 12), pre, make_generators(3, 2),
                                             torch.zeros(()))())  # the steps moved the images


def test_regularization_refuses_bad_values():
    for bad in ({"alpha": 0.0}, {"V": 0.0}, {"lambda_tv": -1.0}, {"theta_decay": 1.0}):
        with pytest.raises(ConvscopeError, match="Regularization"):
            Regularization(**bad)
    model = _net()
    gens = make_generators(0, 1)
    pre = Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3)
    param = make_param("pixel", "noise", 1, (12, 12), pre, gens, torch.zeros(()))
    with pytest.raises(ConvscopeError, match="Regularization"):
        optimize_images(model, logit(0), param, steps=1, lr=0.1, regularization="yosinski", progress=False)
