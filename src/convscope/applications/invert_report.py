"""``convscope invert`` / ``convscope style``: reconstructions as pictures (survey Fig. 12 and Fig. 21 layouts).

``run_invert`` writes ``invert.png`` (the originals in the first row, then one labelled row per layer, one column per
image), ``invert.json`` (normalized feature reconstruction error, PSNR against the original, per layer and image)
and ``invert.html`` (the settings, the picture and those numbers); ``run_style`` writes ``style.png`` (content |
style | result), ``stylized.png`` and ``style.html`` (the settings, the pictures and the losses). The pages link
the PNGs beside them, or embed them when ``self_contained``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.images import image_name, load_images, unique_names
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_name, zoo_name
from ..core.render import grid, save_png
from ..core.report import HtmlReport
from ..errors import ConvscopeError

__all__ = ["InvertRun", "StyleRun", "psnr", "run_invert", "run_style"]


@dataclass(frozen=True)
class InvertRun:
    """Files written and the numbers: ``rows`` one dict per (layer, image) with ``layer``, ``image`` (the file),
    ``name`` (the image's column name), ``error`` and ``psnr_db``."""

    picture: Path
    rows: list[dict]
    html: Path


@dataclass(frozen=True)
class StyleRun:
    """Files written (``picture``: content | style | result, ``stylized``: the result alone, ``html``: the page) and
    the final losses: ``content_loss`` (Gatys' L_content), ``style_loss`` (L_style), ``total_loss`` (alpha L_content
    + beta L_style) and ``start_loss`` (the total at the first step)."""

    picture: Path
    stylized: Path
    html: Path
    content_loss: float
    style_loss: float
    total_loss: float
    start_loss: float
    content_layer: str
    style_layers: list[str]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1]: ``10 log10(1 / MSE)`` dB."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def run_invert(model: nn.Module, paths: Sequence[Path], layers: list[str], out: Path, method: str = "regularized",
               decoders: list[Path] | None = None, steps: int = 200, seed: int = 0,
               self_contained: bool = False) -> InvertRun:
    """Reconstruct every image from every layer with the regularized inverter (one batched optimization) or with
    trained UpconvNet decoders (one per layer, ``decoders[i]`` for ``layers[i]``); images are named by
    :func:`~convscope.core.images.unique_names`."""
    from ..methods.invert import invert
    from ..methods.upconv import load_upconv, reconstruct

    paths = [Path(p) for p in paths]
    names = unique_names(paths)
    x = load_images(paths, model).to(next(model.parameters()).device)
    originals = input_denormalizer(model)(x).clamp(0, 1).float().cpu()
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
            rec = reconstruct(model, dec, x)
            per_layer.append((dec.layer, rec.images.float().cpu(), rec.error.cpu()))
        layers = [name for name, _, _ in per_layer]
    else:
        raise ConvscopeError(f"unknown inversion method {method!r}; use regularized or upconv")
    tiles = list(originals)
    rows: list[dict[str, Any]] = []
    for name, images, err in per_layer:
        tiles += list(images)
        for i, path in enumerate(paths):
            rows.append({"layer": name, "image": str(path), "name": names[i], "error": float(err[i]),
                         "psnr_db": psnr(images[i], originals[i])})
    out = Path(out)
    picture = save_png(grid(tiles, nrow=len(paths), row_labels=["original", *layers],
                            col_labels=[n[:16] for n in names]), out / "invert.png")
    atomic_write_text(out / "invert.json", json.dumps({"method": method, "steps": steps, "rows": rows}, indent=1))

    rep = HtmlReport(f"convscope invert: {_model_name(model)}", self_contained=self_contained)
    rep.text("Each image reconstructed from its features at each layer: " + (
        "an image optimized to reproduce them under natural-image priors (Mahendran & Vedaldi 2015)"
        if method == "regularized" else "decoded by a trained up-convolutional network (Dosovitskiy & Brox 2016)")
        + ". error: the feature reconstruction error ||phi(x) - phi(x0)||^2 / ||phi(x0)||^2; PSNR: the reconstruction "
        "against the original, in dB (higher is closer).")
    settings: list[list[object]] = [["model", _model_name(model)], ["method", method], ["layers", ", ".join(layers)],
                                    ["images", len(paths)]]
    settings += [["steps", steps], ["seed", seed]] if method == "regularized" else [
        ["decoders", ", ".join(str(d) for d in decoders or [])]]
    rep.table(settings, header=["setting", "value"])
    rep.image(picture, caption="first row: the originals; then one row per layer")
    rep.heading("Per layer")
    rep.table([[name, _mean([r["error"] for r in rows if r["layer"] == name]),
                _mean([r["psnr_db"] for r in rows if r["layer"] == name])] for name in layers],
              header=["layer", "mean error", "mean PSNR (dB)"])
    rep.heading("Per image")
    rep.table([[r["layer"], r["name"], r["error"], r["psnr_db"]] for r in rows],
              header=["layer", "image", "error", "PSNR (dB)"])
    return InvertRun(picture, rows, rep.write(out / "invert.html"))


