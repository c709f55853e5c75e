"""``convscope landscape``: the loss around a network's weights (Li et al. 2018) as pictures and a page.

:func:`landscape_report` runs :func:`~convscope.methods.landscape.loss_landscape` and writes, atomically, into
``out/``: ``landscape_2d.png`` (2-D: a filled contour plot, drawn with numpy/PIL: the loss, log-scaled by default,
in colour bands with iso-lines between them, the weights at the cross), ``landscape_1d.png`` (the curve along the
first direction; for 2-D the slice through the weights), optionally ``interpolation.png`` (the loss on the straight
line to another checkpoint, :func:`~convscope.methods.landscape.interpolate`), ``landscape.html`` and
``landscape.json``.

Data: ``x`` and ``y`` given, or :func:`labelled_data` (``"synthetic:N"``: N held-out synthetic scenes with their scene
labels, what ``demo_net`` is trained on; or a ``.pt`` file holding ``{"x": inputs, "y": targets}``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_text, check_output_dir
from ..core.model import input_normalizer, lenient_preprocess, model_device, model_name
from ..core.render import colormap, load_font, save_png, text_size
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.landscape import InterpolationResult, LandscapeResult, LossFn, interpolate, loss_landscape

__all__ = ["LandscapeRun", "contour_picture", "curve_picture", "labelled_data", "landscape_report"]

INK = (0, 0, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class LandscapeRun:
    """What :func:`landscape_report` made: the landscape, the interpolation (or None), the files written."""

    result: LandscapeResult
    interpolation: InterpolationResult | None
    contour_png: Path | None
    curve_png: Path
    interpolation_png: Path | None
    html: Path
    json: Path


# --------------------------------------------------------------------------- data


def labelled_data(spec: str | Path, model: nn.Module, seed: int = 0, progress: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(x, y, description)`` from ``"synthetic:N"`` (held-out synthetic scenes at the model's input size, in its
    input space, labelled with their scene class) or a ``.pt`` file of ``{"x": tensor, "y": tensor}``."""
    text = str(spec)
    if text.startswith("synthetic:") or text == "synthetic":
        from ..data.synthetic import HELD_OUT_START, render_arrays

        count = text.partition(":")[2] or "64"
        if not count.isdigit() or int(count) < 1:
            raise ConvscopeError(f"--data {text}: give synthetic:N with a positive N, e.g. synthetic:64")
        size = lenient_preprocess(model).input_size or (112, 112)
        if size[0] != size[1]:
            raise ConvscopeError(f"synthetic scenes are square; the model's input is {size[0]} x {size[1]}: pass a "
                                 ".pt file of inputs and targets instead")
        arrays = render_arrays(HELD_OUT_START, int(count), size[0], seed, workers=2, progress=progress)
        pixels = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).float().div_(255)
        x = input_normalizer(model)(pixels)
        return x, torch.from_numpy(arrays.scenes).long(), f"{count} held-out synthetic scenes (scene labels)"
    path = Path(text)
    if not path.is_file():
        raise ConvscopeError(f"--data {text}: no such file; give synthetic:N or a .pt file of "
                             "{'x': inputs, 'y': targets}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one message
        raise ConvscopeError(f"--data {text}: cannot read it as a torch file ({type(exc).__name__}); save "
                             "{'x': inputs, 'y': targets} with torch.save") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("x"), torch.Tensor) or not isinstance(obj.get("y"),
                                                                                                   torch.Tensor):
        raise ConvscopeError(f"--data {text}: expected a dict with tensors 'x' (inputs) and 'y' (targets); save it "
                             "with torch.save({'x': x, 'y': y}, path)")
    return obj["x"], obj["y"], f"{len(obj['x'])} examples from {path.name}"


# --------------------------------------------------------------------------- drawing


