"""The explorer app (``convscope serve``) through FastAPI's TestClient: pages, the JSON API, uploads and their
limits, atlas pages and path traversal, the bounded work queue, and the model left as it came."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import convscope as cs
from convscope.atlas.store import Atlas, LayerRecord
from convscope.web import create_app
from convscope.web.service import activation_grid

from .helpers import assert_untouched, snapshot

LAYER = "features.relu3"  # demo_net: 192 units, 14 x 14


def png_bytes(size=(64, 48), color=(200, 40, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def upload(client: TestClient, path=None, data: bytes | None = None, name="photo.png", ctype="image/png") -> str:
    body = data if data is not None else Path(path).read_bytes()
    r = client.post("/api/image", files={"file": (name, body, ctype)})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> str:
    """A small atlas for demo_net written with the store's own API (no builder needed)."""
    root = tmp_path_factory.mktemp("atlas")
    a = Atlas(root, "w")
    a.set_meta({"model": "demo_net"})
    a.add_layers([LayerRecord(LAYER, 0, 192, (192, 14, 14)), LayerRecord("features.relu5", 1, 128, (128, 14, 14))])
    rows = {}
    for u in range(4):
        am = a.write_image(Atlas.relpath(LAYER, u, "am"), Image.new("RGB", (32, 32), (10 * u, 100, 200)))
        top = a.write_image(Atlas.relpath(LAYER, u, "top"), Image.new("RGB", (96, 48), (200, 10 * u, 50)))
        rows[u] = {"am_image": am, "am_activation": 3.5 + u, "top_image": top, "max_activation": 2.0 + u,
                   "top": [{"image": 7, "source": "/data/secret/place/img7.png", "score": 2.0 + u, "y": 3, "x": 4}],
                   "concept": ["red", "stripes", "sky", "red-stripes"][u], "category": "color" if u % 2 == 0
                   else "texture", "iou": 0.1 * (u + 1), "detector": 1}
    a.put_units(LAYER, rows)
    a.put_units("features.relu5", {0: {"concept": "<script>alert(1)</script>", "category": "evil", "iou": 0.01}})
    (a.files_root / "notes.txt").write_text("not a picture")
    (root / "secret.png").write_bytes(png_bytes())  # beside files/, must never be served
    os.symlink(root / "secret.png", a.files_root / "escape.png")
    a.close()
    return str(root)


@pytest.fixture(scope="module")
def demo_client(atlas_dir):
    demo = cs.load_model("demo_net", device="cpu")
    app = create_app(demo, atlas=atlas_dir)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def plain_client():
    app = create_app("demo_net", device="cpu", max_upload_bytes=200_000, max_pixels=1_000_000, image_capacity=3)
    with TestClient(app) as client:
        yield client


# --------------------------------------------------------------------------- pages and the JSON API


def test_page_renders_with_layers_and_assets(demo_client):
    r = demo_client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'id="file"' in html and 'id="grid"' in html and "/static/explorer.js" in html
    assert f'<option value="{LAYER}" selected>' in html  # report's unit layer for demo_net is the default
    assert "sample-chelsea" in html  # bundled photos offered
    for asset in ("/static/explorer.js", "/static/explorer.css"):
        assert demo_client.get(asset).status_code == 200
    layers = demo_client.get("/api/layers").json()
    assert {"name": LAYER, "type": "ReLU", "shape": [192, 14, 14], "units": 192} in layers
    info = demo_client.get("/api/info").json()
    assert info["model"] == "demo_net" and info["atlas"] is True and info["default_layer"] == LAYER


def test_lite0_upload_predicts_a_cat_for_chelsea(lite0, one_thread):
    app = create_app(lite0)
    with TestClient(app) as client:
        image = upload(client, cs.sample_image("chelsea"), name="chelsea.png")
        r = client.get("/api/predict", params={"image": image})
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert len(preds) == 5 and preds[0]["index"] in range(281, 286)  # tabby .. Egyptian cat
        assert "cat" in preds[0]["name"] and sum(p["probability"] for p in preds) <= 1.0 + 1e-6
        timing = r.json()["timing"]
        assert timing["model_ms"] > 0 and "model;dur=" in r.headers["server-timing"]
        # the stored picture is the model's view: 224 x 224 centre crop, served as JPEG
        pic = client.get(f"/api/images/{image}")
        assert pic.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(pic.content)).size == (224, 224)
        # a bundled photo by id gives the same predictions as the uploaded file
        same = client.get("/api/predict", params={"image": "sample-chelsea"}).json()["predictions"]
        assert [p["index"] for p in same] == [p["index"] for p in preds]


