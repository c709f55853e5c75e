"""Display normalization, colormaps, overlays, grids, axis labels, filter grids and PNG saving."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.core.render import (
    COLORMAPS,
    apply_colormap,
    colormap,
    filter_grid,
    fit_text,
    grid,
    label_strip,
    load_font,
    overlay,
    save_png,
    tensor_to_pils,
    text_size,
    to_display,
    to_pil,
)
from convscope.errors import ConvscopeError


def lightness(rgb: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours in [0, 1] (independent of the code under test)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, y * (29 / 3) ** 3)


# ---------------------------------------------------------------- to_display


def test_to_display_minmax_per_image():
    x = torch.stack([torch.tensor([[[0.0, 2.0], [4.0, 8.0]]]), torch.tensor([[[-1.0, -1.0], [1.0, 0.0]]])])
    out = to_display(x)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.allclose(out[1, 0], torch.tensor([[0.0, 0.0], [1.0, 0.5]]))
    assert torch.equal(to_display(torch.full((1, 1, 2, 2), 3.0)), torch.zeros(1, 1, 2, 2))


def test_to_display_percentile_clips_outliers():
    vals = np.concatenate([np.arange(999, dtype=np.float64), [1e6]])
    x = torch.tensor(vals).view(1, 1, 10, 100)
    out = to_display(x, "percentile", lo=1, hi=99).flatten().numpy()
    p_lo, p_hi = np.percentile(vals, 1), np.percentile(vals, 99)
    expected = np.clip((vals - p_lo) / (p_hi - p_lo), 0, 1)
    assert np.allclose(out, expected)
    assert out[-1] == 1 and out[500] < 0.6  # the outlier does not squash the rest


def test_to_display_signed():
    x = torch.tensor([[-2.0, 0.0, 1.0, 2.0]])
    assert torch.allclose(to_display(x, "signed"), torch.tensor([[0.0, 0.5, 0.75, 1.0]]))
    assert torch.equal(to_display(torch.zeros(2, 2), "signed"), torch.full((2, 2), 0.5))
    with pytest.raises(ConvscopeError):
        to_display(x, "bogus")


# ---------------------------------------------------------------- colormaps


def test_colormap_endpoints():
    vir = colormap("viridis").numpy()
    assert vir.shape == (256, 3)
    assert np.allclose(vir[0], [0.267, 0.005, 0.329], atol=0.01)  # dark purple
    assert np.allclose(vir[-1], [0.993, 0.906, 0.144], atol=0.01)  # yellow
    gray = colormap("gray").numpy()
    assert np.array_equal(gray[0], [0, 0, 0]) and np.array_equal(gray[-1], [1, 1, 1])
    jet = colormap("jet").numpy()
    assert jet[0].argmax() == 2 and jet[-1].argmax() == 0  # blue to red
    cw = colormap("coolwarm").numpy()
    assert cw[0].argmax() == 2 and cw[-1].argmax() == 0
    assert np.ptp(cw[128]) < 0.05  # neutral grey in the middle
    assert set(COLORMAPS) == {"viridis", "inferno", "jet", "gray", "coolwarm"}
    with pytest.raises(ConvscopeError, match="viridis"):
        colormap("parula")


@pytest.mark.parametrize("name", ["viridis", "inferno", "gray"])
def test_sequential_colormaps_monotone_lightness(name):
    lstar = lightness(colormap(name).numpy().astype(np.float64))
    assert (np.diff(lstar) > 0).all()
    assert lstar[-1] - lstar[0] > 60


def test_coolwarm_symmetric_lightness():
    lstar = lightness(colormap("coolwarm").numpy().astype(np.float64))
    assert lstar[128] > lstar[0] and lstar[128] > lstar[-1]
    assert abs(lstar[0] - lstar[-1]) < 15


def test_apply_colormap_lookup_and_shapes():
    lut = colormap("inferno")
    maps = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0]).view(1, 1, 1, 5)
    out = apply_colormap(maps, "inferno")
    assert out.shape == (1, 3, 1, 5)
    for i, idx in enumerate([0, 128, 255, 255, 0]):
        assert torch.equal(out[0, :, 0, i], lut[idx])
    assert apply_colormap(torch.rand(4, 6), "gray").shape == (3, 4, 6)
    with pytest.raises(ConvscopeError):
        apply_colormap(torch.rand(1, 3, 4, 4), "gray")


# ---------------------------------------------------------------- overlay


def test_overlay_alpha_extremes():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 5, 7, generator=g)
    maps = torch.randn(2, 1, 5, 7, generator=g) * 3 + 1
    assert torch.allclose(overlay(images, maps, alpha=0.0), images)
    flat = maps.flatten(1)
    mn, mx = flat.min(1).values.view(2, 1, 1, 1), flat.max(1).values.view(2, 1, 1, 1)
    expected = apply_colormap((maps - mn) / (mx - mn), "viridis")
    assert torch.allclose(overlay(images, maps, alpha=1.0, cmap="viridis"), expected, atol=1e-6)
    half = overlay(images, maps, alpha=0.5, cmap="viridis")
    assert torch.allclose(half, 0.5 * images + 0.5 * expected, atol=1e-6)


def test_overlay_upsamples_small_maps():
    images = torch.zeros(1, 3, 8, 8)
    maps = torch.tensor([[[[0.0, 5.0], [0.0, 0.0]]]])
    out = overlay(images, maps, alpha=1.0, cmap="jet")
    assert out.shape == (1, 3, 8, 8)
    assert torch.allclose(out[0, :, 0, -1], torch.tensor([0.5, 0.0, 0.0]))  # the max: dark red
    assert torch.allclose(out[0, :, -1, 0], torch.tensor([0.0, 0.0, 0.5]))  # the min: dark blue
    single = overlay(images[0], maps[0, 0], alpha=1.0, cmap="jet")
    assert torch.allclose(single, out[0])
    with pytest.raises(ConvscopeError):
        overlay(images, maps, alpha=1.5)
    with pytest.raises(ConvscopeError, match="denormalize"):
        overlay(torch.zeros(1, 2, 8, 8), maps)  # 1, 3 (RGB) and 4 (RGBA) channels are images


# ---------------------------------------------------------------- PIL conversion


def test_to_pil_modes_and_rounding():
    x = torch.tensor([0.0, 0.5, 1.0, 1.7, -0.2]).view(1, 1, 5).expand(3, 1, 5)
    img = to_pil(x)
    assert img.mode == "RGB" and img.size == (5, 1)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert to_pil(torch.rand(1, 4, 6)).mode == "L"
    assert to_pil(torch.rand(4, 6)).size == (6, 4)
    pils = tensor_to_pils(torch.rand(3, 3, 2, 2))
    assert len(pils) == 3 and all(p.size == (2, 2) for p in pils)
    with pytest.raises(ConvscopeError):
        to_pil(torch.rand(2, 4, 4))


# ---------------------------------------------------------------- grid


def coloured_batch(n: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, h, w, generator=g)


def test_grid_size_and_cell_contents():
    batch = coloured_batch(5, 6, 10)
    out = grid(batch, nrow=3, padding=2)
    assert out.size == (3 * 10 + 4 * 2, 2 * 6 + 3 * 2)
    a = np.asarray(out)
    # image 4 is at row 1, column 1
    x0, y0 = 2 + 1 * (10 + 2), 2 + 1 * (6 + 2)
    assert np.array_equal(a[y0 : y0 + 6, x0 : x0 + 10], np.asarray(to_pil(batch[4])))
    # the sixth cell is empty: background only
    x5 = 2 + 2 * (10 + 2)
    assert (a[y0 : y0 + 6, x5 : x5 + 10] == 255).all()


def test_grid_letterboxes_and_scales():
    big = Image.new("RGB", (8, 6), (255, 0, 0))
    small = Image.new("RGB", (4, 2), (0, 0, 255))
    out = np.asarray(
        grid(
            [big, torch.zeros(3, 2, 4) + torch.tensor([0, 0, 1.0]).view(3, 1, 1)],
            nrow=2,
            padding=1,
            background=(0, 255, 0),
        )
    )
    assert out.shape == (6 + 2, 2 * 8 + 3, 3)
    x0 = 1 + 8 + 1 + (8 - 4) // 2
    y0 = 1 + (6 - 2) // 2
    assert (out[y0 : y0 + 2, x0 : x0 + 4] == [0, 0, 255]).all()
    assert (out[1, x0] == [0, 255, 0]).all()  # above the letterboxed image: background
    scaled = grid([small], nrow=1, padding=0, scale=3)
    assert scaled.size == (12, 6)
    assert np.array_equal(np.asarray(scaled), np.asarray(small.resize((12, 6), Image.Resampling.NEAREST)))


def test_grid_labels_add_margins():
    batch = coloured_batch(6, 20, 20)
    plain = grid(batch, nrow=3)
    rows = grid(batch, nrow=3, row_labels=["unit 0", "unit 17"])
    cols = grid(batch, nrow=3, col_labels=["a", "b", "c"])
    cells = grid(batch, nrow=3, cell_labels=[str(i) for i in range(6)])
    assert rows.height == plain.height and rows.width > plain.width
    assert cols.width == plain.width and cols.height > plain.height
    assert cells.width == plain.width and cells.height > plain.height
    assert (cells.height - plain.height) % 2 == 0  # one caption strip per grid row
    margin = np.asarray(rows)[:, : rows.width - plain.width]
    assert (margin < 128).any()  # the label text is drawn (dark on white)
    # images are intact, shifted right by the margin
    left = rows.width - plain.width
    assert np.array_equal(np.asarray(rows)[2:22, left + 2 : left + 22], np.asarray(to_pil(batch[0])))
    with pytest.raises(ConvscopeError, match="2"):
        grid(batch, nrow=3, row_labels=["only one"])


def test_grid_wide_labels_widen_cells():
    batch = coloured_batch(2, 3, 3)
    out = grid(batch, nrow=2, col_labels=["a very long column label", "b"])
    assert out.width > 2 * 3 + 3 * 2 + 50


# ---------------------------------------------------------------- axis labels


def check_strip(strip, gap: int = 4) -> list[tuple[int, int, int, int]]:
    """Boxes inside the strip, pairwise at least ``gap`` apart, each holding ink, and no ink outside them."""
    ink = np.asarray(strip.image.convert("L")) < 255
    boxes = [b for b in strip.boxes if b is not None]
    covered = np.zeros_like(ink)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= strip.image.width and 0 <= y0 < y1 <= strip.image.height
        assert ink[y0:y1, x0:x1].any()
        covered[y0:y1, x0:x1] = True
    assert not (ink & ~covered).any()
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert apart >= gap, (a, b)
    return boxes


def test_label_strip_level_when_labels_fit():
    strip = label_strip(["relu1", "relu2", "conv3"], [50, 150, 250], 300)
    boxes = check_strip(strip)
    assert not strip.rotated and len(boxes) == 3
    assert [abs((b[0] + b[2]) / 2 - c) <= 1 for b, c in zip(boxes, [50, 150, 250])] == [True] * 3
    assert all(b[2] - b[0] > b[3] - b[1] for b in boxes)  # wider than tall: level text


@pytest.mark.parametrize("n, pitch", [(12, 40), (40, 14), (60, 5)])
def test_label_strip_long_labels_never_overlap(n, pitch):
    labels = [f"blocks.{i}.conv_pwl.very_long_layer_name_{i}" for i in range(n)]
    centers = [20 + pitch * i for i in range(n)][::-1]  # any order
    strip = label_strip(labels, centers, 40 + pitch * n)
    boxes = check_strip(strip)
    assert strip.rotated and all(b[3] - b[1] > b[2] - b[0] for b in boxes)  # turned: taller than wide
    assert all(len(t) <= 32 and "..." in t for t in strip.texts)  # shortened in the middle
    assert strip.texts[0].startswith("blocks.0") and strip.texts[0].endswith("name_0")
    line = text_size(load_font(11), "Agy|")[1]
    if pitch >= line + 4:
        assert len(boxes) == n  # room for every label once turned
    else:
        assert 1 < len(boxes) < n and strip.boxes[n - 1] is not None  # thinned, from the leftmost label
    with pytest.raises(ConvscopeError, match="one each"):
        label_strip(labels, centers[:-1], 100)


def test_label_strip_keeps_labels_distinct():
    labels = [f"checkpoint_epoch_{i:02d}_of_a_long_training_run" for i in range(6)]
    strip = label_strip(labels, [10 + 20 * i for i in range(6)], 130)
    assert len(set(strip.texts)) == 6 and all(f"{i:02d}_of" in t for i, t in enumerate(strip.texts))
    assert all(len(t) <= 32 for t in strip.texts)
    check_strip(strip)


def test_fit_text_shortens_to_width():
    font = load_font(11)
    text = "features.relu5.some.very.long.name"
    assert fit_text(font, text, 1000) == text
    short = fit_text(font, text, 80)
    assert text_size(font, short)[0] <= 80 and short.startswith("feat") and short.endswith("name")
    assert fit_text(font, text, 1000, max_chars=10) == "feat...ame"
    assert fit_text(font, text, 2) == ""


# ---------------------------------------------------------------- filter_grid


def test_filter_grid_rgb_zero_is_mid_grey():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    w[0, :, 1, 1] = 0.0
    w[1] = 0.0
    scale = 4
    img = filter_grid(w, scale=scale)
    pad = max(1, scale // 4)
    side = 2 * 3 * scale + 3 * pad
    assert img.size == (side, side)
    a = np.asarray(img).astype(int)
    c = pad + scale + scale // 2  # centre of filter pixel (1, 1) in tile 0
    assert np.abs(a[c, c] - 128).max() <= 1
    tile1 = a[pad : pad + 3 * scale, 2 * pad + 3 * scale : 2 * pad + 6 * scale]
    assert np.abs(tile1 - 128).max() <= 1  # an all-zero filter is uniform grey
    # the largest |weight| of filter 2 maps to 0 or 255
    i = int(w[2].abs().argmax())
    ch, y, x = np.unravel_index(i, (3, 3, 3))
    tile2_y = 2 * pad + 3 * scale
    px = a[tile2_y + y * scale + 1, pad + x * scale + 1, ch]
    assert px == (255 if w[2, ch, y, x] > 0 else 0)


def test_filter_grid_grayscale_tiles():
    w = torch.zeros(9, 4, 2, 2)
    w[:, :, 0, 0] = 1.0
    img = filter_grid(w, scale=3)
    tiles_per_side = 3
    sub = math.ceil(math.sqrt(4))
    tile_side = sub * 2 * 3 + (sub + 1) * 1
    pad = max(2, 3 // 2)
    assert img.size == (tiles_per_side * tile_side + (tiles_per_side + 1) * pad,) * 2
    a = np.asarray(img).astype(int)
    first = a[pad + 1, pad + 1]  # tile 0, channel 0, weight (0, 0) = max
    assert (first == 255).all()
    zero = a[pad + 1 + 3, pad + 1 + 3]  # weight (1, 1) = 0
    assert np.abs(zero - 128).max() <= 1


# ---------------------------------------------------------------- save_png


def test_save_png_atomic_round_trip(tmp_path):
    x = torch.rand(3, 5, 7)
    path = save_png(x, tmp_path / "deep" / "dir" / "x.png")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["x.png"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(to_pil(x)))
    save_png(Image.new("L", (3, 3), 9), path)  # overwrite with a PIL image
    assert Image.open(path).size == (3, 3)
    with pytest.raises(ConvscopeError, match=".png"):
        save_png(x, tmp_path / "x.jpg")
