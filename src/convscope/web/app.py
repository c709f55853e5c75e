"""The live explorer: a FastAPI app over :class:`~convscope.web.service.Explorer` (``convscope serve``).

In the spirit of Yosinski et al. 2015's Deep Visualization Toolbox: pick an image (upload, bundled photo, or the
webcam), see the top-5 classes and every feature map of a layer; click a unit for its enlarged map, DeconvNet
projection and guided backpropagation, and, with an atlas, its activation-maximization image, top-9 patches and
concept label; Grad-CAM / saliency for any class; browse and search the atlas.

Robustness: the model is loaded once; all model work runs on one worker thread fed by a bounded queue (a full
queue answers ``503`` with ``Retry-After``); uploads are size-limited while they stream in (``413``), type-checked
and decoded defensively (``415`` / ``400``) with bounded memory (a few decodes at once, each reduced while it decodes,
a pixel limit sized for the model: ``413``; see :class:`~convscope.web.images.Decoder`); atlas files are served only
through :meth:`Atlas.file`, which refuses paths that leave the atlas folder, and unit numbers / file paths out of any
sane range are ``404`` before they reach the store. Bind it to ``127.0.0.1`` (the default of ``convscope serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from ..atlas.store import Atlas, AtlasError, LayerRecord, open_atlas
from ..errors import ConvscopeError
from ..models.zoo import load_model
from .images import UnknownImage, UploadError, shown
from .service import CAM_METHODS, NORMS, Explorer, UnknownLayer, atlas_file_url, atlas_record
from .worker import Busy, JobResult, ModelWorker

__all__ = ["LOOPBACK_HOSTS", "BodyLimit", "atlas_layer_record", "create_app", "unit_number"]

HERE = Path(__file__).parent
log = logging.getLogger("convscope.web")

MB = 1024 * 1024
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
FORM_SLACK = 64 * 1024  # multipart boundaries and headers on top of the file itself
MAX_INDEX_DIGITS = 9  # unit / class numbers in paths: 0 .. 999,999,999 (SQLite and torch take 64-bit ints at most)
MAX_NAME_BYTES = 255  # one path segment (NAME_MAX on Linux and macOS)
MAX_PATH_BYTES = 1024  # a whole atlas file path
INDEX = re.compile(rf"[0-9]{{1,{MAX_INDEX_DIGITS}}}")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, from ``Content-Length`` up front or
    while the body streams in (chunked uploads), before anything is buffered beyond the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        message = (f"the upload is larger than this server's limit of {self.limit / MB:.1f} MB; send a smaller "
                   "picture (or start the server with a larger --max-upload-mb)")
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _timed(job: JobResult) -> JSONResponse:
    """The job's JSON value with a ``Server-Timing`` header: queue wait, model time (a batched job's share), the
    whole job (ms; for a batch, the whole batch)."""
    value = dict(job.value)
    model_ms = 1000 * float(value.pop("model_s", 0.0))
    timing = {"queue_ms": round(1000 * job.wait_s, 2), "model_ms": round(model_ms, 2),
              "job_ms": round(1000 * job.run_s, 2), "batch": job.batch}
    value.pop("batch", None)
    value["timing"] = timing
    header = (f"queue;dur={timing['queue_ms']}, model;dur={timing['model_ms']}, "
              f"job;dur={timing['job_ms']}")
    return JSONResponse(value, headers={"Server-Timing": header, "Cache-Control": "no-store"})


def create_app(model: str | nn.Module = "efficientnet_lite0", atlas: str | os.PathLike[str] | Atlas | None = None,
               *, max_upload_bytes: int = 10 * MB, queue_size: int = 64, image_capacity: int = 128,
               max_pixels: int | None = None, decode_slots: int = 2, device: str = "auto",
               threads: int | None = None, allowed_hosts: list[str] | None = None,
               embed_images: int = 200) -> FastAPI:
    """The explorer app for ``model`` (a zoo name / spec, loaded once, or a module) and an optional atlas folder.

    ``max_upload_bytes``: largest accepted upload (413 above); ``queue_size``: model jobs allowed to wait (503
    above); ``image_capacity``: uploads kept in memory (LRU); ``max_pixels``: largest picture in pixels (413 above;
    None: :func:`~convscope.web.images.pixel_limit` of the model's input side, 16-40 megapixels);
    ``decode_slots``: pictures decoded at once (each holds its full-size decode buffer while it runs);
    ``threads``: ``torch.set_num_threads`` for the process (None: leave it); ``allowed_hosts``: accepted ``Host``
    headers (``convscope serve`` on a loopback address passes the loopback names, which stops DNS-rebinding pages
    from reading the explorer; None: any); ``embed_images``: synthetic scenes the embedding view lays out (each
    layer's embedding is computed once, on the model worker, then cached).
    """
    if not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise ConvscopeError(f"max_upload_bytes={max_upload_bytes!r}: use a positive number of bytes")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise ConvscopeError(f"max_pixels={max_pixels!r}: use a positive number of pixels (or None: sized for the "
                             "model)")
    if not isinstance(decode_slots, int) or decode_slots < 1:
        raise ConvscopeError(f"decode_slots={decode_slots!r}: use a positive int (pictures decoded at once)")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    module = load_model(model, device=device) if isinstance(model, str) else model
    name = getattr(module, "zoo_name", None) or (model if isinstance(model, str) else None)
    store = atlas if isinstance(atlas, Atlas) or atlas is None else open_atlas(atlas)
    explorer = Explorer(module, name=name, atlas=store, image_capacity=image_capacity, max_pixels=max_pixels,
                        decode_slots=decode_slots, embed_images=embed_images)
    decoder = explorer.decoder
    worker = ModelWorker(queue_size)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    atlas_model = store.meta().get("model") if store is not None else None
    atlas_warning = (f"this atlas was built for {atlas_model!r}, not {explorer.name!r}: its pictures may not "
                     "describe these units" if atlas_model and atlas_model != explorer.name else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()
        if store is not None:
            store.close()

    app = FastAPI(title="convscope explorer", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.state.explorer = explorer
    app.state.worker = worker
    app.state.atlas = store
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_SLACK)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ------------------------------------------------------------------ errors -> status codes

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(UploadError)
    async def _upload(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(UnknownImage)
    async def _unknown_image(request: Request, exc: UnknownImage) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(UnknownLayer)
    async def _unknown_layer(request: Request, exc: UnknownLayer) -> JSONResponse:
        return _error(400, str(exc), valid=exc.valid)

    @app.exception_handler(AtlasError)
    async def _atlas(request: Request, exc: AtlasError) -> Response:
        if request.url.path.startswith("/api/"):
            return _error(404, str(exc))
        return templates.TemplateResponse(request, "error.html", {**common, "message": str(exc)}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(ConvscopeError)
    async def _convscope(request: Request, exc: ConvscopeError) -> JSONResponse:
        return _error(400, str(exc))

    async def wait(request: Request, job: Future) -> JSONResponse:
        """Await a queued job; a job whose client has gone away before its turn is dropped (checked every
        0.25 s while it waits)."""
        waiting = asyncio.wrap_future(job)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return _timed(waiting.result())
            if not job.running() and await request.is_disconnected():
                job.cancel()
                return JSONResponse({"error": "client closed the request"}, status_code=499)

    async def run(request: Request, fn: Any, *args: Any) -> JSONResponse:
        """Queue ``fn(*args)`` on the model worker and await it."""
        return await wait(request, worker.submit(fn, *args))

    async def value(fn: Any, *args: Any) -> Any:
        """Queue ``fn(*args)`` on the model worker and await its value (for the pages)."""
        return (await asyncio.wrap_future(worker.submit(fn, *args))).value

    gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()

    def decode_gate() -> asyncio.Semaphore:
        """This event loop's semaphore of ``decode_slots``: uploads wait for a decode slot here, holding no
        thread (the decoder's own lock also covers webcam frames decoded on the model worker)."""
        loop = asyncio.get_running_loop()
        gate = gates.get(loop)
        if gate is None:
            gate = gates[loop] = asyncio.Semaphore(decode_slots)
        return gate

    common = {"model": explorer.name, "has_atlas": store is not None, "atlas_warning": atlas_warning}

    # ------------------------------------------------------------------ the page

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, layer: str | None = Query(None, max_length=MAX_NAME_BYTES)) -> Response:
        """The explorer; ``?layer=NAME`` opens that layer's maps (the graph view's links)."""
        if layer is not None:
            try:
                explorer.layer(layer)
            except UnknownLayer as e:
                return templates.TemplateResponse(request, "error.html", {
                    **common, "title": "Unknown layer", "message": f"{e} (the graph view links them all: /graph)"},
                    status_code=400)
        return templates.TemplateResponse(request, "explorer.html", {
            **common, "layers": explorer.layers, "default_layer": layer or explorer.default_layer,
            "bundled": explorer.bundled(), "input_size": explorer.input_size, "num_classes": explorer.num_classes,
            "cam_layer": explorer.cam_layer, "max_upload_mb": max_upload_bytes / MB, "norms": NORMS,
            "cam_methods": CAM_METHODS, "embed_images": explorer.embed_images})

    @app.get("/graph", response_class=HTMLResponse)
    async def graph_page(request: Request) -> Response:
        """The architecture graph as the layer picker: every node or block that is a layer links to its maps."""
        g = await value(explorer.graph)
        return templates.TemplateResponse(request, "graph.html", {**common, "g": g})

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {"model": explorer.name, "input_size": list(explorer.input_size), "num_classes": explorer.num_classes,
                "default_layer": explorer.default_layer, "cam_layer": explorer.cam_layer,
                "atlas": store is not None, "bundled": explorer.bundled(), "max_upload_bytes": max_upload_bytes,
                "max_pixels": decoder.max_pixels, "queue_size": queue_size}

    @app.get("/api/layers")
    async def layers() -> list[dict[str, Any]]:
        return [{"name": e.name, "type": e.type, "shape": list(e.shape), "units": e.units} for e in explorer.layers]

    @app.get("/api/status")
    async def status() -> dict[str, Any]:
        return {"pending": worker.pending, "queue_size": queue_size, "jobs_done": worker.jobs_done,
                "jobs_rejected": worker.jobs_rejected, "jobs_cancelled": worker.jobs_cancelled,
                "batches": worker.batches, "busy_s": round(worker.busy_s, 3), "images": len(explorer.images),
                "memory_releases": decoder.releases}

    @app.post("/api/image")
    async def upload(request: Request) -> dict[str, Any]:
        """A picture as multipart form field ``file`` (or as the raw body with an image content type)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8)
            try:
                part = form.get("file")
                if part is None or isinstance(part, str):
                    raise UploadError("send the picture as the multipart form field 'file'", 400)
                data, name, part_type = await part.read(), part.filename or "upload", part.content_type
            finally:
                await form.close()
        else:
            data, name, part_type = await request.body(), "upload", ctype
        async with decode_gate():
            img = await run_in_threadpool(decoder.decode, data, part_type)
        del data
        item = await run_in_threadpool(explorer.images.add, img, Path(name).name[:80] or "upload")
        return {"id": item.id, "name": item.name, "url": f"/api/images/{item.id}"}

    @app.get("/api/images/{image_id}")
    async def image(image_id: str) -> Response:
        item = await run_in_threadpool(explorer.image, image_id)
        buf = io.BytesIO()
        item.image.save(buf, format="JPEG", quality=90)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/bundled")
    async def bundled() -> list[dict[str, str]]:
        return [{"name": n, "id": f"sample-{n}", "url": f"/api/images/sample-{n}"} for n in explorer.bundled()]

    @app.get("/api/analyze")
    async def analyze(request: Request, image: str, layer: str | None = None, norm: str = "layer") -> JSONResponse:
        """Top-5 classes and (with ``layer``) the layer's activation grid, from one forward pass."""
        return await run(request, explorer.analyze, image, layer, norm)

    @app.get("/api/predict")
    async def predict(request: Request, image: str) -> JSONResponse:
        return await run(request, explorer.analyze, image, None)

    @app.get("/api/activations")
    async def activations(request: Request, image: str, layer: str | None = None,
                          norm: str = "layer") -> JSONResponse:
        return await run(request, explorer.analyze, image, layer or explorer.default_layer, norm)

    @app.post("/api/frame")
    async def frame(request: Request, layer: str | None = None, norm: str = "layer",
                    unit: int | None = Query(None, ge=0)) -> JSONResponse:
        """A webcam frame (JPEG/PNG as the raw body): predictions, activation grid and, with ``unit``, that
        unit's enlarged map, all from one forward pass. The frame is kept briefly under the returned id."""
        layer = layer or explorer.default_layer
        explorer.check_frame(layer, norm, unit)
        data = await request.body()
        item = (data, request.headers.get("content-type"), layer, norm, unit)
        return await wait(request, worker.submit_batched(("frame", layer), explorer.frame_batch, item))

    @app.get("/api/unit")
    async def unit(request: Request, image: str, layer: str, unit: int = Query(..., ge=0)) -> JSONResponse:
        return await run(request, explorer.unit, image, layer, unit)

    @app.get("/api/cam")
    async def cam(request: Request, image: str, cls: int | None = Query(None, ge=0),
                  method: str = "gradcam") -> JSONResponse:
        return await run(request, explorer.cam, image, cls, method)

    @app.get("/api/graph")
    async def graph(request: Request) -> JSONResponse:
        """The model graph (SVG with layer links, module tree as collapsible HTML, the layers and their nodes)."""
        return await run(request, explorer.graph)

    @app.get("/api/embedding")
    async def embedding(request: Request, layer: str | None = Query(None, max_length=MAX_NAME_BYTES),
                        source: str = Query("synthetic", max_length=20)) -> JSONResponse:
        """t-SNE of the layer's pooled features over synthetic scenes or the explorer's pictures (computed once per
        layer and source, then cached): points with thumbnails, labels and predicted classes."""
        layer = layer or explorer.default_layer
        explorer.layer(layer)  # a bad layer is a 400 before anything is queued
        return await run(request, explorer.embedding, layer, source)

    @app.get("/api/atlas/search")
    async def atlas_search(q: str = Query(..., min_length=1, max_length=100)) -> list[dict[str, Any]]:
        if store is None:
            raise HTTPException(404, "no atlas loaded; start the server with --atlas DIR")
        return [atlas_record(r) for r in await run_in_threadpool(store.search, q, 100)]

    # ------------------------------------------------------------------ atlas pages

    def need_atlas() -> Atlas:
        if store is None:
            raise AtlasError("no atlas loaded: start the server with `convscope serve --atlas DIR` (build one with "
                             "`convscope atlas build MODEL --out DIR`)")
        return store

    @app.get("/atlas", response_class=HTMLResponse)
    async def atlas_index(request: Request) -> Response:
        a = need_atlas()
        rows = await run_in_threadpool(_layer_summaries, a)
        return templates.TemplateResponse(request, "atlas_index.html", {**common, "layers": rows,
                                                                         "meta": a.meta()})

    @app.get("/atlas/search", response_class=HTMLResponse)
    async def atlas_search_page(request: Request, q: str = Query("", max_length=100)) -> Response:
        a = need_atlas()
        found = await run_in_threadpool(a.search, q, 200) if q.strip() else []
        layers = await run_in_threadpool(_matching_layers, a, q) if q.strip() else []
        return templates.TemplateResponse(request, "atlas_search.html", {
            **common, "q": q, "units": [atlas_record(r) for r in found], "layers": layers})

    @app.get("/atlas/files/{path:path}")
    async def atlas_file(path: str) -> FileResponse:
        a = need_atlas()
        if len(path.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in path.split("/")):
            raise HTTPException(404, f"no such atlas file: the path is too long (at most {MAX_NAME_BYTES} bytes a "
                                     f"name, {MAX_PATH_BYTES} in all); use a link from the atlas pages")
        try:
            target = a.file(path)
        except AtlasError as e:
            raise HTTPException(404, f"no such atlas file: {e}") from None
        except (OSError, ValueError):  # names the OS refuses (too long, invalid): nothing is served
            raise HTTPException(404, "no such atlas file; use a link from the atlas pages") from None
        if target.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise HTTPException(404, "the atlas serves only its pictures")
        return FileResponse(target, headers={"Cache-Control": "public, max-age=600"})

    @app.get("/atlas/{layer}", response_class=HTMLResponse)
    async def atlas_layer(request: Request, layer: str, built: bool = False) -> Response:
        a = need_atlas()
        entry = await run_in_threadpool(atlas_layer_record, a, layer)
        units = [atlas_record(r) for r in await run_in_threadpool(a.units, layer)]
        with_pictures = [u for u in units if u["am_image"] or u["top_image"]]
        names = [rec.name for rec in await run_in_threadpool(a.layers)]
        at = names.index(entry.name)
        return templates.TemplateResponse(request, "atlas_layer.html", {
            **common, "layer": entry, "units": with_pictures if built else units, "built": built,
            "n_built": len(with_pictures), "prev": names[at - 1] if at > 0 else None,
            "next": names[at + 1] if at + 1 < len(names) else None, "position": at + 1, "n_layers": len(names),
            "explorable": layer in {e.name for e in explorer.layers}})

    @app.get("/atlas/{layer}/{unit}", response_class=HTMLResponse)
    async def atlas_unit(request: Request, layer: str, unit: str) -> Response:
        a = need_atlas()
        n = (await run_in_threadpool(atlas_layer_record, a, layer)).units
        index = unit_number(unit, n, f"layer {shown(layer)}")
        rec = await run_in_threadpool(a.unit, layer, index)
        built = await run_in_threadpool(_built_units, a, layer)
        return templates.TemplateResponse(request, "atlas_unit.html", {
            **common, "u": atlas_record(rec), "n_units": n,
            "prev_built": _skip(max((u for u in built if u < index), default=None), index - 1),
            "next_built": _skip(min((u for u in built if u > index), default=None), index + 1),
            "explorable": layer in {e.name for e in explorer.layers}})

    return app


def atlas_layer_record(a: Atlas, name: str) -> LayerRecord:
    """The atlas's record of layer ``name``, or :class:`AtlasError` (404) naming its layers (a short message that
    echoes at most 40 characters of the name and never the atlas's folder)."""
    layers = a.layers()
    for rec in layers:
        if rec.name == name:
            return rec
    valid = ", ".join(rec.name for rec in layers) or "(none yet)"
    raise AtlasError(f"layer {shown(name)} is not in this atlas; its layers: {valid}")


def unit_number(text: str, count: int, where: str) -> int:
    """A unit number from a URL path segment, or :class:`AtlasError` (404) when it is not one of ``0 .. count-1``
    (huge numbers never reach SQLite, which overflows above 2**63)."""
    if not INDEX.fullmatch(text) or int(text) >= count:
        raise AtlasError(f"unit {shown(text, 24)} is not a unit of {where}; its units are 0..{count - 1}")
    return int(text)


def _skip(unit: int | None, neighbour: int) -> int | None:
    """``unit`` unless it is the neighbour the pager links anyway."""
    return None if unit == neighbour else unit


def _built_units(a: Atlas, layer: str) -> set[int]:
    """Units of ``layer`` with at least one picture (a partial or sampled atlas leaves the others empty)."""
    return a.done(layer, "am_image") | a.done(layer, "top_image")


def _matching_layers(a: Atlas, q: str) -> list[dict[str, Any]]:
    """Atlas layers whose name contains ``q`` (case-insensitive), in model order, with their units and how many
    have pictures: with dozens of layers, the search box finds a layer by name as well as units by concept."""
    text = q.strip().lower()
    return [{"name": rec.name, "units": rec.units, "built": len(_built_units(a, rec.name))}
            for rec in a.layers() if text in rec.name.lower()]


def _layer_summaries(a: Atlas) -> list[dict[str, Any]]:
    """Per atlas layer: units, shape, and how many units each build stage has filled."""
    rows = []
    for layer in a.layers():
        am = a.done(layer.name, "am_image")
        thumbs = [atlas_file_url(a.unit(layer.name, u).am_image) for u in sorted(am)[:6]]
        rows.append({"name": layer.name, "units": layer.units, "shape": "x".join(map(str, layer.shape)),
                     "am": len(am), "top": len(a.done(layer.name, "top_image")),
                     "concepts": len(a.done(layer.name, "concept")), "thumbs": thumbs})
    return rows

