"""Net2Vec: a concept split across two units is segmented better by the learned combination than by either unit;
the single-unit baseline is NetDissect's IoU; the model is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.data import generate
from convscope.errors import ConvscopeError
from convscope.methods.net2vec import Net2VecConfig, net2vec

from .helpers import assert_untouched, snapshot


class SplitRed(nn.Module):
    """Units of layer ``units``: 0 = red in the left half of the image, 1 = red in the right half, 2-3 random."""

    def __init__(self) -> None:
        super().__init__()
        self.color = nn.Conv2d(3, 1, 1)
        self.rand = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.units = nn.Identity()
        with torch.no_grad():
            self.color.weight.copy_(torch.tensor([1.0, -1.5, -0.5]).view(1, 3, 1, 1))
            self.color.bias.fill_(-0.2)
            g = torch.Generator().manual_seed(1)
            self.rand.weight.copy_(torch.randn(self.rand.weight.shape, generator=g) * 0.2)
            self.rand.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = self.relu(self.color(x))
        left = (torch.arange(x.shape[-1]) < x.shape[-1] // 2).to(x.dtype)
        return self.units(torch.cat([red * left, red * (1 - left), self.relu(self.rand(x))], 1))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("n2v") / "broden", n=40, size=64, seed=7, progress=False)


CFG = Net2VecConfig(quantile=0.05, workers=0, epochs=30)


def test_combination_beats_either_half_unit(synth):
    model = SplitRed()
    model.train()
    before = snapshot(model)
    r = net2vec(model, synth, "units", concepts=["red", "blue"], config=CFG, progress=False)
    assert_untouched(model, before)
    red = r.row("red")
    assert red.best_unit in (0, 1)
    single = r.single_iou[:, r.concepts.index("red")]
    assert red.iou_com > 0.85 and red.iou_com > float(single.max()) + 0.2  # union of both halves vs one half
    assert red.units_needed == 2  # one half alone stays below 90 % of the combination
    assert 0 < red.iou_all < 0.2  # red is a small share of the colour-annotated pixels
    w = r.weights[r.concepts.index("red")]
    assert w[0] > 0 and w[1] > 0 and w[:2].min() > w[2:].abs().max()
    assert r.iou_by_units.shape == (2, 4) and torch.isclose(r.iou_by_units[:, -1], r.iou_com).all()
    assert r.loss[-1] < r.loss[0] and r.train_images + r.val_images == 40 and r.val_images > 0


def test_single_unit_baseline_is_the_dissection_iou_on_held_out_images(synth):
    r = net2vec(SplitRed(), synth, "units", concepts=["red"], config=CFG, progress=False)
    # red on the held-out images: a half unit covers about half of the red pixels and nothing else
    assert 0.25 < r.rows[0].best_unit_iou < 0.8
    assert r.thresholds.shape == (4,)


def test_errors_name_the_fix(synth):
    with pytest.raises(ConvscopeError, match="binary"):
        Net2VecConfig(inputs="logits")
    with pytest.raises(ConvscopeError, match="no concept"):
        net2vec(SplitRed(), synth, "units", concepts=["rouge"], config=CFG, progress=False)
    with pytest.raises(ConvscopeError, match="one layer"):
        net2vec(SplitRed(), synth, "units,color", config=CFG, progress=False)
