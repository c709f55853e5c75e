"""``convscope deconv`` / ``filters`` / ``evolution``: the DeconvNet views of Zeiler & Fergus (2014) as files.

* :func:`deconv_report` (their Fig. 2): one streaming top-k pass over a dataset, then for the chosen units the
  DeconvNet projections of their k strongest activations beside the image patches under the receptive fields.
  Writes ``deconv_<layer>.png``, ``deconv.html`` and ``deconv.json`` (unit, rank, image, location, value).
* :func:`filters_report` (Krizhevsky et al. 2012 Fig. 3; Zeiler & Fergus Fig. 5/6): the first-layer filters and
  the dead units (never active over the dataset) of every convolution and ReLU layer. Writes ``filters.png``,
  ``filters.html`` and ``dead_units.json``.
* :func:`evolution` (their Fig. 4, survey Sec. 4.3.3): the projection of each chosen unit's strongest activation
  over the dataset, for every training checkpoint: one grid, rows = units, columns = epochs. Writes
  ``evolution_<layer>.png`` and ``evolution.json``.

The dataset is an :class:`ImageSet`: image files (loaded a batch at a time), held-out synthetic images (rendered
once, kept as uint8, from index ``HELD_OUT_START`` on, never used by ``train-demo``) or a tensor. Defaults:
the bundled photos for ImageNet models, 500 synthetic images for ``demo_net``. Every file is written atomically.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from ..core.images import expand_inputs, load_images, sample_images
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, input_normalizer, lenient_preprocess, model_name, zoo_name
from ..core.progress import progress_bar
from ..core.render import DisplayMode, grid, save_png, to_display, to_pil
from ..core.report import HtmlReport
from ..core.stream import layer_features
from ..data.synthetic import HELD_OUT_START, render_arrays
from ..errors import ConvscopeError
from ..methods.deconvnet import deconvnet
from ..methods.filters import first_conv, first_layer_filters
from ..methods.topk import TopKActivations, dead_units, render_top_k, top_k_activations, top_k_patches
from ..models.zoo import load_model, load_weights

DEFAULT_SYNTHETIC = 500
TEXTURES = ("brick", "grass", "gravel")


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class ImageSet:
    """A dataset addressed by integer ids: ``load(ids)`` gives the model inputs ``n x C x H x W``.

    ``names[i]`` names image ``i`` in reports. Only a batch at a time is loaded for files.
    """

    names: list[str]
    load: Callable[[Sequence[int]], torch.Tensor]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for s in range(0, len(self), batch_size):
            yield self.load(range(s, min(s + batch_size, len(self))))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The images of ``ids`` (what ``top_k_patches`` asks for)."""
        return self.load([int(i) for i in ids])


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def file_images(paths: Sequence[str | Path], model: nn.Module) -> ImageSet:
    """Image files or folders, preprocessed by the model's own transform, loaded a batch at a time."""
    files = expand_inputs(list(paths))
    dev = _device(model)
    first = load_images(files[:1], model)  # fail early on unreadable files / undefined sizes

    def load(ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        if ids == [0]:
            return first.to(dev)
        return load_images([files[i] for i in ids], model).to(dev)

    return ImageSet([str(f) for f in files], load, f"{len(files)} image files")


def synthetic_images(model: nn.Module, n: int = DEFAULT_SYNTHETIC, seed: int = 0, start: int = HELD_OUT_START,
                     progress: bool = True) -> ImageSet:
    """``n`` held-out synthetic scenes (``convscope.data.synthetic``), at the model's input size, in its input
    space (its ``preprocess``; RGB in [0, 1] without one)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"--synthetic {n!r}: give a positive number of images")
    size = lenient_preprocess(model).input_size or (112, 112)
    if size[0] != size[1]:
        raise ConvscopeError(f"synthetic images are square; the model's input is {size[0]} x {size[1]}")
    arrays = render_arrays(start, n, size[0], seed, workers=2, progress=progress)
    pixels = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).contiguous()  # uint8, 3 bytes a pixel
    norm = input_normalizer(model)
    dev = _device(model)

    def load(ids: Sequence[int]) -> torch.Tensor:
        return norm(pixels[list(ids)].float().div_(255)).to(dev)

    return ImageSet([f"synthetic #{start + i}" for i in range(n)], load, f"{n} held-out synthetic images")


def tensor_images(x: torch.Tensor, model: nn.Module) -> ImageSet:
    """A tensor of images already in the model's input space."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ConvscopeError("images: give a float tensor N x C x H x W in the model's input space, paths, or a folder")
    dev = _device(model)
    return ImageSet([f"image {i}" for i in range(len(x))], lambda ids: x[list(ids)].to(dev), f"{len(x)} images")


def default_images(model: nn.Module, images: torch.Tensor | Sequence[str | Path] | ImageSet | None = None,
                   synthetic: int | None = None, progress: bool = True) -> ImageSet:
    """The dataset to scan: ``images`` when given (paths, folders or a tensor), else ``synthetic`` synthetic images
    when given, else the synthetic set for ``demo_net`` and the bundled photos for every other model."""
    if synthetic is not None and (isinstance(synthetic, bool) or not isinstance(synthetic, int) or synthetic < 1):
        raise ConvscopeError(f"--synthetic {synthetic!r}: give a positive number of images")
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, torch.Tensor):
        return tensor_images(images, model)
    if images:
        if synthetic:
            raise ConvscopeError("give either --images or --synthetic, not both")
        return file_images(list(images), model)
    if synthetic is not None or zoo_name(model) == "demo_net":
        return synthetic_images(model, synthetic or DEFAULT_SYNTHETIC, progress=progress)
    photos = [p for name, p in sample_images().items() if name not in TEXTURES]
    if not photos:
        raise ConvscopeError("no bundled photos found (they come with scikit-image / scikit-learn); pass --images DIR")
    return file_images(photos, model)


