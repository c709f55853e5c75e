"""What the explorer computes, as plain synchronous functions on one model (the web layer queues the calls).

:class:`Explorer` holds the model (loaded once), its spatial layers, the image store and small result caches. Its
methods return JSON-ready dicts; pictures are PNG/JPEG data URLs. Every model call goes through convscope's public
API (``probe``, ``predict``-style softmax, ``deconvnet``, ``gradcam``, ``saliency``), which leaves the model as it
came (modes, ``requires_grad``, hooks). The methods are *not* thread-safe for the model: run them on one
:class:`~convscope.web.worker.ModelWorker`.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..applications.embed_report import class_colours, synthetic_scenes
from ..applications.graph_report import graph_svg, module_tree
from ..applications.report import unit_layer
from ..atlas.store import Atlas, AtlasError
from ..core.images import PHOTO_NAMES, Preprocess, load_image, sample_images
from ..core.model import default_input_size, list_layers, model_device, model_name
from ..core.probe import probe
from ..core.render import colormap, overlay, to_display, to_pil
from ..errors import ConvscopeError, LayerNotFoundError, TargetError
from ..methods.cam import default_cam_layer
from ..methods.deconvnet import deconvnet, unit_backprop
from ..methods.embed import pooled_features, project
from ..methods.graph import model_graph
from ..methods.registry import attribution_method
from ..models.predict import rank_logits
from ..models.zoo import get_classes, get_preprocess
from .images import Decoder, ImageStore, StoredImage, shown

__all__ = ["CAM_METHODS", "EMBED_SOURCES", "NORMS", "Explorer", "GridLayout", "LayerEntry", "activation_grid",
           "colorize", "data_url", "layer_url", "unit_pictures"]

CAM_METHODS = tuple(attribution_method(n).name for n in ("gradcam", "saliency"))
"""The attribution methods the explorer offers (registry names): Grad-CAM at the CAM layer, gradient saliency."""
NORMS = ("layer", "unit")
GRID_BACKGROUND = (0.16, 0.16, 0.18)
EMBED_SOURCES = ("synthetic", "images")
"""What the embedding view lays out: held-out synthetic scenes (with their scene labels), or the explorer's own
pictures (the bundled photos and the uploads it holds)."""
EMBED_THUMB = 64  # side of the hover thumbnails (px)
EMBED_BATCH = 32  # images per forward pass of the feature pass


class UnknownLayer(LayerNotFoundError):
    """A layer the explorer does not offer; ``valid`` lists the names it does."""

    def __init__(self, message: str, valid: list[str]) -> None:
        super().__init__(message)
        self.valid = valid


@dataclass(frozen=True)
class LayerEntry:
    """A layer with a spatial output: name, module type, output shape ``(C, H, W)``."""

    name: str
    type: str
    shape: tuple[int, int, int]

    @property
    def units(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class GridLayout:
    """Where unit ``u`` is in an activation grid: row ``u // cols``, column ``u % cols``, each cell ``tile``
    pixels plus ``pad`` pixels of gap on its right and bottom; the picture is ``width x height``."""

    units: int
    cols: int
    rows: int
    tile: int
    pad: int
    width: int
    height: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- rendering helpers


def data_url(img: Image.Image, fmt: str = "PNG", quality: int = 85) -> str:
    """A PIL image as a ``data:`` URL (PNG with fast compression, or JPEG)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _tile_side(h: int, w: int, target: int = 28, largest: int = 56) -> int:
    """Tile side for maps of ``h x w``: small maps enlarged by an integer factor to about ``target`` pixels, large
    ones reduced to at most ``largest``."""
    side = max(h, w)
    if side >= largest:
        return largest
    return side * max(1, round(target / side))


@functools.cache
def _lut(name: str) -> np.ndarray:
    """``core.render``'s colormap as a ``256 x 3`` uint8 table (the web layer colours with numpy: fast path)."""
    return (colormap(name).numpy() * 255).round().astype(np.uint8)


