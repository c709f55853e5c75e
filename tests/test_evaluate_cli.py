"""``convscope evaluate attribution``: every method scored, files written, the random baseline fails the metrics."""

from __future__ import annotations

import json

import pytest

from convscope.applications.evaluate import METHODS, synthetic_eval_set
from convscope.cli import main


def test_eval_set_is_held_out_and_has_masks():
    images, labels, masks = synthetic_eval_set(3, 112)
    assert images.shape == (3, 3, 112, 112) and labels.shape == (3,) and masks.shape == (3, 112, 112)
    assert masks.flatten(1).any(1).all()


def test_cli_scores_methods_and_writes_table(tmp_path, capsys):
    assert main(["evaluate", "attribution", "--model", "demo_net", "--device", "cpu", "--n", "6", "--n-curve", "3",
                 "--n-sanity", "2", "--steps", "4", "--methods", "gradcam,saliency,random",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| gradcam |" in out and "| random |" in out
    data = json.loads((tmp_path / "evaluation.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"gradcam", "saliency", "random"}
    for r in rows.values():
        assert 0 <= r["pointing_game"] <= 1 and 0 <= r["mask_iou"] <= 1
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
    # a map that ignores the network survives randomization unchanged: the sanity check flags it
    assert rows["random"]["spearman_all_layers"] == pytest.approx(1.0)
    assert rows["gradcam"]["spearman_all_layers"] < 0.9
    for name in ("evaluation.md", "evaluation.html", "examples.png", "randomization.png"):
        assert (tmp_path / name).exists()


def test_cli_rejects_unknown_method_and_wrong_model(tmp_path, capsys):
    assert main(["evaluate", "attribution", "--methods", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err and "gradcam" in str(list(METHODS))
    assert main(["evaluate", "attribution", "--model", "efficientnet_lite0", "--device", "cpu", "--n", "2",
                 "--out", str(tmp_path)]) == 2
    assert "synthetic scene classes" in capsys.readouterr().err
