"""``run_fooling``: the pictures, the HTML page and the JSON hold what ``fooling_image`` returns for the same
inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.applications.fooling import percent, run_fooling
from convscope.errors import ConvscopeError
from convscope.methods.maximize import fooling_image

from .helpers import assert_untouched, linked_images, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: see conftest.one_thread

ARGS = dict(confidence=0.9, max_steps=40, size=32, seed=3)


def test_files_and_numbers_match_the_method(demo, tmp_path):
    before = snapshot(demo)
    targets = [0, 5, 5]  # a repeated class gets its own image (its own start noise)
    run = run_fooling(demo, targets, tmp_path, progress=False, **ARGS)
    assert_untouched(demo, before)
    ref = fooling_image(demo, targets, progress=False, **ARGS)
    assert [r["class"] for r in run.rows] == targets
    assert [r["name"] for r in run.rows] == [demo.classes[t] for t in targets]
    assert torch.allclose(torch.tensor([r["probability"] for r in run.rows]), ref.probabilities, atol=1e-6)
    assert [r["steps"] for r in run.rows] == ref.steps.tolist()
    assert [r["success"] for r in run.rows] == ref.success.tolist()
    assert [r["predicted"] for r in run.rows] == ref.predicted.tolist()
    assert all(r["success"] == (r["probability"] >= 0.9) for r in run.rows)
    # the two images of class 5 differ (seeds 4 and 5)
    assert not torch.equal(run.result.images[1], run.result.images[2])

    assert run.grid == tmp_path / "fooling.png" and run.grid.is_file()
    assert len(run.pictures) == 3 and len(set(run.pictures)) == 3
    for p, img in zip(run.pictures, run.result.images):
        with Image.open(p) as im:
            assert im.size == (32, 32)
            got = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
        assert (got - img.clamp(0, 1)).abs().max() <= 1 / 255 + 1e-6
    assert sorted(linked_images(run.html)) == sorted([run.grid, *run.pictures])
    html = run.html.read_text()
    for r in run.rows:
        assert r["name"] in html and f"{r['probability']:.6f}" in html
    data = json.loads(run.json.read_text())
    assert data["rows"] == run.rows and data["reached"] == sum(ref.success.tolist())
    assert not list(tmp_path.rglob("*.tmp"))
    one = run_fooling(demo, [1], tmp_path / "one", progress=False, self_contained=True, **ARGS)
    assert not linked_images(one.html) and one.html.read_text().count("data:image/png;base64,") == 2


def test_bad_classes_name_the_fix(demo, tmp_path):
    with pytest.raises(ConvscopeError, match="from 0 to 7"):
        run_fooling(demo, [8], tmp_path, max_steps=1, size=32, progress=False)
    with pytest.raises(ConvscopeError, match="at least one"):
        run_fooling(demo, [], tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_percent_never_rounds_up_to_certainty():
    assert percent(0.5) == "50.000%" and percent(0.99998) == "99.998%"
    assert percent(0.9999996) == ">99.999%" and percent(1.0) == "100.000%"