def colorize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), as :func:`convscope.core.render.apply_colormap`."""
    idx = np.rint(np.nan_to_num(np.clip(values, 0, 1), nan=0.0) * 255).astype(np.uint8)
    return _lut(cmap)[idx]


def activation_grid(acts: torch.Tensor, norm: str = "layer", cmap: str = "inferno", pad: int = 1,
                    max_width: int = 1100) -> tuple[Image.Image, GridLayout]:
    """All feature maps of one image (``C x H x W``) as one picture: a tile per unit, in unit order.

    ``norm="layer"``: one scale for the whole layer (0 and below -> black, the layer's max -> bright; a silent unit
    stays dark, as in Yosinski et al. 2015's toolbox); ``"unit"``: each map stretched to its own min..max.
    """
    if acts.dim() != 3:
        raise ConvscopeError(f"activation_grid expects C x H x W, got {tuple(acts.shape)}")
    if norm not in NORMS:
        raise ConvscopeError(f"norm={norm!r}: use one of {', '.join(NORMS)}")
    c, h, w = acts.shape
    a = acts.detach().float().cpu()
    if norm == "layer":
        shown = (a / a.max().clamp_min(1e-12)).clamp(0, 1)
    else:
        shown = to_display(a[:, None], "minmax")[:, 0]
    t = _tile_side(h, w)
    if (h, w) != (t, t):
        mode = "nearest" if t >= max(h, w) else "area"
        shown = F.interpolate(shown[:, None], size=(t, t), mode=mode)[:, 0]
    tiles = colorize(shown.numpy(), cmap)  # C t t 3
    cols = max(1, min(c, (max_width + pad) // (t + pad), max(8, math.ceil(math.sqrt(c * 1.6)))))
    rows = math.ceil(c / cols)
    cells = np.empty((rows * cols, t + pad, t + pad, 3), dtype=np.uint8)
    cells[:] = np.array(GRID_BACKGROUND, dtype=np.float32) * 255
    cells[:c, :t, :t] = tiles
    cells[c:, :t, :t] = np.array(GRID_BACKGROUND, dtype=np.float32) * 255 * 0.6
    pic = cells.reshape(rows, cols, t + pad, t + pad, 3).transpose(0, 2, 1, 3, 4).reshape(rows * (t + pad),
                                                                                         cols * (t + pad), 3)
    img = Image.fromarray(np.ascontiguousarray(pic))
    return img, GridLayout(c, cols, rows, t, pad, img.width, img.height)


def unit_pictures(act_map: torch.Tensor, scale: float, image: Image.Image, cmap: str = "inferno",
                  alpha: float = 0.6) -> tuple[Image.Image, Image.Image]:
    """One unit's map ``h x w`` divided by ``scale`` (the layer's max): enlarged to the image's size (nearest, the
    map's own cells) and blended over the image (bilinear), as :func:`convscope.core.render.overlay` does."""
    m = (act_map.detach().float().cpu() / max(scale, 1e-12)).clamp(0, 1).numpy().astype(np.float32)
    size = image.size
    alone = Image.fromarray(colorize(m, cmap)).resize(size, Image.Resampling.NEAREST)
    smooth = np.asarray(Image.fromarray(m, mode="F").resize(size, Image.Resampling.BILINEAR))
    over = Image.blend(image.convert("RGB"), Image.fromarray(colorize(smooth, cmap)), alpha)
    return alone, over


def layer_url(name: str) -> str:
    """The explorer page showing layer ``name`` (``/?layer=NAME``, percent-encoded)."""
    return "/?layer=" + quote(name, safe="")


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _signed_picture(t: torch.Tensor) -> torch.Tensor:
    """A signed ``C x H x W`` projection for display: its 0.5-99.5th percentiles stretched to [0, 1]."""
    return to_display(t[None].float(), "percentile")[0]


# --------------------------------------------------------------------------- the explorer