# --------------------------------------------------------------------------- units


def parse_units(spec: str) -> list[int]:
    """``"0-15"``, ``"1,5,9"`` or a mix (``"0-3,8"``) -> unit indices, in order, without repeats."""
    out: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConvscopeError(f"--units {spec!r}: use a range (0-15), a list (1,5,9) or both (0-3,8), "
                                 "non-negative, ranges low-high")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        out += [u for u in range(lo, hi + 1) if u not in out]
    return out


def layer_units(model: nn.Module, layer: str, x: torch.Tensor) -> int:
    """How many units (channels) ``layer`` has, from one forward pass of ``x[:1]``."""
    act = layer_features(model, x[:1], layer)[layer]
    if not isinstance(act, torch.Tensor) or act.dim() not in (2, 4):
        shape = tuple(act.shape) if isinstance(act, torch.Tensor) else "nothing"
        raise ConvscopeError(f"layer {layer!r} outputs {shape}; pick a convolutional (N x C x H x W) or linear layer "
                             "(`convscope layers MODEL` lists them)")
    return int(act.shape[1])


def check_units(units: Sequence[int], n: int, layer: str) -> list[int]:
    units = [int(u) for u in units]
    if not units:
        raise ConvscopeError("units: give at least one unit")
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise ConvscopeError(f"unit {bad[0]} is out of range: layer {layer!r} has {n} units (valid 0-{n - 1})")
    return units


def strongest_units(result: TopKActivations, n: int) -> list[int]:
    """The ``n`` units with the highest dataset maximum (top-1 activation), strongest first."""
    return result.values[:, 0].topk(min(n, result.values.shape[0])).indices.tolist()


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConvscopeError(f"--top {k!r}: give a positive number of activations per unit")
    return k


def _model_name(model: nn.Module) -> str:
    return model_name(model)


# --------------------------------------------------------------------------- deconv (Fig. 2)


@dataclass(frozen=True)
class DeconvRun:
    """The top-k result, the units shown and the files written."""

    layer: str
    units: list[int]
    result: TopKActivations
    png: Path
    html: Path
    json: Path


