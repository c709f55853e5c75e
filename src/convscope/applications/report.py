"""The main job: an HTML report of what a model sees in a set of photos.

For each image: top-5 predictions, Grad-CAM overlays for the top classes (Selvaraju et al. 2017), and for a
middle layer the units that fire most, each shown as its activation map over every image (a units x images
grid, in the spirit of Yosinski et al. 2015's per-unit views). PNGs are written beside the HTML page, which links
them (or embeds them: ``self_contained=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.images import SAMPLE_PREFIX, expand_inputs, load_images, unique_names
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_name, zoo_name
from ..core.probe import probe
from ..core.progress import progress_bar
from ..core.render import fit_text, grid, load_font, overlay, save_png
from ..core.report import HtmlReport
from ..core.targets import top_k
from ..methods.cam import default_cam_layer, gradcam, resolve_cam_layer
from ..models.predict import predict

# A middle layer per zoo model for the unit views; other models use the middle of their conv layers.
UNIT_LAYERS = {"efficientnet_lite0": "blocks.10", "efficientnet_lite1": "blocks.14", "efficientnet_lite2": "blocks.14",
               "demo_net": "features.relu3"}


@dataclass
class ReportResult:
    """Where the report went and what it found: the page, the PNGs it shows, the top-5 predictions per image, the
    images read and the name each is reported (and its files are named) under."""

    html: Path
    pngs: list[Path] = field(default_factory=list)
    predictions: list[list[dict]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def unit_layer(model: nn.Module) -> str:
    """The layer whose units the report shows."""
    name = UNIT_LAYERS.get(zoo_name(model), "")
    if name:
        return name
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[len(convs) // 2] if convs else default_cam_layer(model)


def report_images(paths: Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    """The images a report covers: files, folders and ``sample:NAME`` expanded in order (default: the bundled
    photos, without the textures)."""
    return expand_inputs([os.fspath(p) for p in paths] if paths else [f"{SAMPLE_PREFIX}all"])


def build_report(model: nn.Module, paths: Sequence[str | os.PathLike[str]] | None = None, out: Path = Path("out"),
                 cam_layer: str = "", layer: str = "", top_classes: int = 3, n_units: int = 8,
                 progress: bool | None = True, self_contained: bool = False, batch_size: int = 16) -> ReportResult:
    """Write ``out/report.html``, ``out/gradcam/<name>.png`` per image, ``out/units.png`` and
    ``out/predictions.json`` for ``paths`` (files, folders, ``sample:NAME``; default: the bundled photos).

    Images are named by :func:`~convscope.core.images.unique_names` (a bundled photo by its sample name), so two
    ``a.png`` from different folders get ``a`` and ``a_2``. The page links the PNGs; ``self_contained`` embeds them.
    """
    out = Path(out)
    files = report_images(paths)
    names = unique_names(files)
    x = load_images(files, model)
    dev = next(model.parameters()).device
    cam_layer = resolve_cam_layer(model, cam_layer)
    layer = resolve_layer(model, layer)[0] if layer else unit_layer(model)
    preds, maps, acts = [], [], []
    for chunk in progress_bar(x.split(batch_size), desc="report", unit="batch", progress=progress):
        chunk = chunk.to(dev)
        preds += predict(model, chunk, k=5)
        maps.append(gradcam(model, chunk, top_k(top_classes), layer=cam_layer).float().cpu())  # n x K x H x W
        with torch.no_grad(), probe(model, layer, detach=True) as p:
            p.forward(model, chunk)
            acts.append(p.activations[layer].float().cpu())
    cams, unit_acts = torch.cat(maps), torch.cat(acts)
    pixels = input_denormalizer(model)(x).clamp(0, 1).float().cpu()
    k = cams.shape[1]  # top_classes, at most the number of classes

    result = ReportResult(html=out / "report.html", images=files, names=names)
    rep = HtmlReport(f"convscope report: {model_name(model)}",
                     self_contained=self_contained)
    rep.text(f"{len(files)} images. Grad-CAM at layer {cam_layer!r}; unit views at layer {layer!r}.")
    rep.heading("Predictions and Grad-CAM")
    for i, (name, path) in enumerate(zip(names, files)):
        labels = [f"{pr.name} ({pr.probability:.1%})" for pr in preds[i][:k]]
        tiles = overlay(pixels[i : i + 1].expand(k, -1, -1, -1), cams[i][:, None], alpha=0.5)
        png = save_png(grid(torch.cat([pixels[i : i + 1], tiles]), nrow=k + 1, cell_labels=["input", *labels]),
                       out / "gradcam" / f"{name}.png")
        result.pngs.append(png)
        rep.heading(name, level=3)
        rep.text(f"file: {path}")
        rep.table([[r + 1, pr.name, f"{pr.probability:.3f}", f"{pr.logit:.2f}"] for r, pr in enumerate(preds[i])],
                  header=["rank", "class", "probability", "logit"])
        rep.image(png, caption=f"{name}: input and Grad-CAM for its top {k} classes")

    units = _strongest_units(unit_acts, n_units)
    rep.heading(f"Units of {layer} that fire most on these images")
    if unit_acts.dim() == 4:
        png = save_png(_unit_grid(pixels, unit_acts, units, names), out / "units.png")
        result.pngs.append(png)
        rep.image(png, caption=f"rows: the {len(units)} units of {layer} with the highest peak activation; "
                               "columns: images; colour: the unit's activation, scaled by its peak over all images "
                               "(so a dark tile means the unit is silent on that image)")
    else:  # a layer without positions: its activations as numbers
        rep.table([[f"unit {u}", *[float(unit_acts[i, u]) for i in range(len(names))]] for u in units],
                  header=["unit", *names])
    result.predictions = [[{"index": pr.index, "name": pr.name, "probability": pr.probability} for pr in row]
                          for row in preds]
    atomic_write_text(out / "predictions.json",
                      json.dumps(dict(zip(names, result.predictions)), indent=1))
    rep.write(result.html)
    return result


def _unit_grid(pixels: torch.Tensor, acts: torch.Tensor, units: list[int], names: list[str],
               thumb: int = 112, font_size: int = 12) -> Image.Image:
    """Units x images: each unit's activation over each image, scaled by the unit's peak over all images. With more
    than 8 images the tiles shrink to ``thumb`` pixels; column names are shortened to the tile width."""
    if len(names) > 8 and pixels.shape[-1] > thumb:
        size = (round(pixels.shape[-2] * thumb / pixels.shape[-1]), thumb)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    peak = acts.flatten(2).amax(dim=(0, 2)).clamp_min(1e-12)
    tiles = torch.cat([overlay(pixels, acts[:, u : u + 1].clamp_min(0) / peak[u], alpha=0.6, cmap="inferno",
                               normalize=False) for u in units])
    font = load_font(font_size)
    cols = [fit_text(font, n, pixels.shape[-1]) or n[:1] for n in names]
    return grid(tiles, nrow=len(names), row_labels=[f"unit {u}" for u in units], col_labels=cols,
                font_size=font_size)


def _strongest_units(acts: torch.Tensor, n: int) -> list[int]:
    """The ``n`` units with the highest peak activation over the batch."""
    peak = acts.flatten(2).amax(dim=2).amax(dim=0) if acts.dim() == 4 else acts.amax(dim=0)
    return peak.topk(min(n, peak.numel())).indices.tolist()
