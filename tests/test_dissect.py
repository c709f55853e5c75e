"""Network Dissection: planted units get their concepts, thresholds equal numpy.quantile, IoUs equal a brute-force
per-unit per-concept loop, the category restriction on a hand case, resume == uninterrupted, model untouched."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.applications.dissect_report import comparison_chart, dissect_report
from convscope.data import BrodenDataset, BrodenSample, generate, write_broden
from convscope.errors import ConvscopeError, DataError
from convscope.methods.dissect import DissectConfig, TopBuffer, compare, dissect, unit_thresholds

from .helpers import assert_untouched, snapshot

FAST = dict(workers=0, batch_size=8)


class Planted(nn.Module):
    """Units of layer ``units``: 0 fires on red (a 1x1 colour filter), 1 on horizontal stripes (a vertical
    derivative averaged along x, both polarities, then the local density of such edges), 2-5 random 3x3 filters."""

    def __init__(self, random_units: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.color = nn.Conv2d(3, 1, 1)
        self.edge = nn.Conv2d(3, 2, (3, 9), padding=(1, 4))
        self.pool = nn.AvgPool2d(7, stride=1, padding=3, count_include_pad=False)
        self.rand = nn.Conv2d(3, random_units, 3, padding=1)
        self.relu = nn.ReLU()
        self.units = nn.Identity()
        with torch.no_grad():
            self.color.weight.copy_(torch.tensor([1.0, -1.5, -0.5]).view(1, 3, 1, 1))
            self.color.bias.fill_(-0.2)
            w = torch.zeros(1, 3, 3, 9)
            w[0, :, 0], w[0, :, 2] = 1 / 27, -1 / 27
            self.edge.weight.copy_(torch.cat([w, -w]))
            self.edge.bias.zero_()
            self.rand.weight.copy_(torch.randn(self.rand.weight.shape, generator=g) * 0.2)
            self.rand.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = self.relu(self.color(x))
        stripes = self.pool(self.relu(self.edge(x)).sum(1, keepdim=True))
        return self.units(torch.cat([red, stripes, self.relu(self.rand(x))], 1))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    # seed 7: 40 images at 64 px with plenty of horizontal stripes (seed 0 has only two such images)
    return generate(tmp_path_factory.mktemp("synth") / "broden", n=40, size=64, seed=7, progress=False)


@pytest.fixture(scope="module")
def planted_result(synth):
    model = Planted()
    before = snapshot(model)
    res = dissect(model, synth, "units", DissectConfig(quantile=0.05, **FAST), progress=False)
    assert_untouched(model, before)
    return model, res["units"]


# --------------------------------------------------------------------------- planted units


def test_planted_units_are_labelled_with_their_concept(planted_result):
    # quantile 0.05 (not 0.005): red covers ~7 % of these pixels, so the top 0.5 % of a graded red detector is one
    # or two fills; at 5 % the mask spans the red regions (the method is the same, the test is not about q)
    _, d = planted_result
    red, stripes = d.rows[0], d.rows[1]
    assert red.label == "red" and red.category == "color" and red.iou > 0.3 and red.detector
    assert stripes.label.startswith("stripes-horizontal") and stripes.category == "texture" and stripes.iou > 0.04
    assert d.iou.shape == (6, len(d.concepts)) and len(d.rows) == 6
    assert d.summary()["color"] >= 1 and d.summary()["texture"] >= 1
    assert [r.unit for r in d.rows] == list(range(6))


def test_stripes_unit_is_found_at_the_default_quantile(synth):
    d = dissect(Planted(), synth, "units", DissectConfig(**FAST), progress=False)["units"]
    assert d.rows[1].label.startswith("stripes-horizontal") and d.rows[1].iou > 0.04


# --------------------------------------------------------------------------- pass 1: thresholds


@pytest.mark.parametrize("q", [0.005, 0.05, 0.37])
def test_top_buffer_threshold_equals_numpy_quantile_linear(q):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 3, 5, 6, generator=g).relu()  # ties at 0, as after a ReLU
    n = 7 * 5 * 6
    buf = TopBuffer(n, q, 3, 100.0, "x")
    for lo, hi in ((0, 2), (2, 3), (3, 7)):  # uneven batches
        buf.update(a[lo:hi])
    ref = np.quantile(a.transpose(0, 1).reshape(3, -1).double().numpy(), 1 - q, axis=1, method="linear")
    assert buf.k == n - math.floor((n - 1) * (1 - q)) and buf.values.shape == (3, buf.k)
    np.testing.assert_allclose(buf.thresholds().numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [0.005, 0.02])
@pytest.mark.parametrize("kind", ["rising", "relu", "constant", "channels_last"])
def test_top_buffer_over_many_batches_with_deferred_merges(q, kind):
    """Many one-image batches: candidates above the running k-th largest wait and merge in groups; the thresholds
    stay exact (ties, constant units, channels-last input), also after a checkpoint round trip midway, and what
    waits stays under k / 2 plus one batch per unit."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 4, 7, 7, generator=g) * torch.linspace(0.5, 2.0, 300)[:, None, None, None]  # rising
    if kind == "relu":  # mostly zeros: unit 0 has fewer than k positive values, so its threshold is a tie at 0
        a = (a - torch.tensor([3.2, 2.0, 1.0, 0.0])[None, :, None, None]).relu()
    elif kind == "constant":
        a[:, 1] = 0.25  # one unit is constant: one tie group
        a[:, 2] = a[:, 2].round()  # few distinct values: large tie groups inside the top k
    elif kind == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    n = a.numel() // 4
    buf = TopBuffer(n, q, 4, 100.0, "x")
    most = 0
    for i in range(300):
        buf.update(a[i:i + 1])
        most = max(most, int(buf._waiting.max()))
        if i == 150:  # a checkpoint round trip
            buf = TopBuffer.from_state(buf.state(), q, 100.0, "x")
    ref = np.quantile(a.transpose(0, 1).reshape(4, -1).double().numpy(), 1 - q, axis=1, method="linear")
    np.testing.assert_allclose(buf.thresholds().numpy(), ref, rtol=1e-12, atol=1e-12)
    assert most <= buf.k // 2 + 49
    top = np.sort(a.transpose(0, 1).reshape(4, -1).numpy(), axis=1)[:, ::-1][:, :buf.k]
    np.testing.assert_array_equal(buf.values.numpy(), top)


