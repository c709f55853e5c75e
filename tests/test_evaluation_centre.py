"""The off-centre evaluation set leaves a centre prior at chance: the ``center`` reference map's pointing game and
mask IoU equal a random map's expected value (analytic chance per image, paired 95 % interval containing 0, and
inside the ``random`` map's own interval), while on the centred training distribution the same map wins by far."""

from __future__ import annotations

import torch

from convscope.applications.evaluate import METHODS, POINTING_TOLERANCE, bootstrap_means, synthetic_eval_set
from convscope.data.groundtruth import mask_iou, pointing_chance, pointing_game

SIZE = 64


def _scores(eval_set: str, n: int) -> dict[str, torch.Tensor]:
    """Per image: the centre map's hit and IoU, their chance values, and the random map's IoU."""
    images, labels, masks = synthetic_eval_set(n, SIZE, eval_set=eval_set, workers=1, progress=False)
    centre = METHODS["center"](None, images.float(), labels, "", False)
    noise = METHODS["random"](None, images.float(), labels, "", False)
    tol = POINTING_TOLERANCE * SIZE
    f = masks.flatten(1).double().mean(1)  # the object's share of the image
    return {"hit": pointing_game(centre, masks, tolerance_px=tol).double(),
            "hit_chance": pointing_chance(masks, tol).double(),
            "iou": mask_iou(centre, masks).double(),
            "iou_chance": f / (2 - f),  # expected IoU of a random region of the object's area (k^2 / HW overlap)
            "iou_random": mask_iou(noise, masks).double()}


def _interval(d: torch.Tensor) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of ``d`` (the evaluation's own resampling)."""
    means = bootstrap_means(d[:, None], 1000, 0)[:, 0]
    return float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))


def test_centre_prior_scores_chance_in_pointing_and_mask_iou_on_the_off_centre_set():
    s = _scores("off-centre", 160)
    lo, hi = _interval(s["hit"] - s["hit_chance"])
    assert lo < 0 < hi and hi - lo < 0.16
    lo, hi = _interval(s["iou"] - s["iou_chance"])
    assert lo < 0 < hi and hi - lo < 0.03
    # the random reference map scores the analytic chance, and the centre is not above it (paired interval)
    assert abs(float(s["iou_random"].mean() - s["iou_chance"].mean())) < 0.005
    lo, hi = _interval(s["iou"] - s["iou_random"])
    assert lo < 0 < hi

def test_centre_prior_wins_on_the_centred_set():
    s = _scores("centred", 40)  # the training distribution: large objects near the centre
    assert _interval(s["hit"] - s["hit_chance"])[0] > 0.3
    assert _interval(s["iou"] - s["iou_chance"])[0] > 0.15
