"""The HTML pages of ``maximize``, ``invert`` and ``style``: settings, linked pictures that exist, and the numbers
of the run (small sizes, few steps)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from convscope.applications.invert_report import run_invert, run_style
from convscope.applications.maximize_report import run_maximize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny model: see conftest.one_thread


def linked(html_path) -> list[str]:
    """The image sources of a page, each checked to be a file beside it."""
    srcs = re.findall(r'<img src="([^"]+)"', html_path.read_text())
    assert srcs and all((html_path.parent / unquote(s)).is_file() for s in srcs)
    return srcs


def cells(html_path) -> list[str]:
    return re.findall(r"<td>([^<]*)</td>", html_path.read_text())


def photo(path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_maximize_page(tmp_path, demo):
    run = run_maximize(demo, "features.relu5", [0, 2], tmp_path, steps=2, progress=False)
    assert run.html == tmp_path / "maximize_features.relu5.html"
    assert linked(run.html) == ["maximize_features.relu5.png"]
    td = cells(run.html)
    for setting in ("features.relu5", "0, 2", "channel", "pixel"):
        assert setting in td
    assert [f"{a:.4g}" for a in run.activations] == [td[td.index(f"unit {u}") + 1] for u in (0, 2)]
    assert [td[td.index(f"unit {u}") + 2] for u in (0, 2)] == [p.name for p in run.pictures]
    logits = run_maximize(demo, None, [1], tmp_path / "l", steps=1, progress=False, self_contained=True)
    page = logits.html.read_text()
    assert logits.html.name == "maximize_logits.html" and page.count('<img src="data:image/png;base64,') == 1
    assert f"{logits.activations[0]:.4g}" in cells(logits.html)


def test_invert_page_names_images_apart(tmp_path, demo):
    a, b = photo(tmp_path / "x" / "a.png", 0), photo(tmp_path / "y" / "a.png", 1)
    run = run_invert(demo, [a, b], ["features.relu1", "features.relu2"], tmp_path / "out", steps=2)
    assert [r["name"] for r in run.rows] == ["a", "a_2"] * 2
    assert linked(run.html) == ["invert.png"]
    td = cells(run.html)
    per_image = [td[i:i + 4] for i in range(len(td) - 4 * len(run.rows), len(td), 4)]
    assert per_image == [[r["layer"], r["name"], f"{r['error']:.4g}", f"{r['psnr_db']:.4g}"] for r in run.rows]
    mean_psnr = np.mean([r["psnr_db"] for r in run.rows if r["layer"] == "features.relu2"])
    assert f"{mean_psnr:.4g}" in td
    full = run_invert(demo, [a], ["features.relu1"], tmp_path / "full", steps=1, self_contained=True)
    assert full.html.read_text().count('<img src="data:image/png;base64,') == 1


def test_style_page(tmp_path, demo):
    content, style = photo(tmp_path / "c.png", 2), photo(tmp_path / "s.png", 3)
    run = run_style(demo, content, style, tmp_path / "out", content_layer="features.relu3",
                    style_layers=["features.relu1", "features.relu2"], steps=3)
    assert linked(run.html) == ["style.png", "stylized.png"]
    assert run.content_loss >= 0 and run.style_loss >= 0 and run.start_loss >= 0
    assert run.total_loss == pytest.approx(run.content_loss + 1e6 * run.style_loss)  # alpha 1, beta default 1e6
    td = cells(run.html)
    for value in (run.content_loss, run.style_loss, run.total_loss, run.start_loss):
        assert f"{value:.4g}" in td
    assert "features.relu1, features.relu2" in td and "features.relu3" in td
    assert Image.open(run.stylized).size == (112, 112)
