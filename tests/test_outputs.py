"""Models returning tuples, lists, dicts, named tuples or dataclasses: select_output, output(...) targets, and the
gradient methods giving the same maps as on the equivalent single-tensor model."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

from convscope import gradcam, gradient, guided_backprop, saliency, smoothgrad
from convscope.core.targets import (
    OutputTarget,
    output,
    pinned,
    scores_of,
    select_output,
    target_scores,
    tensor_leaves,
    top_class,
    top_k,
)
from convscope.errors import TargetError

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

Pair = namedtuple("Pair", ["logits", "features"])


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    features: torch.Tensor


class MultiOut(nn.Module):
    """One tiny CNN whose forward returns its logits wrapped in a given way (and its features beside them)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.kind = kind
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(5, 4)
        self.aux = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - the return type is the point of the test
        a = self.relu(self.conv(x))
        logits = self.fc(a.mean(dim=(2, 3)))
        kind = self.kind
        if kind == "tensor":
            return logits
        if kind == "tuple":
            return logits, a
        if kind == "list":
            return [a, logits]
        if kind == "dict":
            return {"features": a, "logits": logits}
        if kind == "namedtuple":
            return Pair(logits, a)
        if kind == "dataclass":
            return Result(logits, a)
        if kind == "nested":
            return (a, {"head": [logits]})
        if kind == "two_scores":
            return {"logits": logits, "aux": self.aux(a.mean(dim=(2, 3)))}
        raise AssertionError(kind)


KINDS = ["tuple", "list", "dict", "namedtuple", "dataclass", "nested"]


def test_select_output_forms():
    a, b = torch.randn(2, 3), torch.randn(2, 5, 4, 4)
    assert select_output(a) is a
    for out in [(a, b), [b, a], {"x": b, "y": a}, Pair(a, b), Result(a, b), (b, {"h": [a]}), {"only": b}]:
        expect = b if out == {"only": b} else a  # a lone tensor is taken whatever its rank
        assert select_output(out) is expect
    assert select_output((a, b), 1) is b and select_output((a, b), "1") is b  # a CLI string of digits is an index
    assert select_output({"x": b, "y": a}, "x") is b
    assert select_output(Pair(a, b), "features") is b and select_output(Pair(a, b), 1) is b
    assert select_output(Result(a, b), "features") is b
    assert select_output((b, {"h": [a]}), (1, "h", 0)) is a
    assert select_output((a, b), lambda o: o[1]) is b
    assert [p for p, _ in tensor_leaves((b, {"h": [a]}))] == [(0,), (1, "h", 0)]


@pytest.mark.parametrize("out,key,match", [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), None, r"0: \(2, 3\), 1: \(2, 4\)\), 2 of them 2-D.*output\(KEY\)"),
    ({"a": torch.zeros(2, 3, 4, 4), "b": torch.zeros(2, 3, 4, 4)}, None, r"'a': \(2, 3, 4, 4\).*none 2-D"),
    ((None, "text"), None, "no tensor"),
    ({"logits": torch.zeros(2, 3)}, "scores", "no 'scores'; use one of 'logits'"),
    ((torch.zeros(2, 3),), 4, "no 4; use one of 0"),
    ((torch.zeros(2, 3), {"h": 1}), (1, "h"), "is a int, not a tensor"),
    ((torch.zeros(2, 3), {"h": 1}), (1, "g"), r"at 1 is a dict with no 'g'"),
    (Result(torch.zeros(2, 3), torch.zeros(2, 3)), "score", "use one of 'logits', 'features'"),
])
def test_select_output_errors_are_one_line(out, key, match):
    with pytest.raises(TargetError, match=match) as err:
        select_output(out, key)
    assert "\n" not in str(err.value)


