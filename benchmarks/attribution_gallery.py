#!/usr/bin/env python
"""Draw the docs picture of every registered attribution method: ``docs/img/attribution_all_{lite0,demo}.png``.

One grid per model, rows = images, columns = the methods of ``ATTRIBUTION_METHODS`` (a method added to the
registry appears here without a change), each map as an overlay on its image, the top class of each image:

* ``efficientnet_lite0`` on three bundled photos (``cs.sample_images()``: chelsea, rocket, coffee);
* ``demo_net`` on four held-out synthetic scenes (``render_arrays`` from ``HELD_OUT_START``, the ``off-centre``
  evaluation set: the first four images of distinct scene classes, whatever the net predicts).

Display: per-channel results (``N x K x C x H x W``) as ``max_c |.|`` (as ``convscope evaluate attribution``
scores them); maps with negative values (occlusion, prediction difference) as signed maps (coolwarm, 0 is grey,
red = evidence for the class); the others with jet from their 0.5th to 99.5th percentile.

Each method runs once on the model's batch of images (that call's maps are drawn); methods under 5 s run twice
more and the median of the three is reported, divided by the batch size, as the time per image, and as a multiple
of the plain input gradient's time in the same run (less sensitive to a busy machine). One untimed gradient call
warms the model up first. On a machine other jobs keep busy use ``--threads 1``: with 2 threads on 2 oversubscribed
cores a lite0 forward took 8 s instead of 0.3 s (each OpenMP barrier waits for a descheduled thread). Prints a
Markdown table of the times and the machine's load.

    python benchmarks/attribution_gallery.py --threads 1     # both models (17 min on 2 busy cores)
    python benchmarks/attribution_gallery.py --models demo_net --methods lrp scorecam --out /tmp/gallery
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import convscope as cs
from convscope.applications.evaluate import EVAL_SETS
from convscope.core.model import input_denormalizer, model_classes
from convscope.core.render import grid, load_font, overlay, save_png, text_size, to_display, to_pil
from convscope.data.synthetic import HELD_OUT_START, render_arrays
from convscope.methods.cam import default_cam_layer
from convscope.methods.registry import ATTRIBUTION_METHODS, AttributionMethod

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea", "rocket", "coffee")
SCENES = 4
TILE = 160  # pixels per tile side in the picture
REPEAT_UNDER_S = 5.0  # a method whose first call took less is timed twice more (median of 3)
SHORT = {"efficientnet_lite0": "lite0", "demo_net": "demo"}

# Modest settings so that the whole script runs in minutes; every other method runs with its defaults.
OPTIONS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n": 16},
    "occlusion": {"window": 16, "stride": 8},
    "integrated-gradients": {"steps": 32, "method": "adaptive"},
    "scorecam": {"batch_size": 64},
    "prediction-difference": {"window": 16, "samples": 4},  # stride: image side / 14 (PD_GRID windows a side)
}
PD_GRID = 14  # prediction difference: about 14 x 14 windows per image (stride 8 at 112 px, 16 at 224 px)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(entry: AttributionMethod, side: int) -> dict[str, Any]:
    """The options this script passes to ``entry`` for images ``side`` px wide (progress bars off where the method
    has one)."""
    opts = dict(OPTIONS.get(entry.name, {}))
    if entry.name == "prediction-difference":
        opts["stride"] = max(1, side // PD_GRID)
    if "progress" in inspect.signature(entry.function).parameters:
        opts["progress"] = False
    return opts


def photo_inputs(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """The bundled photos through the model's preprocess; row names."""
    return cs.load_images([cs.sample_image(n) for n in PHOTOS], model), list(PHOTOS)


