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


def test_dissect_checkpoints_side_by_side(tmp_path, capsys):
    """``--checkpoints``: each checkpoint dissected on the same data; its row equals dissecting that model alone."""
    import torch

    from convscope import load_model
    from convscope.methods.dissect import DissectConfig, compare, dissect

    trained = load_model("demo_net", device="cpu")
    ckpts = tmp_path / "run"
    ckpts.mkdir()
    torch.manual_seed(0)
    untrained = {k: torch.randn_like(v) * 0.05 if v.dim() > 1 else v for k, v in trained.state_dict().items()}
    torch.save(untrained, ckpts / "epoch_00.pt")
    torch.save(trained.state_dict(), ckpts / "epoch_12.pt")
    out = tmp_path / "out"
    args = ["dissect", "demo_net", "--device", "cpu", "--layers", "features.relu2,features.relu5", "--n", "8",
            "--quantile", "0.05", "--checkpoints", str(ckpts), "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 0" in text and "epoch 12" in text
    assert (out / "dissect_checkpoints.png").exists()
    rows = (out / "dissect_checkpoints.csv").read_text().splitlines()
    assert rows[0].startswith("condition,layer,") and len(rows) == 1 + 2 * 2
    alone = dissect(trained, out / "broden", ["features.relu2", "features.relu5"], DissectConfig(quantile=0.05),
                    progress=False)
    expected = compare({"epoch 12": alone}).rows
    got = [r for r in rows[1:] if r.startswith("epoch 12,")]
    assert [r.split(",")[1] for r in got] == ["features.relu2", "features.relu5"]
    for r, e in zip(got, expected):
        assert int(r.split(",")[-3]) == e["total"] and int(r.split(",")[-1]) == e["units"]