def _map_figure(model: nn.Module, images: ImageSet, result: TopKActivations, units: list[int], display: str,
                batch_size: int) -> Image.Image:
    """``mode="map"``: per unit the projections of its whole feature map in its k top images | those images."""
    k = result.values.shape[1]
    ids = result.image_ids[units].reshape(-1).cpu()
    x = images(ids)
    table = torch.tensor(units).repeat_interleave(k)[:, None]
    proj = deconvnet(model, x, result.layer, table, mode="map", batch_size=batch_size)[:, 0]
    pixels = input_denormalizer(model)(x).clamp(0, 1).float().cpu()
    shown = to_display(proj.float().cpu(), cast(DisplayMode, display))  # to_display refuses other modes
    nrow = math.ceil(math.sqrt(k))
    blocks = []
    for j in range(len(units)):
        blocks.append(grid(list(shown[j * k:(j + 1) * k]), nrow=nrow, padding=1))
        blocks.append(grid(list(pixels[j * k:(j + 1) * k]), nrow=nrow, padding=1))
    return grid(blocks, nrow=2, padding=4, row_labels=[f"unit {u}" for u in units],
                col_labels=["deconvnet (whole map)", "images"])


def deconv_report(model: nn.Module, images: torch.Tensor | Sequence[str | Path] | ImageSet | None = None,
                  layer: str = "", units: Sequence[int] | None = None, k: int = 9, out: Path = Path("out/deconv"),
                  n_units: int = 16, mode: str = "max", synthetic: int | None = None, display: str = "percentile",
                  batch_size: int = 32, progress: bool = True) -> DeconvRun:
    """Zeiler & Fergus Fig. 2 for ``layer``: per unit the DeconvNet projections of its ``k`` strongest activations
    over the dataset beside the image patches under their receptive fields.

    Args:
        images: paths / folders, a tensor in the model's input space, or None for the defaults
            (see :func:`default_images`; ``synthetic`` asks for that many synthetic images).
        units: the units to show; default the ``n_units`` with the highest top-1 activation.
        mode: ``"max"``: project each activation alone, crops of the receptive field (the paper);
            ``"map"``: project the unit's whole feature map in each top image, whole images.
        display: how projections are scaled for display (``to_display``): ``"percentile"`` (0.5 / 99.5
            percentiles to black / white: a few strong pixels do not wash out the rest) or ``"signed"`` (0 is grey,
            symmetric by the largest magnitude).
    """
    out = Path(out)
    k = _check_k(k)
    if mode not in ("max", "map"):
        raise ConvscopeError(f"--mode {mode!r}: use 'max' (the strongest activation) or 'map' (the whole feature map)")
    if display not in ("percentile", "signed"):
        raise ConvscopeError(f"--display {display!r}: use 'percentile' or 'signed'")
    layer = resolve_layer(model, layer)[0]
    data = default_images(model, images, synthetic, progress)
    n_all = layer_units(model, layer, data.load([0]))
    if units is not None:
        units = check_units(units, n_all, layer)
    found = top_k_activations(model, data.batches(batch_size), layer, k=k, progress=False)[layer]
    units = list(units) if units is not None else strongest_units(found, n_units)
    if mode == "max":
        img = render_top_k(model, data, found, units=units, display=display, batch_size=batch_size)
    else:
        img = _map_figure(model, data, found, units, display, batch_size)
    stem = layer.replace("/", "_")
    png = save_png(img, out / f"deconv_{stem}.png")
    kk = found.values.shape[1]
    rows = [{"unit": u, "rank": r, "image": data.names[int(found.image_ids[u, r])],
             "image_id": int(found.image_ids[u, r]), "location": [int(v) for v in found.locations[u, r]],
             "value": float(found.values[u, r])} for u in units for r in range(kk)]
    json_path = atomic_write_text(out / "deconv.json", json.dumps({
        "model": _model_name(model), "layer": layer, "mode": mode, "k": kk, "images": data.source,
        "images_seen": found.images_seen, "units": units, "activations": rows}, indent=1))
    rep = HtmlReport(f"convscope deconv: {_model_name(model)}, layer {layer}")
    how = ("each projection is the DeconvNet reconstruction (Zeiler & Fergus 2014) of that one activation alone, "
           "cropped, like the patch beside it, to the activation's receptive field"
           if mode == "max" else "each projection reconstructs the unit's whole feature map in that image")
    scaled = ("scaled per projection from its 0.5th to 99.5th percentile (about grey at 0)" if display == "percentile"
              else "grey is 0, scaled by the largest magnitude")
    rep.text(f"The {kk} strongest activations of {len(units)} units of {layer!r} over {data.source} "
             f"({found.images_seen} images; one image counts once per unit). Left: {how}; {scaled}: the structure "
             "shows which input pattern excites the unit. Right: the image patches (strongest first, row by row).")
    if not any(isinstance(m, nn.MaxPool2d) for m in model.modules()):
        rep.text("This network has no max pooling. The DeconvNet's only image-dependent step is unpooling through "
                 "the max-pooling switches (its rectification acts on the backward signal), so here a projection "
                 "depends only on the unit and the position of the activation, not on the image: the projections "
                 "of one unit look alike. The patches carry the information.")
    rep.image(png, caption=f"deconv_{stem}.png")
    rep.table([[u, f"{float(found.values[u, 0]):.3g}", f"{float(found.values[u, -1]):.3g}",
                data.names[int(found.image_ids[u, 0])]] for u in units],
              header=["unit", "top-1 activation", f"top-{kk} activation", "top-1 image"])
    html = rep.write(out / "deconv.html")
    return DeconvRun(layer, units, found, png, html, json_path)


