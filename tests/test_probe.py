"""The probe: capture, edit, backward rules, and leaving the model exactly as it came."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.core.layers import named_layers
from convscope.core.probe import probe
from convscope.errors import ConvscopeError, LayerNotFoundError

from .helpers import assert_untouched, snapshot


class InplaceNet(nn.Module):
    """conv -> in-place ReLU module -> conv -> functional in-place relu_ -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        h = self.conv2(h)
        h.relu_()
        return self.fc(h.mean((2, 3)))


def _zoo_cases(lite0, demo):
    return [pytest.param(lite0, id="efficientnet_lite0"), pytest.param(demo, id="demo_net")]


@pytest.fixture(params=["efficientnet_lite0", "demo_net"])
def zoo_model(request, lite0, demo):
    return {"efficientnet_lite0": lite0, "demo_net": demo}[request.param]


def test_every_layer_captured_and_model_untouched(zoo_model):
    """One forward+backward over every named layer of a zoo model; afterwards nothing has changed."""
    model = zoo_model
    size = model.preprocess.input_size
    model.train()  # a mode the probe must restore
    first = next(model.parameters())
    first.requires_grad_(False)  # a requires_grad the probe must restore
    before = snapshot(model)
    x = torch.randn(2, 3, *size, requires_grad=True)
    names = list(named_layers(model))
    with probe(model, names) as p:
        out = model(x)
        acts = p.activations
        assert set(acts) == set(names), "every layer type of the zoo must be captured"
        leaf = [n for n in names if isinstance(acts[n], torch.Tensor) and acts[n].requires_grad]
        grads = p.gradients(out[:, 0].sum(), leaf, retain_graph=True)
        gx, = torch.autograd.grad(out[:, 0].sum(), x)
    assert all(g.shape == acts[n].shape for n, g in grads.items())
    assert gx.abs().sum() > 0
    assert_untouched(model, before)
    assert model.training and not first.requires_grad
    first.requires_grad_(True)
    model.eval()


def test_restores_when_body_raises(demo):
    before = snapshot(demo)
    with pytest.raises(RuntimeError, match="boom"):
        with probe(demo, ["features.conv1", "features.relu3"], relu_rule="guided",
                   edit={"features.conv2": lambda t: t * 0}, grad_edit={"features.conv3": lambda g: g}):
            demo(torch.randn(1, 3, 112, 112))
            raise RuntimeError("boom")
    assert_untouched(demo, before)


def test_restores_when_hook_raises(demo):
    before = snapshot(demo)

    def bad(t: torch.Tensor) -> torch.Tensor:
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"), probe(demo, edit={"features.conv2": bad}):
        demo(torch.randn(1, 3, 112, 112))
    assert_untouched(demo, before)


def test_activation_equals_independent_forward(demo):
    """The captured conv3 output equals a hand-run of the Sequential up to conv3."""
    x = torch.randn(2, 3, 112, 112)
    with probe(demo, "features.conv3") as p, torch.no_grad():
        demo(x)
    with torch.no_grad():
        h = x
        for name, layer in demo.features.named_children():
            h = layer(h)
            if name == "conv3":
                break
    torch.testing.assert_close(p.activations["features.conv3"], h)


def test_layer_gradient_equals_split_network(demo):
    """d logit / d conv4-output via the probe equals autograd through the second half of the net alone."""
    x = torch.randn(1, 3, 112, 112)
    with probe(demo, "features.conv4") as p:
        out = demo(x)
        g = p.gradients(out[0, 3], ["features.conv4"])["features.conv4"]
    names = [n for n, _ in demo.features.named_children()]
    cut = names.index("conv4")
    with torch.no_grad():
        h = x
        for layer in list(demo.features.children())[: cut + 1]:
            h = layer(h)
    h = h.clone().requires_grad_(True)
    t = h
    for layer in list(demo.features.children())[cut + 1:]:
        t = layer(t)
    logits = demo.classifier(demo.flatten(demo.avgpool(t)))
    (ref,) = torch.autograd.grad(logits[0, 3], h)
    torch.testing.assert_close(g, ref)


