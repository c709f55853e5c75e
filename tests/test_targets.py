"""Targets: ints, lists, N x K, callables, top-k; and batched VJPs equal to one-by-one gradients."""

from __future__ import annotations

import pytest
import torch

from convscope.core.targets import batched_grad, target_scores, top_class, top_k
from convscope.errors import TargetError


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
