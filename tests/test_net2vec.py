"""Net2Vec: a concept split across two units is segmented better by the learned combination than by either unit;
the single-unit baseline is NetDissect's IoU; a concept the units cannot predict is flagged as not beating the
trivial baselines, a concept defined by the sum of two units is found by the combination only; the model is
untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convscope.data import BrodenSample, generate, write_broden
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


class Channels(nn.Module):
    """Layer ``units``: the image's three channels as three units (a 1 x 1 identity convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.units.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.units.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def _planted(root, label_of, n: int = 40, size: int = 16, seed: int = 0):
    """A Broden folder of ``n`` random-pixel images (the last quarter held out) with one pixel-level concept,
    ``planted`` = ``label_of(image as float H x W x 3 in [0, 1], rng)``; returns it and the images."""
    rng = np.random.default_rng(seed)
    samples, images = [], []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = label_of(img.astype(np.float64) / 255, rng)
        samples.append(BrodenSample(f"p/{i:03d}", img, seg={"color": np.where(mask, 1, 2)},
                                    split="val" if i >= 3 * n // 4 else "train"))
        images.append(img)
    return write_broden(root, samples, {1: "planted", 2: "rest"}, {"color": [1, 2]}), np.stack(images)


def test_a_concept_the_units_cannot_predict_is_flagged(tmp_path):
    # labels drawn independently of the image, covering ~80 % of the pixels: no mask beats "everything"
    root, _ = _planted(tmp_path, lambda img, rng: rng.random(img.shape[:2]) < 0.8)
    model = Channels()
    before = snapshot(model)
    for decision in ("iou", "paper"):
        cfg = Net2VecConfig(quantile=0.2, workers=0, epochs=20, decision=decision, margin=0.01)
        r = net2vec(model, root, "units", concepts=["planted"], config=cfg, progress=False).rows[0]
        assert 0.75 < r.iou_all < 0.85  # the trivial mask's IoU is the concept's share of the pixels
        assert r.iou_com <= r.iou_all + 0.02 and r.best_unit_iou < r.iou_all
        assert r.gain == pytest.approx(r.iou_com - r.iou_all)
        assert r.gain_low <= r.gain <= r.gain_high and r.gain_low < 0.01
        assert not r.beats_baselines and r.margin == 0.01
    assert_untouched(model, before)


def test_a_concept_spread_over_two_units_is_found_by_the_combination_only(tmp_path):
    # planted = the pixels where unit 0 + unit 1 (red + green) is high; blue is noise. A single unit's mask
    # (red > T) catches half of it at best; a weighted sum with equal weights segments it.
    root, images = _planted(tmp_path, lambda img, rng: img[..., 0] + img[..., 1] > 1.2)
    cfg = Net2VecConfig(quantile=0.3, inputs="raw", workers=0, epochs=40, margin=0.05)
    res = net2vec(Channels(), root, "units", concepts=["planted"], config=cfg, progress=False)
    r = res.rows[0]
    assert r.iou_com > 0.8 and r.best_unit_iou < 0.6 and r.best_unit in (0, 1)
    assert r.beats_baselines and r.gain_low > 0.05 and r.gain == pytest.approx(r.iou_com - r.best_unit_iou)
    w = res.weights[0]
    assert w[0] > 0 and w[1] > 0 and abs(float(w[0] / w[1]) - 1) < 0.35 and w[:2].min() > 3 * w[2].abs()
    assert float(res.iou_by_units[0, 0]) < 0.6  # the largest weight alone is a single-unit mask
    # the held-out IoU recomputed by hand in float64 from the images, the weights and the decision threshold
    x = torch.from_numpy(images[30:]).double().div(255)  # N x H x W x 3: the units' maps
    logit = (x / res.thresholds) @ res.weights[0].double() + float(res.bias[0])
    pred, truth = logit > float(res.decision[0]), x[..., 0] + x[..., 1] > 1.2
    assert float((pred & truth).sum() / (pred | truth).sum()) == pytest.approx(r.iou_com, abs=1e-3)
    # the paper's M > 0.5 under the balanced loss marks more than the concept; the IoU threshold does better
    paper = net2vec(Channels(), root, "units", concepts=["planted"], progress=False,
                    config=Net2VecConfig(quantile=0.3, inputs="raw", workers=0, epochs=40, decision="paper")).rows[0]
    assert paper.positive_fraction > r.positive_fraction and paper.threshold == 0.0


def test_config_checks_name_the_fix():
    with pytest.raises(ConvscopeError, match="decision='half'.*'iou'"):
        Net2VecConfig(decision="half")
    with pytest.raises(ConvscopeError, match="bootstrap"):
        Net2VecConfig(bootstrap=-1)
    with pytest.raises(ConvscopeError, match="confidence"):
        Net2VecConfig(confidence=1.5)
