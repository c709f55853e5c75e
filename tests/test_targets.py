"""Targets: ints, lists, N x K, callables, top-k; batched VJPs equal to one-by-one gradients; segmentation and
detection targets (Grad-CAM against a float64 closed form, saliency against float64 autograd)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope import gradcam, saliency
from convscope.core.targets import batched_grad, detection, segmentation, target_scores, top_class, top_k
from convscope.errors import TargetError

from .helpers import assert_untouched, snapshot


def test_target_forms():
    out = torch.tensor([[0.1, 0.9, 0.3], [0.7, 0.2, 0.5]])
    s, i = target_scores(out, 2)
    assert torch.equal(s, out[:, [2]]) and i.tolist() == [[2], [2]]
    s, _ = target_scores(out, [1, 0])
    assert torch.equal(s, torch.stack([out[0, [1]], out[1, [0]]]))
    s, _ = target_scores(out, [[0, 1], [2, 2]])
    assert torch.equal(s, torch.stack([out[0, [0, 1]], out[1, [2, 2]]]))
    _, i = target_scores(out, top_class)
    assert i.tolist() == [[1], [0]]
    _, i = target_scores(out, top_k(2))
    assert i.tolist() == [[1, 2], [0, 2]]
    s, i = target_scores(out, lambda o: o[:, 0] - o[:, 1])
    assert i is None and torch.allclose(s, torch.tensor([[-0.8], [0.5]]))


@pytest.mark.parametrize("bad,match", [(3, "out of range"), ([0, 1, 2], "2 images"), (-1, "out of range"),
                                       (torch.tensor([0.5, 1.0]), "integers"), (True, "bool")])
def test_bad_targets(bad, match):
    with pytest.raises(TargetError, match=match):
        target_scores(torch.zeros(2, 3), bad)


def test_batched_grad_equals_loop():
    torch.manual_seed(0)
    w = torch.randn(5, 4)
    x = torch.randn(3, 4, requires_grad=True)
    scores = torch.tanh(x @ w.T)[:, [0, 2, 4]]
    refs = [torch.autograd.grad(scores[:, j].sum(), x, retain_graph=True)[0] for j in range(3)]
    (g,) = batched_grad(scores, [x])
    for j in range(3):
        torch.testing.assert_close(g[j], refs[j])


# --- segmentation and detection targets -------------------------------------------------------------------------


def _seg_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))  # N x 3 classes x H x W


def _hand_gradcam_seg(net: nn.Sequential, x: torch.Tensor, cls: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Float64, no autograd: y_c = sum_k W[c, k] A_k + b_c (1x1 conv), so d(sum_ij M_ij y_c,ij)/dA_k,ij = W[c, k]
    M_ij; alpha_k = mean_ij of that; map = ReLU(sum_k alpha_k A_k)."""
    conv1, head = net[0].double(), net[2]
    a = torch.relu(conv1(x.double())).detach()  # N x 4 x H x W
    w, b = head.weight.detach().double()[:, :, 0, 0], head.bias.detach().double()
    y = torch.einsum("ck,nkhw->nchw", w, a) + b[None, :, None, None]
    m = (y.argmax(1) == cls).double() if mask is None else mask.double().expand(x.shape[0], *mask.shape[-2:])
    alpha = w[cls][None, :] * m.mean(dim=(1, 2))[:, None]  # N x 4
    net[0].float()
    return torch.relu(torch.einsum("nk,nkhw->nhw", alpha, a))


@pytest.mark.usefixtures("one_thread")
def test_gradcam_with_segmentation_target_equals_hand_computation():
    net = _seg_net()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    before = snapshot(net)
    with torch.no_grad():
        won = (net(x).argmax(1) == 1).sum()
    assert 0 < won < 2 * 144  # class 1 wins some pixels, not all: the default mask matters
    got = gradcam(net, x, target=segmentation(1), layer="1", upsample=False)
    assert got.shape == (2, 1, 12, 12)
    torch.testing.assert_close(got[:, 0].double(), _hand_gradcam_seg(net, x, 1, None), rtol=1e-4, atol=1e-6)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[2:6, 3:9] = True
    got_m = gradcam(net, x, target=segmentation(2, mask=mask), layer="1", upsample=False)
    torch.testing.assert_close(got_m[:, 0].double(), _hand_gradcam_seg(net, x, 2, mask), rtol=1e-4, atol=1e-6)
    both = gradcam(net, x, target=segmentation([1, 2], mask=mask), layer="1", upsample=False)  # K = 2, one pass
    torch.testing.assert_close(both[:, 1], got_m[:, 0])
    assert_untouched(net, before)


