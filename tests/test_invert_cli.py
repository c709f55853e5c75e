"""``convscope invert`` / ``upconv train`` / ``style``: pictures and numbers written, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import convscope as cs
from convscope.applications.invert_report import psnr
from convscope.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_psnr_by_hand():
    a = torch.zeros(3, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")


def test_invert_regularized_and_upconv(tmp_path, capsys):
    img = str(cs.sample_image("chelsea"))
    assert main(["invert", img, img, "--model", "demo_net", "--device", "cpu", "--layers",
                 "features.relu1,features.relu3", "--steps", "3", "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "invert.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["features.relu1"] * 2 + ["features.relu3"] * 2
    assert all(r["error"] >= 0 for r in rows)
    w, h = Image.open(tmp_path / "r" / "invert.png").size
    assert w > 2 * 112 and h > 3 * 112  # 2 image columns; originals + 2 layer rows
    dec = tmp_path / "d.pt"
    assert main(["upconv", "train", "demo_net", "--device", "cpu", "--layer", "features.relu2", "--synthetic", "8",
                 "--epochs", "1", "--batch-size", "4", "--width", "4", "--out", str(dec)]) == 0
    assert main(["invert", img, "--model", "demo_net", "--device", "cpu", "--method", "upconv", "--decoder", str(dec),
                 "--out", str(tmp_path / "u")]) == 0
    rows = json.loads((tmp_path / "u" / "invert.json").read_text())["rows"]
    assert rows[0]["layer"] == "features.relu2" and "PSNR" in capsys.readouterr().out


def test_style_writes_pictures(tmp_path):
    c, s = str(cs.sample_image("chelsea")), str(cs.sample_image("flower"))
    assert main(["style", c, s, "--model", "demo_net", "--device", "cpu", "--content-layer", "features.relu3",
                 "--style-layers", "features.relu1,features.relu2", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "stylized.png").size == (112, 112)
    assert Image.open(tmp_path / "style.png").size[0] > 3 * 112


def test_errors_are_one_line(tmp_path, capsys):
    img = str(cs.sample_image("chelsea"))
    assert main(["invert", img, "--model", "demo_net", "--method", "upconv", "--out", str(tmp_path)]) == 2
    assert "--decoder" in capsys.readouterr().err
    assert main(["invert", img, "--model", "demo_net", "--layers", "features.relu9", "--out", str(tmp_path)]) == 2
    assert "features.relu" in capsys.readouterr().err
    assert main(["invert", img, "--model", "demo_net", "--method", "upconv", "--decoder", str(tmp_path / "no.pt"),
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
