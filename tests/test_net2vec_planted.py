"""Net2Vec on a planted distributed concept: the concept is where a weighted sum of three binarized units exceeds a
threshold (a majority vote), so each unit alone is a poor detector (IoU 0.6 in closed form) while the learned
combination segments it; every single unit's IoU stays far below the combination's and the flag says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.data import BrodenSample, write_broden
from convscope.methods.net2vec import Net2VecConfig, net2vec

from .helpers import assert_untouched, snapshot
from .test_net2vec import Channels


def majority_dataset(root, n: int = 40, size: int = 16, seed: int = 3):
    """Random-pixel images; concept ``majority`` = at least two of the three channels above 1/2 (the last quarter
    of the images held out); returns the folder and the images."""
    rng = np.random.default_rng(seed)
    samples, images = [], []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = (img.astype(np.float64) / 255 > 0.5).sum(-1) >= 2
        samples.append(BrodenSample(f"m/{i:03d}", img, seg={"color": np.where(mask, 1, 2)},
                                    split="val" if i >= 3 * n // 4 else "train"))
        images.append(img)
    return write_broden(root, samples, {1: "majority", 2: "rest"}, {"color": [1, 2]}), np.stack(images)


def test_a_majority_of_three_units_is_found_by_the_combination_and_by_no_single_unit(tmp_path):
    root, images = majority_dataset(tmp_path)
    model = Channels()
    before = snapshot(model)
    # binarized inputs 1[A_k > T_k] with P(A_k > T_k) = 1/2: the concept is 1[I_0 + I_1 + I_2 > 1.5]
    cfg = Net2VecConfig(quantile=0.5, workers=0, epochs=40, margin=0.05)
    res = net2vec(model, root, "units", concepts=["majority"], config=cfg, progress=False)
    assert_untouched(model, before)
    r = res.rows[0]
    # closed form for independent fair units: P(I_k and maj) / P(I_k or maj) = 0.375 / 0.625 = 0.6
    single = res.single_iou[:, 0]
    assert single.shape == (3,) and float(single.max()) < 0.66 and float(single.min()) > 0.5
    assert r.best_unit_iou == pytest.approx(float(single.max()))
    assert 0.45 < r.iou_all < 0.55  # the trivial mask: the concept covers half of the pixels
    assert r.iou_com > 0.9 and r.iou_com > float(single.max()) + 0.25  # found by the combination only
    assert r.beats_baselines and r.gain_low > 0.2
    assert r.units_needed == 3  # the two largest weights alone stay below 90 % of the combination
    w = res.weights[0]
    assert (w > 0).all() and float(w.max() / w.min()) < 1.5  # three comparable positive weights
    # the held-out IoU recomputed by hand in float64 from the images, the unit thresholds and the learned map
    x = torch.from_numpy(images[30:]).double().div(255)  # held-out N x H x W x 3: the units' maps
    on = (x > res.thresholds).double()  # I_k(x) = 1[A_k > T_k]
    pred = on @ w.double() + float(res.bias[0]) > float(res.decision[0])
    truth = (x > 0.5).sum(-1) >= 2
    assert float((pred & truth).sum() / (pred | truth).sum()) == pytest.approx(r.iou_com, abs=1e-3)
