"""The dissection bar charts: many long group names and section names never run into each other."""

from __future__ import annotations

import numpy as np

from convscope.applications.dissect_report import comparison_chart
from convscope.core.render import label_strip
from convscope.methods.dissect import Comparison

from .test_render import check_strip

CATS = ["color", "object", "texture", "scene"]


def comparison(conditions: list[str], layers: list[str]) -> Comparison:
    pairs = [(c, layer) for c in conditions for layer in layers]
    rows = [{"condition": c, "layer": layer, **{k: 1 + (7 * i + 3 * j + 31 * len(k)) % 140 for j, k in enumerate(CATS)}}
            for i, (c, layer) in enumerate(pairs)]
    return Comparison(conditions, layers, CATS, rows)


def groups_and_band(img) -> tuple[list[tuple[int, int]], np.ndarray, int]:
    """The bar groups' x extents (read from the row just above the x axis), the non-white pixels below the axis,
    and the axis row."""
    a = np.asarray(img.convert("RGB")).astype(int)
    black = (a.sum(2) == 0).sum(1)
    axis = int(black.argmax())  # the x axis: the longest black line
    above = a[axis - 1]
    colored = np.flatnonzero((above.max(1) - above.min(1)) > 30)  # bar pixels (grid lines and text are grey)
    groups, start = [], colored[0]
    for prev, x in zip(colored, colored[1:]):
        if x - prev > 10:  # bars of a group are 2 px apart, groups 18 px
            groups.append((start, prev))
            start = x
    groups.append((start, colored[-1]))
    return groups, a[axis + 2:].min(2) < 255, axis


def test_many_long_group_names_do_not_overlap():
    names = [f"checkpoint_epoch_{i:02d}_of_a_long_training_run" for i in range(14)]
    img = comparison_chart(comparison(names, ["features.relu5"]))
    groups, band, axis = groups_and_band(img)
    assert len(groups) == 14
    # the names under the axis are exactly label_strip's, centred under the groups (bars end 2 px short) ...
    strip = label_strip(names, [(a0 + a1 + 2) / 2 for a0, a1 in groups], img.width)
    drawn = np.asarray(img)[axis + 6:axis + 6 + strip.image.height]
    assert np.array_equal(drawn, np.asarray(strip.image))
    assert not band[6 + strip.image.height:].any()  # and nothing else is drawn there
    # ... whose ink boxes are apart, one per group, each under its own group
    boxes = check_strip(strip)
    assert strip.rotated and len(boxes) == 14
    assert all(a0 <= (b[0] + b[2]) / 2 <= a1 for b, (a0, a1) in zip(boxes, groups))


def test_bars_fit_their_counts_and_sections_fit_their_span():
    conds = ["a_condition_with_a_very_long_name_indeed", "b_condition_with_a_very_long_name_indeed"]
    img = comparison_chart(comparison(conds, ["blocks.1", "blocks.10.conv_pwl"]))
    groups, band, axis = groups_and_band(img)
    assert len(groups) == 4
    a = np.asarray(img.convert("RGB")).astype(int)
    section_line = axis + 2 + int(np.flatnonzero(band.sum(1) > 0.5 * (groups[1][1] - groups[0][0]))[-1])
    text = a[section_line + 2:].min(2) < 255  # the section names under their lines
    cols = text.any(0)
    gap = (groups[1][1], groups[2][0])  # between the two sections' spans
    assert cols[groups[0][0]:groups[1][1]].any() and cols[groups[2][0]:groups[3][1]].any()
    assert not cols[gap[0] + 1:gap[1]].any()  # each name stays within its span
