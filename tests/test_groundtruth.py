"""Ground truth for saliency scoring: target masks, the pointing game and mask IoU on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.data import BrodenDataset, generate, mask_iou, pointing_game, render_sample, target_mask, target_masks
from convscope.data.groundtruth import pointing_chance
from convscope.errors import DataError


def _square_mask(n=1, size=64, top=10, left=10, side=10):
    m = torch.zeros(n, size, size, dtype=torch.bool)
    m[:, top : top + side, left : left + side] = True
    return m


def _peak(y, x, size=64):
    m = torch.zeros(1, 1, size, size)
    m[0, 0, y, x] = 1.0
    return m


def test_pointing_game_hits_misses_and_tolerance():
    mask = _square_mask()  # rows/cols 10..19
    maps = torch.cat([_peak(15, 15), _peak(40, 40), _peak(25, 15), _peak(19, 19)])
    masks = mask.expand(4, -1, -1)
    assert pointing_game(maps, masks).tolist() == [True, False, True, True]  # (25,15) is 6 px below the mask
    assert pointing_game(maps, masks, tolerance_px=5).tolist() == [True, False, False, True]
    assert pointing_game(maps, masks, tolerance_px=6).tolist() == [True, False, True, True]


def test_pointing_chance_is_the_hit_rate_of_a_peak_at_every_pixel():
    size = 24
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 3:9, 5:12] = True  # a rectangle
    masks[1, 20:, 0:3] = True  # a corner piece: its tolerance band is clipped by the border
    peaks = torch.eye(size * size).view(size * size, 1, size, size)  # one map per pixel position
    for tol in (0, 2, 3.5):
        chance = pointing_chance(masks, tolerance_px=tol)
        for i in range(2):
            hits = pointing_game(peaks, masks[i].expand(size * size, -1, -1), tolerance_px=tol)
            assert float(chance[i]) == pytest.approx(float(hits.float().mean()), abs=1e-6)
    assert float(pointing_chance(masks, 0)[0]) == pytest.approx(42 / size**2)


def test_pointing_game_flat_map_points_at_the_first_pixel():
    flat = torch.zeros(1, 1, 64, 64)
    assert pointing_game(flat, _square_mask(top=0, left=0, side=2), tolerance_px=0).tolist() == [True]
    assert pointing_game(flat, _square_mask(), tolerance_px=5).tolist() == [False]


def test_pointing_game_upsamples_coarse_maps_to_the_mask():
    coarse = torch.zeros(2, 1, 8, 8)
    coarse[0, 0, 1, 1] = 1.0  # cell covering pixels 8..15 of the 64 px mask
    coarse[1, 0, 6, 6] = 1.0  # cell covering pixels 48..55
    assert pointing_game(coarse, _square_mask(2), tolerance_px=0).tolist() == [True, False]


def test_mask_iou_hand_made():
    mask = _square_mask()
    exact = mask[:, None].float()
    shifted = torch.roll(exact, shifts=5, dims=3)  # overlap 10x5 = 50, union 150
    assert mask_iou(exact, mask).item() == pytest.approx(1.0)
    assert mask_iou(shifted, mask).item() == pytest.approx(50 / 150)
    # quantile 0.05 of 64*64 keeps 205 pixels: the 100 mask pixels (value 1) then 105 ties in raster order
    assert mask_iou(exact, mask, quantile=0.05).item() == pytest.approx(100 / 205)
    batch = torch.cat([exact, shifted])
    assert torch.allclose(mask_iou(batch, mask.expand(2, -1, -1)), torch.tensor([1.0, 1 / 3]))


def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError, match="empty"):
        pointing_game(_peak(1, 1), torch.zeros(1, 64, 64, dtype=torch.bool))
    with pytest.raises(DataError, match="N = 2"):
        mask_iou(torch.zeros(2, 1, 64, 64), _square_mask(1))
    with pytest.raises(DataError, match="quantile"):
        mask_iou(_peak(1, 1), _square_mask(), quantile=0.0)
    with pytest.raises(DataError, match="N x 1 x H x W"):
        pointing_game(torch.zeros(1, 3, 64, 64), _square_mask())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    generate(root, n=6, size=64, seed=9, progress=False)
    return root


def test_target_mask_matches_the_rendered_dominant_object(synth):
    ds = BrodenDataset(synth)
    for i in range(len(ds)):
        assert np.array_equal(target_mask(ds, i), render_sample(i, 64, seed=9).target_mask)
    masks = target_masks(ds, range(len(ds)))
    assert masks.shape == (6, 64, 64) and masks.dtype == torch.bool
    # the mask itself as a saliency map is a perfect score; its complement is not
    assert pointing_game(masks[:, None].float(), masks, tolerance_px=0).all()
    assert torch.allclose(mask_iou(masks[:, None].float(), masks), torch.ones(6))
    assert (mask_iou((~masks)[:, None].float(), masks) == 0).all()


def test_target_mask_needs_target_csv(synth, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    (copy / "target.csv").unlink()
    with pytest.raises(DataError, match="target.csv"):
        target_mask(BrodenDataset(copy), 0)
    with pytest.raises(DataError, match="pixel-level"):
        target_mask(BrodenDataset(synth, categories=["color", "scene"]), 0)
