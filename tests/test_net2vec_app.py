"""``run_net2vec``: the chart, the segmentation pictures, the HTML page and the JSON hold what ``net2vec`` returns
for the same inputs, and the pictured masks are the ones the method scored."""

from __future__ import annotations

import json

import pytest
import torch

from convscope.applications.net2vec_report import (
    held_out_indices,
    iou_chart,
    run_net2vec,
    segment,
    summary,
    synthetic_dataset,
)
from convscope.errors import ConvscopeError
from convscope.methods.dissect import DissectConfig, open_dataset
from convscope.methods.net2vec import Net2VecConfig, net2vec

from .helpers import assert_untouched, linked_images, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: see conftest.one_thread

LAYER = "features.relu5"
CFG = Net2VecConfig(quantile=0.05, seg_size=16, epochs=5, workers=0)
CONCEPTS = ["red", "blue", "circle"]


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("n2v_app") / "broden", n=40, size=64, seed=7, progress=False)


def test_files_and_numbers_match_the_method(demo, broden, tmp_path):
    before = snapshot(demo)
    run = run_net2vec(demo, broden, LAYER, tmp_path, CONCEPTS, CFG, pictures=2, examples=2, progress=False)
    assert_untouched(demo, before)
    ref = net2vec(demo, broden, LAYER, concepts=CONCEPTS, config=CFG, progress=False)
    assert torch.equal(run.result.weights, ref.weights) and run.result.loss == ref.loss
    assert [r["concept"] for r in run.rows] == CONCEPTS
    for row, r, j in zip(run.rows, ref.rows, range(3)):
        assert (row["iou_com"], row["best_unit"], row["best_unit_iou"], row["iou_all"], row["units_needed"]) == (
            r.iou_com, r.best_unit, r.best_unit_iou, r.iou_all, r.units_needed)
        assert row["gain"] == pytest.approx(r.iou_com - max(r.best_unit_iou, r.iou_all))
        assert (row["beats_baselines"], row["gain_ci"]) == (r.beats_baselines, [r.gain_low, r.gain_high])
        assert row["beats_baselines"] == (row["gain_ci"][0] > CFG.margin)
        assert row["iou_top1"] == float(ref.iou_by_units[j, 0]) and row["iou_top5"] == float(ref.iou_by_units[j, 4])
        top = ref.weights[j].abs().topk(5).indices.tolist()
        assert [u["unit"] for u in row["top_units"]] == top
        assert [u["weight"] for u in row["top_units"]] == ref.weights[j, top].tolist()

    assert list(run.pictures) == ["red", "blue"]  # the asked concepts, in order, up to `pictures`
    assert linked_images(run.html) == [run.chart, *run.pictures.values()]
    html = run.html.read_text()
    for row in run.rows:
        assert row["concept"] in html and f"{row['iou_com']:.4g}" in html and f"{row['best_unit_iou']:.4g}" in html
    assert "segment_red.png" in html and "net2vec_iou.png" in html and "beats baselines" in html
    for row in run.rows:  # the flag is on the page, beside the concept
        cells = html.split(f"<td>{row['concept']}</td>", 1)[1].split("</tr>", 1)[0]
        assert ("<td>yes</td>" if row["beats_baselines"] else "<td>NO</td>") in cells
    data = json.loads(run.json.read_text())
    assert data["rows"] == run.rows and data["loss"] == ref.loss and data["val_images"] == ref.val_images
    assert data["pictures"] == {"red": "segment_red.png", "blue": "segment_blue.png"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_pictured_masks_are_the_ones_scored(demo, broden):
    res = net2vec(demo, broden, LAYER, concepts=CONCEPTS, config=CFG, progress=False)
    val = held_out_indices(open_dataset(broden, demo, DissectConfig(seg_size=CFG.seg_size)), CFG)
    assert len(val) == res.val_images
    for concept in CONCEPTS:
        m = segment(demo, broden, res, concept, val, CFG)
        assert m.truth.shape == m.combination.shape == m.unit.shape == (len(val), 16, 16)
        a = m.annotated[:, None, None]
        inter, union = int((m.combination & m.truth & a).sum()), int(((m.combination | m.truth) & a).sum())
        assert inter / union == pytest.approx(res.row(concept).iou_com, abs=1e-9)


def test_dataset_is_reused_and_errors_name_the_fix(demo, broden, tmp_path):
    index = broden / "index.csv"
    stamp = index.stat().st_mtime_ns
    assert synthetic_dataset(broden, n=40, size=64, seed=7, progress=False) == broden
    assert index.stat().st_mtime_ns == stamp  # same settings: not regenerated
    other = synthetic_dataset(tmp_path / "b", n=6, size=32, seed=7, progress=False)
    assert synthetic_dataset(other, n=8, size=32, seed=7, progress=False) == other
    assert json.loads((other / "synth.json").read_text())["n"] == 8  # new settings: regenerated
    with pytest.raises(ConvscopeError, match="pictures=-1"):
        run_net2vec(demo, broden, LAYER, tmp_path / "out", config=CFG, pictures=-1)
    with pytest.raises(ConvscopeError, match="no concept 'rouge'"):
        run_net2vec(demo, broden, LAYER, tmp_path / "out", ["rouge"], CFG, progress=False)
    assert not (tmp_path / "out").exists()


def test_summary_and_chart_show_the_flag():
    rows = [{"concept": "ring", "category": "object", "iou_com": 0.19, "best_unit": 69, "best_unit_iou": 0.07,
             "iou_all": 0.03, "gain": 0.12, "gain_ci": [0.1, 0.14], "beats_baselines": True},
            {"concept": "brown", "category": "color", "iou_com": 0.09, "best_unit": 3, "best_unit_iou": 0.03,
             "iou_all": 0.09, "gain": 0.0, "gain_ci": [-0.002, 0.003], "beats_baselines": False}]
    text = summary(rows, margin=0.01).splitlines()
    assert text[1].startswith("ring") and text[1].endswith("yes") and "+0.120 [+0.100, +0.140]" in text[1]
    assert text[2].startswith("brown") and text[2].endswith("NO")
    assert text[-1].startswith("1 of 2 concepts do not beat") and "0.01" in text[-1]
    flagged, plain = iou_chart(rows), iou_chart([{**r, "beats_baselines": True} for r in rows])
    assert flagged.size == plain.size and flagged.tobytes() != plain.tobytes()  # the grey "(trivial)" label
