"""``convscope explain``: overlays, a grid and an HTML page for each method; clear errors."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

import convscope as cs
from convscope.cli import EXPLAIN_METHODS, main
from convscope.methods.registry import ATTRIBUTION_METHODS

from .helpers import linked_images

TILE = 112  # demo_net's input size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name in ("chelsea", "coffee"):
        shutil.copy(cs.sample_image(name), d)
    return d


def test_folder_of_images(folder, tmp_path, capsys):
    assert main(["explain", str(folder), "--model", "demo_net", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    for stem in ("chelsea", "coffee"):  # input + one Grad-CAM overlay (default method, target top)
        assert 2 * TILE < Image.open(tmp_path / f"{stem}.gradcam.png").size[0] < 2 * (TILE + 40)
    assert Image.open(tmp_path / "grid.gradcam.png").size[1] > 2 * TILE  # one row per image
    html = (tmp_path / "explain.gradcam.html").read_text()
    assert len(linked_images(tmp_path / "explain.gradcam.html")) == 2 and "chelsea" in html and "coffee" in html
    assert "probability" in html and html.count("<tr>") == 2 * 6  # a top-5 table per image
    assert not list(tmp_path.glob("*.tmp*")), "no temp files may be left"


@pytest.mark.parametrize("method", [m for m in EXPLAIN_METHODS if m not in ("cam", "gradcam")])
def test_every_method_writes_overlays_grid_and_html(method, tmp_path):
    extra = {"occlusion": ["--window", "56", "--stride", "28", "--layer", "features.relu5"],
             "smoothgrad": ["--samples", "2"],
             "prediction-difference": ["--window", "16", "--stride", "8"]}.get(method, [])
    model = "demo_vit" if method == "rollout" else "demo_net"  # attention rollout needs a vision transformer
    assert main(["explain", str(cs.sample_image("chelsea")), "--model", model, "--device", "cpu",
                 "--method", method, "--target", "top2", "--out", str(tmp_path), *extra]) == 0
    per_channel = ATTRIBUTION_METHODS[method].per_channel
    tiles = 1 + 2 * (2 if per_channel else 1) + (method == "occlusion")  # input, per target (raw,) overlay, unit
    im = Image.open(tmp_path / f"chelsea.{method}.png")
    assert im.size[0] > tiles * TILE and im.size[1] > TILE  # long labels widen cells, so only a lower bound
    assert Image.open(tmp_path / f"grid.{method}.png").size == im.size
    html = (tmp_path / f"explain.{method}.html").read_text()
    assert len(linked_images(tmp_path / f"explain.{method}.html")) == 1 and html.count("<tr>") == 6


def test_explicit_targets_and_cam_on_lite0(tmp_path, capsys):
    img = str(cs.sample_image("chelsea"))
    assert main(["explain", img, "--method", "cam", "--target", "281,282", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    html = (tmp_path / "explain.cam.html").read_text()
    assert "tabby" in html and "tiger cat" in html and "head.act" in html
    assert Image.open(tmp_path / "chelsea.cam.png").size[0] > 3 * 224


@pytest.mark.parametrize("args, match", [
    (["--target", "cat"], "--target"),
    (["--method", "gradcam", "--layer", "features.conv9"], "features.conv5"),
    (["--method", "cam"], "gradcam"),  # demo_net has no global-average-pooling classifier
    (["--target", "10"], "out of range"),
])
def test_errors_are_one_clear_line(args, match, tmp_path, capsys):
    img = str(cs.sample_image("chelsea"))
    assert main(["explain", img, "--model", "demo_net", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("convscope: error:")
    assert match in err
