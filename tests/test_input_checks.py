"""core/checks.py: bad model inputs give one-line errors with the fix, the device is matched, the first non-finite
layer is named; 1- and 4-channel models work with saliency, Grad-CAM and occlusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope import gradcam, occlusion, saliency
from convscope.core.checks import (
    all_finite,
    check_finite,
    check_forward_args,
    check_model_input,
    first_conv,
    first_nonfinite_layer,
    input_channels,
)
from convscope.errors import ConvscopeError

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(channels: int = 3, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes))


@pytest.mark.parametrize("x,match", [
    ([[0.5]], r"is a list, not a tensor; load images with cs.load_images"),
    (torch.rand(3, 16, 16), r"takes 4-D input N x C x H x W but x has shape \(3, 16, 16\); add a batch dimension"),
    (torch.rand(1, 1, 3, 16, 16), "reshape it to N x C x H x W"),
    (torch.rand(0, 3, 16, 16), "empty"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), r"uint8 .*x.float\(\) / 255 then the model's preprocess"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.long), r"int64; the model takes floating-point input: convert with "
                                                   r"x.float\(\)"),
    (torch.rand(1, 3, 16, 16, dtype=torch.float64), r"x is float64 but the model is float32: convert x with "
                                                     r"x.float\(\) \(or the model with model.double\(\)\)"),
    (torch.rand(1, 1, 16, 16), r"first convolution '0' takes 3 channels but x has 1 .*x.expand\(-1, 3, -1, -1\)"),
    (torch.rand(1, 4, 16, 16), r"takes 3 channels but x has 4 .*x\[:, :3\]"),
    (torch.rand(1, 16, 16, 3), r"channels-last .*x.permute\(0, 3, 1, 2\)"),
])
def test_bad_inputs_are_one_line_errors(x, match):
    model = _net()
    before = snapshot(model)
    with pytest.raises(ConvscopeError, match=match) as err:
        check_model_input(model, x)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert_untouched(model, before)


def test_good_input_is_returned_as_is_and_other_ranks_follow_the_model():
    model = _net()
    x = torch.rand(2, 3, 16, 16)
    assert check_model_input(model, x) is x  # already on the model's device: no copy
    seq = nn.Sequential(nn.Conv1d(2, 3, 3))
    s = torch.rand(4, 2, 10)
    assert check_model_input(seq, s) is s
    with pytest.raises(ConvscopeError, match=r"3-D input N x C x L"):
        check_model_input(seq, torch.rand(4, 2, 10, 10))
    mlp = nn.Sequential(nn.Linear(5, 2))  # no convolution: rank and channels are the model's business
    v = torch.rand(3, 5)
    assert check_model_input(mlp, v) is v
    emb = nn.Sequential(nn.Embedding(10, 4))  # token ids are integers by design
    ids = torch.tensor([[1, 2]])
    assert check_model_input(emb, ids) is ids
    nhwc = torch.rand(1, 16, 16, 3)
    assert check_model_input(_net(), nhwc, layout="NHWC") is nhwc
    with pytest.raises(ConvscopeError, match="layout='NWHC'"):
        check_model_input(model, x, layout="NWHC")


def test_first_conv_is_cached_and_rescanned_when_the_stem_is_replaced():
    model = _net()
    assert first_conv(model) == ("0", model[0])
    assert first_conv(model)[1] is model[0]
    model[0] = nn.Conv2d(1, 6, 3, padding=1)  # adapted to grayscale after a first call
    assert first_conv(model)[1] is model[0]
    x = torch.rand(1, 1, 16, 16)
    assert check_model_input(model, x) is x
    assert input_channels(model) == 1 and input_channels(_net(4)) == 4 and input_channels(nn.Linear(2, 2)) == 3


def test_forward_pre_hook_checks_every_call_and_leaves_the_model():
    """How the probe's root pre-hook uses it: a method call with a bad input stops at the hook, one line."""
    model = _net()
    handle = model.register_forward_pre_hook(lambda m, args: check_forward_args(m, args))
    try:
        before = snapshot(model)
        with pytest.raises(ConvscopeError, match="float64 but the model is float32") as err:
            saliency(model, torch.rand(1, 3, 16, 16, dtype=torch.float64))
        assert "\n" not in str(err.value)
        assert_untouched(model, before, hooks=1)
        assert saliency(model, torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
        assert check_forward_args(model, ({"x": 1},)) is None  # not a tensor: left to the model
        assert check_forward_args(model, (torch.rand(1, 3, 8, 8), "extra")) is None  # nothing moved
    finally:
        handle.remove()


class _LogNet(nn.Module):
    """A NaN made by forward code between modules: log of a negative number."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.log(self.conv(x) - 100.0)  # NaN everywhere
        return self.fc(a.mean(dim=(2, 3)))


def test_check_finite_names_the_first_nonfinite_layer():
    model = _net()
    model.train()  # the diagnostic pass must not touch batch-norm statistics or the mode
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("inf")  # (inf, not NaN: the snapshot compares with torch.equal)
    before = snapshot(model)
    out = torch.full((2, 4), float("nan"))
    with pytest.raises(ConvscopeError, match=r"has NaN: the first layer whose output is non-finite is '3' \(Conv2d\) "
                                             r"\(its weights hold NaN/inf") as err:
        check_finite(model, x, out)
    assert "\n" not in str(err.value)
    assert_untouched(model, before)
    assert first_nonfinite_layer(model, x) == ("3", "output")
    check_finite(model, x, torch.zeros(2, 4))  # finite: no pass, no error
    assert all_finite({"a": [torch.zeros(1)], "b": torch.zeros(1, dtype=torch.long)})
    assert not all_finite((torch.zeros(1), {"c": torch.tensor([float("inf")])}))


def test_check_finite_points_at_forward_code_input_and_maps():
    model = _LogNet()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ConvscopeError, match=r"first appears in the input of layer 'fc' \(Linear\)"):
        check_finite(model, x, model(x))
    bad_x = x.clone()
    bad_x[0, 0, 0, :2] = float("inf")
    with pytest.raises(ConvscopeError, match="the input x holds 2 NaN/inf values; clean the input"):
        check_finite(_net(), bad_x, torch.full((1, 4), float("nan")))
    with pytest.raises(ConvscopeError, match=r"the gradcam map has inf although every layer's output is finite"):
        check_finite(_net(), torch.rand(1, 3, 8, 8), torch.tensor([float("inf")]), what="the gradcam map")


def test_check_finite_in_a_root_forward_hook_does_not_recurse():
    model = _LogNet()
    before = snapshot(model)
    handle = model.register_forward_hook(lambda m, args, out: check_finite(m, args[0], out))
    try:
        with pytest.raises(ConvscopeError, match="input of layer 'fc'"):
            saliency(model, torch.rand(1, 3, 8, 8))
        assert_untouched(model, before, hooks=1)
    finally:
        handle.remove()


@pytest.mark.parametrize("channels", [1, 4])
def test_methods_run_on_1_and_4_channel_models(channels):
    model = _net(channels).eval()
    before = snapshot(model)
    x = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(channels))
    assert check_model_input(model, x) is x
    sal = saliency(model, x, target=1)
    xx = x.clone().requires_grad_(True)  # independent: autograd, max |d S / d x| over the channels
    (g,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)
    torch.testing.assert_close(sal[:, 0], g.abs().amax(1))
    cam = gradcam(model, x, target=1, layer="4")
    assert cam.shape == (2, 1, 16, 16) and bool(torch.isfinite(cam).all()) and cam.sum() > 0
    occ = occlusion(model, x, target=1, window=16, stride=16, fill=0.5)  # one window covering the whole image
    with torch.no_grad():
        drop = model(x)[:, 1] - model(torch.full_like(x, 0.5))[:, 1]
    torch.testing.assert_close(occ.maps[:, 0], drop[:, None, None].expand(2, 16, 16))
    assert_untouched(model, before)