def test_unit_thresholds_equal_numpy_quantile_over_all_positions(synth):
    model = Planted()
    ds = BrodenDataset(synth)
    t = unit_thresholds(model, ds, "units", DissectConfig(quantile=0.01, **FAST), progress=False)["units"]
    x = torch.from_numpy(np.stack([ds.load_image(i) for i in range(len(ds))])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        acts = model(x)
    ref = np.quantile(acts.transpose(0, 1).reshape(6, -1).double().numpy(), 0.99, axis=1, method="linear")
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12)


def test_buffer_memory_cap_names_the_fix(synth):
    with pytest.raises(ConvscopeError, match="max_buffer_mb"):
        dissect(Planted(), synth, "units", DissectConfig(quantile=0.5, max_buffer_mb=0.001, **FAST), progress=False)


# --------------------------------------------------------------------------- pass 2: IoU


def test_iou_equals_brute_force_loop_over_units_and_concepts(synth, planted_result):
    model, d = planted_result
    ds = BrodenDataset(synth)
    x = torch.from_numpy(np.stack([ds.load_image(i) for i in range(len(ds))])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        up = F.interpolate(model(x), size=(64, 64), mode="bilinear", align_corners=False).numpy()
    masks = up > d.thresholds.numpy()[None, :, None, None]
    segs = [{c: ds.load_seg(i, c) for c in ds.pixel_categories} for i in range(len(ds))]
    scenes = [ds.image_labels(i, "scene") for i in range(len(ds))]
    for ci, (num, cat) in enumerate(zip(d.concept_numbers, d.concept_categories)):
        truth, annotated = [], []
        for i in range(len(ds)):
            if cat == "scene":
                truth.append(np.full((64, 64), num in scenes[i]))
                annotated.append(bool(scenes[i]))
            else:
                truth.append((segs[i][cat] == num).any(0))
                annotated.append(bool((segs[i][cat] != 0).any()))
        for u in range(6):
            inter = sum(int((masks[i, u] & truth[i]).sum()) for i in range(len(ds)))
            act = sum(int(masks[i, u].sum()) for i in range(len(ds)) if annotated[i])
            gt = sum(int(truth[i].sum()) for i in range(len(ds)))
            ref = inter / (act + gt - inter) if act + gt - inter else 0.0
            assert d.intersection[u, ci] == inter and d.activated[u, ci] == act and d.truth[ci] == gt
            assert abs(float(d.iou[u, ci]) - ref) < 1e-12, (u, d.concepts[ci])


def _dense_tally(act, t, lab):
    """Eq. 19 the plain way: upsample every map (float64), threshold, and count every unit x concept pair."""
    up = F.interpolate(act.double(), size=lab.size, mode="bilinear", align_corners=False)
    m = (up > t[None, :, None, None]).flatten(2)  # N x U x P
    sizes = m.sum(2).double()
    inter = torch.zeros(act.shape[1], lab.image_level.shape[1], dtype=torch.float64)
    for c in range(inter.shape[1]):
        truth = (lab.cols == c).any(1)  # N x P
        inter[:, c] = (m & truth[:, None]).sum((0, 2)).double() + (sizes * lab.image_level[:, c, None]).sum(0)
    return inter, sizes.T @ lab.annotated.double(), sizes


@pytest.mark.parametrize("src,dst", [((7, 7), (112, 112)), ((5, 9), (37, 64)), ((13, 13), (64, 64)), ((1, 1), (8, 8)),
                                     ((16, 16), (16, 16)), ((20, 20), (10, 10)), ((7, 7), (7, 8))])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("chunk", [None, 64])
def test_sparse_tally_equals_dense_upsampling(src, dst, layout, chunk, monkeypatch):
    """tally_batch evaluates only blocks that can pass and counts uniform-label blocks whole; the counts must equal
    upsampling every map and counting every pixel, at power-of-two, odd, identity and downsampling scales."""
    import importlib

    from convscope.methods.dissect import BatchLabels, tally_batch

    if chunk:  # interpolate a few blocks at a time: chunks must stay inside their group of equal-shaped blocks
        monkeypatch.setattr(importlib.import_module("convscope.methods.dissect.tally"), "_TALLY_CHUNK", chunk)
    g = torch.Generator().manual_seed(src[0] * 100 + dst[1])
    n, u, c, layers = 4, 6, 5, 2
    act = torch.randn(n, u, *src, generator=g).relu()
    if layout == "channels_last":
        act = act.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view, dense in no layout
        act = torch.stack([act, act], 2).flatten(1, 2)[:, ::2]
    t = torch.quantile(act.transpose(0, 1).reshape(u, -1).double(), 0.7, dim=1)
    # blocky labels (regions, some blocks uniform, some on boundaries) in two layers, plus image-level concepts
    cols = F.interpolate(torch.randint(0, c, (n, layers, 4, 4), generator=g).float(), size=dst,
                         mode="nearest").long().flatten(2)
    cols[:, 1][cols[:, 1] == cols[:, 0]] = c  # a concept in both layers of a pixel counts once
    cols[:, 0, : dst[1]] = c  # some unlabelled pixels
    image_level = torch.zeros(n, c, dtype=torch.float64)
    image_level[:, c - 1] = (torch.rand(n, generator=g) > 0.5).double()
    cols[cols == c - 1] = c  # concept c-1 is image-level only
    lab = BatchLabels(cols, image_level, torch.rand(n, c, generator=g) > 0.3, torch.zeros(c), dst)
    got = tally_batch(act, t, lab)
    ref = _dense_tally(act, t, lab)
    assert ref[2].sum() > 0
    for a, b, name in zip(got, ref, ("intersection", "activated", "sizes")):
        assert torch.equal(a, b), name


def _hand_dataset(root):
    """Two 4x4 images; unit = the red channel. Image 0 has colour and texture labels, image 1 colour only."""
    r0 = np.zeros((4, 4), np.uint8)
    r0[0, :] = 250  # image 0: top row active
    r1 = np.zeros((4, 4), np.uint8)
    r1[:, 0] = 250  # image 1: left column active
    r1[1, 1] = 200
    imgs = [np.stack([r, np.zeros_like(r), np.zeros_like(r)], -1) for r in (r0, r1)]
    color0 = np.full((4, 4), 1)
    color0[0, :2] = 2  # 'red' on two of the active pixels
    texture0 = np.zeros((4, 4), int)
    texture0[0:2, 0:2] = 3  # 'dots' 2x2: overlaps the active row in 2 pixels
    color1 = np.full((4, 4), 2)  # image 1 all 'red'
    samples = [BrodenSample("h/0", imgs[0], seg={"color": color0, "texture": texture0}),
               BrodenSample("h/1", imgs[1], seg={"color": color1, "texture": np.zeros((4, 4), int)})]
    return write_broden(root, samples, {1: "black", 2: "red", 3: "dots"}, {"color": [1, 2], "texture": [3]})


def test_category_restriction_on_a_hand_case(tmp_path):
    root = _hand_dataset(tmp_path)
    model = nn.Sequential()
    model.add_module("r", nn.Conv2d(3, 1, 1, bias=False))
    with torch.no_grad():
        model.r.weight.copy_(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1))
    # 32 positions: 0 x 23, 200 x 1, 250 x 8. quantile 0.25: numpy's linear quantile at 0.75 sits at position
    # 31 * 0.75 = 23.25 -> 200 + 0.25 * 50 = 212.5, so each mask is the 250-pixels: 4 in image 0, 4 in image 1
    d = dissect(model, root, "r", DissectConfig(quantile=0.25, workers=0, batch_size=1), progress=False)["r"]
    assert float(d.thresholds[0]) == pytest.approx(212.5 / 255)
    col = {n: i for i, n in enumerate(d.concepts)}
    # dots (texture): only image 0 is annotated, so |M| = 4 (not 8); I = 2, |L| = 4 -> 2 / (4 + 4 - 2) = 1/3
    # (without the restriction it would be 2 / (8 + 4 - 2) = 0.2, below red)
    assert float(d.activated[0, col["dots"]]) == 4 and float(d.activated[0, col["red"]]) == 8
    assert float(d.iou[0, col["dots"]]) == pytest.approx(1 / 3)
    # red (colour): both images annotated, |M| = 8; I = 2 + 4, |L| = 2 + 16 -> 6 / (8 + 18 - 6) = 0.3
    assert float(d.iou[0, col["red"]]) == pytest.approx(0.3)
    assert d.rows[0].label == "dots" and d.rows[0].category == "texture" and d.rows[0].detector