def test_segmentation_scores_sum_the_class_logits_over_the_mask():
    y = torch.randn(2, 3, 4, 5)
    s = segmentation([0, 2])(y)
    for j, c in enumerate([0, 2]):
        expect = (y[:, c] * (y.argmax(1) == c)).sum(dim=(1, 2))
        torch.testing.assert_close(s[:, j], expect)
    weights = torch.rand(2, 4, 5)  # N x H x W float weights
    torch.testing.assert_close(segmentation(1, mask=weights)(y)[:, 0], (y[:, 1] * weights).sum(dim=(1, 2)))
    never = torch.full((1, 3, 2, 2), -5.0)
    never[:, 0] = 1.0  # class 2 wins nowhere: score 0, not NaN
    assert segmentation(2)(never).tolist() == [[0.0]]
    dict_out = {"out": y, "aux": torch.randn(2, 7)}  # the only 4-D tensor is taken
    torch.testing.assert_close(segmentation(1)(dict_out), segmentation(1)(y))


@pytest.mark.parametrize("make,match", [
    (lambda: segmentation(5)(torch.zeros(1, 3, 4, 4)), "out of range"),
    (lambda: segmentation(1)(torch.zeros(2, 3)), "N x K x H x W"),
    (lambda: segmentation(1, mask=torch.ones(8, 8))(torch.zeros(1, 3, 4, 4)), r"H x W = \(4, 4\)"),
    (lambda: segmentation("cat"), "int >= 0"),
    (lambda: segmentation(1, mask=[[1]]), "must be a tensor"),
    (lambda: detection(3)(torch.zeros(2, 3, 6)), "box_index < 3"),
    (lambda: detection(0, cls=1)({"scores": torch.zeros(2, 3)}), "drop cls="),
    (lambda: detection(0)([{"boxes": torch.zeros(2, 4), "logits": torch.zeros(2)}]), "score_key="),
    (lambda: detection(0)(torch.zeros(2, 3)), "N x B x"),
    (lambda: detection(-1), "int >= 0"),
])
def test_bad_segmentation_and_detection_targets(make, match):
    with pytest.raises(TargetError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_detection_conventions():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 3, 4 + 5, generator=g)  # N x B x (4 + C)
    best = raw[..., 4:].amax(-1)
    torch.testing.assert_close(detection()(raw), best[:, [0]])
    torch.testing.assert_close(detection([2, 0])(raw), best[:, [2, 0]])
    torch.testing.assert_close(detection(1, cls=3)(raw), raw[:, [1], 4 + 3])
    scores = torch.rand(2, 3, generator=g)
    torch.testing.assert_close(detection(1)({"boxes": raw[..., :4], "scores": scores}), scores[:, [1]])
    per_class = torch.rand(2, 3, 5, generator=g)
    torch.testing.assert_close(detection(2, cls=4, score_key="logits")({"logits": per_class}), per_class[:, [2], 4])
    listed = [{"boxes": torch.zeros(4, 4), "scores": torch.tensor([0.9, 0.5, 0.2, 0.1]), "labels": torch.zeros(4)},
              {"boxes": torch.zeros(2, 4), "scores": torch.tensor([0.8, 0.3]), "labels": torch.zeros(2)}]
    torch.testing.assert_close(detection([0, 1])(listed), torch.tensor([[0.9, 0.5], [0.8, 0.3]]))
    with pytest.raises(TargetError, match="image 1 has 2 boxes"):
        detection(2)(listed)
    s, idx = target_scores(listed, detection(0))  # a list of per-image dicts: N from the list
    assert idx is None and s.shape == (2, 1)


class _BoxNet(nn.Module):
    """A tiny box predictor: B = 3 boxes of 4 coordinates and C = 2 class logits each, as N x B x (4 + C) or as a
    torchvision-style list of per-image dicts."""

    def __init__(self, as_list: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.as_list = as_list
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(24, 3 * 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[dict[str, torch.Tensor]]:
        out = self.head(self.features(x)).reshape(x.shape[0], 3, 6)
        if not self.as_list:
            return out
        return [{"boxes": o[:, :4], "scores": o[:, 4:].softmax(-1).amax(-1), "labels": o[:, 4:].argmax(-1)}
                for o in out]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("as_list", [False, True])
def test_saliency_with_detection_target(as_list):
    net = _BoxNet(as_list)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = snapshot(net)
    got = saliency(net, x, target=detection(1))
    assert got.shape == (2, 1, 16, 16)
    assert_untouched(net, before)
    xx = x.detach().double().requires_grad_(True)  # independent: autograd of box 1's score in float64
    ref = _BoxNet(as_list).double()
    out = ref(xx)
    if as_list:
        score = torch.stack([d["scores"][1] for d in out]).sum()
    else:
        score = out[:, 1, 4:].amax(-1).sum()
    (g,) = torch.autograd.grad(score, xx)
    torch.testing.assert_close(got[:, 0].double(), g.abs().amax(1), rtol=1e-4, atol=1e-7)
