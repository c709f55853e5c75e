"""``convscope maximize``: plain, class logits, multifaceted and DGN-AM write a labelled grid, per-unit PNGs and
the objective values; bad input is one clear line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import convscope as cs
from convscope.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _run(tmp_path, *extra):
    return main(["maximize", "demo_net", "--device", "cpu", "--steps", "3", "--out", str(tmp_path), *extra])


def test_units_and_logits(tmp_path, capsys):
    assert _run(tmp_path / "u", "--layer", "features.relu5", "--units", "0-2,7") == 0
    data = json.loads((tmp_path / "u" / "maximize.json").read_text())
    assert data["units"] == [0, 1, 2, 7] and len(data["activations"]) == 4
    assert sorted(p.name for p in (tmp_path / "u" / "units").iterdir()) == [
        f"features.relu5_{u}.png" for u in (0, 1, 2, 7)]
    assert Image.open(tmp_path / "u" / "units" / "features.relu5_0.png").size == (112, 112)
    assert Image.open(tmp_path / "u" / "maximize_features.relu5.png").size[0] > 4 * 112
    assert _run(tmp_path / "l", "--layer", "logits", "--units", "0,3") == 0
    assert "objective reached" in capsys.readouterr().out
    assert json.loads((tmp_path / "l" / "maximize.json").read_text())["layer"] is None


def test_facets_and_generator(tmp_path):
    assert _run(tmp_path / "f", "--layer", "features.relu5", "--units", "4", "--facets", "2", "--synthetic", "16",
                "--top", "6") == 0
    assert len(list((tmp_path / "f" / "units").iterdir())) == 2
    dec = tmp_path / "g.pt"
    assert main(["upconv", "train", "demo_net", "--device", "cpu", "--layer", "features.relu3", "--synthetic", "4",
                 "--epochs", "1", "--batch-size", "4", "--width", "4", "--out", str(dec)]) == 0
    assert _run(tmp_path / "d", "--layer", "features.relu5", "--units", "0,1", "--generator", str(dec),
                "--code-init", str(cs.sample_image("chelsea"))) == 0
    assert json.loads((tmp_path / "d" / "maximize.json").read_text())["generator"] == str(dec)


def test_errors(tmp_path, capsys):
    assert _run(tmp_path, "--layer", "features.relu9", "--units", "0") == 2
    assert "features.relu" in capsys.readouterr().err
    assert _run(tmp_path, "--layer", "features.relu5", "--units", "0-x") == 2
    capsys.readouterr()
    assert _run(tmp_path, "--layer", "features.relu5", "--units", "0", "--generator", str(tmp_path / "none.pt")) == 2
    assert "does not exist" in capsys.readouterr().err
