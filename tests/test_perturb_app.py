"""``run_perturbation``: the picture grid, the HTML page and the JSON hold what ``perturbation_study`` returns for
the same inputs, with regularized inversion and with an UpconvNet decoder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from convscope.applications.perturb_report import run_perturbation
from convscope.core.images import load_images
from convscope.data.synthetic import render_sample
from convscope.errors import ConvscopeError
from convscope.methods.perturb import perturbation_study
from convscope.methods.upconv import UpconvNet, load_upconv, save_upconv

from .helpers import assert_untouched, linked_images, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny sizes: see conftest.one_thread

LAYER = "features.relu3"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("perturb_images")
    paths = []
    for i, name in enumerate(["first_img", "second_img"]):
        p = folder / f"{name}.png"
        Image.fromarray(render_sample(100_000 + i, size=48, seed=0).image).save(p)
        paths.append(p)
    return paths


def test_regularized_files_and_numbers_match_the_method(demo, pictures, tmp_path):
    before = snapshot(demo)
    run = run_perturbation(demo, pictures, LAYER, tmp_path, steps=3, seed=2, progress=False)
    assert_untouched(demo, before)
    ref = perturbation_study(demo, load_images(pictures, demo), LAYER, steps=3, seed=2, progress=False)
    assert run.study.kinds == ref.kinds == ["none", "binarize", "dropout", "drop_least"]
    assert run.study.method == "regularized" and run.study.layer == LAYER
    assert torch.allclose(run.study.images, ref.images, atol=1e-6)
    got_f = torch.tensor([r["feature_error"] for r in run.rows]).view(4, 2)
    got_i = torch.tensor([r["image_error"] for r in run.rows]).view(4, 2)
    assert torch.allclose(got_f, ref.feature_error, rtol=1e-5) and torch.allclose(got_i, ref.image_error, rtol=1e-5)
    names = ("first_img", "second_img")
    assert [(r["kind"], r["name"]) for r in run.rows] == [(k, n) for k in ref.kinds for n in names]
    assert all(r["image_error"] == 0 and r["psnr_unperturbed_db"] is None for r in run.rows[:2])
    assert all(r["image_error"] > 0 and r["psnr_unperturbed_db"] > 0 for r in run.rows[2:])
    for s, k in zip(run.summary, ref.kinds):
        assert s["kind"] == k and s["mean_feature_error"] == pytest.approx(float(ref.feature_error[ref.kinds.index(k)]
                                                                                   .mean()), rel=1e-5)

    assert linked_images(run.html) == [run.picture] and run.picture == tmp_path / "perturb.png"
    with Image.open(run.picture) as im:
        assert im.width > 5 * 112 and im.height > 2 * 112  # 2 rows of original + 4 reconstructions
    html = run.html.read_text()
    for text in ("perturb.png", LAYER, "binarize", "dropout", "drop_least", "first_img", "second_img",
                 f"{run.rows[3]['feature_error']:.4g}"):
        assert text in html
    data = json.loads(run.json.read_text())  # standard JSON: no Infinity
    assert data["rows"] == run.rows and data["summary"] == run.summary and data["steps"] == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_decoder_and_its_layer(demo, pictures, tmp_path):
    torch.manual_seed(0)
    dec = UpconvNet((192, 14, 14), (112, 112), width=4, layer=LAYER, model_name="demo_net", mean=(0.5,) * 3,
                    std=(0.5,) * 3)
    path = save_upconv(dec, tmp_path / "dec.pt")
    run = run_perturbation(demo, pictures[:1], None, tmp_path / "out", perturbations=["binarize"], decoder=path,
                           self_contained=True)
    ref = perturbation_study(demo, load_images(pictures[:1], demo), LAYER, ["binarize"], decoder=load_upconv(path))
    assert run.study.method == "upconv" and run.study.kinds == ["none", "binarize"]
    assert torch.allclose(run.study.images, ref.images) and torch.allclose(run.study.feature_error, ref.feature_error)
    assert [r["feature_error"] for r in run.rows] == ref.feature_error.flatten().tolist()
    assert not linked_images(run.html) and "data:image/png;base64," in run.html.read_text()
    assert json.loads(run.json.read_text())["decoder"] == str(path)
    with pytest.raises(ConvscopeError, match="decodes layer 'features.relu3'"):
        run_perturbation(demo, pictures[:1], "features.relu5", tmp_path / "bad", decoder=path)
    assert not (tmp_path / "bad").exists()


def test_bad_input_names_the_fix(demo, pictures, tmp_path):
    with pytest.raises(ConvscopeError, match="binarize, dropout, drop_least"):
        run_perturbation(demo, pictures, LAYER, tmp_path, perturbations=["blur"])
    with pytest.raises(ConvscopeError, match="at most once"):
        run_perturbation(demo, pictures, LAYER, tmp_path, perturbations=["dropout", "dropout"])
    with pytest.raises(ConvscopeError, match="at least one perturbation: binarize"):
        run_perturbation(demo, pictures, LAYER, tmp_path, perturbations=[])
    with pytest.raises(ConvscopeError, match="give a layer"):
        run_perturbation(demo, pictures, None, tmp_path)
    assert not any(tmp_path.iterdir())