def test_inplace_relu_module_and_functional():
    """Captured values are the layer's own output even when in-place ReLUs follow it."""
    torch.manual_seed(0)
    net = InplaceNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with probe(net, ["conv1", "conv2"]) as p:
        out = net(x)
        a1, a2 = p.activations["conv1"], p.activations["conv2"]
        grads = p.gradients(out[:, 1].sum(), ["conv1", "conv2"])
    ref1 = net.conv1(x)
    ref2 = net.conv2(F.relu(ref1))
    torch.testing.assert_close(a1, ref1.detach())
    torch.testing.assert_close(a2, ref2.detach())
    assert (a1 < 0).any() and (a2 < 0).any(), "negatives must survive: the ReLU must not have run in place on them"
    # gradient at conv2: fc weight / (H*W) masked by the relu
    expect = (net.fc.weight[1].view(1, 4, 1, 1) / 64) * (ref2 > 0)
    torch.testing.assert_close(grads["conv2"], expect.detach().expand_as(ref2))
    assert net.relu1.inplace, "the inplace flag must be restored"


def test_edit_replaces_activation(demo):
    x = torch.randn(1, 3, 112, 112)
    with probe(demo, edit={"features.relu5": torch.zeros_like}) as p, torch.no_grad():
        out = demo(x)
    fc = demo.classifier
    with torch.no_grad():
        ref = fc.fc8(F.relu(fc.fc7(F.relu(fc.fc6(torch.zeros(1, 128 * 49))))))
    torch.testing.assert_close(out, ref)
    assert p.activations["features.relu5"].abs().sum() == 0


def test_grad_edit_replaces_gradient(demo):
    x = torch.randn(1, 3, 112, 112, requires_grad=True)
    with probe(demo, grad_edit={"features.conv1": torch.zeros_like}):
        (g,) = torch.autograd.grad(demo(x)[0, 0], x)
    assert g.abs().sum() == 0
    with probe(demo, grad_edit={"features.conv1": lambda g: 2 * g}):
        (g2,) = torch.autograd.grad(demo(x)[0, 0], x)
    with probe(demo):
        (g1,) = torch.autograd.grad(demo(x)[0, 0], x)
    torch.testing.assert_close(g2, 2 * g1)


def test_stop_after_skips_the_rest(demo):
    ran = []
    h = demo.classifier.fc6.register_forward_hook(lambda *a: ran.append(1))
    try:
        with probe(demo, "features.conv2", stop_after="features.conv2") as p, torch.no_grad():
            assert p.forward(demo, torch.randn(1, 3, 112, 112)) is None
        assert "features.conv2" in p.activations and not ran
    finally:
        h.remove()


