#!/usr/bin/env python
"""Load test of the live explorer (``convscope serve``): 50 concurrent clients against one server process.

    python benchmarks/serve_load.py --quick          # ~40 s: 10 s of load after start-up and warm-up
    python benchmarks/serve_load.py                  # 60 s of load (what the lead reports, on a quiet machine)

The server runs in its own process (``python -m convscope.cli serve``, uvicorn, one model worker). Clients are
asyncio tasks on one ``httpx.AsyncClient``, each with one request in flight at a time, in two kinds:

* **photo** clients (60 %) replay a user session: upload a photo (a bundled photo, randomly cropped and flipped,
  so every upload is new), ``analyze`` (top-5 + activation grid of the default layer), ``cam`` (Grad-CAM),
  ``unit`` (a random unit: enlarged map, DeconvNet, guided backprop), ``analyze`` of another layer, ``unit``;
* **webcam** clients (40 %) post 320x240 JPEG frames (``/api/frame`` with a selected unit) back to back.

Reported per endpoint: requests, requests/s, latency p50/p95/p99 (client side, wall clock), the server's
model-only time per request (the ``model`` entry of ``Server-Timing``: forward/backward passes only, no queueing,
decoding or PNG encoding) and latency / model time; overall: requests/s, errors (non-2xx other than 503), 503s
(answered with ``Retry-After``; the client waits and retries) and the model-bound rate (requests / total model
seconds: what one worker could serve if only the model cost time). Writes ``benchmarks/results/serve.json`` and
prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import convscope as cs  # noqa: E402
from convscope.core.images import PHOTO_NAMES  # noqa: E402
from harness import atomic_write, describe_machine, load_average, machine_info, md_table  # noqa: E402

LAYERS = {"efficientnet_lite0": ["blocks.3", "blocks.5", "blocks.10", "blocks.13", "head.act"],
          "demo_net": ["features.relu2", "features.relu3", "features.relu5"]}
MODEL_DUR = re.compile(r"model;dur=([0-9.]+)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", help="zoo model the server loads (default lite0)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of measured load (default 60; --quick 10)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of unmeasured load first (default 10; "
                                                                "--quick 3)")
    ap.add_argument("--webcam-share", type=float, default=0.4, help="fraction of webcam clients (default 0.4)")
    ap.add_argument("--queue-size", type=int, default=64, help="server --queue-size (default 64)")
    ap.add_argument("--threads", type=int, default=0, help="server --threads (default: its own choice)")
    ap.add_argument("--quick", action="store_true", help="10 s of load after 3 s of warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve.json", help="JSON results")
    args = ap.parse_args(argv)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    return args


# --------------------------------------------------------------------------------------------- inputs


def _jpeg(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_inputs(rng: random.Random, n: int = 24) -> tuple[list[bytes], list[bytes]]:
    """Photos (random crops/flips of the bundled photos, ~640 px) and 320x240 webcam-like frames, as JPEG."""
    photos = [cs.load_image(p) for name, p in cs.sample_images().items() if name in PHOTO_NAMES]
    uploads, frames = [], []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop.thumbnail((640, 640))
        uploads.append(_jpeg(crop))
        frames.append(_jpeg(ImageOps.fit(crop, (320, 240)), quality=80))
    return uploads, frames


# --------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "convscope.cli", "serve", "--model", args.model, "--device", "cpu", "--port",
           str(port), "--queue-size", str(args.queue_size), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log("server: " + " ".join(cmd[2:]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                return (await c.get("/api/info")).json()
            except httpx.HTTPError:
                await asyncio.sleep(0.25)
    raise SystemExit(f"the server did not answer within {timeout} s")


# --------------------------------------------------------------------------------------------- the clients


class Recorder:
    """Latencies, model times and status codes per endpoint, counted only inside the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.model: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.failures: list[str] = []

    def add(self, name: str, seconds: float, r: httpx.Response | None, error: str | None = None) -> None:
        if not self.measuring:
            return
        code = r.status_code if r is not None else 0
        self.codes[name][code] += 1
        if r is not None and r.status_code < 300:
            self.lat[name].append(seconds)
            m = MODEL_DUR.search(r.headers.get("server-timing", ""))
            self.model[name].append(float(m.group(1)) / 1000 if m else 0.0)
        elif code != 503 and len(self.failures) < 20:
            self.failures.append(f"{name}: {code} {error or (r.text[:200] if r is not None else '')}")