def test_targets_on_containers():
    logits = torch.tensor([[0.1, 0.9, 0.3], [0.7, 0.2, 0.5]])
    out = {"features": torch.zeros(2, 4, 2, 2), "logits": logits}
    assert top_class(out).tolist() == [1, 0]
    assert top_k(2)(out).tolist() == [[1, 2], [0, 2]]
    s, i = target_scores(out, [2, 1])
    assert i.tolist() == [[2], [1]] and torch.equal(s, logits.gather(1, i))
    two = (logits, -logits)
    s, i = target_scores(two, output(1))  # top class of -logits
    assert i.tolist() == [[0], [1]] and torch.equal(s, torch.tensor([[-0.1], [-0.2]]))
    s, i = target_scores(two, output(0, [[0, 2], [1, 1]]))
    assert torch.equal(s, torch.tensor([[0.1, 0.3], [0.2, 0.2]]))
    t = output(1, lambda y: y[:, 0] * 2)  # an inner score callable sees the selected tensor
    s, i = target_scores(two, t)
    assert i is None and torch.equal(s, torch.tensor([[-0.2], [-1.4]]))
    assert torch.equal(t(two), s)
    p = pinned(output(1), torch.tensor([[2], [0]]))  # pinned indices stay on the same output
    assert isinstance(p, OutputTarget) and p.output == 1
    assert p[1:].output == 1 and p[1:].target.tolist() == [[0]]
    assert p.repeat(2, 1).output == 1 and p.repeat(2, 1).target.tolist() == [[2], [0], [2], [0]]
    s, _ = target_scores(((-logits)[1:], logits[1:]), p[1:])  # output 1, class 0 of image 1
    assert torch.equal(s, logits[1:, :1])
    assert torch.equal(pinned(top_class, torch.tensor([[1]])), torch.tensor([[1]]))
    assert scores_of(two, p) is two[1] and scores_of(out, top_class) is logits
    assert output("logits").__name__ == "output('logits', top_class)"
    with pytest.raises(TargetError, match="a target callable returned scores of shape"):
        target_scores(two, lambda o: o[0].sum())  # a scalar for a container output: which image?
    with pytest.raises(TargetError, match="give a dict key"):
        output(2.5)  # type: ignore[arg-type]
    with pytest.raises(TargetError, match="do not fit 2 images"):
        target_scores(two, output(0, [[0], [1], [2]]))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_methods_on_multi_output_models_equal_the_plain_model(kind):
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    plain, net = MultiOut("tensor"), MultiOut(kind)
    before = snapshot(net)
    torch.testing.assert_close(saliency(net, x), saliency(plain, x))
    torch.testing.assert_close(gradient(net, x, top_k(2)), gradient(plain, x, top_k(2)))
    torch.testing.assert_close(guided_backprop(net, x, [1, 3]), guided_backprop(plain, x, [1, 3]))
    torch.testing.assert_close(gradcam(net, x, layer="relu"), gradcam(plain, x, layer="relu"))
    torch.testing.assert_close(smoothgrad(net, x, n=3, sigma=0.1), smoothgrad(plain, x, n=3, sigma=0.1))
    assert_untouched(net, before)


def test_output_target_picks_one_of_several_score_tensors():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    net = MultiOut("two_scores")
    before = snapshot(net)
    with pytest.raises(TargetError, match=r"'logits': \(2, 4\), 'aux': \(2, 4\).*output\(KEY\)") as err:
        saliency(net, x)
    assert "\n" not in str(err.value)
    assert_untouched(net, before)
    plain = MultiOut("tensor")
    torch.testing.assert_close(saliency(net, x, target=output("logits")), saliency(plain, x))
    torch.testing.assert_close(gradcam(net, x, target=output("logits", 2), layer="relu"),
                               gradcam(plain, x, target=2, layer="relu"))
    aux = gradient(net, x, target=output("aux"))  # independent: autograd of the aux head's top class
    xx = x.clone().requires_grad_(True)
    scores = net(xx)["aux"]
    (g,) = torch.autograd.grad(scores.gather(1, scores.argmax(1, keepdim=True)).sum(), xx)
    torch.testing.assert_close(aux[:, 0], g)
    assert_untouched(net, before)


def test_path_and_window_methods_on_a_two_head_model_equal_the_plain_model():
    """Methods that read the output beside the target (IG's endpoints, prediction difference's softmax, SmoothGrad's
    pinned classes) read the chosen head too."""
    import convscope as cs

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    net, plain = MultiOut("two_scores"), MultiOut("tensor")
    t = output("logits")
    torch.testing.assert_close(cs.integrated_gradients(net, x, target=t, steps=4),
                               cs.integrated_gradients(plain, x, steps=4))
    torch.testing.assert_close(cs.smoothgrad(net, x, target=t, n=2), cs.smoothgrad(plain, x, n=2))
    kw = dict(window=6, stride=6, samples=2)
    torch.testing.assert_close(cs.prediction_difference(net, x, target=t, **kw),
                               cs.prediction_difference(plain, x, **kw))


def test_occlusion_scorecam_and_attacks_on_a_two_head_model_equal_the_plain_model():
    import convscope as cs

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    net, plain = MultiOut("two_scores"), MultiOut("tensor")
    t = output("logits")
    torch.testing.assert_close(cs.occlusion(net, x, target=t, window=6, stride=6).maps,
                               cs.occlusion(plain, x, window=6, stride=6).maps)
    torch.testing.assert_close(cs.scorecam(net, x, target=t, layer="relu"), cs.scorecam(plain, x, layer="relu"))
    torch.testing.assert_close(cs.fgsm(net, x, target=t, eps=2 / 255).x, cs.fgsm(plain, x, eps=2 / 255).x)


def test_a_one_channel_model_gets_its_cam_layer_found():
    import convscope as cs

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    assert cs.resolve_cam_layer(net) == "1"
    assert cs.gradcam(net, torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)
