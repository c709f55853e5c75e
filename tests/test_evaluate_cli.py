"""``convscope evaluate attribution``: every method scored with bootstrap intervals, files written, the random
baseline fails the metrics; on the default off-centre set a centre prior points at the object only at chance."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from convscope.applications.evaluate import (
    METHODS,
    METRICS,
    POINTING_TOLERANCE,
    bootstrap_means,
    channels_last_inputs,
    intervals,
    method_cost,
    synthetic_eval_set,
)
from convscope.cli import main
from convscope.data.groundtruth import pointing_chance, pointing_game
from convscope.errors import ConvscopeError


def test_eval_set_is_held_out_and_has_masks():
    images, labels, masks = synthetic_eval_set(3, 112)
    assert images.shape == (3, 3, 112, 112) and labels.shape == (3,) and masks.shape == (3, 112, 112)
    assert masks.flatten(1).any(1).all()
    with pytest.raises(ConvscopeError, match="off-centre"):
        synthetic_eval_set(2, 64, eval_set="middle")


def _centre_vs_chance(eval_set: str, n: int, size: int = 64) -> tuple[float, float, float]:
    """Pointing-game hit rate of the ``center`` map minus chance (paired per image): mean, 95 % interval."""
    images, labels, masks = synthetic_eval_set(n, size, eval_set=eval_set, workers=1, progress=False)
    tol = POINTING_TOLERANCE * size
    hits = pointing_game(METHODS["center"](None, images.float(), labels, "", False), masks, tolerance_px=tol)
    d = hits.double() - pointing_chance(masks, tol).double()
    half = 1.96 * float(d.std()) / n**0.5
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def test_off_centre_set_leaves_a_centre_prior_at_chance():
    mean, lo, hi = _centre_vs_chance("off-centre", 240)
    assert lo < 0 < hi and hi - lo < 0.12  # chance lies inside a narrow interval
    mean, lo, hi = _centre_vs_chance("centred", 40)  # the training distribution: the centre wins by far
    assert lo > 0.3
    images, _, masks = synthetic_eval_set(40, 64, workers=1, progress=False)
    area = masks.flatten(1).float().mean(1)
    assert float(area.min()) > 0.04 and float(area.max()) / float(area.min()) > 2  # several scales


def test_intervals_and_the_not_beyond_baseline_flag():
    g = torch.Generator().manual_seed(0)
    n = 400
    base = torch.rand(n, generator=g)
    per_image = {"random": {}, "center": {}, "good": {}, "same": {}}
    for metric, sign in METRICS:
        noise = torch.rand(n, generator=g) * 0.05
        per_image["random"][metric] = base - 0.1 * sign
        per_image["center"][metric] = base.clone()  # the better reference on every metric
        per_image["same"][metric] = base + noise - 0.025  # equal to the centre on average
        per_image["good"][metric] = base + sign * 0.05 + noise
    per_image["same"]["spearman_all_layers"][:5] = float("nan")  # left out of the means
    ci = intervals(per_image, resamples=500, seed=1)
    assert ci["good"]["not_beyond_baseline"] == [] and ci["random"]["not_beyond_baseline"] == []
    assert ci["same"]["not_beyond_baseline"] == [m for m, _ in METRICS]
    # the mean's interval agrees with the normal approximation (mean +- 1.96 sd / sqrt(n))
    lo, hi = ci["center"]["mask_iou_ci"]
    m, half = float(base.mean()), 1.96 * float(base.std()) / n**0.5
    assert lo == pytest.approx(m - half, abs=0.006) and hi == pytest.approx(m + half, abs=0.006)
    means = bootstrap_means(torch.stack([base, base], 1), resamples=50, seed=3)
    assert torch.equal(means[:, 0], means[:, 1])  # the same resampled images for every column


def test_cli_scores_methods_and_writes_table(tmp_path, capsys):
    assert main(["evaluate", "attribution", "--model", "demo_net", "--device", "cpu", "--n", "6", "--n-curve", "3",
                 "--n-sanity", "2", "--steps", "4", "--methods", "gradcam,saliency,random",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "| gradcam |" in out and "| random |" in out and "not beyond the references" in out
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
    assert data["eval_set"] == "off-centre" and 0 < data["pointing_game"]["chance"] < 0.5
    for r in rows.values():
        assert 0 <= r["pointing_game"] <= 1 and 0 <= r["mask_iou"] <= 1
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        for key in ("pointing_game", "mask_iou", "deletion_auc", "insertion_auc"):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi
    assert rows["random"]["not_beyond_baseline"] == [] and isinstance(rows["gradcam"]["not_beyond_baseline"], list)

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


def test_all_methods_leave_out_those_that_do_not_apply_and_named_ones_must_apply(tmp_path, monkeypatch):
    import convscope as cs
    from convscope.applications import evaluate as ev

    def not_here(m, x, y, layer, progress):
        raise ConvscopeError("rollout needs a ViT's attention weights; explain a ViT")

    few = {"saliency": METHODS["saliency"], "rollout": not_here, "random": METHODS["random"]}
    monkeypatch.setattr(ev, "METHODS", few)
    model = cs.load_model("demo_net", device="cpu")
    res = ev.evaluate_attribution(model, tmp_path, n=4, n_curve=2, n_sanity=2, steps=4, resamples=20,
                                  progress=False)
    assert [r["method"] for r in res.rows] == ["saliency", "random"]
    assert "`rollout`: rollout needs a ViT's attention weights" in res.markdown
    assert json.loads((tmp_path / "evaluation.json").read_text())["not_applicable"] == {
        "rollout": "rollout needs a ViT's attention weights; explain a ViT"}
    with pytest.raises(ConvscopeError, match="explain a ViT"):  # asked for by name: the error reaches the user
        ev.evaluate_attribution(model, tmp_path, n=4, methods=["saliency", "rollout"], n_curve=2, n_sanity=2,
                                steps=4, resamples=20, progress=False)


def test_a_figure_undefined_on_every_image_is_said_so_not_printed_as_nan():
    from convscope.applications.evaluate import _markdown, json_safe

    g = torch.Generator().manual_seed(0)
    per_image = {m: {metric: torch.rand(20, generator=g) for metric, _ in METRICS} for m in ("random", "center", "x")}
    per_image["x"]["spearman_all_layers"][:] = float("nan")  # constant maps after randomization: no rank correlation
    ci = intervals(per_image, resamples=50, seed=0)
    assert "spearman_all_layers" not in ci["x"]["not_beyond_baseline"]  # not judged
    row = {"method": "x", **{m: float(per_image["x"][m].nanmean()) for m, _ in METRICS}, "ms_per_image": 1.0,
           **ci["x"]}
    md = _markdown([row], 20, 20, 20, 0.5, "layer", "model")
    assert "undefined (constant maps)" in md and not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert json.loads(json.dumps(json_safe(row)))["spearman_all_layers"] is None