# --------------------------------------------------------------------------- resuming


class _Flaky(BrodenDataset):
    """Fails on the ``fail_at``-th item read (an interrupted run)."""

    fail_at = 10**9
    reads = 0

    def __getitem__(self, i):
        type(self).reads += 1
        if type(self).reads == type(self).fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().__getitem__(i)


@pytest.mark.parametrize("fail_at", [20, 60])  # 40 images per pass: inside pass 1, inside pass 2
def test_resume_after_interruption_equals_an_uninterrupted_run(synth, tmp_path, fail_at):
    cfg = DissectConfig(checkpoint_every=1, **FAST)
    model = Planted()
    ref = dissect(model, synth, "units", cfg, progress=False)["units"]
    _Flaky.reads, _Flaky.fail_at = 0, fail_at
    with pytest.raises(KeyboardInterrupt):
        dissect(model, _Flaky(synth), "units", cfg, out=tmp_path, progress=False)
    assert (tmp_path / ("pass1.pt" if fail_at < 40 else "pass2.pt")).is_file()
    _Flaky.reads, _Flaky.fail_at = 0, 10**9
    got = dissect(model, _Flaky(synth), "units", cfg, out=tmp_path, progress=False)["units"]
    assert _Flaky.reads < 80  # it did not start over
    assert torch.equal(got.iou, ref.iou) and torch.equal(got.thresholds, ref.thresholds)
    assert torch.equal(got.top_images, ref.top_images) and got.rows == ref.rows
    again = dissect(model, synth, "units", cfg, out=tmp_path, progress=False)["units"]  # finished: no recompute
    assert torch.equal(again.iou, ref.iou)