def run_style(model: nn.Module, content: Path, style: Path, out: Path, content_layer: str | None = None,
              style_layers: list[str] | None = None, beta: float | None = None, steps: int = 300,
              seed: int = 0, alpha: float = 1.0, self_contained: bool = False) -> StyleRun:
    """Gatys et al. style transfer of ``content`` in the style of ``style``: writes ``style.png``, ``stylized.png``
    and ``style.html``."""
    from .style import DEFAULT_BETA, style_transfer

    dev = next(model.parameters()).device
    xc, xs = load_images([content], model).to(dev), load_images([style], model).to(dev)
    res = style_transfer(model, xc, xs, content_layer=content_layer, style_layers=style_layers, alpha=alpha,
                         beta=beta, steps=steps, seed=seed)
    beta = DEFAULT_BETA.get(zoo_name(model), 1e6) if beta is None else float(beta)
    denormalize = input_denormalizer(model)

    def px(t: torch.Tensor) -> torch.Tensor:
        return denormalize(t).clamp(0, 1).float().cpu()[0]

    out = Path(out)
    result = res.images[0].float().cpu()
    stylized = save_png(result, out / "stylized.png")
    names = unique_names([content, style])
    picture = save_png(grid([px(xc), px(xs), result], nrow=3, col_labels=["content", "style", "result"]),
                       out / "style.png")
    lc, ls = float(res.content_loss[0]), float(res.style_loss[0])
    total, start = alpha * lc + beta * ls, -float(res.history[0].reshape(-1)[0])
    rep = HtmlReport(f"convscope style: {image_name(content)} in the style of {image_name(style)}",
                     self_contained=self_contained)
    rep.text("Neural style transfer (Gatys, Ecker & Bethge 2016): the image starts from the content photo and "
             "descends L_total = alpha L_content + beta L_style; L_content matches the content layer's features, "
             "L_style the Gram matrices of the style layers.")
    rep.table([["model", _model_name(model)], ["content", f"{names[0]} ({content})"],
               ["style", f"{names[1]} ({style})"], ["content layer", res.content_layer],
               ["style layers", ", ".join(res.style_layers)], ["alpha", alpha], ["beta", beta], ["steps", steps],
               ["seed", seed]], header=["setting", "value"])
    rep.image(picture, caption="content, style and result")
    rep.image(stylized, caption="the result at full size")
    rep.heading("Losses")
    rep.table([["L_content", lc], ["L_style", ls], ["L_total (final)", total], ["L_total (first step)", start]],
              header=["loss", "value"])
    return StyleRun(picture, stylized, rep.write(out / "style.html"), lc, ls, total, start, res.content_layer,
                    list(res.style_layers))


def _model_name(model: nn.Module) -> str:
    return model_name(model)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