def scene_inputs(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """The first ``SCENES`` held-out off-centre scenes of distinct classes, in the model's input space."""
    size = int(model.preprocess.input_size[0])
    arrays = render_arrays(HELD_OUT_START, 4 * SCENES, size, progress=False, config=EVAL_SETS["off-centre"])
    classes = model_classes(model) or ()
    picked: list[int] = []
    for i, c in enumerate(arrays.scenes.tolist()):
        if c not in [int(arrays.scenes[j]) for j in picked]:
            picked.append(i)
        if len(picked) == SCENES:
            break
    pixels = torch.from_numpy(np.ascontiguousarray(arrays.images[picked])).permute(0, 3, 1, 2).float() / 255
    names = [f"#{HELD_OUT_START + i} ({classes[int(arrays.scenes[i])]})" for i in picked]
    return model.preprocess.normalize(pixels), names


def run_method(entry: AttributionMethod, model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, float]:
    """The method's top-class maps of the batch (``N x H x W``) and its seconds per image."""
    opts = settings(entry, int(x.shape[-1]))
    times = []
    maps = None
    for _ in range(3):
        t0 = time.perf_counter()
        out = entry.maps(model, x, cs.top_class, layer=layer, **opts)
        times.append(time.perf_counter() - t0)
        maps = out if maps is None else maps
        if times[0] >= REPEAT_UNDER_S:
            break
    assert maps is not None
    maps = maps.detach().float()[:, 0]  # top class: N x [C x] H x W
    if entry.per_channel:
        maps = maps.abs().amax(1)
    return maps, statistics.median(times) / x.shape[0]


def tiles_of(pixels: torch.Tensor, maps: torch.Tensor) -> list[torch.Tensor]:
    """Overlays ``3 x H x W`` of ``maps`` (``N x h x w``) on ``pixels``: signed maps in coolwarm, others in jet."""
    if bool((maps < 0).any()):
        scale = maps.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
        shown, cmap = (maps / (2 * scale) + 0.5).clamp(0, 1), "coolwarm"
    else:
        shown, cmap = to_display(maps[:, None], "percentile", 0.5, 99.5)[:, 0], "jet"
    return list(overlay(pixels, shown[:, None], alpha=0.5, cmap=cmap, normalize=False))


def not_applicable(pixels: torch.Tensor) -> torch.Tensor:
    """A pale copy of the image with "n/a" written on it: the method does not apply to this model."""
    img = to_pil(0.25 * pixels + 0.75)
    draw = ImageDraw.Draw(img)
    font = load_font(max(10, img.width // 8))
    w, h = text_size(font, "n/a")
    draw.text(((img.width - w) // 2, (img.height - h) // 2), "n/a", fill=(90, 90, 90), font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def resize(tile: torch.Tensor) -> torch.Tensor:
    return F.interpolate(tile[None], size=(TILE, TILE), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def gallery(model_name: str, methods: list[str], out: Path) -> list[tuple[str, float | None]]:
    """Draw one model's grid into ``out``; returns (method, seconds per image) in column order."""
    model = cs.load_model(model_name)
    x, rows = photo_inputs(model) if model_name != "demo_net" else scene_inputs(model)
    layer = default_cam_layer(model)
    pixels = input_denormalizer(model)(x).clamp(0, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)
    p, top = probs.max(1)
    classes = model_classes(model) or ()
    labels = [f"{classes[int(c)][:18] if int(c) < len(classes) else c} {float(q):.2f}" for c, q in zip(top, p)]
    cs.gradient(model, x[:1])  # untimed warm-up: the first backward pass of a process is slower
    columns: list[list[torch.Tensor]] = [list(pixels)]
    timing: list[tuple[str, float | None]] = []
    for name in methods:
        entry = ATTRIBUTION_METHODS[name]
        try:
            maps, per_image = run_method(entry, model, x, layer)
        except cs.ConvscopeError as exc:  # a method that does not apply to this model (CAM without GAP): say so
            log(f"  {SHORT[model_name]} {name}: not applicable: {exc}")
            columns.append([not_applicable(pixels[i]) for i in range(x.shape[0])])
            timing.append((name, None))
            continue
        log(f"  {SHORT[model_name]} {name}: {per_image * 1e3:.0f} ms/image")
        columns.append(tiles_of(pixels, maps))
        timing.append((name, per_image))
    cells, cell_labels = [], []
    for i in range(x.shape[0]):
        for j, col in enumerate(columns):
            cells.append(resize(col[i]))
            cell_labels.append(labels[i] if j == 0 else "")
    img = grid(cells, nrow=len(columns), row_labels=rows, col_labels=["input (top class)", *methods],
               cell_labels=cell_labels, font_size=12)
    # a 256-colour palette keeps the picture small enough for the docs
    path = save_png(img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE),
                    out / f"attribution_all_{SHORT[model_name]}.png")
    log(f"wrote {path} (layer for the CAMs: {layer})")
    return timing


def time_cell(times: dict[str, float | None], name: str) -> str:
    """``"123 (4.5×)"``: ms per image and the multiple of the input gradient's time in the same run."""
    t, ref = times.get(name), times.get("gradient")
    if t is None:
        return "n/a"
    return f"{t * 1e3:.0f}" + (f" ({t / ref:.1f}×)" if ref else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "demo_net"], choices=list(SHORT))
    ap.add_argument("--methods", nargs="+", default=list(ATTRIBUTION_METHODS), choices=list(ATTRIBUTION_METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = {m: dict(gallery(m, args.methods, args.out)) for m in args.models}
    print(f"| method | settings | {' | '.join(SHORT[m] + ' ms / image (× gradient)' for m in args.models)} |")
    print("|---|---|" + "---|" * len(args.models))
    for name in args.methods:
        opts = ", ".join(f"{k}={v}" for k, v in OPTIONS.get(name, {}).items()) or "defaults"
        cells = " | ".join(time_cell(results[m], name) for m in args.models)
        print(f"| {name} | {opts} | {cells} |")
    print(f"\n{torch.get_num_threads()} threads, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
