"""End to end: the explorer served by uvicorn, driven by a real headless Chromium (Debian's ``chromium``) through
Playwright: load the page, upload a photo, see predictions, click a unit, see its pictures; a screenshot is saved
to ``out/screenshots/explorer.png`` for a person to look at. The webcam path runs on Chromium's fake camera.

``CONVSCOPE_E2E_ATLAS=DIR`` uses a real atlas of efficientnet_lite0 (``convscope atlas build``) instead of the
fixture; ``CONVSCOPE_DOCS_SCREENSHOT=1`` also copies the screenshot to ``docs/img/explorer.png``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import convscope as cs
from convscope.atlas.store import Atlas, LayerRecord

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the end-to-end test drives it",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="the end-to-end test needs playwright (pip)")
uvicorn = pytest.importorskip("uvicorn")

from convscope.web import create_app  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LAYER = "blocks.10"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream"]


def _fixture_atlas(root: Path) -> Path:
    """An atlas of every unit of ``blocks.10`` with labelled placeholder pictures (what the page must show)."""
    a = Atlas(root, "w")
    a.set_meta({"model": "efficientnet_lite0"})
    a.add_layers([LayerRecord(LAYER, 0, 112, (112, 14, 14))])
    rows = {}
    for u in range(112):
        am = Image.new("RGB", (112, 112), ((37 * u) % 256, 90, 160))
        ImageDraw.Draw(am).text((8, 50), f"AM unit {u}", fill=(255, 255, 255))
        top = Image.new("RGB", (240, 120), (40, (53 * u) % 256, 90))
        ImageDraw.Draw(top).text((8, 50), f"top-9 of unit {u}", fill=(255, 255, 255))
        rows[u] = {"am_image": a.write_image(Atlas.relpath(LAYER, u, "am"), am),
                   "top_image": a.write_image(Atlas.relpath(LAYER, u, "top"), top), "am_activation": 5.0,
                   "max_activation": 4.0, "concept": f"concept-{u}", "category": "object", "iou": 0.05,
                   "detector": 1}
    a.put_units(LAYER, rows)
    a.close()
    return root


@pytest.fixture(scope="module")
def server(lite0, tmp_path_factory):
    atlas = os.environ.get("CONVSCOPE_E2E_ATLAS") or _fixture_atlas(tmp_path_factory.mktemp("atlas"))
    app = create_app(lite0, atlas=atlas)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _click_unit(page, unit: int) -> None:
    """A real mouse click on the centre of ``unit``'s tile in the activation grid."""
    box = page.locator("#grid").bounding_box()
    L = page.evaluate("window.explorer.layout")
    step = L["tile"] + L["pad"]
    x = box["x"] + ((unit % L["cols"]) * step + L["tile"] / 2) * box["width"] / L["width"]
    y = box["y"] + ((unit // L["cols"]) * step + L["tile"] / 2) * box["height"] / L["height"]
    page.mouse.move(x, y)
    page.mouse.click(x, y)


def _loaded(ids: list[str]) -> str:
    return " && ".join(f"(document.getElementById('{i}')?.naturalWidth > 0)" for i in ids)


def test_upload_predict_click_unit_screenshot(server, browser):
    url, app = server
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    assert page.title().startswith("convscope explorer")
    page.set_input_files("#file", str(cs.sample_image("chelsea")))
    page.wait_for_selector("#preds .pred", timeout=60_000)
    top1 = page.locator("#preds .pred").first.inner_text()
    assert "cat" in top1, top1
    page.wait_for_function("window.explorer.layout !== null && " + _loaded(["grid", "current"]), timeout=60_000)
    assert page.evaluate("window.explorer.layer") == LAYER
    maxes = page.evaluate("window.explorer.maxes")
    unit = max(range(len(maxes)), key=maxes.__getitem__)  # the strongest unit on this photo
    _click_unit(page, unit)
    page.wait_for_function(_loaded(["u-act", "u-overlay", "u-deconv", "u-guided", "u-am", "u-top", "cam-img"])
                           + " && !document.getElementById('unit-card').classList.contains('loading')",
                           timeout=120_000)
    assert page.evaluate("window.explorer.unit") == unit
    assert page.locator("#unit-title").inner_text() == f"Unit {unit} of {LAYER}"
    assert page.locator("#u-atlas .badge").inner_text().strip() != ""
    assert page.locator("#sel-box").is_visible()
    assert "Grad-CAM" in page.locator("#cam-caption").inner_text()
    page.mouse.move(5, 5)  # no hover tooltip in the picture
    out = ROOT / "out" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1440
    if os.environ.get("CONVSCOPE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        # 256 colours, dithered (like the other pictures in docs/img), to keep the repository small
        rgb = Image.open(shot).convert("RGB")
        palette = rgb.quantize(256, method=Image.Quantize.MEDIANCUT)
        rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(ROOT / "docs" / "img" / "explorer.png",
                                                                               optimize=True)
    # a class from the top-5 list drives the class-evidence panel
    second = page.locator("#preds .pred").nth(1)
    name = second.locator(".name").inner_text()
    second.click()
    page.wait_for_function("(n) => document.getElementById('cam-caption').textContent.includes(n)", arg=name,
                           timeout=60_000)
    assert not errors, errors
    page.close()


def test_webcam_streams_frames(server, browser):
    url, app = server
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url + "/")
    page.click("#webcam")
    page.wait_for_function("document.getElementById('fps').textContent.includes('fps')", timeout=60_000)
    start = app.state.worker.jobs_done
    t0 = time.monotonic()
    time.sleep(4)
    frames = app.state.worker.jobs_done - start
    fps = frames / (time.monotonic() - t0)
    print(f"\nwebcam: {fps:.1f} frames/s end to end in headless Chromium ({page.locator('#fps').inner_text()})")
    assert frames >= 4, f"only {frames} webcam frames in 4 s"
    page.click("#webcam")  # stop: the last frame stays, inspectable
    page.wait_for_function("document.getElementById('current').naturalWidth > 0 && "
                           "window.explorer.image.startsWith('f-')", timeout=30_000)
    page.close()


def test_raw_path_traversal_over_the_socket(server):
    """Requests a browser or httpx would normalize, sent byte for byte to uvicorn."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    for target in ("/atlas/files/../atlas.sqlite", "/atlas/files/../../../../etc/passwd",
                   "/atlas/files/./../atlas.sqlite", "/static/../app.py", "/atlas/files/%2e%2e/atlas.sqlite"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert 400 <= status < 500, (target, data[:200])
        assert b"SQLite format" not in data and b"root:" not in data and b"create_app" not in data