class _LRU:
    """A tiny thread-safe LRU dict."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)


class Explorer:
    """The explorer's model-side work for one model (and optionally an atlas of it). ``max_pixels`` (None: sized
    for the model) and ``decode_slots`` bound how uploads and frames are decoded (:class:`~.images.Decoder`);
    ``embed_images``: how many synthetic scenes the embedding view lays out."""

    def __init__(self, model: nn.Module, name: str | None = None, atlas: Atlas | None = None,
                 image_capacity: int = 128, frame_capacity: int = 32, max_pixels: int | None = None,
                 top_k: int = 5, decode_slots: int = 2, embed_images: int = 200) -> None:
        if isinstance(embed_images, bool) or not isinstance(embed_images, int) or not 3 <= embed_images <= 5000:
            raise ConvscopeError(f"embed_images={embed_images!r}: give the number of synthetic scenes to embed, "
                                 "3..5000")
        self.model = model
        self.name = name or model_name(model)
        self.device = model_device(model)
        self.classes = get_classes(model)
        self.top_k = top_k
        pre = get_preprocess(model)
        if pre.input_size is None:  # a bare module: fix a size, keep its normalization
            side = max(default_input_size(model))
            pre = Preprocess(resize=side, crop=side, mean=pre.mean, std=pre.std)
        self.preprocess = pre
        self.input_size: tuple[int, int] = pre.input_size  # type: ignore[assignment]
        rows = list_layers(model, input_size=self.input_size)
        self.layers: list[LayerEntry] = [
            LayerEntry(r.name, r.type, r.output_shape) for r in rows
            if r.output_shape is not None and len(r.output_shape) == 3 and r.output_shape[1] * r.output_shape[2] > 1
            and r.type not in ("Sequential", "ModuleList", "ModuleDict")
        ]
        if not self.layers:
            raise ConvscopeError(f"{self.name} has no layer with a spatial feature map (C x H x W output); the "
                                 "explorer shows convolutional networks")
        self._by_name = {e.name: e for e in self.layers}
        preferred = unit_layer(model)
        self.default_layer = preferred if preferred in self._by_name else self.layers[len(self.layers) // 2].name
        n_out = self._num_outputs()
        self.num_classes = len(self.classes) if self.classes is not None else n_out
        self.cam_layer = default_cam_layer(model)
        self.atlas = atlas
        self.images = ImageStore(pre, image_capacity)
        # uploads are reduced while decoding to 2-4x the side the model resizes to; webcam frames to 1-2x
        self.side = max(pre.resize or 0, *self.input_size)
        self.decoder = Decoder(self.side, max_pixels, slots=decode_slots)
        self.max_pixels = self.decoder.max_pixels
        self.frames = ImageStore(pre, frame_capacity, prefix="f-")
        self._preds = _LRU(4 * image_capacity)
        self._acts = _LRU(16)
        self.embed_images = embed_images
        self._graph: dict[str, Any] | None = None
        self._embeds = _LRU(8)

    # ------------------------------------------------------------------ helpers

    def _num_outputs(self) -> int:
        with torch.no_grad(), probe(self.model):
            out = self.model(torch.zeros(1, 3, *self.input_size, device=self.device))
        return int(out.reshape(1, -1).shape[1])

    def layer(self, name: str) -> LayerEntry:
        """The layer entry, or :class:`UnknownLayer` naming the valid ones."""
        entry = self._by_name.get(name)
        if entry is None:
            valid = [e.name for e in self.layers]
            raise UnknownLayer(f"unknown layer {shown(name)} for {self.name}; valid layers: {', '.join(valid)}", valid)
        return entry

    def check_unit(self, layer: str, unit: int) -> LayerEntry:
        entry = self.layer(layer)
        if not 0 <= unit < entry.units:
            raise TargetError(f"unit {unit} is out of range: layer {layer!r} has {entry.units} units "
                              f"(valid 0-{entry.units - 1})")
        return entry

    def check_class(self, cls: int) -> None:
        if not 0 <= cls < self.num_classes:
            raise TargetError(f"class {cls} is out of range: {self.name} has {self.num_classes} classes "
                              f"(valid 0-{self.num_classes - 1})")

    def class_name(self, cls: int) -> str:
        return self.classes[cls] if self.classes is not None and cls < len(self.classes) else f"class {cls}"

    def image(self, image_id: str) -> StoredImage:
        """An uploaded picture or a recent webcam frame by id."""
        if image_id.startswith("f-"):
            return self.frames.get(image_id)
        if image_id.startswith("sample-"):
            return self.sample(image_id[len("sample-"):])
        return self.images.get(image_id)

    def sample(self, name: str) -> StoredImage:
        """A bundled photo (loaded on first use and kept)."""
        pid = f"sample-{name}"
        try:
            return self.images.get(pid)
        except ConvscopeError:
            pass
        found = sample_images()
        if name not in found or name not in PHOTO_NAMES:
            valid = ", ".join(n for n in PHOTO_NAMES if n in found)
            raise ConvscopeError(f"no bundled photo {shown(name)}; bundled photos: {valid}")
        return self.images.add(load_image(found[name]), name=name, pin_id=pid)

    def bundled(self) -> list[str]:
        """Names of the bundled photos available here."""
        found = sample_images()
        return [n for n in PHOTO_NAMES if n in found]

    def tensor(self, item: StoredImage) -> torch.Tensor:
        """The stored picture as a ``1 x 3 x H x W`` model input."""
        arr = torch.from_numpy(np.asarray(item.image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return self.preprocess.normalize(arr)[None].to(self.device)

    @staticmethod
    def pixels(item: StoredImage) -> torch.Tensor:
        """The stored picture as ``1 x 3 x H x W`` RGB in [0, 1]."""
        return torch.from_numpy(np.asarray(item.image, dtype=np.uint8).copy()).permute(2, 0, 1).float()[None] / 255

    def _predictions(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        return [asdict(p) for p in rank_logits(logits[None], self.classes, self.top_k)[0]]

    def _forward(self, x: torch.Tensor, layer: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: the logits of the image and (``layer``) that layer's output ``C x H x W``."""
        with torch.no_grad(), probe(self.model, layer or [], detach=True) as p:
            out = self.model(x)
        acts = p.activations[layer][0].float().cpu() if layer else None
        return out.reshape(len(x), -1)[0].float().cpu(), acts

    def _analyze(self, key: str, x: torch.Tensor, layer: str | None) -> tuple[list[dict], torch.Tensor | None, float]:
        """Predictions and (``layer``) activations of an image, from the caches or one forward pass."""
        preds = self._preds.get(key)
        acts = self._acts.get((key, layer)) if layer else None
        if preds is not None and (layer is None or acts is not None):
            return preds, acts, 0.0
        t0 = time.perf_counter()
        logits, acts = self._forward(x, layer)
        dt = time.perf_counter() - t0
        preds = self._predictions(logits)
        self._preds.put(key, preds)
        if layer:
            self._acts.put((key, layer), acts)
        return preds, acts, dt

    def _grid(self, acts: torch.Tensor, layer: str, norm: str) -> dict[str, Any]:
        img, layout = activation_grid(acts, norm)
        peak = acts.flatten(1).amax(1)
        return {"layer": layer, "norm": norm, "shape": list(acts.shape), "grid": data_url(img),
                "layout": layout.as_dict(), "max": [round(float(v), 4) for v in peak],
                "strongest": peak.topk(min(8, len(peak))).indices.tolist()}

    def _unit_map(self, acts: torch.Tensor, item: StoredImage, unit: int) -> dict[str, Any]:
        """The enlarged activation map of one unit, alone and over the image (scaled by the layer's max)."""
        m = acts[unit].float()
        alone, over = unit_pictures(m, float(acts.max()), item.image)
        flat = int(m.flatten().argmax())
        return {"unit": unit, "max": float(m.max()), "mean": float(m.mean()),
                "argmax": [flat // m.shape[1], flat % m.shape[1]], "activation": data_url(alone),
                "overlay": data_url(over)}

    # ------------------------------------------------------------------ the jobs (run them on the worker)

    def analyze(self, image_id: str, layer: str | None = None, norm: str = "layer") -> dict[str, Any]:
        """Top-k predictions and (``layer``) the activation grid of a stored image."""
        item = self.image(image_id)
        if layer:
            self.layer(layer)
        if norm not in NORMS:
            raise ConvscopeError(f"norm={norm!r}: use one of {', '.join(NORMS)}")
        preds, acts, dt = self._analyze(image_id, self.tensor(item), layer)
        out: dict[str, Any] = {"image": image_id, "predictions": preds}
        if acts is not None:
            out["activations"] = self._grid(acts, layer, norm)  # type: ignore[arg-type]
        out["model_s"] = dt
        return out

    def check_frame(self, layer: str, norm: str, unit: int | None) -> None:
        """Validate a webcam frame's options before it is queued (clear 400s, not a failed batch)."""
        self.layer(layer)
        if norm not in NORMS:
            raise ConvscopeError(f"norm={norm!r}: use one of {', '.join(NORMS)}")
        if unit is not None:
            self.check_unit(layer, unit)

    def frame_batch(self, items: list[tuple[bytes, str | None, str, str, int | None]]
                    ) -> list[dict[str, Any] | Exception]:
        """Webcam frames ``(bytes, content type, layer, norm, unit)``, all of one layer: each is stored (short-lived),
        then one batched forward pass gives every frame its predictions, activation grid and (``unit``) the unit's
        enlarged map. A frame that does not decode gets its own error; the others go on."""
        layer = items[0][2]
        if any(it[2] != layer for it in items):
            raise ConvscopeError("frame_batch() takes frames of one layer per call")
        results: list[dict[str, Any] | Exception] = []
        stored: list[tuple[int, StoredImage]] = []
        for i, (data, ctype, _, norm, unit) in enumerate(items):
            try:
                self.check_frame(layer, norm, unit)
                stored.append((i, self.frames.add(self.decoder.decode(data, ctype, min_side=self.side),
                                                  name="webcam")))
                results.append({})
            except ConvscopeError as e:
                results.append(e)
        if not stored:
            return results
        t0 = time.perf_counter()
        x = torch.cat([self.tensor(item) for _, item in stored])
        with torch.no_grad(), probe(self.model, layer, detach=True) as p:
            out = self.model(x)
        logits, acts = out.reshape(len(x), -1).float().cpu(), p.activations[layer].float().cpu()
        dt = (time.perf_counter() - t0) / len(stored)  # each frame's share of the batched pass
        for k, (i, item) in enumerate(stored):
            _, _, _, norm, unit = items[i]
            preds = self._predictions(logits[k])
            self._preds.put(item.id, preds)
            self._acts.put((item.id, layer), acts[k])
            res: dict[str, Any] = {"image": item.id, "predictions": preds, "activations": self._grid(acts[k], layer,
                                                                                                    norm)}
            if unit is not None:
                res["unit"] = self._unit_map(acts[k], item, unit)
            res.update(batch=len(stored), model_s=dt)
            results[i] = res
        return results

    def frame(self, data: bytes, content_type: str | None, layer: str, norm: str = "layer",
              unit: int | None = None) -> dict[str, Any]:
        """One webcam frame (see :meth:`frame_batch`)."""
        out = self.frame_batch([(data, content_type, layer, norm, unit)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def unit(self, image_id: str, layer: str, unit: int) -> dict[str, Any]:
        """One unit on one image: its enlarged activation map (alone and over the image), its DeconvNet projection
        (Zeiler & Fergus 2014) and its guided backpropagation (Springenberg et al. 2015), both from the unit's
        strongest activation; plus its atlas record when there is one."""
        self.check_unit(layer, unit)
        item = self.image(image_id)
        x = self.tensor(item)
        _, acts, dt = self._analyze(image_id, x, layer)
        t0 = time.perf_counter()
        proj = deconvnet(self.model, x, layer, units=[unit], mode="max")[0, 0]
        guided = self._guided_unit(x, layer, unit)
        dt += time.perf_counter() - t0
        out = self._unit_map(acts, item, unit)  # type: ignore[arg-type]
        out.update(layer=layer, image=image_id, deconv=data_url(to_pil(_signed_picture(proj))),
                   guided=data_url(to_pil(_signed_picture(guided))), silent=bool(out["max"] <= 0),
                   atlas=self.atlas_unit(layer, unit), model_s=dt)
        return out

    def _guided_unit(self, x: torch.Tensor, layer: str, unit: int) -> torch.Tensor:
        """Guided backpropagation from the strongest activation of ``unit`` of ``layer`` to the input pixels."""
        return unit_backprop(self.model, x[:1], layer, [unit], rule="guided")[0, 0].detach().cpu()

    def cam(self, image_id: str, cls: int | None = None, method: str = "gradcam") -> dict[str, Any]:
        """Grad-CAM (Selvaraju et al. 2017, at the last feature map) or gradient saliency (Simonyan et al. 2014)
        for class ``cls`` (default: the top class), over the image."""
        if method not in CAM_METHODS:
            raise ConvscopeError(f"method={method!r}: use one of {', '.join(CAM_METHODS)}")
        item = self.image(image_id)
        x = self.tensor(item)
        if cls is None:
            preds, _, _ = self._analyze(image_id, x, None)
            cls = int(preds[0]["index"])
        self.check_class(cls)
        t0 = time.perf_counter()
        entry = attribution_method(method)
        maps = entry.maps(self.model, x, cls, layer=self.cam_layer)[:, :1].detach().float().cpu()  # 1 x 1 x H x W
        dt = time.perf_counter() - t0
        if method == "saliency":  # gradients are spiky: clip at the 99th percentile before colouring
            maps = to_display(maps, "percentile", lo=0.0, hi=99.0)
        pic = overlay(self.pixels(item), maps, alpha=0.5, cmap="jet", normalize=method == "gradcam")[0]
        return {"image": image_id, "class": cls, "name": self.class_name(cls), "method": method,
                "layer": self.cam_layer if entry.needs_layer else None, "overlay": data_url(to_pil(pic)),
                "model_s": dt}

    # ------------------------------------------------------------------ whole-model views

    def graph(self) -> dict[str, Any]:
        """The model's computation graph (:func:`~convscope.methods.graph.model_graph`, traced once at the explorer's
        input size, then cached) as the explorer shows it: the SVG of
        :func:`~convscope.applications.graph_report.graph_svg` and the collapsible module tree
        (:func:`~convscope.applications.graph_report.module_tree`), where every node or container frame that is one
        of the explorer's layers links to that layer's view (:func:`layer_url`); and each layer with the graph
        nodes (or frame) it is drawn as."""
        if self._graph is not None:
            return {**self._graph, "model_s": 0.0}
        t0 = time.perf_counter()
        g = model_graph(self.model, self.input_size)
        dt = time.perf_counter() - t0
        names = {e.name for e in self.layers}
        drawn: dict[str, list[str]] = {e.name: [] for e in self.layers}
        links: dict[str, str] = {}
        for n in g.module_calls:
            if n.module in names:
                links[n.name] = layer_url(n.module)
                drawn[n.module].append(n.name)
        for group in g.groups:
            if group in names:  # a container layer (a residual block, a stage): its frame
                links[group] = layer_url(group)
                drawn[group].append(group)
        layers = [{"name": e.name, "type": e.type, "shape": list(e.shape), "units": e.units, "url": layer_url(e.name),
                   "nodes": drawn[e.name]} for e in self.layers]
        self._graph = {"model": self.name, "input_shape": list(g.input_shape), "nodes": len(g.nodes),
                       "module_calls": len(g.module_calls), "joins": len(g.joins), "params": g.params,
                       "svg": graph_svg(g, links), "tree": module_tree(g, links), "layers": layers}
        return {**self._graph, "model_s": dt}

    def embed_inputs(self, source: str) -> tuple[torch.Tensor, torch.Tensor | None, list[str], list[str | None],
                                                  dict[int, str]]:
        """The pictures the embedding view lays out (see :data:`EMBED_SOURCES`), in the model's input space:
        ``(x, labels or None, image names, image ids or None, label names)``."""
        if source == "synthetic":
            from ..data.synthetic import HELD_OUT_START

            x, labels, label_names = synthetic_scenes(self.model, self.embed_images, seed=0, progress=False,
                                                      size=min(self.input_size))
            names = [f"synthetic #{HELD_OUT_START + i}" for i in range(len(x))]
            return x, labels, names, [None] * len(x), dict(enumerate(label_names))
        items = [self.sample(n) for n in self.bundled()] + self.images.items()
        if len(items) < 3:
            raise ConvscopeError(f"the explorer holds {len(items)} picture(s); a t-SNE embedding needs at least 3: "
                                 "upload more pictures or use source=synthetic")
        x = torch.cat([self.tensor(it) for it in items])
        return x, None, [it.name for it in items], [it.id for it in items], {}

    def embedding(self, layer: str, source: str = "synthetic") -> dict[str, Any]:
        """The t-SNE embedding (van der Maaten & Hinton 2008) of ``layer``'s global-average-pooled features
        (:func:`~convscope.methods.embed.pooled_features`, :func:`~convscope.methods.embed.project`, as
        ``convscope embed``) over ``source``'s pictures: each point with its 2-D position, a thumbnail, its label
        (synthetic scenes) and the model's predicted class, coloured by label (else prediction). Computed once per
        layer and source (for ``images``: per set of pictures held), then cached."""
        self.layer(layer)
        if source not in EMBED_SOURCES:
            raise ConvscopeError(f"source={shown(source)}: use one of {', '.join(EMBED_SOURCES)}")
        ids = None if source == "synthetic" else tuple(n for n in self.bundled()) + tuple(
            it.id for it in self.images.items())
        key = (layer, source, self.embed_images if ids is None else ids)
        cached = self._embeds.get(key)
        if cached is not None:
            return {**cached, "cached": True, "model_s": 0.0}
        x, labels, names, image_ids, label_names = self.embed_inputs(source)
        t0 = time.perf_counter()
        pooled = pooled_features(self.model, layer, x, batch_size=EMBED_BATCH, progress=False, predict=True,
                                 thumbnail=EMBED_THUMB)
        t1 = time.perf_counter()
        coords = project(pooled.features, "tsne", seed=0)
        t2 = time.perf_counter()
        preds = pooled.predictions
        colour_by = labels if labels is not None else preds
        colours = class_colours(colour_by)
        thumbs = pooled.thumbnails
        points = []
        for i in range(len(coords)):
            lab = int(labels[i]) if labels is not None else None
            pred = int(preds[i]) if preds is not None else None
            c = colour_by[i] if colour_by is not None else None
            thumb = data_url(Image.fromarray(thumbs[i].permute(1, 2, 0).numpy()), "JPEG", 80) if thumbs is not None \
                else None
            points.append({"x": round(float(coords[i, 0]), 4), "y": round(float(coords[i, 1]), 4), "name": names[i],
                           "image": image_ids[i], "label": lab,
                           "label_name": None if lab is None else label_names.get(lab, f"class {lab}"),
                           "prediction": pred, "prediction_name": None if pred is None else self.class_name(pred),
                           "colour": _hex(colours[int(c)]) if c is not None else "#5a5a5a", "thumbnail": thumb})
        legend = []
        if colour_by is not None:
            for cls in sorted(colours):
                name = label_names.get(cls, f"class {cls}") if labels is not None else self.class_name(cls)
                legend.append({"class": cls, "name": name, "colour": _hex(colours[cls]),
                               "count": int((colour_by == cls).sum())})
        out = {"layer": layer, "source": source, "method": "tsne", "seed": 0, "n": len(points),
               "features": int(pooled.features.shape[1]), "coloured_by": "label" if labels is not None else
               "prediction", "points": points, "legend": legend, "feature_s": round(t1 - t0, 4),
               "tsne_s": round(t2 - t1, 4)}
        self._embeds.put(key, out)
        return {**out, "cached": False, "model_s": t1 - t0}

    # ------------------------------------------------------------------ atlas

    def atlas_unit(self, layer: str, unit: int) -> dict[str, Any] | None:
        """The atlas record of a unit with URLs of its pictures, ``{"missing": reason}``, or None (no atlas)."""
        if self.atlas is None:
            return None
        try:
            rec = self.atlas.unit(layer, unit)
        except AtlasError as e:
            return {"missing": str(e)}
        return atlas_record(rec)


def atlas_file_url(relpath: str | None) -> str | None:
    """The explorer URL of an atlas picture (``/atlas/files/...``), segments percent-encoded."""
    if not relpath:
        return None
    from urllib.parse import quote

    return "/atlas/files/" + quote(relpath, safe="/")


def atlas_record(rec: Any) -> dict[str, Any]:
    """A :class:`~convscope.atlas.store.UnitRecord` as JSON with picture URLs."""
    # the page shows where each top activation came from by file name, never the server's folders
    top = [{**t, "source": PurePath(str(t["source"])).name} if t.get("source") else dict(t) for t in rec.top]
    return {"layer": rec.layer, "unit": rec.unit, "am_image": atlas_file_url(rec.am_image),
            "am_activation": rec.am_activation, "top_image": atlas_file_url(rec.top_image), "top": top,
            "max_activation": rec.max_activation, "concept": rec.concept, "category": rec.category,
            "iou": rec.iou, "detector": rec.detector}