def _scaled(values: np.ndarray, log_scale: bool) -> tuple[np.ndarray, bool]:
    """The values to colour / plot (log10 when asked and every finite value is positive) and whether log was used."""
    finite = np.isfinite(values)
    use_log = bool(log_scale and finite.any() and (values[finite] > 0).all())
    out = np.where(finite, values, np.nan)
    return (np.log10(out) if use_log else out), use_log


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def contour_picture(result: LandscapeResult, size: int = 360, levels: int = 14, log_scale: bool = True,
                    cmap: str = "viridis", title: str = "") -> Image.Image:
    """A 2-D landscape as a filled contour plot: the grid interpolated bilinearly to ``size`` pixels, ``levels``
    colour bands of equal width (in log10 of the loss when ``log_scale``), dark iso-lines where the band changes,
    a white cross at the weights, axes in units of the directions and a colour bar. Non-finite points are white."""
    if result.betas is None:
        raise ConvscopeError("contour_picture needs a 2-D landscape (dims=2); draw a 1-D one with curve_picture")
    vals, use_log = _scaled(result.losses.double().cpu().numpy(), log_scale)
    finite = np.isfinite(vals)
    if not finite.any():
        raise ConvscopeError("every loss of the landscape is inf or NaN; use a smaller span")
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    img = np.flipud(vals.T)  # x: alpha to the right, y: beta upwards
    mask = np.flipud(finite.T)
    grid_t = torch.from_numpy(np.where(mask, img, hi).copy())[None, None]
    up = F.interpolate(grid_t, size=(size, size), mode="bilinear", align_corners=True)[0, 0].numpy()
    up_mask = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=(size, size),
                            mode="nearest")[0, 0].numpy() > 0.5
    span = hi - lo if hi > lo else 1.0
    band = np.clip(((up - lo) / span * levels).astype(int), 0, levels - 1)
    lut = (colormap(cmap).numpy() * 255).round().astype(np.uint8)
    rgb = lut[np.round((band + 0.5) / levels * 255).astype(int)]
    edge = np.zeros_like(band, dtype=bool)
    edge[:, 1:] |= band[:, 1:] != band[:, :-1]
    edge[1:, :] |= band[1:, :] != band[:-1, :]
    rgb[edge] = (rgb[edge] * 0.35).astype(np.uint8)
    rgb[~up_mask] = 255
    font, small = load_font(12), load_font(10)
    line = text_size(font, "Agy|")[1]
    left, top, bottom, right = 44, (line + 10) if title else 8, 2 * line + 14, 80
    canvas = Image.new("RGB", (left + size + right, top + size + bottom), WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill=INK, font=font)
    canvas.paste(Image.fromarray(rgb), (left, top))
    draw.rectangle([left - 1, top - 1, left + size, top + size], outline=INK)
    a, b = result.alphas.tolist(), result.betas.tolist()

    def px(alpha: float, beta: float) -> tuple[float, float]:
        return (left + (alpha - a[0]) / (a[-1] - a[0]) * (size - 1), top + (b[-1] - beta) / (b[-1] - b[0]) * (size - 1))

    for t in (a[0], 0.0, a[-1]):
        x, _ = px(t, 0)
        draw.line([x, top + size, x, top + size + 4], fill=INK)
        s = _fmt(t)
        draw.text((x - text_size(small, s)[0] / 2, top + size + 6), s, fill=INK, font=small)
    for t in (b[0], 0.0, b[-1]):
        _, y = px(0, t)
        draw.line([left - 5, y, left - 1, y], fill=INK)
        s = _fmt(t)
        draw.text((left - 8 - text_size(small, s)[0], y - text_size(small, s)[1] / 2), s, fill=INK, font=small)
    label = "alpha (direction 1); beta (direction 2) upwards"
    draw.text((left, top + size + line + 8), label, fill=INK, font=small)
    cx, cy = px(0.0, 0.0)
    draw.line([cx - 6, cy, cx + 6, cy], fill=WHITE, width=2)
    draw.line([cx, cy - 6, cx, cy + 6], fill=WHITE, width=2)
    # colour bar: bands from the lowest (bottom) to the highest loss (top)
    x0, bw = left + size + 14, 14
    for k in range(levels):
        y1 = top + size - k * size / levels
        y0 = top + size - (k + 1) * size / levels
        color = tuple(int(c) for c in lut[round((k + 0.5) / levels * 255)])
        draw.rectangle([x0, y0, x0 + bw, y1], fill=color)
    draw.rectangle([x0, top, x0 + bw, top + size], outline=INK)
    for v, y in ((hi, top), (lo, top + size - text_size(small, "0")[1])):
        draw.text((x0 + bw + 4, y), _fmt(10**v if use_log else v), fill=INK, font=small)
    draw.text((x0, top + size + 6), "log loss" if use_log else "loss", fill=INK, font=small)
    return canvas


