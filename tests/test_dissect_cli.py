"""``convscope dissect``: generates the synthetic set once, writes pages / CSV / JSON, resumes, clear errors."""

from __future__ import annotations

import json

import pytest

from convscope.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_dissect_synthetic_and_rerun(tmp_path, capsys):
    args = ["dissect", "demo_net", "--device", "cpu", "--layers", "features.relu1,features.relu5", "--n", "8",
            "--quantile", "0.05", "--max-units", "2", "--top", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "features.relu1" in out and "features.relu5" in out and "detector_units" in out
    for name in ("dissect_features.relu1.html", "dissect_features.relu5.csv", "iou_features.relu5.csv",
                 "dissect_summary.png", "dissect.json"):
        assert (tmp_path / name).exists(), name
    first = json.loads((tmp_path / "dissect.json").read_text())
    index = (tmp_path / "broden" / "index.csv").stat().st_mtime_ns
    assert main(args) == 0  # a rerun reuses the dataset and the saved passes, same result
    assert (tmp_path / "broden" / "index.csv").stat().st_mtime_ns == index
    assert json.loads((tmp_path / "dissect.json").read_text()) == first


def test_dissect_errors(tmp_path, capsys):
    assert main(["dissect", "demo_net", "--layers", "features.relu9", "--out", str(tmp_path)]) == 2
    assert "features.relu" in capsys.readouterr().err
    assert main(["dissect", "demo_net", "--layers", "features.relu1", "--dataset", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