class TwoLayer(nn.Module):
    """y = w2 . relu(W1 x): small enough to work the backward rules out by hand."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 3, bias=False)
        self.act = act
        self.l2 = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
            self.l2.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.act(self.l1(x)))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()], ids=["relu", "relu_inplace", "relu6"])
def test_relu_rules_by_hand(act):
    """x = (2, 3, -1): hidden h = x; upstream grad at h = w2 = (1, -2, 3)."""
    net = TwoLayer(act)
    x = torch.tensor([[2.0, 3.0, -1.0]], requires_grad=True)
    expected = {
        None: torch.tensor([[1.0, -2.0, 0.0]]),          # plain gradient: w2 * 1[h > 0]
        "guided": torch.tensor([[1.0, 0.0, 0.0]]),       # max(w2, 0) * 1[h > 0]
        "deconvnet": torch.tensor([[1.0, 0.0, 3.0]]),    # max(w2, 0), ignoring the forward mask
    }
    for rule, exp in expected.items():
        with probe(net, relu_rule=rule):
            (g,) = torch.autograd.grad(net(x).sum(), x)
        torch.testing.assert_close(g, exp, msg=f"rule {rule}")


def test_relu6_upper_mask_in_guided():
    net = TwoLayer(nn.ReLU6())
    x = torch.tensor([[7.0, 3.0, 1.0]], requires_grad=True)
    with probe(net, relu_rule="guided"):
        (g,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 3.0]]))  # 7 is clipped by ReLU6: no gradient


def test_functional_relu_gets_the_rule():
    class Functional(TwoLayer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.relu(self.l1(x)))

    net = Functional(nn.Identity())
    x = torch.tensor([[2.0, 3.0, -1.0]], requires_grad=True)
    with probe(net, relu_rule="deconvnet"):
        (g,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0, 3.0]]))


def test_guided_differs_from_gradient_on_lite0(lite0):
    """ReLU6 is not nn.ReLU: the rule must still apply (Captum silently returns the plain gradient here)."""
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    grads = {}
    for rule in (None, "guided", "deconvnet"):
        with probe(lite0, relu_rule=rule):
            (grads[rule],) = torch.autograd.grad(lite0(x)[0, 281], x)
    assert (grads["guided"] - grads[None]).abs().max() > 1e-3
    assert (grads["deconvnet"] - grads[None]).abs().max() > 1e-3


def test_unknown_layer_lists_closest(demo):
    with pytest.raises(LayerNotFoundError) as info, probe(demo, "features.conv9"):
        pass
    msg = str(info.value)
    assert "features.conv9" in msg and "features.conv1" in msg and "convscope layers" in msg


def test_probe_leaves_parameters_bitwise_identical(demo):
    ref = copy.deepcopy(demo.state_dict())
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    with probe(demo, ["features.conv5"], relu_rule="guided") as p:
        out = demo(x)
        p.gradients(out.sum(), ["features.conv5"])
    for k, v in demo.state_dict().items():
        assert torch.equal(v, ref[k]), k


# --------------------------------------------------------------------------- shared modules: one name per call


class _TwiceReLU(torch.nn.Module):
    """conv -> relu -> conv -> the same relu: ``relu`` runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x)))).mean((2, 3))


def test_each_call_of_a_shared_module_has_its_own_name():
    from convscope.core.stream import layer_features

    model = _TwiceReLU()
    x = torch.randn(2, 3, 8, 8)
    feats = layer_features(model, x, ["relu:0", "relu:1"])
    with torch.no_grad():
        first = torch.relu(model.conv1(x))
        second = torch.relu(model.conv2(first))
    assert torch.equal(feats["relu:0"], first) and torch.equal(feats["relu:1"], second)
    with pytest.raises(ConvscopeError, match=r"more than once.*relu:0 or relu:1"):
        layer_features(model, x, ["relu"])
    with pytest.raises(ConvscopeError, match="did not run"):
        layer_features(model, x, ["relu:2"])
    assert model.relu.inplace  # restored


def test_gradients_at_one_call_of_a_shared_module():
    model = _TwiceReLU().double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with probe(model, ["relu:0"]) as p:
        out = model(x)
        g = p.gradients(out[:, 1].sum(), ["relu:0"])["relu:0"]
        a = p.activations["relu:0"]
    # by hand: d out_1 / d relu0 = conv2^T (1[conv2(a) > 0] * 1/(H W)) for channel 1
    a2 = a.detach().clone().requires_grad_(True)
    torch.relu(model.conv2(a2))[:, 1].mean((1, 2)).sum().backward()
    assert torch.allclose(g, a2.grad, atol=1e-12)


def test_a_detached_capture_survives_a_later_in_place_add():
    class InPlaceResidual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(x)
            out += x  # torchvision's residual add, in place on the captured output
            return out

    model = InPlaceResidual()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad(), probe(model, "bn", detach=True) as p:
        model(x)
        captured = p.activations["bn"]
    with torch.no_grad():
        assert torch.allclose(captured, model.bn(x))


def test_list_layers_lists_each_call_of_a_shared_module():
    from convscope.core.model import list_layers

    rows = {r.name: r for r in list_layers(_TwiceReLU(), input_size=(8, 8))}
    assert rows["relu"].calls == 2 and rows["relu:0"].calls == 1 and rows["relu:1"].output_shape == (4, 8, 8)
    assert list(rows).index("relu:0") == list(rows).index("relu") + 1