def curve_picture(xs: Sequence[float] | torch.Tensor, ys: Sequence[float] | torch.Tensor, title: str = "",
                  xlabel: str = "alpha", log_scale: bool = False, marks: Sequence[float] = (0.0,),
                  size: tuple[int, int] = (420, 260)) -> Image.Image:
    """A line chart of ``ys`` over ``xs`` (the loss along a direction or a path), with points, axis ticks (the ends
    and the points of ``marks`` on x; min, middle, max on y) and dashed vertical lines at ``marks``. Non-finite
    values break the line."""
    x = np.asarray(torch.as_tensor(xs, dtype=torch.float64).cpu(), dtype=np.float64)
    y, use_log = _scaled(np.asarray(torch.as_tensor(ys, dtype=torch.float64).cpu(), dtype=np.float64), log_scale)
    if len(x) != len(y) or len(x) < 2:
        raise ConvscopeError("curve_picture needs at least 2 points, as many x as y values")
    finite = np.isfinite(y)
    if not finite.any():
        raise ConvscopeError("every value of the curve is inf or NaN; use a smaller span")
    font, small = load_font(12), load_font(10)
    line = text_size(font, "Agy|")[1]
    w, h = size
    left, top, bottom, right = 56, (line + 10) if title else 8, 2 * line + 14, 14
    canvas = Image.new("RGB", (left + w + right, top + h + bottom), WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill=INK, font=font)
    lo, hi = float(np.min(y[finite])), float(np.max(y[finite]))
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    xmin, xmax = float(x.min()), float(x.max())

    def px(u: float, v: float) -> tuple[float, float]:
        return left + (u - xmin) / (xmax - xmin or 1) * w, top + (hi - v) / (hi - lo) * h

    draw.rectangle([left, top, left + w, top + h], outline=INK)
    for m in marks:
        if xmin <= m <= xmax:
            mx, _ = px(m, lo)
            for yy in range(top, top + h, 6):
                draw.line([mx, yy, mx, min(yy + 3, top + h)], fill=(150, 150, 150))
    for t in sorted({xmin, xmax, *[m for m in marks if xmin <= m <= xmax]}):
        tx, _ = px(t, lo)
        draw.line([tx, top + h, tx, top + h + 4], fill=INK)
        s = _fmt(t)
        draw.text((tx - text_size(small, s)[0] / 2, top + h + 6), s, fill=INK, font=small)
    for v in (lo + pad, (lo + hi) / 2, hi - pad):
        _, ty = px(xmin, v)
        draw.line([left - 4, ty, left, ty], fill=INK)
        s = _fmt(10**v if use_log else v)
        draw.text((left - 7 - text_size(small, s)[0], ty - text_size(small, s)[1] / 2), s, fill=INK, font=small)
    draw.text((left, top + h + line + 8), xlabel + ("; loss on a log scale" if use_log else ""), fill=INK, font=small)
    color = (33, 102, 172)
    run: list[tuple[float, float]] = []
    for u, v, ok in zip(x, y, finite):
        if ok:
            run.append(px(float(u), float(v)))
        if not ok or u == x[-1]:
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            run = []
    for u, v, ok in zip(x, y, finite):
        if ok:
            cx, cy = px(float(u), float(v))
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
    return canvas


# --------------------------------------------------------------------------- the report


def _json_values(t: torch.Tensor) -> list | float | None:
    """Nested lists of floats, ``None`` for inf / NaN (which JSON cannot hold)."""
    if t.dim() == 0:
        v = float(t)
        return v if math.isfinite(v) else None
    return [_json_values(r) for r in t]


def _middle_row(result: LandscapeResult) -> tuple[torch.Tensor, float]:
    """The 1-D slice of a 2-D landscape through the weights (beta closest to 0) and its beta."""
    assert result.betas is not None
    j = int(result.betas.abs().argmin())
    return result.losses[:, j], float(result.betas[j])


