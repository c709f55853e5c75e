"""Attribution metrics: deletion / insertion against a naive loop, randomization check, Spearman and blur against
scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.imageops import gaussian_blur, rank_average, spearman
from convscope.errors import ConvscopeError
from convscope.methods.evaluation import (
    deletion_insertion,
    deletion_insertion_many,
    model_randomization,
    model_randomization_many,
    pixel_ranks,
    randomizable_layers,
)

from .helpers import assert_untouched, snapshot


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_deletion_insertion_matches_a_naive_loop():
    model = Small()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 6, 6, generator=g)
    maps = torch.rand(3, 6, 6, generator=g)
    steps, sigma = 4, 1.0
    res = deletion_insertion(model, x, maps, target=[0, 2, 4], steps=steps, batch_size=5, blur_sigma=sigma)
    blurred = gaussian_blur(x, sigma)
    for i, c in enumerate([0, 2, 4]):
        order = np.argsort(-maps[i].flatten().numpy(), kind="stable")
        for t in range(steps + 1):
            k = round(t * 36 / steps)
            sel = np.zeros(36, bool)
            sel[order[:k]] = True
            sel_t = torch.from_numpy(sel).view(1, 6, 6)
            deleted = torch.where(sel_t, torch.zeros(()), x[i])
            inserted = torch.where(sel_t, x[i], blurred[i])
            with torch.no_grad():
                pd = F.softmax(model(deleted[None]), 1)[0, c]
                pi = F.softmax(model(inserted[None]), 1)[0, c]
            assert abs(float(res.deletion[i, t]) - float(pd)) < 1e-5
            assert abs(float(res.insertion[i, t]) - float(pi)) < 1e-5
    # areas by the trapezoid rule, by hand
    d = res.deletion[0].tolist()
    assert abs(float(res.deletion_auc[0]) - sum((d[j] + d[j + 1]) / 2 / steps for j in range(steps))) < 1e-6
    # first point of deletion is the clean image, last point of insertion too
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    torch.testing.assert_close(res.deletion[:, 0], p[[0, 1, 2], [0, 2, 4]])
    torch.testing.assert_close(res.insertion[:, -1], p[[0, 1, 2], [0, 2, 4]])


def _naive_curves(model, x, maps, classes, steps, baseline, blurred):
    """One image, one step, one forward pass at a time: the definition, without any batching."""
    hw = x.shape[-1] * x.shape[-2]
    dele = torch.empty(x.shape[0], steps + 1)
    ins = torch.empty(x.shape[0], steps + 1)
    for i, c in enumerate(classes):
        order = torch.sort(maps[i].flatten(), descending=True, stable=True).indices
        for t in range(steps + 1):
            sel = torch.zeros(hw, dtype=torch.bool)
            sel[order[:round(t * hw / steps)]] = True
            sel = sel.view(1, *x.shape[-2:])
            with torch.no_grad():
                dele[i, t] = F.softmax(model(torch.where(sel, baseline, x[i])[None]), 1)[0, c]
                ins[i, t] = F.softmax(model(torch.where(sel, x[i], blurred[i])[None]), 1)[0, c]
    return dele, ins


def test_batched_deletion_insertion_of_many_methods_equals_a_per_image_loop():
    model = Small()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 6, 6, generator=g)
    maps = {"a": torch.rand(4, 6, 6, generator=g), "b": torch.randn(4, 1, 6, 6, generator=g),
            "ties": torch.zeros(4, 6, 6)}  # all ties: raster order
    classes, steps, baseline = [1, 0, 4, 2], 5, torch.full((3, 1, 1), -0.5)
    blurred = gaussian_blur(x, 1.2)
    for batch_size in (1, 7, 1000):
        got = deletion_insertion_many(model, x, maps, target=classes, steps=steps, batch_size=batch_size,
                                      deletion_baseline=baseline, blur_sigma=1.2, progress=False)
        assert list(got) == ["a", "b", "ties"]
        for name, m in maps.items():
            dele, ins = _naive_curves(model, x, m.reshape(4, 6, 6), classes, steps, baseline, blurred)
            torch.testing.assert_close(got[name].deletion, dele, atol=1e-6, rtol=0)
            torch.testing.assert_close(got[name].insertion, ins, atol=1e-6, rtol=0)
            torch.testing.assert_close(got[name].deletion_auc, torch.trapezoid(dele, dx=1 / steps), atol=1e-6, rtol=0)
            assert got[name].target.tolist() == classes
    one = deletion_insertion(model, x, maps["b"], target=classes, steps=steps, deletion_baseline=baseline,
                             blur_sigma=1.2)
    torch.testing.assert_close(one.insertion, got["b"].insertion, atol=1e-6, rtol=0)
    # the curves differ between methods: the shared endpoints did not overwrite the map-dependent points
    assert not torch.allclose(got["a"].deletion, got["ties"].deletion)


def test_deletion_insertion_many_errors_name_the_fix():
    model, x = Small(), torch.randn(2, 3, 6, 6)
    with pytest.raises(ConvscopeError, match="at least one"):
        deletion_insertion_many(model, x, {})
    with pytest.raises(ConvscopeError, match="maps must be N x H x W"):
        deletion_insertion_many(model, x, {"a": torch.rand(2, 6, 6), "b": torch.rand(3, 6, 6)})
    with pytest.raises(ConvscopeError, match="batch_size"):
        deletion_insertion(model, x, torch.rand(2, 6, 6), batch_size=0)


def test_pixel_ranks_break_ties_in_raster_order():
    maps = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    assert pixel_ranks(maps).tolist() == [[[1, 0], [2, 3]]]


def test_spearman_and_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 60, generator=g)
    b = a + torch.randn(4, 60, generator=g)
    a[:, :12] = 0.0  # ties, as in ReLU-ed maps
    b[:, 5:20] = 1.0
    got = spearman(a, b)
    for i in range(4):
        assert abs(float(got[i]) - stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic) < 1e-10
        np.testing.assert_allclose(rank_average(a[i]).numpy(), stats.rankdata(a[i].numpy()) - 1)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None])).all()


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 17, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = gaussian_blur(x, 1.5)  # kernel radius 5 in both (scipy: int(3 * 1.5 + 0.5), ours: ceil(3 * 1.5))
    ref = np.stack([[ndimage.gaussian_filter(c, 1.5, mode="mirror", truncate=3.0) for c in im] for im in x.numpy()])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(got.sum((-1, -2)), x.sum((-1, -2)), rtol=0.02, atol=0)


def test_model_randomization_leaves_the_model_and_tracks_layers():
    model = Small()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    before = snapshot(model)

    def explain(m, xx):
        return cs.saliency(m, xx, target=[1, 3])[:, 0]

    res = model_randomization(model, x, explain)
    assert_untouched(model, before)
    assert res.layers == ["fc", "conv"] == randomizable_layers(model)
    assert res.spearman.shape == (2, 2) and len(res.maps) == 3
    torch.testing.assert_close(res.maps[0], explain(model, x))
    # a "method" that ignores the network is perfectly stable: the check catches exactly that
    flat = model_randomization(model, x, lambda m, xx: xx.abs().sum(1))
    torch.testing.assert_close(flat.spearman, torch.ones(2, 2))
    with pytest.raises(cs.LayerNotFoundError):
        model_randomization(model, x, explain, layers=["nope"])


def test_randomized_demo_net_changes_its_saliency(demo):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    res = model_randomization(demo, x, lambda m, xx: cs.gradcam(m, xx, target=[0, 1], layer="features.relu5")[:, 0],
                              layers=randomizable_layers(demo))
    assert res.layers[0] == "classifier.fc8" and res.layers[-1] == "features.conv1"
    assert float(res.spearman_abs[-1].nan_to_num(0).abs().max()) < 0.9  # fully random: the map is unrelated


def test_randomization_stages_and_many_methods_equal_the_full_cascade():
    model = Small()
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    fns = {"sal": lambda m, xx: cs.saliency(m, xx, target=[0, 1, 2])[:, 0],
           "ixg": lambda m, xx: cs.input_x_gradient(m, xx, target=[2, 2, 0])[:, 0].sum(1)}
    layers = ["fc", "conv"]
    full = {k: model_randomization(model, x, f, layers=layers, seed=3, progress=False) for k, f in fns.items()}
    both = model_randomization_many(model, x, fns, layers=layers, seed=3, stages=[-1], progress=False)
    for k in fns:
        assert both[k].layers == ["conv"] and len(both[k].maps) == 2
        torch.testing.assert_close(both[k].spearman, full[k].spearman[-1:])  # the skipped stage still ran
        torch.testing.assert_close(both[k].spearman_abs, full[k].spearman_abs[-1:])
        torch.testing.assert_close(both[k].maps[1], full[k].maps[-1])
    top = model_randomization(model, x, fns["sal"], layers=layers, seed=3, stages=[0, -2])  # one stage, twice
    assert top.layers == ["fc"]
    torch.testing.assert_close(top.spearman, full["sal"].spearman[:1])
    for bad in ([2], [], [0.5]):
        with pytest.raises(ConvscopeError, match="stages="):
            model_randomization(model, x, fns["sal"], layers=layers, stages=bad)