# --------------------------------------------------------------------------- filters and dead units


@dataclass(frozen=True)
class FiltersRun:
    """The first-layer filter picture, the dead units per layer (``rows``: layer, type, relu, units, dead,
    fraction) and the files written."""

    layer: str
    dead: dict[str, list[int]]
    rows: list[dict]
    png: Path
    html: Path
    json: Path


def activation_layers(model: nn.Module) -> list[str]:
    """Every convolution and ReLU / ReLU6 layer, in definition order."""
    kinds = (nn.Conv2d, nn.ReLU, nn.ReLU6)
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds)]


def filters_report(model: nn.Module, out: Path = Path("out/filters"),
                   images: torch.Tensor | Sequence[str | Path] | ImageSet | None = None,
                   synthetic: int | None = None, layers: Sequence[str] | None = None, tol: float = 0.0,
                   batch_size: int = 8, progress: bool = True) -> FiltersRun:
    """First-layer filters (``filters.png``) and a table of dead units (never above ``tol`` over the dataset) for
    every convolution and ReLU layer (``dead_units``: one streaming pass for all layers)."""
    out = Path(out)
    conv = first_conv(model)
    stem = resolve_layer(model, conv)[1]
    assert isinstance(stem, nn.Conv2d), "first_conv names an nn.Conv2d"
    weight = stem.weight
    scale = max(4, 64 // max(weight.shape[-2:]))
    png = save_png(first_layer_filters(model, conv, scale=scale), out / "filters.png")
    layers = list(layers) if layers else activation_layers(model)
    data = default_images(model, images, synthetic, progress)
    dead = dead_units(model, data.batches(batch_size), layers, tol=tol, progress=False)
    types = dict(model.named_modules())
    rows: list[dict[str, Any]] = [
        {"layer": n, "type": type(types[n]).__name__, "relu": isinstance(types[n], nn.ReLU | nn.ReLU6),
         "units": len(d.max_activation), "dead": d.units.tolist(), "fraction": d.fraction}
        for n, d in dead.items()]
    json_path = atomic_write_text(out / "dead_units.json", json.dumps({
        "model": _model_name(model), "images": data.source, "tol": tol, "layers": rows}, indent=1))
    rep = HtmlReport(f"convscope filters: {_model_name(model)}")
    rep.text(f"The filters of the first convolution {conv!r} ({tuple(weight.shape)}), each scaled by its own "
             "largest absolute weight, grey is 0 (Krizhevsky et al. 2012 Fig. 3; Zeiler & Fergus 2014 Fig. 5-6).")
    rep.image(png, caption="first-layer filters")
    relu = [r for r in rows if r["relu"]]
    rep.heading("Dead units")
    rep.text(f"Units whose activation never exceeds {tol:g} at any position of {data.source}: "
             f"{sum(len(r['dead']) for r in relu)} of {sum(r['units'] for r in relu)} units at the {len(relu)} ReLU "
             "layers pass nothing on for these images. At a convolution followed by batch norm a never-positive "
             "output is not dead (the normalization shifts it); there the count only says the output is never "
             "positive.")
    rep.table([[r["layer"], r["type"], r["units"], len(r["dead"]), f"{r['fraction']:.1%}",
                ", ".join(map(str, r["dead"][:20])) + (" ..." if len(r["dead"]) > 20 else "")] for r in rows],
              header=["layer", "type", "units", "dead", "fraction", "dead units"])
    html = rep.write(out / "filters.html")
    return FiltersRun(conv, {r["layer"]: r["dead"] for r in rows}, rows, png, html, json_path)


# --------------------------------------------------------------------------- training evolution (Fig. 4)


def checkpoint_paths(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files: the given files, and for a folder its ``epoch_XX.pt`` files in epoch order."""
    items = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("epoch_*.pt"), key=lambda f: (_epoch_of(f) is None, _epoch_of(f) or 0, f.name))
            if not found:
                raise ConvscopeError(f"{p}: no epoch_XX.pt checkpoints in this folder (`convscope train-demo` writes "
                                     "them); pass the folder of a training run or checkpoint files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ConvscopeError(f"checkpoint {str(p)!r} does not exist; pass a folder of epoch_XX.pt or .pt files")
    if not out:
        raise ConvscopeError("evolution: give at least one checkpoint")
    return out


def _epoch_of(path: Path) -> int | None:
    m = re.fullmatch(r"epoch_(\d+)", path.stem)
    return int(m.group(1)) if m else None


def checkpoint_label(path: Path) -> str:
    e = _epoch_of(path)
    return f"epoch {e}" if e is not None else path.stem


def load_checkpoint(architecture: str | nn.Module, path: Path, device: str = "auto") -> nn.Module:
    """The architecture with the checkpoint's weights: a zoo name / model spec (``load_model(spec, weights=path)``)
    or a module, which is copied (the original keeps its weights)."""
    if isinstance(architecture, nn.Module):
        model = load_weights(copy.deepcopy(architecture), path)
        return model.eval()
    return load_model(architecture, weights=path, device=device)


def projection_column(model: nn.Module, images: ImageSet | Callable[[torch.Tensor], torch.Tensor],
                      result: TopKActivations, units: Sequence[int], batch_size: int = 32,
                      display: str = "percentile") -> list[Image.Image]:
    """One picture per unit: the DeconvNet projections of its top activations in ``result`` (``k`` of them, a small
    grid), cropped to the receptive field, scaled by ``to_display(display)``."""
    found = top_k_patches(model, images, result, units=list(units), projections=True, batch_size=batch_size)
    k = result.values.shape[1]
    cells = []
    mode = cast(DisplayMode, display)  # to_display refuses other modes
    for crops in found.projections or []:
        shown = [to_display(c[None].float().cpu(), mode)[0] for c in crops]
        cells.append(grid(shown, nrow=math.ceil(math.sqrt(k)), padding=1) if k > 1 else to_pil(shown[0]))
    return cells


def evolution_grid(columns: Sequence[Sequence[Image.Image]], units: Sequence[int], labels: Sequence[str],
                   target: int = 64) -> Image.Image:
    """Rows = units, columns = checkpoints: ``columns[e][j]`` is unit ``units[j]`` at checkpoint ``e``."""
    side = max(max(c.width, c.height) for col in columns for c in col)
    scale = max(1, target // side)
    cells = [columns[e][j] for j in range(len(units)) for e in range(len(columns))]
    if scale > 1:
        cells = [c.resize((c.width * scale, c.height * scale), Image.Resampling.NEAREST) for c in cells]
    return grid(cells, nrow=len(columns), padding=2, row_labels=[f"unit {u}" for u in units], col_labels=list(labels))


@dataclass(frozen=True)
class EvolutionRun:
    """The units shown, the checkpoints (column labels), the per-checkpoint top-k results, the grid's cells
    (``cells[checkpoint][unit]``) and the files."""

    layer: str
    units: list[int]
    labels: list[str]
    results: list[TopKActivations]
    cells: list[list[Image.Image]]
    png: Path
    json: Path


def evolution(checkpoints: str | Path | Sequence[str | Path], layer: str, units: Sequence[int] | None = None,
              images: torch.Tensor | Sequence[str | Path] | ImageSet | None = None, k: int = 1,
              out: Path = Path("out/evolution"), architecture: str | nn.Module = "demo_net", n_units: int = 8,
              synthetic: int | None = None, device: str = "auto", batch_size: int = 32,
              progress: bool = True) -> EvolutionRun:
    """The evolution of features during training (Zeiler & Fergus 2014 Fig. 4; survey Sec. 4.3.3).

    For every checkpoint (files, or a folder of ``epoch_XX.pt``) the weights are loaded into ``architecture``;
    each unit's ``k`` strongest activations over the dataset (one streaming top-k pass) are projected down by the
    DeconvNet (one batched call for all units). Default units: the ``n_units`` strongest of the LAST checkpoint.
    The dataset is rendered / listed once and shared by all checkpoints; one checkpoint's model is in memory at a
    time and the top-k pass keeps ``k x units`` values, so memory does not grow with the dataset.
    Writes ``evolution_<layer>.png`` (rows = units, columns = epochs) and ``evolution.json``.
    """
    out = Path(out)
    k = _check_k(k)
    paths = checkpoint_paths(checkpoints)
    labels = [checkpoint_label(p) for p in paths]
    last = load_checkpoint(architecture, paths[-1], device)
    layer = resolve_layer(last, layer)[0]
    data = default_images(last, images, synthetic, progress)
    n_all = layer_units(last, layer, data.load([0]))
    if units is not None:
        units = check_units(units, n_all, layer)
    results: dict[int, TopKActivations] = {}
    results[len(paths) - 1] = top_k_activations(last, data.batches(batch_size), layer, k=k, progress=False)[layer]
    units = list(units) if units is not None else strongest_units(results[len(paths) - 1], n_units)
    columns: dict[int, list[Image.Image]] = {}
    columns[len(paths) - 1] = projection_column(last, data, results[len(paths) - 1], units, batch_size)
    del last
    for e in progress_bar(range(len(paths) - 1), desc="checkpoints", unit="ckpt",
                          progress=progress if len(paths) > 2 else False):
        model = load_checkpoint(architecture, paths[e], device)
        if layer_units(model, layer, data.load([0])) != n_all:
            raise ConvscopeError(f"{paths[e]}: layer {layer!r} has a different number of units than in "
                                 f"{paths[-1]}; give checkpoints of one architecture")
        results[e] = top_k_activations(model, data.batches(batch_size), layer, k=k, progress=False)[layer]
        columns[e] = projection_column(model, data, results[e], units, batch_size)
    order = range(len(paths))
    img = evolution_grid([columns[e] for e in order], units, labels)
    stem = layer.replace("/", "_")
    png = save_png(img, out / f"evolution_{stem}.png")
    rows = [{"checkpoint": str(paths[e]), "label": labels[e], "units": [
        {"unit": u, "activations": [{"image": data.names[int(results[e].image_ids[u, r])],
                                      "location": [int(v) for v in results[e].locations[u, r]],
                                      "value": float(results[e].values[u, r])}
                                     for r in range(results[e].values.shape[1])]} for u in units]} for e in order]
    json_path = atomic_write_text(out / "evolution.json", json.dumps({
        "layer": layer, "units": units, "k": k, "images": data.source, "checkpoints": rows}, indent=1))
    return EvolutionRun(layer, units, labels, [results[e] for e in order], [columns[e] for e in order], png,
                        json_path)


__all__ = ["DeconvRun", "EvolutionRun", "FiltersRun", "ImageSet", "activation_layers", "check_units",
           "checkpoint_paths", "deconv_report", "default_images", "evolution", "evolution_grid", "file_images",
           "filters_report", "layer_units", "load_checkpoint", "parse_units", "projection_column",
           "strongest_units", "synthetic_images", "tensor_images"]
