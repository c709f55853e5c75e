"""The explorer serves an atlas of many layers (issue 21's whole-model atlas: 49 layers of efficientnet_lite0):
every layer listed and reachable, layers found by name in the search box, neighbouring layers linked, and a
partial atlas (a sample of units per layer) browsable through its units that have pictures."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

import convscope as cs
from convscope.atlas.store import Atlas, LayerRecord
from convscope.web import create_app

DEPTH = 12  # conv layers of the tiny model, all in the atlas
EXTRA = ("late.0", 6)  # a layer added to the store by hand with only a sample of its units built


class Deep(nn.Module):
    """A tiny plain CNN with many conv layers (3 units each)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()) for _ in range(DEPTH)])
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    torch.manual_seed(0)
    model = Deep().eval()
    layers = [f"blocks.{i}.0" for i in range(DEPTH)]
    root = tmp_path_factory.mktemp("atlas_many")
    images = torch.rand(6, 3, 16, 16)
    cs.build_atlas(model, layers, root, images=images, k=2, am_steps=2, am_size=16, chunk=2, batch_size=6,
                   progress=False).close()
    store = Atlas(root, "w")  # a layer in progress: 2 of its 6 units have pictures
    name, units = EXTRA
    store.add_layers([LayerRecord(name, 10_000, units, (units, 16, 16))])
    png = (root / "files" / "blocks.0.0" / "0_am.png").read_bytes()
    rows = {u: {"am_image": store.write_bytes(Atlas.relpath(name, u, "am"), png), "am_activation": 1.0}
            for u in (1, 4)}
    store.put_units(name, rows)
    store.close()
    with TestClient(create_app(model, atlas=root)) as c:
        yield c, layers


def test_index_lists_every_layer_with_its_pictures(client):
    c, layers = client
    r = c.get("/atlas")
    assert r.status_code == 200
    linked = re.findall(r'<td><a href="/atlas/([^"/?]+)">', r.text)
    assert linked == layers + [EXTRA[0]]  # model order, the hand-added layer last
    assert r.text.count("3/3") >= 2 * DEPTH  # AM and top-k pictures done for every unit of every built layer
    thumbs = re.findall(r'src="(/atlas/files/[^"]+)"', r.text)
    assert len(thumbs) == 3 * DEPTH + 2
    ok = c.get(thumbs[-3])
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_every_layer_page_links_its_neighbours(client):
    c, layers = client
    names = layers + [EXTRA[0]]
    for i, name in enumerate(names):
        r = c.get(f"/atlas/{name}")
        assert r.status_code == 200 and f"layer {i + 1} of {len(names)}" in r.text
        pager = re.findall(r'<a href="/atlas/([^"/?]+)">(?:←|[^<]*→)', r.text)
        assert pager == names[max(0, i - 1):i] + names[i + 1:i + 2]
    first = c.get(f"/atlas/{layers[0]}/2").text  # a unit page of the real builder's output
    assert "No activation-maximization image yet" not in first and "No top-9 patches yet" not in first


def test_search_finds_layers_by_name(client):
    c, _ = client
    r = c.get("/atlas/search", params={"q": "BLOCKS.1"})
    assert r.status_code == 200
    found = re.findall(r'<td><a href="/atlas/([^"/?]+)">', r.text)
    assert found == ["blocks.1.0", "blocks.10.0", "blocks.11.0"]
    r = c.get("/atlas/search", params={"q": "late"})
    assert re.findall(r'<td><a href="/atlas/([^"/?]+)">', r.text) == ["late.0"] and "2/6" in r.text
    r = c.get("/atlas/search", params={"q": "zebra"})
    assert "No unit" in r.text and "layers whose name" not in r.text
    assert c.get("/api/atlas/search", params={"q": "blocks"}).json() == []  # the JSON API stays by concept


def test_partial_layer_shows_its_built_units(client):
    c, _ = client
    name, units = EXTRA
    r = c.get(f"/atlas/{name}")
    tiles = re.findall(rf'class="unit-tile" href="/atlas/{re.escape(name)}/(\d+)"', r.text)
    assert tiles == [str(u) for u in range(units)] and "2 of 6 units have pictures" in r.text
    r = c.get(f"/atlas/{name}", params={"built": 1})
    tiles = re.findall(rf'class="unit-tile" href="/atlas/{re.escape(name)}/(\d+)"', r.text)
    assert tiles == ["1", "4"] and "Show all units" in r.text
    page = c.get(f"/atlas/{name}/1").text  # the next unit with pictures is 3 units away: linked directly
    assert f'href="/atlas/{name}/4" title="the next unit with pictures"' in page
    assert "the previous unit with pictures" not in page  # unit 0 is the pager's own neighbour
    page = c.get(f"/atlas/{name}/5").text
    assert f'href="/atlas/{name}/1" title="the previous unit with pictures"' not in page  # 4 is nearer
    assert f'href="/atlas/{name}/4"' in page and "the next unit with pictures" not in page
