"""Dissection pages link their PNGs (small pages) or embed them (``self_contained``)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import torch
from torch import nn

from convscope.applications.dissect_report import dissect_report
from convscope.data import BrodenDataset, generate
from convscope.methods.dissect import DissectConfig, dissect


def test_pages_link_or_embed_their_pictures(tmp_path):
    data = generate(tmp_path / "broden", n=6, size=32, seed=1, progress=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    res = dissect(model, data, "1", DissectConfig(quantile=0.2, workers=0, batch_size=8), progress=False)
    rep = dissect_report(model, BrodenDataset(data), res, tmp_path / "out", top=2)
    page = rep.html[0]
    srcs = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert srcs == ["dissect_1.png", *[f"units_1/unit_{u}.png" for u in _shown(page)]] and len(srcs) == 4
    assert all((page.parent / unquote(s)).is_file() for s in srcs)
    assert page.stat().st_size < 10_000
    full = dissect_report(model, BrodenDataset(data), res, tmp_path / "full", top=2, self_contained=True).html[0]
    text = full.read_text()
    assert text.count('<img src="data:image/png;base64,') == 4
    assert full.stat().st_size > sum((page.parent / s).stat().st_size for s in srcs)


def _shown(page) -> list[int]:
    """The units in the order the page shows them (from the captions)."""
    return [int(u) for u in re.findall(r"<figcaption>unit (\d+):", page.read_text())]
