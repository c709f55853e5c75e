"""LRP (methods/lrp.py): agreement with zennit, conservation, a hand-computed example, model state, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.images import Preprocess
from convscope.errors import ConvscopeError
from convscope.methods.lrp import COMPOSITES, lrp

from .helpers import assert_untouched, snapshot
from .peers import zennit

ZENNIT_COMPOSITES = ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"]


def _bn(c: int, dims: int = 2) -> nn.Module:
    """A batch norm with non-trivial running statistics and affine parameters."""
    bn = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


def conv_net() -> nn.Module:
    """(a) conv-BN-ReLU-pool twice, then linear-BN-ReLU-linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), _bn(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), _bn(32, 1), nn.ReLU(), nn.Linear(32, 10)).double().eval()


class ResNet(nn.Module):
    """(b) conv-BN-ReLU6 stem, one residual block (``r + h``), ReLU6, global average pooling, linear.

    ``sum_module`` (zennit's ``Sum`` over a stacked last axis) replaces ``r + h`` for zennit, whose relevance would
    otherwise be copied into both summands; convscope splits ``r + h`` in proportion, as zennit's Sum rule does."""

    def __init__(self, sum_module: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8), nn.ReLU6())
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8), nn.ReLU6()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.sum = sum_module
        self.act, self.pool, self.flat, self.fc = nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        r = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(h)))))
        y = r + h if self.sum is None else self.sum(torch.stack([r, h], dim=-1))
        return self.fc(self.flat(self.pool(self.act(y))))


def zennit_lrp(model: nn.Module, x: torch.Tensor, idx: torch.Tensor, composite: str, low: torch.Tensor,
               high: torch.Tensor) -> torch.Tensor:
    """zennit's relevance for class ``idx`` (N), starting from the logit as convscope does."""
    z = zennit()
    canon = [z.canonizers.SequentialMergeBatchNorm()]
    C = z.composites
    make = {
        "epsilon": lambda: C.LayerMapComposite(C.layer_map_base() + [(z.types.Convolution, z.rules.Epsilon()),
                                                                     (nn.Linear, z.rules.Epsilon())],
                                               canonizers=canon),
        "epsilon_plus_flat": lambda: C.EpsilonPlusFlat(canonizers=canon),
        "epsilon_gamma_box": lambda: C.EpsilonGammaBox(low=low.expand_as(x), high=high.expand_as(x),
                                                       canonizers=canon),
        "epsilon_alpha2_beta1": lambda: C.EpsilonAlpha2Beta1(canonizers=canon),
    }
    with z.attribution.Gradient(model, make[composite]()) as attributor:
        _, rel = attributor(x.clone(), lambda out: out * F.one_hot(idx, out.shape[1]).to(out))
    return rel


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.mark.parametrize("composite", ZENNIT_COMPOSITES)
def test_matches_zennit_on_conv_bn_pool_linear(composite, one_thread):
    model = conv_net()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 2], [3, 4], [5, 6]])
    ours = lrp(model, x, target=targets, composite=composite)  # the two targets in one batched backward
    assert ours.shape == (3, 2, 3, 16, 16)
    low, high = torch.zeros(1, 3, 1, 1, dtype=torch.float64), torch.ones(1, 3, 1, 1, dtype=torch.float64)
    for k in range(2):
        theirs = zennit_lrp(model, x, targets[:, k], composite, low, high)
        assert (_cosines(ours[:, k], theirs) >= 0.999).all(), (composite, k, _cosines(ours[:, k], theirs))
        assert theirs.abs().max() > 0


