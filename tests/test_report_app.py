"""``build_report``: any number of images from files, folders and samples; distinct output names; a small page that
links its PNGs, or one self-contained file."""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from convscope.applications.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny model: see conftest.one_thread


def photos(folder, n: int, seed: int):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / f"a{i}.png")
    return folder


def test_folders_files_and_samples_get_distinct_names(tmp_path, demo):
    one, two = photos(tmp_path / "one", 6, 0), photos(tmp_path / "two", 5, 1)
    res = build_report(demo, ["sample:motorcycle", one, str(two / "a0.png")], tmp_path / "out", n_units=3,
                       top_classes=2, progress=False)
    assert res.names == ["motorcycle", "a0", "a1", "a2", "a3", "a4", "a5", "a0_2"]  # 8 images, 3 arguments
    assert [p.name for p in res.images][-1] == "a0.png" and res.images[-1].parent == two
    gradcams = sorted(p.name for p in (tmp_path / "out" / "gradcam").iterdir())
    assert gradcams == sorted(f"{n}.png" for n in res.names)  # the two a0.png do not overwrite each other
    assert list(json.loads((tmp_path / "out" / "predictions.json").read_text())) == res.names
    units = Image.open(tmp_path / "out" / "units.png")
    assert units.width > 8 * 112 and 3 * 112 < units.height < 4 * 112 + 60  # 8 image columns x 3 unit rows
    html = res.html.read_text()
    assert "motorcycle_left" not in html.replace(str(res.images[0]), "")  # named as the sample, not its file


def test_page_links_its_pngs_and_self_contained_embeds_them(tmp_path, demo):
    folder = photos(tmp_path / "imgs", 3, 2)
    res = build_report(demo, [folder], tmp_path / "out", n_units=2, top_classes=2, progress=False)
    html = res.html.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs == ["gradcam/a0.png", "gradcam/a1.png", "gradcam/a2.png", "units.png"]
    assert all((res.html.parent / unquote(s)).is_file() for s in srcs)
    assert [res.html.parent / s for s in srcs] == res.pngs
    assert "data:" not in html and len(html.encode()) < 10_000  # small: pixels stay in the PNGs
    full = build_report(demo, [folder], tmp_path / "full", n_units=2, top_classes=2, progress=False,
                        self_contained=True).html.read_text()
    assert full.count('<img src="data:image/png;base64,') == 4 and "gradcam/" not in full.split("<body>")[1]
    assert len(full) > sum(p.stat().st_size for p in res.pngs)  # the PNGs, base64-encoded
