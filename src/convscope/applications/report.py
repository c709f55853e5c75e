"""The main job: an HTML report of what a model sees in a set of photos.

For each image: top-5 predictions, Grad-CAM overlays for the top classes (Selvaraju et al. 2017), and for a
middle layer the units that fire most, each shown as its activation map over every image (a units x images
grid, in the spirit of Yosinski et al. 2015's per-unit views). PNGs are written beside a self-contained HTML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.images import load_images, sample_images
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.probe import probe
from ..core.render import grid, overlay, save_png
from ..core.report import HtmlReport
from ..core.targets import top_k
from ..methods.cam import default_cam_layer, gradcam
from ..models.predict import predict

# A middle layer per zoo model for the unit views; other models use the middle of their conv layers.
UNIT_LAYERS = {"efficientnet_lite0": "blocks.10", "efficientnet_lite1": "blocks.14", "efficientnet_lite2": "blocks.14",
               "demo_net": "features.relu3"}


@dataclass
class ReportResult:
    """Where the report went and what it found."""

    html: Path
    pngs: list[Path] = field(default_factory=list)
    predictions: list[list[dict]] = field(default_factory=list)


def unit_layer(model: nn.Module) -> str:
    """The layer whose units the report shows."""
    name = UNIT_LAYERS.get(getattr(model, "zoo_name", ""), "")
    if name:
        return name
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[len(convs) // 2] if convs else default_cam_layer(model)


def build_report(model: nn.Module, paths: list[Path] | None = None, out: Path = Path("out"), cam_layer: str = "",
                 layer: str = "", top_classes: int = 3, n_units: int = 8, progress: bool = True) -> ReportResult:
    """Write ``out/report.html`` plus PNGs for ``paths`` (default: the bundled photos)."""
    out = Path(out)
    if not paths:
        photos = sample_images()
        paths = [p for name, p in photos.items() if name not in ("brick", "grass", "gravel")]
    names = [Path(p).stem for p in paths]
    pre = model.preprocess if hasattr(model, "preprocess") else None
    x = load_images(list(paths), model).to(next(model.parameters()).device)
    pixels = pre.denormalize(x).clamp(0, 1).cpu() if pre is not None else x.clamp(0, 1).cpu()
    cam_layer = resolve_layer(model, cam_layer)[0] if cam_layer else default_cam_layer(model)
    layer = resolve_layer(model, layer)[0] if layer else unit_layer(model)
    steps = tqdm(total=3, desc="report", disable=not progress)

    preds = predict(model, x, k=5)
    steps.update()
    maps = gradcam(model, x, top_k(top_classes), layer=cam_layer).cpu()  # one batched call: N x K x H x W
    steps.update()
    with torch.no_grad(), probe(model, layer, detach=True) as p:
        p.forward(model, x)
        acts = p.activations[layer].float().cpu()
    steps.update()
    steps.close()

    result = ReportResult(html=out / "report.html")
    rep = HtmlReport(f"convscope report: {getattr(model, 'zoo_name', type(model).__name__)}")
    rep.text(f"{len(paths)} images. Grad-CAM at layer {cam_layer!r}; unit views at layer {layer!r}.")
    rep.heading("Predictions and Grad-CAM")
    for i, name in enumerate(names):
        labels = [f"{pr.name} ({pr.probability:.1%})" for pr in preds[i][:top_classes]]
        tiles = overlay(pixels[i : i + 1].expand(top_classes, -1, -1, -1), maps[i][:, None], alpha=0.5)
        png = save_png(grid(torch.cat([pixels[i : i + 1], tiles]), nrow=top_classes + 1,
                            cell_labels=["input", *labels]), out / "gradcam" / f"{name}.png")
        result.pngs.append(png)
        rep.heading(name, level=3)
        rep.table([[r + 1, pr.name, f"{pr.probability:.3f}", f"{pr.logit:.2f}"] for r, pr in enumerate(preds[i])],
                  header=["rank", "class", "probability", "logit"])
        rep.image(png, caption=f"{name}: input and Grad-CAM for its top {top_classes} classes")

    units = _strongest_units(acts, n_units)
    rep.heading(f"Units of {layer} that fire most on these images")
    peak = acts.flatten(2).amax(dim=(0, 2)).clamp_min(1e-12) if acts.dim() == 4 else None
    tiles = torch.cat([overlay(pixels, acts[:, u : u + 1].clamp_min(0) / peak[u], alpha=0.6, cmap="inferno",
                               normalize=False) for u in units]) if peak is not None else pixels
    png = save_png(grid(tiles, nrow=len(names), row_labels=[f"unit {u}" for u in units], col_labels=names),
                   out / "units.png")
    result.pngs.append(png)
    rep.image(png, caption=f"rows: the {len(units)} units of {layer} with the highest peak activation; "
                           "columns: images; colour: the unit's activation, scaled by its peak over all images "
                           "(so a dark "
                           "tile means the unit is silent on that image)")
    result.predictions = [[{"index": pr.index, "name": pr.name, "probability": pr.probability} for pr in row]
                          for row in preds]
    atomic_write_text(out / "predictions.json",
                      json.dumps(dict(zip(names, result.predictions)), indent=1))
    rep.write(result.html)
    return result


def _strongest_units(acts: torch.Tensor, n: int) -> list[int]:
    """The ``n`` units with the highest peak activation over the batch."""
    peak = acts.flatten(2).amax(dim=2).amax(dim=0) if acts.dim() == 4 else acts.amax(dim=0)
    return peak.topk(min(n, peak.numel())).indices.tolist()