def landscape_report(model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                     out: str | Path = Path("out/landscape"), *, data: str = "synthetic:64", dims: int = 2,
                     steps: int = 21, span: float = 1.0, seed: int = 0, loss: LossFn = F.cross_entropy,
                     batch_size: int = 256, log_scale: bool = True,
                     other: Mapping[str, torch.Tensor] | nn.Module | None = None,
                     extent: tuple[float, float] = (-0.5, 1.5), other_label: str = "other checkpoint",
                     progress: bool | None = None, self_contained: bool = False) -> LandscapeRun:
    """The loss landscape of ``model`` (Li et al. 2018: ``dims`` filter-normalized random directions from ``seed``,
    ``steps`` points per axis in ``[-span, span]``) on ``(x, y)`` (default: :func:`labelled_data` of ``data``), as
    pictures, HTML and JSON in ``out``. With ``other`` (a state dict or model of the same architecture) also the loss
    on the straight line from the model (alpha 0) to ``other`` (alpha 1) over ``extent``. The model is evaluated in
    eval mode and its weights are restored bit for bit."""
    out = check_output_dir(out)
    if (x is None) != (y is None):
        raise ConvscopeError("give both x (inputs) and y (targets), or neither (then data= is used)")
    source = f"{len(x)} examples" if x is not None else ""
    if x is None:
        x, y, source = labelled_data(data, model, seed=0, progress=progress is not False)
    assert y is not None
    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    result = loss_landscape(model, x, y, dims=dims, steps=steps, span=span, seed=seed, loss=loss,
                            batch_size=batch_size, progress=progress)
    name = model_name(model)
    contour_png = None
    if result.dims == 2:
        title = f"{name}: loss over 2 filter-normalized directions"
        contour_png = save_png(contour_picture(result, log_scale=log_scale, title=title), out / "landscape_2d.png")
        curve, beta = _middle_row(result)
        curve_title = f"{name}: loss along direction 1 (beta = {_fmt(beta)})"
    else:
        curve, curve_title = result.losses, f"{name}: loss along a filter-normalized direction"
    curve_png = save_png(curve_picture(result.alphas, curve, curve_title, "alpha (direction 1)", log_scale),
                         out / "landscape_1d.png")
    inter = inter_png = None
    if other is not None:
        inter = interpolate(model, model, other, x, y, steps=steps, extent=extent, loss=loss, batch_size=batch_size,
                            progress=progress)
        inter_png = save_png(curve_picture(inter.alphas, inter.losses, f"{name} (0) to {other_label} (1)",
                                           "alpha: (1 - alpha) weights + alpha other", log_scale, marks=(0.0, 1.0)),
                             out / "interpolation.png")

    origin = result.origin_loss
    rep = HtmlReport(f"convscope landscape: {name}", self_contained=self_contained)
    rep.text(f"Loss ({getattr(loss, '__name__', 'loss')}, mean over {source}) at theta + alpha delta"
             + (" + beta eta" if dims == 2 else "") + f", {steps} points per axis in [-{span:g}, {span:g}]: random "
             "Gaussian directions, filter-normalized (each filter scaled to the norm of the weights' filter; biases "
             f"and batch-norm parameters not moved), Li et al. 2018 Sec. 4; seed {seed}. The model runs in eval mode "
             "(dropout off, batch norm with its running statistics); its weights are restored bit for bit. "
             + (f"Loss at the weights: {origin:.4g}. " if origin is not None else "")
             + f"Lowest loss on the grid {float(result.losses[torch.isfinite(result.losses)].min()):.4g}, highest "
             f"{float(result.losses[torch.isfinite(result.losses)].max()):.4g}"
             + (f"; {result.nonfinite} points overflowed (inf/NaN, shown white)." if result.nonfinite else "."))
    if contour_png is not None:
        rep.image(contour_png, caption=f"{contour_png.name}: contours of the "
                                       f"{'log ' if log_scale else ''}loss; the cross marks the weights")
    rep.image(curve_png, caption=f"{curve_png.name}: {curve_title}")
    if inter is not None and inter_png is not None:
        rep.heading("Straight line to another checkpoint")
        ends = [float(v) for a, v in zip(inter.alphas.tolist(), inter.losses) if a in (0.0, 1.0)]
        rep.text(f"Loss at (1 - alpha) theta + alpha theta' with theta' = {other_label} (Goodfellow et al. 2015; "
                 "Li et al. 2018 Sec. 3); every floating-point entry of the state, running statistics too, is "
                 "interpolated." + (f" Loss at alpha 0: {ends[0]:.4g}, at alpha 1: {ends[1]:.4g}." if len(ends) == 2
                                    else ""))
        rep.image(inter_png, caption=f"{inter_png.name}: the model at alpha 0, {other_label} at alpha 1")
    rep.table([[f"{float(a):.3g}", float(v)] for a, v in zip(result.alphas, curve)], header=["alpha", "loss"])
    html = rep.write(out / "landscape.html")
    payload = {"model": name, "data": source, "dims": dims, "steps": steps, "span": span, "seed": seed,
               "origin_loss": origin, "alphas": result.alphas.tolist(),
               "betas": None if result.betas is None else result.betas.tolist(),
               "losses": _json_values(result.losses), "nonfinite": result.nonfinite}
    if inter is not None:
        payload["interpolation"] = {"other": other_label, "alphas": inter.alphas.tolist(),
                                    "losses": _json_values(inter.losses)}
    json_path = atomic_write_text(out / "landscape.json", json.dumps(payload, indent=1))
    return LandscapeRun(result, inter, contour_png, curve_png, inter_png, html, json_path)
