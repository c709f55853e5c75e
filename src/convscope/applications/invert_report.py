"""``convscope invert`` / ``convscope style``: reconstructions as pictures (survey Fig. 12 and Fig. 21 layouts).

``run_invert`` writes ``invert.png`` (the originals in the first row, then one labelled row per layer, one column per
image) and ``invert.json`` (normalized feature reconstruction error, PSNR against the original, per layer and
image); ``run_style`` writes ``style.png`` (content | style | result) and ``stylized.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.images import load_images
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.render import grid, save_png
from ..errors import ConvscopeError


@dataclass(frozen=True)
class InvertRun:
    """Files written and the per-row numbers."""

    picture: Path
    rows: list[dict]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1]: ``10 log10(1 / MSE)`` dB."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def run_invert(model: nn.Module, paths: list[Path], layers: list[str], out: Path, method: str = "regularized",
               decoders: list[Path] | None = None, steps: int = 200, seed: int = 0) -> InvertRun:
    """Reconstruct every image from every layer with the regularized inverter (one batched optimization) or with
    trained UpconvNet decoders (one per layer, ``decoders[i]`` for ``layers[i]``)."""
    from ..methods.invert import invert
    from ..methods.upconv import load_upconv, reconstruct

    x = load_images(paths, model).to(next(model.parameters()).device)
    pre = getattr(model, "preprocess", None)
    originals = (pre.denormalize(x) if pre is not None else x).clamp(0, 1).float().cpu()
    if method == "regularized":
        layers = [resolve_layer(model, name)[0] for name in layers]
        res = invert(model, x, layers, steps=steps, seed=seed)
        per_layer = [(name, res.for_layer(name).float().cpu(), res.error[[i for i, n in enumerate(res.layers)
                                                                          if n == name]].cpu()) for name in layers]
    elif method == "upconv":
        if not decoders:
            raise ConvscopeError("--method upconv needs --decoder FILE for each layer (train one with "
                                 "`convscope upconv train MODEL --layer L --out FILE`)")
        per_layer = []
        for path in decoders:
            dec = load_upconv(path, device=x.device)
            res = reconstruct(model, dec, x)
            per_layer.append((dec.layer, res.images.float().cpu(), res.error.cpu()))
        layers = [name for name, _, _ in per_layer]
    else:
        raise ConvscopeError(f"unknown inversion method {method!r}; use regularized or upconv")
    tiles = list(originals)
    rows = []
    for name, images, err in per_layer:
        tiles += list(images)
        for i, path in enumerate(paths):
            rows.append({"layer": name, "image": str(path), "error": float(err[i]),
                         "psnr_db": psnr(images[i], originals[i])})
    picture = save_png(grid(tiles, nrow=len(paths), row_labels=["original", *layers],
                            col_labels=[p.stem[:16] for p in paths]), Path(out) / "invert.png")
    atomic_write_text(Path(out) / "invert.json", json.dumps({"method": method, "steps": steps, "rows": rows},
                                                            indent=1))
    return InvertRun(picture, rows)


def run_style(model: nn.Module, content: Path, style: Path, out: Path, content_layer: str | None = None,
              style_layers: list[str] | None = None, beta: float | None = None, steps: int = 300,
              seed: int = 0) -> Path:
    """Gatys et al. style transfer of ``content`` in the style of ``style``; returns the comparison picture."""
    from .style import style_transfer

    dev = next(model.parameters()).device
    xc, xs = load_images([content], model).to(dev), load_images([style], model).to(dev)
    res = style_transfer(model, xc, xs, content_layer=content_layer, style_layers=style_layers, beta=beta,
                         steps=steps, seed=seed)
    pre = getattr(model, "preprocess", None)

    def px(t: torch.Tensor) -> torch.Tensor:
        return (pre.denormalize(t) if pre is not None else t).clamp(0, 1).float().cpu()[0]

    result = res.images[0].float().cpu()
    save_png(result, Path(out) / "stylized.png")
    return save_png(grid([px(xc), px(xs), result], nrow=3, col_labels=["content", "style", "result"]),
                    Path(out) / "style.png")
