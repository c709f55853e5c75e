"""The explorer's memory under a burst of large-pixel uploads: a real server (uvicorn in a subprocess, on a loopback
port) gets 30 concurrent uploads of a 6300 x 6300 PNG of a few KB; its peak RSS stays bounded and falls back near
its baseline afterwards. Plus the pieces that bound it: decode slots, reducing while decoding, the pixel limit."""

from __future__ import annotations

import asyncio
import io
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from convscope.core.images import decode_rgb
from convscope.web import create_app
from convscope.web import images as web_images
from convscope.web.images import Decoder, pixel_limit, release_memory

MB = 1024 * 1024
SIDE = 6300  # 39.7 megapixels: under a 40-megapixel limit
BURST = 30

SERVER = """
import socket, sys, uvicorn
from convscope.web import create_app
app = create_app("demo_net", device="cpu", threads=1, max_pixels=40_000_000)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
"""


def big_png(side: int = SIDE) -> bytes:
    """A mostly flat palette PNG with a transparent colour: tens of megapixels in a few KB."""
    im = Image.new("P", (side, side), 0)
    im.putpalette([255, 255, 255, 200, 30, 30, 20, 60, 200] + [0] * (256 - 3) * 3)
    draw = ImageDraw.Draw(im)
    draw.rectangle((side // 5, side // 5, side // 2, side // 2), fill=1)
    draw.ellipse((side // 2, side // 3, 4 * side // 5, 2 * side // 3), fill=2)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start or the last reset) of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_burst_of_large_pixel_uploads_keeps_rss_bounded():
    data = big_png()
    assert len(data) < 100_000  # the point: a small file that decodes to 120 MB of RGB
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"

        async def burst() -> dict:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                for _ in range(600):
                    try:
                        if (await client.get("/api/info")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                small = io.BytesIO()
                Image.new("RGB", (640, 480), (10, 120, 30)).save(small, format="PNG")
                warm = await client.post("/api/image", files={"file": ("warm.png", small.getvalue(), "image/png")})
                assert warm.status_code == 200, warm.text
                await asyncio.sleep(0.3)
                before = memory_mb(proc.pid)["VmRSS"]
                exact = reset_peak(proc.pid)
                peak = [before]
                done = threading.Event()

                def sample() -> None:  # a second view of the peak where VmHWM cannot be reset
                    while not done.is_set():
                        peak.append(memory_mb(proc.pid)["VmRSS"])
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    rs = await asyncio.gather(*[client.post("/api/image", files={"file": (f"big{i}.png", data,
                                                                                          "image/png")})
                                                for i in range(BURST)])
                finally:
                    done.set()
                    sampler.join()
                if exact:
                    peak.append(memory_mb(proc.pid)["VmHWM"])
                assert [r.status_code for r in rs] == [200] * BURST, rs[0].text
                stored = await client.get(rs[0].json()["url"])
                return {"before": before, "peak": max(peak), "stored": stored,
                        "status": (await client.get("/api/status")).json()}

        got = asyncio.run(burst())
        before, peak = got["before"], got["peak"]
        assert Image.open(io.BytesIO(got["stored"].content)).size == (112, 112)
        assert got["status"]["images"] == BURST + 1 and got["status"]["memory_releases"] >= 1
        after = memory_mb(proc.pid)["VmRSS"]
        for _ in range(40):  # memory comes back within a moment of the burst
            if after <= before + 300:
                break
            time.sleep(0.05)
            after = memory_mb(proc.pid)["VmRSS"]
        print(f"RSS before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
        assert peak < 1536, f"peak RSS {peak:.0f} MB during {BURST} uploads of {SIDE}x{SIDE} (baseline {before:.0f})"
        assert after <= before + 300, f"RSS {after:.0f} MB after the burst, {before:.0f} MB before"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_default_pixel_limit_fits_the_model_and_refuses_with_413():
    assert pixel_limit(112) == 16_000_000 and pixel_limit(224) == 40_000_000
    assert 16_000_000 < pixel_limit(150) < 40_000_000
    app = create_app("demo_net", device="cpu")  # resizes to 112: 16 megapixels at most
    with TestClient(app) as client:
        assert client.get("/api/info").json()["max_pixels"] == pixel_limit(112)
        r = client.post("/api/image", files={"file": ("big.png", big_png(), "image/png")})
        assert r.status_code == 413
        msg = r.json()["error"]
        assert "\n" not in msg and "6300x6300" in msg and "16.0 megapixels" in msg and "downscale" in msg
        r = client.post("/api/frame", content=big_png(), headers={"content-type": "image/png"})
        assert r.status_code == 413 and "megapixels" in r.json()["error"]


def test_decode_reduces_while_decoding_to_a_few_times_the_model_side():
    d = Decoder(112)
    assert d.min_side == 224 and d.max_pixels == pixel_limit(112)
    for side in (1000, 3001):
        img = d.decode(big_png(side), "image/png")
        assert img.mode == "RGB" and 224 <= min(img.size) < 448 and img.width == img.height
        # the transparent background is white, the drawn shapes keep their colours
        a = np.asarray(img)
        assert (a[2, 2] == 255).all() and a[img.height * 3 // 10, img.width * 3 // 10].tolist() == [200, 30, 30]
    small = d.decode(big_png(300), "image/png")
    assert small.size == (300, 300)  # below 2x the side: kept as it is
    with pytest.raises(web_images.UploadError, match="megapixels") as info:
        Decoder(112, max_pixels=1000).decode(big_png(40), "image/png")
    assert info.value.status == 413


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"])
def test_reduced_decode_matches_converting_then_reducing(mode):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (203, 157, 4), dtype=np.uint8), "RGBA")
    im = Image.fromarray(rng.integers(0, 65536, (203, 157), dtype=np.uint16)) if mode == "I;16" else rgba.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    full = decode_rgb(io.BytesIO(buf.getvalue()))
    small = decode_rgb(io.BytesIO(buf.getvalue()), min_side=40)
    assert small.size == full.reduce(3).size == (53, 68)
    diff = np.abs(np.asarray(small, dtype=int) - np.asarray(full.reduce(3), dtype=int))
    assert diff.max() <= 1, mode


def test_reduced_decode_applies_exif_orientation():
    im = Image.new("RGB", (400, 200), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 100, 200))  # left quarter red
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the red quarter on top
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    for min_side in (None, 50):
        out = np.asarray(decode_rgb(io.BytesIO(buf.getvalue()), min_side=min_side))
        assert out.shape[:2] == ((400, 200) if min_side is None else (100, 50))
        assert out[2, out.shape[1] // 2].tolist() == [255, 0, 0] and out[-2, 2].tolist() == [0, 0, 255]


def test_at_most_slots_decodes_run_at_once(monkeypatch):
    running, most, lock = 0, 0, threading.Lock()
    real = web_images.decode_image

    def counting(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(web_images, "decode_image", counting)
    d = Decoder(16, slots=2, trim_pixels=10_000)
    data = big_png(200)
    threads = [threading.Thread(target=d.decode, args=(data, "image/png")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 2 and d.releases == 8  # every large decode handed memory back


def test_release_memory_trims_on_glibc():
    trimmed = release_memory(collect=False)
    assert isinstance(trimmed, bool)
    if platform.libc_ver()[0] == "glibc":
        assert trimmed


def test_create_app_refuses_bad_decode_settings():
    from convscope.errors import ConvscopeError

    with pytest.raises(ConvscopeError, match="decode_slots"):
        create_app("demo_net", device="cpu", decode_slots=0)
    with pytest.raises(ConvscopeError, match="max_pixels"):
        create_app("demo_net", device="cpu", max_pixels=-5)