@pytest.mark.parametrize("composite", ZENNIT_COMPOSITES)
def test_matches_zennit_on_residual_relu6_net(composite, one_thread):
    z = zennit()
    model = ResNet().double().eval()
    peer = ResNet(z.layer.Sum()).double().eval()
    peer.load_state_dict(model.state_dict())
    x = 3 * torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.stem(x) >= 6).any()  # ReLU6 saturates somewhere: relevance must pass there too
    ours = lrp(model, x, target=[[1, 2], [3, 4]], composite=composite, low=-10.0, high=10.0)
    bound = torch.full((1, 1, 1, 1), 10.0, dtype=torch.float64)
    for k in range(2):
        theirs = zennit_lrp(peer, x, torch.tensor([[1, 2], [3, 4]])[:, k], composite, -bound, bound)
        assert (_cosines(ours[:, k], theirs) >= 0.999).all(), (composite, k, _cosines(ours[:, k], theirs))


class ConservingNet(nn.Module):
    """No biases; ReLU6 that saturates, LRN, max and average pooling, a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.act1, self.norm, self.pool = nn.ReLU6(), nn.LocalResponseNorm(3), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.act2, self.gap, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Linear(24, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.norm(self.act1(self.conv1(x))))
        h = self.act2(self.conv2(h) + h)
        return self.fc(self.gap(h).flatten(1))


def test_relevance_is_conserved_with_lrp0_and_no_biases(one_thread):
    model = ConservingNet().double().eval()
    x = 4 * torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model.act1.forward(model.conv1(x)) == 6).any() and (model.conv1(x) > 6).any()
        logits = model(x)
    rel = lrp(model, x, target=[[0, 3], [1, 2]], composite="epsilon", epsilon=1e-12)
    expected = logits.gather(1, torch.tensor([[0, 3], [1, 2]]))
    torch.testing.assert_close(rel.sum(dim=(2, 3, 4)), expected, rtol=1e-8, atol=1e-10)


def test_epsilon_rule_by_hand_on_two_layers():
    """R_j = sum_k a_j w_jk / (z_k + eps sign z_k) R_k (Montavon et al. 2019, Eq. 6), computed with loops."""
    eps = 0.1
    fc1, fc2 = nn.Linear(3, 2), nn.Linear(2, 1)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0]]))
        fc1.bias.copy_(torch.tensor([0.2, -0.1]))
        fc2.weight.copy_(torch.tensor([[1.5, -0.7]]))
        fc2.bias.copy_(torch.tensor([0.05]))
    model = nn.Sequential(fc1, nn.ReLU(), fc2).double().eval()
    x = torch.tensor([[1.0, 0.5, -2.0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
    w1, b1 = fc1.weight.double().tolist(), fc1.bias.double().tolist()
    w2, b2 = fc2.weight.double().tolist(), fc2.bias.double().tolist()
    expected = []
    for xi in x.tolist():
        z1 = [sum(xi[i] * w1[j][i] for i in range(3)) + b1[j] for j in range(2)]
        a1 = [max(v, 0.0) for v in z1]
        out = sum(a1[j] * w2[0][j] for j in range(2)) + b2[0]
        stab = out + eps * (1 if out >= 0 else -1)
        r1 = [a1[j] * w2[0][j] / stab * out for j in range(2)]  # relevance of the hidden units (R_out = logit)
        r0 = [sum(xi[i] * w1[j][i] / (z1[j] + eps * (1 if z1[j] >= 0 else -1)) * r1[j] for j in range(2))
              for i in range(3)]
        expected.append(r0)
    rel = lrp(model, x, target=0, composite="epsilon", epsilon=eps)
    assert rel.shape == (2, 1, 3)
    torch.testing.assert_close(rel[:, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dict_composite_equals_named_one(one_thread):
    model = conv_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    named = lrp(model, x, target=1, composite="epsilon_plus_flat")
    as_dict = lrp(model, x, target=1, composite={"0": "flat", nn.Conv2d: "zplus", nn.Linear: "epsilon"})
    torch.testing.assert_close(as_dict, named)
    plus = lrp(model, x, target=1, composite="epsilon_plus")
    assert not torch.allclose(plus, named)  # the first layer's rule matters
    single = [lrp(model, x, target=t) for t in (1, 7)]
    torch.testing.assert_close(lrp(model, x, target=[[1, 7], [1, 7]]), torch.cat(single, dim=1))


def test_zbox_bounds_default_to_the_models_preprocess(one_thread):
    model = conv_net()
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    model.preprocess = pre
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    mean = torch.tensor(pre.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float64).view(1, 3, 1, 1)
    default = lrp(model, x, target=2, composite="epsilon_gamma_box")
    explicit = lrp(model, x, target=2, composite="epsilon_gamma_box", low=-mean / std, high=(1 - mean) / std)
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, lrp(model, x, target=2, composite="epsilon_gamma_box", low=-1.0, high=1.0))


def _boom(output: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("target failed")


def test_model_is_left_as_it_came(one_thread):
    model = conv_net()
    model[2] = nn.ReLU(inplace=True)
    model.train()
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()  # .grad buffers and BN statistics
    model[9].register_forward_hook(lambda m, i, o: None)
    before = snapshot(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():  # works inside no_grad as well
        for composite in ZENNIT_COMPOSITES:
            assert torch.isfinite(lrp(model, x, target=cs.top_k(2), composite=composite)).all()
    assert_untouched(model, before, hooks=1)
    with pytest.raises(RuntimeError, match="target failed"):
        lrp(model, x, target=_boom)
    assert_untouched(model, before, hooks=1)
    with pytest.raises(ConvscopeError, match="intermediate tensor"):  # raised inside the rule pass
        lrp(model, x, composite={"4": "flat"})
    assert_untouched(model, before, hooks=1)


class WithNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), norm, nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: lrp(m, x, composite="epsilon_plus_box"), "unknown LRP composite 'epsilon_plus_box'"),
    (lambda m, x: lrp(m, x, composite=3), "composite must be a name"),
    (lambda m, x: lrp(m, x, composite={nn.Conv2d: "gama"}), "unknown LRP rule 'gama'"),
    (lambda m, x: lrp(m, x, composite="epsilon_alpha2_beta1", alpha=2.0, beta=0.5), "alpha - beta = 1"),
    (lambda m, x: lrp(m, x, epsilon=-1.0), "epsilon=-1.0"),
    (lambda m, x: lrp(m, x, composite="epsilon_gamma_box", low=torch.zeros(5)), "broadcast to the input"),
    (lambda m, x: lrp(m, x.long()), "floating-point"),
    (lambda m, x: lrp(WithNorm(nn.GroupNorm(2, 4)).eval(), x), "layer 'norm' (GroupNorm)"),
    (lambda m, x: lrp(WithNorm(Scale()), x), "layer 'norm' (Scale, a module with its own parameters)"),
    (lambda m, x: lrp(m, x, composite={nn.MaxPool2d: "gamma"}), "needs a layer with a weight"),
])
def test_bad_input_is_one_line_error(call, message):
    model = conv_net().float()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConvscopeError) as info:
        call(model, x)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_module_can_be_given_a_rule():
    model = WithNorm(Scale()).eval()
    x = torch.randn(2, 3, 8, 8)
    rel = lrp(model, x, target=0, composite={"norm": "pass"})
    assert rel.shape == (2, 1, 3, 8, 8) and torch.isfinite(rel).all() and rel.abs().sum() > 0


def test_composites_are_listed():
    assert set(ZENNIT_COMPOSITES) <= set(COMPOSITES) and "epsilon_plus" in COMPOSITES


@pytest.mark.slow
def test_runs_on_the_bundled_models(lite0, demo, one_thread):
    assert any(isinstance(m, nn.LocalResponseNorm) for m in demo.modules())  # LRN: identity for relevance
    for model, size, composite in ((lite0, 128, "epsilon_gamma_box"), (demo, 112, "epsilon_plus_flat")):
        before = snapshot(model)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(8))
        rel = lrp(model, x, target=cs.top_k(2), composite=composite)
        assert rel.shape == (1, 2, 3, size, size) and torch.isfinite(rel).all() and rel.abs().sum() > 0
        assert_untouched(model, before)