def test_resume_refuses_a_different_configuration(synth, tmp_path):
    dissect(Planted(), synth, "units", DissectConfig(**FAST), out=tmp_path, progress=False)
    with pytest.raises(ConvscopeError, match="different config"):
        dissect(Planted(), synth, "units", DissectConfig(quantile=0.01, **FAST), out=tmp_path, progress=False)
    meta = json.loads((tmp_path / "dissect_meta.json").read_text())
    assert meta["config"]["quantile"] == 0.005 and meta["layers"] == ["units"]


def test_data_loader_workers_give_the_same_result(synth, planted_result):
    _, d = planted_result
    got = dissect(Planted(), synth, "units", DissectConfig(quantile=0.05, workers=1, batch_size=16),
                  progress=False)["units"]
    assert torch.allclose(got.iou, d.iou) and got.rows == d.rows


# --------------------------------------------------------------------------- errors, comparison, report


def test_errors_name_the_fix(synth):
    with pytest.raises(ConvscopeError, match="quantile"):
        DissectConfig(quantile=0)
    with pytest.raises(DataError, match="pick from"):
        dissect(Planted(), BrodenDataset(synth, categories=["color"]), "units",
                DissectConfig(categories=("texture",), **FAST), progress=False)
    with pytest.raises(DataError, match="BrodenDataset"):
        dissect(Planted(), torch.zeros(1, 3, 8, 8), "units", DissectConfig(**FAST))
    model = Planted()
    before = snapshot(model)
    with pytest.raises(ConvscopeError):
        dissect(model, synth, "unitz", DissectConfig(**FAST))
    assert_untouched(model, before)


