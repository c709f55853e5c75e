"""``convscope evaluate attribution``: every method scored, files written, the random baseline fails the metrics."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from convscope.applications.evaluate import METHODS, channels_last_inputs, method_cost, synthetic_eval_set
from convscope.cli import main


def test_eval_set_is_held_out_and_has_masks():
    images, labels, masks = synthetic_eval_set(3, 112)
    assert images.shape == (3, 3, 112, 112) and labels.shape == (3,) and masks.shape == (3, 112, 112)
    assert masks.flatten(1).any(1).all()


def test_cli_scores_methods_and_writes_table(tmp_path, capsys):
    assert main(["evaluate", "attribution", "--model", "demo_net", "--device", "cpu", "--n", "6", "--n-curve", "3",
                 "--n-sanity", "2", "--steps", "4", "--methods", "gradcam,saliency,random",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "| gradcam |" in out and "| random |" in out
    # every stage reports, as whole time-stamped lines (stderr is not a terminal here)
    err = captured.err
    for stage in ("] maps:   0%", "deletion/insertion: 100%", "randomization: 100%",
                  "randomization (gradcam cascade): 100%"):
        assert stage in err, err
    assert re.search(r"\] maps \(\w+\): 100% (\d+)/\1 fwd", err), err
    assert "\r" not in err.split("render")[-1]
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


def test_channels_last_inputs_same_outputs_and_hook_removed():
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = model(x)
    with channels_last_inputs(model):
        torch.testing.assert_close(model(x), ref)
    model(x)
    assert seen == [False, True, False]


def test_method_cost_ranks_the_slow_methods():
    assert method_cost("occlusion", 112) == 13 * 13 + 1  # window 16, stride 8: 13 positions a side
    assert method_cost("occlusion", 112) > method_cost("smoothgrad", 112) > method_cost("gradcam", 112)
    assert set(METHODS) >= {"occlusion", "smoothgrad", "random"}
