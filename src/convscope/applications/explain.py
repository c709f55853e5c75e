"""``convscope explain``: one attribution method on images, as overlay grids and an HTML page.

Any method of the registry (:data:`convscope.methods.registry.ATTRIBUTION_METHODS`); signed per-channel results
(gradients, guided backpropagation, IG, LRP) are shown as the signed RGB image and its channel sum, maps as jet
overlays, occlusion as a signed drop (with the strongest unit of ``layer`` beside it, Zeiler & Fergus Fig. 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.images import load_images, unique_names
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_classes, model_device, model_name
from ..core.progress import progress_bar
from ..core.render import grid, overlay, save_png, to_display
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.cam import resolve_cam_layer
from ..methods.occlusion import occlusion
from ..methods.registry import attribution_method
from ..models.predict import predict


@dataclass(frozen=True)
class ExplainRun:
    """What :func:`explain_images` wrote: the page, the grid of every image, one PNG per image, the layer used."""

    html: Path
    grid: Path
    pngs: list[Path]
    layer: str


def explain_targets(spec: str) -> int | list[int]:
    """``--target``: 'top' / 'topN' -> N (the image's N best classes); an int or a comma list -> the indices."""
    s = spec.strip().lower()
    if s == "top":
        return 1
    if s.startswith("top") and s[3:].isdigit() and int(s[3:]) >= 1:
        return int(s[3:])
    try:
        idx = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        idx = []
    if not idx:
        raise ConvscopeError(f"--target {spec!r}: use a class index (281), a comma list (281,282), 'top' or 'top5'")
    return idx


def signed_display(t: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """Signed map -> [0, 1] with 0 at 0.5, scaled by a high percentile of |value| (a few spikes saturate)."""
    scale = t.detach().float().abs().flatten().kthvalue(max(1, int(q * t.numel()))).values
    return (t / (2 * scale.clamp_min(1e-12)) + 0.5).clamp(0, 1)


def explain_one(model: nn.Module, x: torch.Tensor, method: str, targets: list[int], layer: str,
                progress: bool | None, window: int | None = None, stride: int | None = None, samples: int = 50,
                seed: int = 0) -> tuple[torch.Tensor, list[tuple[torch.Tensor, str]]]:
    """The method's result for one image: (maps K x [C x] H x W, extra (tile, label) pairs)."""
    t = torch.tensor([targets], device=x.device)
    extra: list[tuple[torch.Tensor, str]] = []
    if method == "occlusion":
        kw: dict[str, Any] = {k: v for k, v in (("window", window), ("stride", stride)) if v is not None}
        res = occlusion(model, x, t, layer=layer or None, progress=progress, **kw)
        # Zeiler & Fergus Fig. 7 (b), as a drop: red where the unit looks
        if res.strongest_unit is not None and res.unit_activation is not None and res.unit is not None:
            drop = res.unit_activation[:1, None, None, None] - res.strongest_unit[:1, None]
            extra.append((drop, f"unit {int(res.unit[0])} of {layer}"))
        return res.maps[0], extra
    options: dict[str, Any] = {"n": samples, "seed": seed} if method == "smoothgrad" else {}
    if method == "prediction-difference":  # Zintgraf et al.'s window slides like occlusion's
        options = {k: v for k, v in (("window", window), ("stride", stride)) if v is not None}
    maps = attribution_method(method).maps(model, x, t, layer=layer, **options)[0]
    if maps.shape[0] == 1 and len(targets) > 1:  # a class-agnostic method (VisualBackProp): one map for every class
        maps = maps.expand(len(targets), *maps.shape[1:])
    return maps, extra


def explain_images(model: nn.Module, files: Sequence[Path], out: Path, method: str = "gradcam", layer: str = "",
                   target: int | list[int] = 1, target_text: str = "top", window: int | None = None,
                   stride: int | None = None, samples: int = 50, seed: int = 0,
                   self_contained: bool = False) -> ExplainRun:
    """``convscope explain``: one attribution method (from the registry) on each image for its ``target`` classes
    (an int N: the image's N best classes; a list: those indices), an overlay grid per image and an HTML page."""
    entry = attribution_method(method)
    device = model_device(model)
    if entry.needs_layer:
        layer = resolve_cam_layer(model, layer)  # "" or "auto": the last spatial map before global pooling
    else:
        layer = resolve_layer(model, layer)[0] if layer else ""
    if not entry.needs_layer and method != "occlusion":
        layer = ""  # checked, but this method reads no layer
    spec = target
    denormalize = input_denormalizer(model)
    classes = model_classes(model)
    signed = entry.per_channel or method == "occlusion"
    name = model_name(model)
    rep = HtmlReport(f"convscope explain: {method} on {name}", self_contained=self_contained)
    if method == "occlusion":
        legend = ("Colour (coolwarm, 0 is grey): red where hiding the region lowers the class score (the model relies "
                  "on it), blue where hiding it raises the score." + (" The last tile is the same for the most active "
                  f"feature map of {layer}: red where hiding the region lowers its activation." if layer else ""))
    elif signed:
        legend = ("Each class shows the signed result per colour channel as an RGB image (grey is 0), then its "
                  "channel sum over the photo (coolwarm: red raises the class score, blue lowers it).")
    else:
        legend = "Colour: jet, from blue (low) to red (high), scaled per map."
    rep.text(entry.description + (f", at layer {layer!r}" if layer else "") + f"; target: {target_text}. "
             + legend)
    all_tiles: list[torch.Tensor] = []
    all_labels: list[str] = []
    ncol = 1
    pngs: list[Path] = []
    stems = unique_names(files)
    for path, stem in progress_bar(list(zip(files, stems)), desc="explain", unit="image",
                                   progress=None if len(files) > 1 else False):
        x = load_images([path], model).to(device)
        ranked = predict(model, x, k=max(5, spec if isinstance(spec, int) else 1))[0]
        if isinstance(spec, int) and len(ranked) < spec:
            raise ConvscopeError(f"--target top{spec}: the model has only {len(ranked)} classes; use "
                                 f"top{len(ranked)} or fewer")
        top = ranked[:5]
        targets = [p.index for p in ranked[:spec]] if isinstance(spec, int) else spec
        maps, extra = explain_one(model, x, method, targets, layer, None if len(files) == 1 else False, window,
                                  stride, samples, seed)
        pixels = denormalize(x).clamp(0, 1).float().cpu()
        maps = maps.detach().float().cpu()
        tiles, labels = [pixels[0]], ["input"]
        for k, c in enumerate(targets):
            cls = (classes[c] if classes is not None and c < len(classes) else f"class {c}")[:24]
            heat, alpha = maps[k], 0.5
            if heat.dim() == 3:  # per channel: the signed image itself (as in the papers), then its channel sum
                tiles.append(signed_display(heat) if heat.shape[0] == 3 else to_display(heat.sum(0)[None]))
                labels.append(f"{cls} ({method})")
                heat, alpha = heat.sum(0), 0.75  # thin structures: let the map dominate the photo
            shown = signed_display(heat) if signed else to_display(heat[None, None], "percentile", 0.0, 99.5)[0, 0]
            tiles.append(overlay(pixels, shown.reshape(1, 1, *shown.shape[-2:]), alpha=alpha,
                                 cmap="coolwarm" if signed else "jet", normalize=False)[0])
            labels.append(f"{c} {cls}")
        for t, label in extra:
            tiles.append(overlay(pixels, signed_display(t.float().cpu()), alpha=0.5, cmap="coolwarm",
                                 normalize=False)[0])
            labels.append(label)
        png = save_png(grid(tiles, nrow=len(tiles), cell_labels=labels), out / f"{stem}.{method}.png")
        pngs.append(png)
        all_tiles += tiles
        all_labels += labels
        ncol = max(ncol, len(tiles))
        rep.heading(stem, level=3)
        rep.table([[r + 1, p.index, p.name, f"{p.probability:.3f}", f"{p.logit:.2f}"] for r, p in enumerate(top)],
                  header=["rank", "class", "name", "probability", "logit"])
        rep.image(png, caption=f"{stem}: input, then {method} for classes {', '.join(map(str, targets))}")
    grid_png = save_png(grid(all_tiles, nrow=ncol, cell_labels=all_labels), out / f"grid.{method}.png")
    html = rep.write(out / f"explain.{method}.html")
    return ExplainRun(html, grid_png, pngs, layer)