class _SharedReLU(nn.Module):
    """One ReLU module used at two places: its output per forward pass is ambiguous for dissection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_a_module_that_runs_twice_is_refused_with_the_fix(synth):
    model = _SharedReLU()
    before = snapshot(model)
    with pytest.raises(ConvscopeError, match="more than once.*module that runs once"):
        dissect(model, synth, "relu", DissectConfig(**FAST), progress=False)
    assert_untouched(model, before)
    assert dissect(model, synth, "conv2", DissectConfig(**FAST), progress=False)["conv2"].iou.shape[0] == 4


def test_compare_and_report(synth, planted_result, tmp_path):
    model, d = planted_result
    other = dissect(Planted(seed=3), synth, "units", DissectConfig(quantile=0.05, **FAST), progress=False)
    table = compare({"planted": {"units": d}, "other": other})
    assert [r["condition"] for r in table.rows] == ["planted", "other"]
    assert table.rows[0]["color"] == d.summary()["color"] and "texture" in table.text()
    assert comparison_chart(table).size[0] > 100
    rep = dissect_report(model, BrodenDataset(synth), {"units": d}, tmp_path, top=2)
    html = rep.html[0].read_text()
    assert "unit 0: red (color)" in html and html.count("<img") == 1 + 6  # the chart + one strip per unit
    payload = json.loads(rep.json.read_text())["layers"]["units"]
    assert payload["units"][0]["label"] == "red" and len(payload["iou"]) == 6
    iou_rows = (tmp_path / "iou_units.csv").read_text().splitlines()
    assert len(iou_rows) == 7 and iou_rows[0].split(",")[1:] == d.concepts


def test_top_buffer_takes_non_contiguous_maps():
    """A transformer block's token map (class token sliced off, tokens viewed as a grid) reaches the buffer as a
    non-contiguous tensor: the running scan once failed on it ("view size is not compatible"); the thresholds must
    equal those of the same values fed contiguously."""
    from convscope.methods.dissect.quantile import TopBuffer

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 1 + 16, 5, generator=g)  # N x (class + 4 x 4 patches) x D
    grid = tokens[:, 1:].reshape(6, 4, 4, 5).permute(0, 3, 1, 2)  # N x D x 4 x 4, neither layout contiguous
    assert not grid.is_contiguous() and not grid.is_contiguous(memory_format=torch.channels_last)
    a = TopBuffer(12, 0.1, 5, 64.0, "block")
    b = TopBuffer(12, 0.1, 5, 64.0, "block")
    for chunk in grid.split(2):
        a.update(chunk)
        b.update(chunk.contiguous())
    torch.testing.assert_close(a.thresholds(), b.thresholds(), rtol=0, atol=0)