def test_analyze_grid_layout_matches_the_picture(demo_client):
    image = upload(demo_client, cs.sample_image("coffee"))
    r = demo_client.get("/api/analyze", params={"image": image, "layer": LAYER})
    assert r.status_code == 200, r.text
    d = r.json()
    a = d["activations"]
    L = a["layout"]
    assert a["shape"] == [192, 14, 14] and L["units"] == 192 and len(a["max"]) == 192
    assert L["cols"] * L["rows"] >= 192 > L["cols"] * (L["rows"] - 1)
    assert decode(a["grid"]).size == (L["width"], L["height"]) == (L["cols"] * (L["tile"] + L["pad"]),
                                                                  L["rows"] * (L["tile"] + L["pad"]))
    assert max(a["max"]) == pytest.approx(a["max"][a["strongest"][0]])
    # the same image and layer again comes from the cache: no model time
    again = demo_client.get("/api/activations", params={"image": image, "layer": LAYER}).json()
    assert again["timing"]["model_ms"] == 0 and again["activations"]["max"] == a["max"]


def test_activation_grid_puts_each_unit_where_the_layout_says():
    acts = torch.zeros(13, 5, 5)
    acts[11, 2, 2] = 1.0  # only unit 11 fires
    img, L = activation_grid(acts, "layer")
    arr = torch.from_numpy(np.array(img)).float()
    step = L.tile + L.pad
    r, c = divmod(11, L.cols)
    tile = arr[r * step:r * step + L.tile, c * step:c * step + L.tile]
    assert tile.max() > 200  # bright somewhere in unit 11's tile
    others = arr.clone()
    others[r * step:r * step + L.tile, c * step:c * step + L.tile] = 0
    assert others.max() < 60  # every other tile (and the gaps) dark
    with pytest.raises(cs.ConvscopeError, match="norm"):
        activation_grid(acts, "bogus")


def test_unit_view_pictures_and_atlas_record(demo_client):
    image = upload(demo_client, cs.sample_image("astronaut"))
    r = demo_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    pics = {k: decode(d[k]) for k in ("activation", "overlay", "deconv", "guided")}
    assert all(p.size == (112, 112) for p in pics.values())
    assert d["unit"] == 2 and d["max"] >= 0 and len(d["argmax"]) == 2
    assert pics["deconv"].tobytes() != pics["guided"].tobytes()
    rec = d["atlas"]
    assert rec["concept"] == "sky" and rec["category"] == "color" and rec["detector"] is True
    for key in ("am_image", "top_image"):
        pic = demo_client.get(rec[key])
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/png"
    # a unit the atlas has no pictures for yet: a record with None, not an error
    d = demo_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": 100}).json()
    assert d["atlas"]["am_image"] is None and d["atlas"]["concept"] is None
    # a layer the atlas does not hold: the reason, not an error
    d = demo_client.get("/api/unit", params={"image": image, "layer": "features.relu1", "unit": 0}).json()
    assert "features.relu1" in d["atlas"]["missing"]


def test_unit_out_of_range_and_bad_values(demo_client):
    image = upload(demo_client, cs.sample_image("rocket"))
    r = demo_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": 192})
    assert r.status_code == 400 and "valid 0-191" in r.json()["error"]
    assert demo_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": -1}).status_code == 422
    assert demo_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": "x"}).status_code == 422
    r = demo_client.get("/api/analyze", params={"image": image, "layer": LAYER, "norm": "weird"})
    assert r.status_code == 400 and "norm" in r.json()["error"]


def test_unknown_layer_lists_valid_names(demo_client):
    image = upload(demo_client, cs.sample_image("coffee"))
    for path, params in [("/api/analyze", {"layer": "features.relu9"}),
                         ("/api/unit", {"layer": "features.relu9", "unit": 0})]:
        r = demo_client.get(path, params={"image": image, **params})
        assert r.status_code == 400
        body = r.json()
        assert "features.relu9" in body["error"] and LAYER in body["error"] and LAYER in body["valid"]
    r = demo_client.post("/api/frame", params={"layer": "nope"}, content=png_bytes(),
                         headers={"content-type": "image/png"})
    assert r.status_code == 400 and LAYER in r.json()["valid"]


def test_unknown_image_is_404(demo_client):
    for image in ("u-doesnotexist", "../../etc/passwd", "sample-nosuchphoto", "f-gone"):
        r = demo_client.get("/api/predict", params={"image": image})
        assert r.status_code in (400, 404), (image, r.status_code)
        assert "error" in r.json()


