"""Gradient receptive-field boxes are found once per (layer, input size, location) and shared between calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.methods.topk import box_cache

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """Not a sequential chain (a residual sum): receptive fields come from the gradient's support."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.c1(x)))
        return h + self.c3(h)


def test_boxes_shared_between_calls_and_equal_to_a_fresh_computation():
    torch.manual_seed(0)
    net = Residual()
    passes = []
    h = net.register_forward_pre_hook(lambda m, i: passes.append(len(i[0])))
    try:
        first = cs.receptive_fields(net, "c3", [[0, 0], [3, 4], [7, 7]], (16, 16), method="gradient")
        n_first = len(passes)
        again = cs.receptive_fields(net, "c3", [[3, 4], [0, 0], [3, 4]], (16, 16), method="gradient")
        assert len(passes) == n_first + 1, "only the probe's one clean pass: no gradient pass for known locations"
        more = cs.receptive_fields(net, "c3", [[7, 7], [5, 1]], (16, 16), method="gradient")
    finally:
        h.remove()
    assert torch.equal(again, first[[1, 0, 1]]) and torch.equal(more[0], first[2])
    assert set(box_cache(net, "c3", (16, 16), torch.float32, torch.device("cpu"))) == {(0, 0), (3, 4), (7, 7), (5, 1)}
    fresh = Residual()
    fresh.load_state_dict(net.state_dict())
    ref = cs.receptive_fields(fresh, "c3", [[0, 0], [3, 4], [7, 7], [5, 1]], (16, 16), method="gradient")
    assert torch.equal(torch.cat([first, more[1:]]), ref)
    # by hand: (3, 4) of c3 reads h rows 2..4, cols 3..5; h row r reads c1 rows 2r - 1 .. 2r + 1 (rows 3..9,
    # cols 5..11), each c1 pixel the image pixels +-1: rows 2..10, cols 4..12 (half-open box 2, 4, 11, 13)
    assert ref[1].tolist() == [2, 4, 11, 13]


def test_changed_weights_recompute_the_boxes():
    net = Residual()
    before = cs.receptive_fields(net, "c3", [[2, 2]], (16, 16), method="gradient")
    with torch.no_grad():
        net.c3.weight.zero_()
        net.c3.bias.zero_()
    after = cs.receptive_fields(net, "c3", [[2, 2]], (16, 16), method="gradient")
    assert after.tolist() != before.tolist()  # c3 contributes nothing: only h's own (smaller) field is left
    assert len(box_cache(net, "c3", (16, 16), torch.float32, torch.device("cpu"))) == 1