async def call(client: httpx.AsyncClient, rec: Recorder, name: str, method: str, url: str, **kw: Any) -> Any:
    """One request; a 503 waits for Retry-After and tries again (each try is counted)."""
    while True:
        t0 = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError as e:
            rec.add(name, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}")
            return None
        rec.add(name, time.perf_counter() - t0, r)
        if r.status_code == 503:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            continue
        return r.json() if r.status_code < 300 else None


async def photo_client(client: httpx.AsyncClient, rec: Recorder, rng: random.Random, uploads: list[bytes],
                       layers: list[str], default: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        up = await call(client, rec, "upload", "POST", "/api/image",
                        files={"file": ("photo.jpg", rng.choice(uploads), "image/jpeg")})
        if up is None:
            continue
        image = up["id"]
        a = await call(client, rec, "analyze", "GET", "/api/analyze", params={"image": image, "layer": default})
        await call(client, rec, "cam", "GET", "/api/cam", params={"image": image})
        units = a["activations"]["layout"]["units"] if a else 16
        await call(client, rec, "unit", "GET", "/api/unit",
                   params={"image": image, "layer": default, "unit": rng.randrange(units)})
        other = rng.choice(layers)
        a = await call(client, rec, "analyze", "GET", "/api/analyze", params={"image": image, "layer": other})
        units = a["activations"]["layout"]["units"] if a else 16
        await call(client, rec, "unit", "GET", "/api/unit",
                   params={"image": image, "layer": other, "unit": rng.randrange(units)})


async def webcam_client(client: httpx.AsyncClient, rec: Recorder, rng: random.Random, frames: list[bytes],
                        default: str, stop: asyncio.Event) -> None:
    unit = rng.randrange(16)
    while not stop.is_set():
        await call(client, rec, "frame", "POST", "/api/frame", params={"layer": default, "unit": unit},
                   content=rng.choice(frames), headers={"content-type": "image/jpeg"})


async def load(args: argparse.Namespace, base: str, info: dict[str, Any]) -> tuple[Recorder, float, dict, dict]:
    rng = random.Random(args.seed)
    uploads, frames = make_inputs(rng)
    layers = LAYERS.get(args.model, [info["default_layer"]])
    rec, stop = Recorder(), asyncio.Event()
    limits = httpx.Limits(max_connections=args.clients + 5, max_keepalive_connections=args.clients + 5)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        n_cam = round(args.clients * args.webcam_share)
        tasks = [asyncio.create_task(webcam_client(client, rec, random.Random(rng.random()), frames,
                                                   info["default_layer"], stop)) for _ in range(n_cam)]
        tasks += [asyncio.create_task(photo_client(client, rec, random.Random(rng.random()), uploads, layers,
                                                   info["default_layer"], stop)) for _ in range(args.clients - n_cam)]
        log(f"load: {args.clients} clients ({n_cam} webcam, {args.clients - n_cam} photo); warm-up {args.warmup:g} s")
        await asyncio.sleep(args.warmup)
        before = (await client.get("/api/status")).json()
        rec.measuring = True
        t0 = time.perf_counter()
        log(f"measuring for {args.duration:g} s")
        await asyncio.sleep(args.duration)
        rec.measuring = False
        elapsed = time.perf_counter() - t0
        after = (await client.get("/api/status")).json()
        stop.set()
        await asyncio.wait(tasks, timeout=120)
        for t in tasks:
            t.cancel()
    return rec, elapsed, before, after


# --------------------------------------------------------------------------------------------- report


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(rec: Recorder, elapsed: float, before: dict, after: dict) -> dict[str, Any]:
    rows, total, errors, busy = {}, 0, 0, 0
    for name in sorted(set(rec.codes)):
        codes = rec.codes[name]
        n = sum(codes.values())
        ok = sum(c for k, c in codes.items() if 200 <= k < 300)
        n503 = codes.get(503, 0)
        err = n - ok - n503
        lat, model = rec.lat[name], rec.model[name]
        total += n
        errors += err
        busy += n503
        rows[name] = {"requests": n, "ok": ok, "errors": err, "busy_503": n503, "rps": ok / elapsed,
                      "p50_ms": 1000 * pct(lat, 50), "p95_ms": 1000 * pct(lat, 95), "p99_ms": 1000 * pct(lat, 99),
                      "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
                      "model_p50_ms": 1000 * pct(model, 50),
                      "model_mean_ms": 1000 * statistics.fmean(model) if model else None,
                      "latency_over_model": (pct(lat, 50) / pct(model, 50)) if model and pct(model, 50) > 0 else None}
    ok_all = sum(r["ok"] for r in rows.values())
    model_s = sum(sum(rec.model[n]) for n in rows)
    worker_busy = after["busy_s"] - before["busy_s"]
    return {"elapsed_s": elapsed, "requests": total, "ok": ok_all, "rps": ok_all / elapsed, "errors": errors,
            "busy_503": busy, "model_s": model_s, "model_bound_rps": ok_all / model_s if model_s else None,
            "worker_busy_fraction": worker_busy / elapsed,
            "worker_jobs": after["jobs_done"] - before["jobs_done"],
            "server_rejected": after["jobs_rejected"] - before["jobs_rejected"], "endpoints": rows,
            "failures": rec.failures}


def table(s: dict[str, Any]) -> str:
    def f(v: float | None, d: int = 1) -> str:
        return "–" if v is None or v != v else f"{v:.{d}f}"

    rows = [[n, r["requests"], f(r["rps"], 2), f(r["p50_ms"], 0), f(r["p95_ms"], 0), f(r["p99_ms"], 0),
             f(r["model_p50_ms"]), f(r["latency_over_model"]), r["errors"], r["busy_503"]]
            for n, r in s["endpoints"].items()]
    rows.append(["**all**", s["requests"], f(s["rps"], 2), "", "", "", "", "", s["errors"], s["busy_503"]])
    return md_table(["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "model p50 ms",
                     "p50 / model", "errors", "503"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    la0 = load_average()
    proc = start_server(args, port)
    try:
        info = asyncio.run(wait_ready(base, proc))
        rec, elapsed, before, after = asyncio.run(load(args, base, info))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    s = summarize(rec, elapsed, before, after)
    threads = args.threads or max(1, min(4, len(os.sched_getaffinity(0))))
    machine = machine_info(torch.device("cpu"), threads, "tuned")
    machine.update(loadavg_start=la0, loadavg_end=load_average())
    result = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "model": args.model,
              "clients": args.clients, "webcam_share": args.webcam_share, "duration_s": args.duration,
              "warmup_s": args.warmup, "queue_size": args.queue_size, "quick": args.quick, "machine": machine,
              **s}
    atomic_write(args.out, json.dumps(result, indent=1))
    print(f"\n### Explorer under {args.clients} concurrent clients ({args.model}, {elapsed:.0f} s"
          f"{', --quick' if args.quick else ''})\n")
    print(table(s))
    mb = s["model_bound_rps"]
    print(f"\n{s['rps']:.2f} requests/s answered; model-bound rate {mb:.2f} requests/s (requests / model seconds), "
          f"so the server reaches {s['rps'] / mb:.0%} of it; the model worker was busy {s['worker_busy_fraction']:.0%} "
          f"of the time. Errors: {s['errors']}; 503s: {s['busy_503']}." if mb else "")
    print(f"\nMachine: {describe_machine(machine)}. JSON: {args.out}")
    for f in s["failures"]:
        print("failure:", f)
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