def test_cam_gradcam_and_saliency(demo_client):
    image = upload(demo_client, cs.sample_image("chelsea"))
    top = demo_client.get("/api/predict", params={"image": image}).json()["predictions"][0]["index"]
    r = demo_client.get("/api/cam", params={"image": image})
    assert r.status_code == 200
    d = r.json()
    assert d["class"] == top and d["method"] == "gradcam" and d["layer"] == "features.relu5"
    assert decode(d["overlay"]).size == (112, 112)
    s = demo_client.get("/api/cam", params={"image": image, "cls": 3, "method": "saliency"}).json()
    assert s["class"] == 3 and s["name"] == cs.load_model("demo_net").classes[3]
    assert decode(s["overlay"]).tobytes() != decode(d["overlay"]).tobytes()
    r = demo_client.get("/api/cam", params={"image": image, "cls": 8})
    assert r.status_code == 400 and "valid 0-7" in r.json()["error"]
    assert demo_client.get("/api/cam", params={"image": image, "method": "lime"}).status_code == 400


def test_webcam_frame_then_inspect_it(demo_client):
    buf = io.BytesIO()
    cs.load_image(cs.sample_image("flower")).resize((320, 240)).save(buf, format="JPEG")
    r = demo_client.post("/api/frame", params={"layer": LAYER, "unit": 5}, content=buf.getvalue(),
                         headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["image"].startswith("f-") and len(d["predictions"]) == 5
    assert d["activations"]["layout"]["units"] == 192 and d["unit"]["unit"] == 5
    assert decode(d["unit"]["activation"]).size == (112, 112)
    # the frame is kept briefly: freezing the webcam and clicking a unit works on it
    u = demo_client.get("/api/unit", params={"image": d["image"], "layer": LAYER, "unit": 5})
    assert u.status_code == 200 and u.json()["max"] == pytest.approx(d["unit"]["max"], rel=1e-5)


def test_bundled_photos(demo_client):
    rows = demo_client.get("/api/bundled").json()
    names = {r["name"] for r in rows}
    assert {"chelsea", "astronaut"} <= names
    r = demo_client.get(rows[0]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = demo_client.get("/api/images/sample-brick")  # textures are not offered as photos
    assert r.status_code == 400 and "bundled photos" in r.json()["error"]


# --------------------------------------------------------------------------- uploads: limits and checks


def test_upload_too_large_is_413(plain_client):
    big = os.urandom(300_000)
    r = plain_client.post("/api/image", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # chunked (no Content-Length): refused while streaming in
    r = plain_client.post("/api/image", content=(big[i:i + 50_000] for i in range(0, len(big), 50_000)),
                          headers={"content-type": "image/png"})
    assert r.status_code == 413
    r = plain_client.post("/api/frame", content=big, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413


def test_upload_type_checks(plain_client):
    r = plain_client.post("/api/image", files={"file": ("a.txt", b"hello world", "text/plain")})
    assert r.status_code == 415 and "content type 'text/plain'" in r.json()["error"]
    r = plain_client.post("/api/image", files={"file": ("a.png", b"hello world", "image/png")})
    assert r.status_code == 415 and "not a picture" in r.json()["error"]
    r = plain_client.post("/api/image", files={"file": ("a.pdf", b"%PDF-1.4\n%...", "application/octet-stream")})
    assert r.status_code == 415
    r = plain_client.post("/api/image", files={"file": ("a.png", png_bytes()[:60], "image/png")})
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["error"]
    r = plain_client.post("/api/image", files={"file": ("a.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = plain_client.post("/api/image", files={"other": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    bomb = png_bytes(size=(1200, 1000), color=(0, 0, 0))  # 1.2 MP > max_pixels=1e6, small file
    r = plain_client.post("/api/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    r = plain_client.post("/api/image", content=png_bytes(fmt="BMP"), headers={"content-type": "image/bmp"})
    assert r.status_code == 200  # raw body works too


def test_upload_lru_evicts_oldest(plain_client):
    ids = [upload(plain_client, data=png_bytes(color=(i * 50, 0, 0))) for i in range(4)]  # capacity 3
    assert plain_client.get(f"/api/images/{ids[0]}").status_code == 404
    r = plain_client.get("/api/predict", params={"image": ids[0]})
    assert r.status_code == 404 and "upload it again" in r.json()["error"]
    assert all(plain_client.get(f"/api/images/{i}").status_code == 200 for i in ids[1:])


# --------------------------------------------------------------------------- atlas pages and traversal


def test_atlas_pages(demo_client):
    r = demo_client.get("/atlas")
    assert r.status_code == 200 and LAYER in r.text and "features.relu5" in r.text and "4/192" in r.text
    r = demo_client.get(f"/atlas/{LAYER}")
    assert r.status_code == 200 and "stripes" in r.text and f"/atlas/{LAYER}/3" in r.text
    r = demo_client.get(f"/atlas/{LAYER}/1")
    assert r.status_code == 200 and "stripes" in r.text and "texture" in r.text and "img7.png" in r.text
    assert "/data/secret" not in r.text  # file names only, not the server's folders
    assert f"/atlas/files/{LAYER}/1_am.png" in r.text
    assert demo_client.get(f"/atlas/{LAYER}/192").status_code == 404
    r = demo_client.get("/atlas/features.relu9")
    assert r.status_code == 404 and LAYER in r.text  # names the valid layers


def test_atlas_search(demo_client):
    r = demo_client.get("/atlas/search", params={"q": "stripe"})
    assert r.status_code == 200 and "stripes" in r.text and "red-stripes" in r.text and ">sky<" not in r.text
    assert "No unit" in demo_client.get("/atlas/search", params={"q": "zebra"}).text
    for page in (demo_client.get("/atlas/search", params={"q": "evil"}), demo_client.get("/atlas/features.relu5"),
                 demo_client.get("/atlas/features.relu5/0"), demo_client.get("/atlas/search", params={"q": "<i>"})):
        assert page.status_code == 200 and "<script>alert" not in page.text and "<i>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in demo_client.get("/atlas/features.relu5/0").text
    rows = demo_client.get("/api/atlas/search", params={"q": "TEXTURE"}).json()
    assert sorted(r["unit"] for r in rows) == [1, 3]  # category matches too, case-insensitive
    assert rows[0]["iou"] >= rows[1]["iou"]


@pytest.mark.parametrize("path", [
    "/atlas/files/%2e%2e/atlas.sqlite",
    "/atlas/files/..%2fatlas.sqlite",
    "/atlas/files/features.relu3/..%2f..%2fatlas.sqlite",
    "/atlas/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/atlas/files//etc/passwd",
    "/atlas/files/%2fetc%2fpasswd",
    "/atlas/files/..%5csecret.png",
    "/atlas/files/%2e%2e/secret.png",
    "/atlas/files/escape.png",          # a symlink inside files/ that points out
    "/atlas/files/notes.txt",           # inside, but not a picture
    "/atlas/files/features.relu3/%00.png",
])
def test_atlas_files_refuse_traversal(demo_client, path):
    r = demo_client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert b"SQLite format" not in r.content and b"root:" not in r.content and r.headers["content-type"] != "image/png"


HUGE = "99999999999999999999"  # > 2**64: SQLite overflows on it


@pytest.mark.parametrize("path", [
    f"/atlas/{LAYER}/{HUGE}",
    f"/atlas/{LAYER}/{'9' * 5000}",     # more digits than int() parses by default
    f"/atlas/{LAYER}/-1",
    f"/atlas/{LAYER}/0x10",
    f"/atlas/{LAYER}/1e3",
    f"/atlas/{LAYER}/1%0A",
    f"/atlas/{LAYER}/192",              # one past the last unit
    f"/atlas/{'x' * 300}/1",
    f"/atlas/{'x' * 300}",
])
def test_atlas_unit_numbers_out_of_range_are_404_pages(demo_client, path):
    r = demo_client.get(path)
    assert r.status_code == 404 and "Not found" in r.text, (path[:60], r.status_code)
    message = r.text.split('class="error-text">', 1)[1].split("</p>", 1)[0]
    assert len(message) < 400 and ("0..191" in message or "its layers" in message), message


@pytest.mark.parametrize("path", [
    "/atlas/files/" + "a" * 300 + ".png",                # one name longer than the OS allows (ENAMETOOLONG)
    f"/atlas/files/{LAYER}/" + "b" * 256 + ".png",
    "/atlas/files/" + "c/" * 700 + "x.png",              # a path longer than any atlas writes
    "/atlas/files/" + "%C3%A9" * 130 + ".png",           # 260 bytes in UTF-8 from 130 characters
])
def test_atlas_files_with_too_long_names_are_404(demo_client, path):
    r = demo_client.get(path)
    assert r.status_code == 404 and "too long" in r.json()["error"], (path[:60], r.status_code)
    assert demo_client.get(f"/atlas/files/{LAYER}/0_am.png").status_code == 200  # real files still served


def test_huge_numbers_in_the_api_are_4xx_with_short_messages(demo_client):
    image = upload(demo_client, data=png_bytes())
    for path, params in [("/api/unit", {"image": image, "layer": LAYER, "unit": HUGE}),
                         ("/api/cam", {"image": image, "cls": HUGE}),
                         ("/api/unit", {"image": image, "layer": "x" * 300, "unit": 1}),
                         ("/api/predict", {"image": "u-" + "x" * 300}),
                         ("/api/images/sample-" + "x" * 300, {})]:
        r = demo_client.get(path, params=params)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert len(r.json()["error"]) < 400 and "x" * 60 not in r.json()["error"]
    r = demo_client.post("/api/frame", params={"layer": LAYER, "unit": HUGE}, content=png_bytes(),
                         headers={"content-type": "image/png"})
    assert r.status_code == 400 and "valid 0-191" in r.json()["error"]


def test_atlas_absent(plain_client):
    r = plain_client.get("/atlas")
    assert r.status_code == 404 and "--atlas" in r.text
    assert plain_client.get("/atlas/files/x.png").status_code == 404
    image = upload(plain_client, data=png_bytes())
    assert plain_client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": 0}).json()["atlas"] is None


def test_missing_atlas_folder_is_a_clear_error(tmp_path):
    with pytest.raises(cs.ConvscopeError, match="atlas build"):
        create_app("demo_net", atlas=tmp_path / "nothing")


# --------------------------------------------------------------------------- the work queue


def test_full_queue_answers_503_with_retry_after():
    app = create_app("demo_net", device="cpu", queue_size=1)
    worker = app.state.worker
    release = threading.Event()
    running = threading.Event()

    def slow() -> dict:
        running.set()
        release.wait(30)
        return {}

    with TestClient(app) as client:
        image = upload(client, data=png_bytes())
        first = worker.submit(slow)  # runs
        assert running.wait(10)
        queued = worker.submit(slow)  # waits: the queue (size 1) is now full
        r = client.get("/api/predict", params={"image": image})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        assert client.get("/api/status").json()["jobs_rejected"] == 1
        release.set()
        first.result(10), queued.result(10)
        r = client.get("/api/predict", params={"image": image})
        assert r.status_code == 200


def test_job_of_a_client_that_went_away_is_dropped():
    app = create_app("demo_net", device="cpu", queue_size=4)
    worker = app.state.worker
    release, running = threading.Event(), threading.Event()
    calls = []
    explorer = app.state.explorer
    real = explorer.analyze
    explorer.analyze = lambda *a, **k: calls.append(a) or real(*a, **k)
    image = explorer.sample("coffee").id

    def slow() -> dict:
        running.set()
        release.wait(30)
        return {}

    async def request_then_leave() -> list[dict]:
        sent, first = [], True

        async def receive() -> dict:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict",
                 "query_string": f"image={image}".encode(), "headers": [(b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "root_path": ""}
        await app(scope, receive, send)
        return sent

    try:
        blocker = worker.submit(slow)
        assert running.wait(10)
        sent = asyncio.run(request_then_leave())
        assert sent[0]["status"] == 499
        release.set()
        blocker.result(10)
        worker.submit(lambda: {}).result(10)  # the queue has drained past the dropped job
        assert calls == [] and worker.jobs_cancelled == 1
    finally:
        release.set()
        worker.close()


def test_waiting_frames_run_as_one_batch_and_a_bad_frame_fails_alone():
    from convscope.web.worker import ModelWorker

    worker = ModelWorker(queue_size=8, max_batch=3)
    release, running = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def batch(items: list[int]) -> list:
        seen.append(items)
        return [ValueError(f"bad {i}") if i == 2 else i * 10 for i in items]

    try:
        blocker = worker.submit(lambda: running.set() or release.wait(30))
        assert running.wait(10)
        futs = [worker.submit_batched("a", batch, i) for i in range(5)]
        other = worker.submit_batched("b", batch, 7)
        release.set()
        blocker.result(10)
        assert [f.result(10).value for f in futs if f is not futs[2]] == [0, 10, 30, 40]
        with pytest.raises(ValueError, match="bad 2"):
            futs[2].result(10)
        assert other.result(10).value == 70
        assert seen == [[0, 1, 2], [3, 4], [7]]  # same key together, at most max_batch, order kept
        assert [f.result().batch for f in futs if f is not futs[2]] == [3, 3, 2, 2]
    finally:
        release.set()
        worker.close()


def test_frame_batch_matches_single_frames():
    demo = cs.load_model("demo_net", device="cpu")
    app = create_app(demo)
    ex = app.state.explorer
    frames = []
    for name in ("chelsea", "rocket"):
        buf = io.BytesIO()
        cs.load_image(cs.sample_image(name)).resize((320, 240)).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    try:
        out = ex.frame_batch([(frames[0], "image/jpeg", LAYER, "layer", 3), (b"junk", "image/jpeg", LAYER, "layer", 3),
                              (frames[1], "image/jpeg", LAYER, "unit", None)])
        assert isinstance(out[1], cs.ConvscopeError) and out[0]["batch"] == 2
        for res, data, unit in ((out[0], frames[0], 3), (out[2], frames[1], None)):
            alone = ex.frame(data, "image/jpeg", LAYER, norm=res["activations"]["norm"], unit=unit)
            assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in res["predictions"]]
            assert alone["activations"]["max"] == pytest.approx(res["activations"]["max"], rel=1e-4, abs=1e-5)
        assert "unit" in out[0] and "unit" not in out[2]
    finally:
        app.state.worker.close()


def test_fifty_concurrent_clients_all_get_answers():
    demo = cs.load_model("demo_net", device="cpu")
    app = create_app(demo, queue_size=64)
    image = app.state.explorer.sample("chelsea").id
    frame = png_bytes(size=(160, 120))

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            reqs = [client.post("/api/frame", params={"unit": i}, content=frame, headers={"content-type": "image/png"})
                    if i % 3 == 0 else
                    client.get("/api/analyze", params={"image": image, "layer": LAYER if i % 2 else "features.relu5"})
                    for i in range(50)]
            return [r.status_code for r in await asyncio.gather(*reqs)]

    try:
        codes = asyncio.run(main())
    finally:
        app.state.worker.close()
    assert codes == [200] * 50


# --------------------------------------------------------------------------- the model is left as it came


def test_requests_leave_the_model_untouched():
    demo = cs.load_model("demo_net", device="cpu")
    demo.features.train()  # a mixed mode the server must not change
    demo.classifier[0].weight.requires_grad_(False)
    before = snapshot(demo)
    app = create_app(demo)
    with TestClient(app) as client:
        image = upload(client, cs.sample_image("china"))
        for layer in (LAYER, "features.conv1", "features.pool5"):
            assert client.get("/api/analyze", params={"image": image, "layer": layer}).status_code == 200
            assert client.get("/api/unit", params={"image": image, "layer": layer, "unit": 1}).status_code == 200
        for method in ("gradcam", "saliency"):
            assert client.get("/api/cam", params={"image": image, "method": method}).status_code == 200
        assert client.post("/api/frame", params={"unit": 0}, content=png_bytes(),
                           headers={"content-type": "image/png"}).status_code == 200
        # failing requests too
        assert client.get("/api/unit", params={"image": image, "layer": LAYER, "unit": 999}).status_code == 400
        assert client.get("/api/cam", params={"image": image, "cls": 99}).status_code == 400
    assert_untouched(demo, before)


# --------------------------------------------------------------------------- the CLI


def test_cli_serve_binds_localhost_by_default(monkeypatch, atlas_dir):
    import uvicorn

    from convscope.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    n = torch.get_num_threads()
    try:
        assert main(["serve", "--model", "demo_net", "--device", "cpu", "--atlas", atlas_dir, "--port", "8765",
                     "--max-upload-mb", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8765
    app = seen["app"]
    assert app.state.explorer.name == "demo_net" and app.state.atlas is not None
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:  # closes the model worker on exit
        r = client.post("/api/image", content=os.urandom(3 * 1024 * 1024), headers={"content-type": "image/png"})
        assert r.status_code == 413
        assert client.get("/api/info").status_code == 200
        # a page that rebinds its own DNS name to 127.0.0.1 cannot read the explorer
        assert client.get("/api/info", headers={"host": "evil.example:8765"}).status_code == 400


def test_cli_serve_bad_atlas_exits_2(tmp_path, capsys):
    from convscope.cli import main

    assert main(["serve", "--model", "demo_net", "--device", "cpu", "--atlas", str(tmp_path)]) == 2
    assert "atlas" in capsys.readouterr().err
