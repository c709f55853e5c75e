"""The explorer's whole-model views through FastAPI's TestClient: the architecture graph as the layer picker
(``/graph``, ``/api/graph``: every layer the explorer shows is a link to its maps) and the embedding view
(``/api/embedding``: t-SNE of a layer's pooled features with thumbnails, labels and predicted classes), on a tiny
net built here; bad layers and sources answer 4xx with one line; the model is left as it came. With Debian's
``/usr/bin/chromium`` and Playwright, one test also drives the page: click a graph node, hover an embedding point.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from collections import OrderedDict
from html import unescape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from convscope.applications.embed_report import synthetic_scenes
from convscope.core.preprocess import Preprocess
from convscope.methods.embed import project
from convscope.web import create_app

from .helpers import assert_untouched, snapshot

SIDE = 32
N_SCENES = 24
CLASSES = ("ant", "bee", "cat", "dog", "eel")
CHROMIUM = "/usr/bin/chromium"


class Residual(nn.Module):
    """``x + relu(conv(x))``: a container layer, drawn as a frame around its two leaf calls and a join."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 3, padding=1), relu2=nn.ReLU()))
        self.block = Residual(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.features(x))).flatten(1))


def tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny().eval()
    m.preprocess = Preprocess(resize=SIDE, crop=SIDE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    m.classes = CLASSES
    return m


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def upload(client: TestClient, data: bytes, name: str) -> str:
    r = client.post("/api/image", files={"file": (name, data, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def picture(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head in ("data:image/jpeg;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def one_line_error(r) -> str:  # noqa: ANN001
    msg = r.json()["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture(scope="module")
def model() -> Tiny:
    return tiny()


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, embed_images=N_SCENES)) as c:
        yield c


def hrefs(html: str) -> list[str]:
    return [unescape(h) for h in re.findall(r'<a href="([^"]+)"', html)]


def layer_of(href: str) -> str | None:
    parts = urlsplit(href)
    return parse_qs(parts.query).get("layer", [None])[0] if parts.path == "/" else None


# --------------------------------------------------------------------------- the graph as the layer picker


def test_graph_page_links_every_layer_to_a_layer_view_that_renders(client):
    layers = [e["name"] for e in client.get("/api/layers").json()]
    assert "block" in layers and "features.relu2" in layers and "fc" not in layers  # fc has no C x H x W map
    r = client.get("/graph")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    svg = page[page.index("<svg"):page.index("</svg>")]
    # every layer is a click target in the drawing: its leaf call's box, or (a container) its block's frame
    in_drawing = {layer_of(h) for h in hrefs(svg)}
    assert in_drawing == set(layers)
    # the Residual block's frame links; the Sequential ``features`` is no explorer layer: its frame does not
    assert '<a href="/?layer=block" class="link" data-name="block"><g class="group">' in svg
    assert svg.count('<g class="group">') == 2 and 'data-name="features"' not in svg
    # ... and listed in the layer table and the module blocks (collapsible <details>)
    table = page[page.index('id="graph-layers"'):]
    assert [layer_of(h) for h in hrefs(table)] == layers
    assert {layer_of(h) for h in hrefs(page)} - {None} == set(layers)  # None: the header's links
    assert page.count("<details") >= 3  # the model, features, block
    image = upload(client, png_bytes((200, 60, 30)), "red.png")
    units = {e["name"]: e["units"] for e in client.get("/api/layers").json()}
    for href in sorted({h for h in hrefs(page) if layer_of(h)}):
        name = layer_of(href)
        view = client.get(href)
        assert view.status_code == 200, href
        assert f'<option value="{name}" selected>' in view.text and f'data-layer="{name}"' in view.text
        maps = client.get("/api/analyze", params={"image": image, "layer": name})
        assert maps.status_code == 200, maps.text
        assert maps.json()["activations"]["layout"]["units"] == units[name]


def test_graph_api_matches_the_layer_list(client):
    g = client.get("/api/graph").json()
    assert [e["name"] for e in g["layers"]] == [e["name"] for e in client.get("/api/layers").json()]
    by = {e["name"]: e for e in g["layers"]}
    assert by["features.relu2"]["nodes"] == ["features.relu2"] and by["block"]["nodes"] == ["block"]
    assert by["block.act"]["url"] == "/?layer=block.act"
    assert g["joins"] == 1 and g["module_calls"] == 9 and g["params"] == sum(p.numel() for p in tiny().parameters())
    assert g["svg"].startswith("<svg") and g["tree"].startswith("<details open>")
    assert {layer_of(h) for h in hrefs(g["tree"])} == set(by)  # the module blocks link every layer too
    # computed once: the second call is the cache (no model time)
    assert client.get("/api/graph").json()["timing"]["model_ms"] == 0


def test_unknown_layer_in_the_page_is_400_one_line(client):
    r = client.get("/", params={"layer": "features.relu9"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html")
    msg = unescape(re.search(r'<p class="error-text">(.*?)</p>', r.text, re.S).group(1))
    assert "\n" not in msg and "features.relu9" in msg and "features.relu2" in msg
    assert client.get("/", params={"layer": "x" * 300}).status_code == 422


def test_page_offers_the_graph_and_embedding_offline(client):
    page = client.get("/").text
    assert 'id="graph-toggle"' in page and 'id="embed-run"' in page and 'id="embed-svg"' in page
    assert '<a href="/graph"' in page  # in the header
    js = client.get("/static/explorer.js").text
    assert "/api/graph" in js and "/api/embedding" in js
    for text in (page, js, client.get("/graph").text):  # no CDN, no external script or style: works offline
        assert not re.search(r'(src|href)="(https?:)?//', text)


# --------------------------------------------------------------------------- the embedding view


def test_embedding_of_synthetic_scenes_points_thumbnails_labels(client, model):
    layer = "features.relu2"
    r = client.get("/api/embedding", params={"layer": layer})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["layer"] == layer and d["source"] == "synthetic" and d["n"] == N_SCENES == len(d["points"])
    assert d["features"] == 16 and d["coloured_by"] == "label" and d["cached"] is False
    # independent computation: the same scenes, the layer's features by calling the modules directly, the
    # model's classes from its own forward pass, the t-SNE of those features
    x, labels, names = synthetic_scenes(model, N_SCENES, size=SIDE, progress=False)
    with torch.no_grad():
        feats = model.features(x).mean((2, 3))
        preds = model(x).argmax(1)
    pts = d["points"]
    assert [p["label"] for p in pts] == labels.tolist()
    assert [p["label_name"] for p in pts] == [names[c] for c in labels.tolist()]
    assert [p["prediction"] for p in pts] == preds.tolist()
    assert [p["prediction_name"] for p in pts] == [CLASSES[c] for c in preds.tolist()]
    want = project(feats, "tsne", seed=0)
    got = np.array([[p["x"], p["y"]] for p in pts])
    assert np.abs(got - want).max() <= 1e-3 * np.ptp(want)
    # each thumbnail is its scene (64 px, JPEG): close to the scene's own pixels resized
    rgb = (x * 0.25 + 0.5).clamp(0, 1)
    for i in (0, 7, N_SCENES - 1):
        thumb = picture(pts[i]["thumbnail"])
        assert thumb.size == (64, 64)
        ref = Image.fromarray((rgb[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
            (64, 64), Image.Resampling.BILINEAR)
        assert np.abs(np.asarray(thumb, dtype=float) - np.asarray(ref, dtype=float)).mean() < 12
    # legend: every label present, counts add up, colours as on the points
    legend = {e["class"]: e for e in d["legend"]}
    assert sum(e["count"] for e in legend.values()) == N_SCENES
    assert all(p["colour"] == legend[p["label"]]["colour"] for p in pts)
    # computed once per layer: the second call comes from the cache
    again = client.get("/api/embedding", params={"layer": layer}).json()
    assert again["cached"] is True and again["timing"]["model_ms"] == 0 and again["points"] == pts


def test_embedding_of_the_explorers_pictures(client):
    bundled = client.get("/api/bundled").json()
    ids = [upload(client, png_bytes(c), f"{n}.png") for n, c in (("red", (220, 20, 20)), ("blue", (20, 20, 220)))]
    d = client.get("/api/embedding", params={"layer": "block", "source": "images"}).json()
    held = [b["id"] for b in bundled] + ids
    assert d["n"] >= len(held) and {p["image"] for p in d["points"]} >= set(held)
    assert d["coloured_by"] == "prediction" and all(p["label"] is None for p in d["points"])
    assert {"red.png", "blue.png"} <= {p["name"] for p in d["points"]}
    for p in d["points"]:  # every point opens its picture
        assert p["prediction_name"] == CLASSES[p["prediction"]]
        assert client.get(f"/api/images/{p['image']}").status_code == 200
    # a new upload is a new set of pictures: embedded again, one point more
    upload(client, png_bytes((20, 220, 20)), "green.png")
    more = client.get("/api/embedding", params={"layer": "block", "source": "images"}).json()
    assert more["cached"] is False and more["n"] == d["n"] + 1


def test_embedding_bad_layer_or_source_is_4xx_one_line(client):
    r = client.get("/api/embedding", params={"layer": "features.relu9"})
    assert r.status_code == 400
    msg = one_line_error(r)
    assert "features.relu9" in msg and "features.relu2" in msg and "features.relu2" in r.json()["valid"]
    r = client.get("/api/embedding", params={"layer": "fc"})  # no spatial map: not an explorer layer
    assert r.status_code == 400 and "fc" in one_line_error(r)
    r = client.get("/api/embedding", params={"layer": "block", "source": "webcam"})
    assert r.status_code == 400 and "synthetic" in one_line_error(r) and "images" in one_line_error(r)
    r = client.get("/api/embedding", params={"layer": "y" * 400})
    assert r.status_code == 422 and one_line_error(r)


def test_too_few_pictures_is_a_one_line_400(model):
    # no bundled photos found and one upload: a t-SNE needs 3 pictures
    with TestClient(create_app(model, embed_images=N_SCENES)) as c:
        c.app.state.explorer.bundled = lambda: []
        upload(c, png_bytes((1, 2, 3)), "only.png")
        r = c.get("/api/embedding", params={"layer": "block", "source": "images"})
        assert r.status_code == 400 and "at least 3" in one_line_error(r)


def test_embed_images_must_be_sane(model):
    from convscope.errors import ConvscopeError

    for bad in (2, 0, 10_000, True, "300"):
        with pytest.raises(ConvscopeError, match="embed_images"):
            create_app(model, embed_images=bad)


def test_whole_model_views_leave_the_model_untouched():
    m = tiny()
    m.features.train()  # a mixed mode the server must not change
    m.fc.weight.requires_grad_(False)
    m.block.conv.weight.grad = torch.ones_like(m.block.conv.weight)
    before = snapshot(m)
    with TestClient(create_app(m, embed_images=N_SCENES)) as c:
        assert c.get("/graph").status_code == 200
        assert c.get("/api/graph").status_code == 200
        upload(c, png_bytes((9, 99, 199)), "x.png")
        for source in ("synthetic", "images"):
            assert c.get("/api/embedding", params={"layer": "block.act", "source": source}).status_code == 200
        assert c.get("/api/embedding", params={"layer": "nope"}).status_code == 400
        assert c.get("/api/embedding", params={"layer": "block", "source": "nope"}).status_code == 400
    assert_untouched(m, before)


# --------------------------------------------------------------------------- in a browser


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed; this test drives it")
def test_browser_graph_click_and_embedding_hover(client):
    sync_api = pytest.importorskip("playwright.sync_api")
    uvicorn = pytest.importorskip("uvicorn")
    app = client.app  # the module's app (its embeddings cached by the tests above), served without a 2nd lifespan
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png",
                                                  "buffer": png_bytes((200, 40, 40))}])
            page.wait_for_function("window.explorer.layout !== null")
            # the graph panel: click the Residual block's frame label -> that layer's maps
            page.click("#graph-toggle")
            page.wait_for_selector('#graph-view a.link[data-name="block"]')
            page.locator('#graph-view a.link[data-name="block"] text').click()
            page.wait_for_function("window.explorer.layer === 'block' && window.explorer.layout.units === 16")
            assert page.locator("#layer").input_value() == "block"
            assert page.locator('#graph-view a.link.on[data-name="block"]').count() == 1
            # the full graph page: a node's link opens the explorer on that layer, with the tab's image
            page.goto(url + "/graph")
            page.locator('#graph-page-view a.link[data-name="features.relu2"] rect').click()
            page.wait_for_function("window.explorer && window.explorer.layer === 'features.relu2' && "
                                   "window.explorer.layout !== null && window.explorer.layout.units === 16")
            # the embedding: hover a point -> its thumbnail and its label / predicted class
            page.click("#embed-run")
            page.wait_for_selector("#embed-svg circle", timeout=60_000)
            assert page.locator("#embed-svg circle").count() == N_SCENES
            page.locator("#embed-svg circle").nth(3).hover(force=True)
            page.wait_for_function("!document.getElementById('embed-peek').hidden && "
                                   "document.getElementById('embed-peek-img').naturalWidth === 64")
            text = page.locator("#embed-peek-text").inner_text()
            assert "label:" in text and "predicted:" in text
            browser.close()
        assert not errors, errors
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()
