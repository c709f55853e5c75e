"""Turn tensors into pictures: display normalization, colormaps, overlays, labelled grids, PNGs.

No matplotlib: colormaps are 256 x 3 lookup tables interpolated from a few control points.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from convscope.core.io import atomic_write_bytes
from convscope.errors import ConvscopeError

__all__ = [
    "COLORMAPS",
    "LabelStrip",
    "apply_colormap",
    "as_rgb",
    "colormap",
    "filter_grid",
    "fit_text",
    "grid",
    "label_strip",
    "load_font",
    "overlay",
    "save_png",
    "tensor_to_pils",
    "text_size",
    "to_display",
    "to_pil",
]

DisplayMode = Literal["minmax", "percentile", "signed"]
Color = tuple[int, int, int]

# --------------------------------------------------------------------------- display normalization


def to_display(
    x: torch.Tensor, mode: DisplayMode = "minmax", lo: float = 0.5, hi: float = 99.5
) -> torch.Tensor:
    """Map an arbitrary tensor to [0, 1] for display, separately per image.

    A 4-D tensor is normalized per item of dim 0; anything else as one image.
    ``minmax``: min -> 0, max -> 1. ``percentile``: the ``lo``/``hi`` percentiles -> 0/1, clipped.
    ``signed``: 0 -> 0.5, symmetric by the max absolute value. Constant images map to 0 (0.5 if signed).
    """
    if mode not in ("minmax", "percentile", "signed"):
        raise ConvscopeError(f"to_display(mode={mode!r}): use 'minmax', 'percentile' or 'signed'.")
    if not 0 <= lo < hi <= 100:
        raise ConvscopeError(f"to_display(lo={lo}, hi={hi}): need 0 <= lo < hi <= 100 (percentiles).")
    x = x.detach()
    x = x if x.is_floating_point() else x.float()
    flat = x.reshape(x.shape[0], -1) if x.dim() == 4 else x.reshape(1, -1)
    if flat.shape[1] == 0:
        return x.clone()
    if mode == "signed":
        scale = flat.abs().amax(dim=1, keepdim=True)
        out = flat / (2 * scale.clamp_min(torch.finfo(flat.dtype).tiny)) + 0.5
    else:
        if mode == "minmax":
            vmin, vmax = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        else:
            vmin, vmax = _percentile(flat, lo), _percentile(flat, hi)
        span = vmax - vmin
        out = torch.where(span > 0, (flat - vmin) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return out.clamp(0, 1).reshape(x.shape)


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row percentile with linear interpolation (no size limit, unlike ``torch.quantile``)."""
    n = flat.shape[1]
    pos = q / 100 * (n - 1)
    i0 = math.floor(pos)
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    if i1 < n / 2:  # only the order statistics needed: the i1 + 1 smallest (or n - i0 largest), not a full sort
        s = flat.topk(i1 + 1, dim=1, largest=False, sorted=True).values
        a, b = s[:, i0], s[:, i1]
    else:
        s = flat.topk(n - i0, dim=1, largest=True, sorted=True).values
        a, b = s[:, n - 1 - i0], s[:, n - 1 - i1]
    return (a * (1 - frac) + b * frac).unsqueeze(1)


# --------------------------------------------------------------------------- colormaps

# (position, (r, g, b)) control points in [0, 1], interpolated linearly into 256 entries.
_CONTROL_POINTS: dict[str, list[tuple[float, tuple[float, float, float]]]] = {
    "viridis": [
        (0.000, (0.267, 0.005, 0.329)),
        (0.125, (0.283, 0.141, 0.458)),
        (0.250, (0.230, 0.322, 0.546)),
        (0.375, (0.173, 0.449, 0.558)),
        (0.500, (0.128, 0.567, 0.551)),
        (0.625, (0.158, 0.684, 0.502)),
        (0.750, (0.369, 0.789, 0.383)),
        (0.875, (0.678, 0.864, 0.190)),
        (1.000, (0.993, 0.906, 0.144)),
    ],
    "inferno": [
        (0.000, (0.001, 0.000, 0.014)),
        (0.100, (0.088, 0.043, 0.224)),
        (0.200, (0.258, 0.039, 0.406)),
        (0.300, (0.416, 0.090, 0.433)),
        (0.400, (0.578, 0.148, 0.404)),
        (0.500, (0.735, 0.216, 0.330)),
        (0.600, (0.865, 0.317, 0.226)),
        (0.700, (0.954, 0.468, 0.100)),
        (0.800, (0.988, 0.645, 0.040)),
        (0.900, (0.964, 0.843, 0.273)),
        (1.000, (0.988, 0.998, 0.645)),
    ],
    "jet": [
        (0.000, (0.0, 0.0, 0.5)),
        (0.125, (0.0, 0.0, 1.0)),
        (0.375, (0.0, 1.0, 1.0)),
        (0.625, (1.0, 1.0, 0.0)),
        (0.875, (1.0, 0.0, 0.0)),
        (1.000, (0.5, 0.0, 0.0)),
    ],
    "gray": [(0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))],
    "coolwarm": [
        (0.00, (0.230, 0.299, 0.754)),
        (0.25, (0.552, 0.690, 0.996)),
        (0.50, (0.865, 0.865, 0.865)),
        (0.75, (0.958, 0.604, 0.483)),
        (1.00, (0.706, 0.016, 0.150)),
    ],
}
COLORMAPS: tuple[str, ...] = tuple(_CONTROL_POINTS)


def _lut_numpy(name: str) -> np.ndarray:
    """256 x 3 float32 lookup table for a named colormap."""
    pts = _CONTROL_POINTS[name]
    pos = np.array([p for p, _ in pts])
    rgb = np.array([c for _, c in pts])
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, pos, rgb[:, k]) for k in range(3)], axis=1).astype(np.float32)


def colormap(name: str) -> torch.Tensor:
    """The ``256 x 3`` RGB lookup table (values in [0, 1]) of a colormap in ``COLORMAPS``."""
    if name not in _CONTROL_POINTS:
        raise ConvscopeError(f"Unknown colormap {name!r}; use one of {', '.join(COLORMAPS)}.")
    return torch.from_numpy(_lut_numpy(name))


def apply_colormap(maps: torch.Tensor, name: str = "viridis") -> torch.Tensor:
    """Colour maps in [0, 1]: ``N x 1 x H x W`` -> ``N x 3 x H x W``, ``H x W`` -> ``3 x H x W``.

    Values are clamped to [0, 1] and NaN shows as 0.
    """
    if maps.dim() == 4 and maps.shape[1] == 1:
        m = maps[:, 0]
    elif maps.dim() == 2:
        m = maps
    else:
        raise ConvscopeError(
            f"apply_colormap expects N x 1 x H x W or H x W maps, got shape {tuple(maps.shape)}; "
            "reduce channels first (e.g. maps.mean(1, keepdim=True))."
        )
    lut = colormap(name).to(maps.device)
    m = torch.nan_to_num(m.detach().float(), nan=0.0).clamp(0, 1)
    rgb = lut[(m * 255).round().long()]  # ... x H x W x 3
    out = rgb.movedim(-1, -3)
    return out.to(maps.dtype) if maps.is_floating_point() else out


# --------------------------------------------------------------------------- overlay


def overlay(
    images: torch.Tensor,
    maps: torch.Tensor,
    alpha: float = 0.5,
    cmap: str = "jet",
    normalize: bool = True,
) -> torch.Tensor:
    """Blend colour-mapped heat maps over images: ``(1 - alpha) * image + alpha * cmap(map)``.

    ``images``: ``N x C x H x W`` (or ``C x H x W``) in [0, 1] with ``C`` = 3 (RGB), 1 (grayscale, shown as
    grey RGB) or 4 (RGBA, composited over white); ``maps``: ``N x 1 x h x w`` (or ``N x h x w``; ``h x w`` for
    one image), bilinearly upsampled to ``H x W``, then min-max normalized per map when ``normalize`` (else
    clamped to [0, 1]). Returns ``N x 3 x H x W`` RGB.
    """
    if not 0 <= alpha <= 1:
        raise ConvscopeError(f"overlay(alpha={alpha}): alpha must be in [0, 1].")
    if images.dim() == 3:
        return overlay(images[None], maps.reshape(1, 1, *maps.shape[-2:]), alpha, cmap, normalize)[0]
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ConvscopeError(
            f"overlay expects images N x C x H x W in [0, 1] with 1, 3 or 4 channels, got {tuple(images.shape)}; "
            "use preprocess.denormalize(x) to get pixels from model inputs."
        )
    images = as_rgb(images)
    m = maps[:, None] if maps.dim() == 3 else maps
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] not in (1, images.shape[0]):
        raise ConvscopeError(
            f"overlay expects maps N x 1 x h x w with N = {images.shape[0]} (or 1), got {tuple(maps.shape)}."
        )
    m = m.detach().float().to(images.device)
    m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
    m = to_display(m, "minmax") if normalize else m.clamp(0, 1)
    colored = apply_colormap(m, cmap).to(images.dtype if images.is_floating_point() else torch.float32)
    base = images.detach().to(colored.dtype)
    return (1 - alpha) * base + alpha * colored


# --------------------------------------------------------------------------- PIL conversion


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` pixels in [0, 1] as RGB ``N x 3 x H x W``: grayscale (``C = 1``) repeated, RGBA
    (``C = 4``) composited over white (``rgb * a + (1 - a)``), RGB as it is."""
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ConvscopeError(f"as_rgb expects N x C x H x W with 1, 3 or 4 channels, got {tuple(images.shape)}; "
                             "reduce other channel counts first (e.g. x.mean(1, keepdim=True))")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 4:
        alpha = images[:, 3:].clamp(0, 1)
        return images[:, :3] * alpha + (1 - alpha)
    return images


def to_pil(x: torch.Tensor) -> Image.Image:
    """``3 x H x W``, ``4 x H x W``, ``1 x H x W`` or ``H x W`` tensor in [0, 1] -> RGB, RGBA or L PIL image
    (clamped)."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
        raise ConvscopeError(
            f"to_pil expects 3 x H x W, 4 x H x W, 1 x H x W or H x W, got {tuple(x.shape)}; "
            "use tensor_to_pils for a batch, or to_display/apply_colormap for other channel counts."
        )
    arr = torch.nan_to_num(x.detach().float().cpu(), nan=0.0).clamp(0, 1).mul(255).round()
    arr_np = arr.to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr_np[..., 0] if arr_np.shape[2] == 1 else arr_np)


def tensor_to_pils(batch: torch.Tensor) -> list[Image.Image]:
    """``N x C x H x W`` tensor in [0, 1] -> list of PIL images."""
    if batch.dim() != 4:
        raise ConvscopeError(f"tensor_to_pils expects N x C x H x W, got {tuple(batch.shape)}.")
    return [to_pil(b) for b in batch]


# --------------------------------------------------------------------------- grids


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def load_font(size: int) -> Font:
    """Pillow's default font at ``size`` pixels (the fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


def text_size(font: Font, text: str) -> tuple[int, int]:
    """Width and height (from the top of the text origin) of ``text`` in ``font``."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom)


def _as_pils(
    images: torch.Tensor | Sequence[Image.Image | torch.Tensor], scale: int | None
) -> list[Image.Image]:
    """Normalize the grid input to a list of RGB PIL images, enlarged by ``scale`` (nearest)."""
    if isinstance(images, torch.Tensor):
        items: list[Image.Image | torch.Tensor] = list(tensor_to_pils(images))
    else:
        items = list(images)
    if not items:
        raise ConvscopeError("grid() got no images; pass a non-empty tensor or list.")
    if scale is not None and (not isinstance(scale, int) or scale < 1):
        raise ConvscopeError(f"grid(scale={scale!r}): use a positive int or None.")
    pils = []
    for it in items:
        im = to_pil(it) if isinstance(it, torch.Tensor) else it
        if not isinstance(im, Image.Image):
            raise ConvscopeError(f"grid() got a {type(im).__name__}; pass PIL images or tensors.")
        im = im.convert("RGB")
        if scale and scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        pils.append(im)
    return pils


def _check_labels(labels: Sequence[str] | None, n: int, what: str) -> list[str] | None:
    """Validate a label list's length (None passes)."""
    if labels is None:
        return None
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ConvscopeError(f"grid() got {len(labels)} {what} for {n}; give exactly {n}.")
    return labels


def grid(
    images: torch.Tensor | Sequence[Image.Image | torch.Tensor],
    nrow: int = 8,
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell_labels: Sequence[str] | None = None,
    background: Color = (255, 255, 255),
    scale: int | None = None,
    font_size: int = 12,
) -> Image.Image:
    """Lay images out in a labelled grid, ``nrow`` images per row (as torchvision's ``make_grid``).

    Rows get ``row_labels`` on the left, columns ``col_labels`` on top, each cell an optional
    caption below. Cells are as large as the largest image (and wide enough for the labels);
    smaller images are centred (letterboxed). ``scale`` enlarges images with nearest neighbour.
    """
    if not isinstance(nrow, int) or nrow < 1 or padding < 0:
        raise ConvscopeError(f"grid(nrow={nrow}, padding={padding}): need nrow >= 1 and padding >= 0.")
    pils = _as_pils(images, scale)
    ncol = min(nrow, len(pils))
    nrows = math.ceil(len(pils) / nrow)
    rows = _check_labels(row_labels, nrows, "row labels (one per grid row)")
    cols = _check_labels(col_labels, ncol, "column labels (one per grid column)")
    cells = _check_labels(cell_labels, len(pils), "cell labels (one per image)")
    font = load_font(font_size)
    pad = max(2, font_size // 4)
    line_h = text_size(font, "Agy|")[1]
    label_w = max((text_size(font, t)[0] for t in (cols or []) + (cells or [])), default=0)
    cw = max(max(im.width for im in pils), label_w)
    ch = max(im.height for im in pils)
    left = max(text_size(font, t)[0] for t in rows) + 2 * pad if rows else 0
    top = line_h + 2 * pad if cols else 0
    cap_h = line_h + pad if cells else 0
    width = left + ncol * cw + (ncol + 1) * padding
    height = top + nrows * (ch + cap_h) + (nrows + 1) * padding
    canvas = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if sum(background) >= 3 * 128 else (255, 255, 255)
    for i, im in enumerate(pils):
        r, c = divmod(i, nrow)
        x0 = left + padding + c * (cw + padding)
        y0 = top + padding + r * (ch + cap_h + padding)
        canvas.paste(im, (x0 + (cw - im.width) // 2, y0 + (ch - im.height) // 2))
        if cells:
            tw = text_size(font, cells[i])[0]
            draw.text((x0 + (cw - tw) // 2, y0 + ch + pad // 2), cells[i], fill=ink, font=font)
    for c, text in enumerate(cols or []):
        tw = text_size(font, text)[0]
        draw.text((left + padding + c * (cw + padding) + (cw - tw) // 2, pad), text, fill=ink, font=font)
    for r, text in enumerate(rows or []):
        y = top + padding + r * (ch + cap_h + padding) + (ch - line_h) // 2
        draw.text((pad, y), text, fill=ink, font=font)
    return canvas


def fit_text(font: Font, text: str, width: float, max_chars: int | None = None) -> str:
    """``text``, shortened in the middle with ``...`` until it is at most ``width`` pixels wide (and ``max_chars``
    characters); ``""`` when not even ``...`` fits."""
    text = str(text)
    limit = len(text) if max_chars is None else max(0, max_chars)
    if len(text) <= limit and text_size(font, text)[0] <= width:
        return text
    for n in range(min(len(text), limit) - 3, 0, -1):
        head = (n + 1) // 2
        short = text[:head] + "..." + text[len(text) - (n - head):]
        if text_size(font, short)[0] <= width:
            return short
    return "..." if text_size(font, "...")[0] <= width else ""


def _distinct_fits(font: Font, labels: list[str], width: float, max_chars: int) -> list[str]:
    """:func:`fit_text` of each label; where that makes distinct labels equal, the prefix they all share is
    replaced by ``...`` first."""
    texts = [fit_text(font, t, width, max_chars) for t in labels]
    if len(set(texts)) == len(set(labels)):
        return texts
    common = os.path.commonprefix(labels)
    cut = max(0, len(common) - 2)  # keep a little context before the first difference
    if cut <= 3:
        return texts
    return [t if fit == t else fit_text(font, "..." + t[cut:], width, max_chars) for t, fit in zip(labels, texts)]


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LabelStrip:
    """Axis labels drawn by :func:`label_strip`: the strip ``image``, each label's ink box ``(x0, y0, x1, y1)``
    (exclusive ends; ``None`` for a label left out to thin a crowded axis), the texts drawn and whether they are
    turned 90 degrees."""

    image: Image.Image
    boxes: list[Box | None]
    texts: list[str]
    rotated: bool


def label_strip(
    labels: Sequence[str],
    centers: Sequence[float],
    width: int,
    font_size: int = 11,
    max_chars: int = 32,
    gap: int = 4,
    background: Color = (255, 255, 255),
    ink: Color = (0, 0, 0),
) -> LabelStrip:
    """Axis labels centred under x positions ``centers`` of a ``width``-pixel chart, which never overlap.

    Labels are drawn level when each fits its place with ``gap`` pixels to the next; otherwise all are turned 90
    degrees (reading upwards, hanging from the axis), and where even that is too crowded only every k-th label
    is drawn. Labels longer than ``max_chars`` (or than ``width``) are shortened in the middle, or after a prefix
    they all share where that keeps distinct labels apart.
    """
    if len(labels) != len(centers):
        raise ConvscopeError(f"label_strip() got {len(labels)} labels for {len(centers)} centers; give one each.")
    if width < 1:
        raise ConvscopeError(f"label_strip(width={width}): use a positive chart width in pixels.")
    font = load_font(font_size)
    texts = _distinct_fits(font, [str(t) for t in labels], width, max_chars)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), t, font=font) for t in (*texts, "Agy|")]
    top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
    tiles = []
    for t, (left, _, right, _) in zip(texts, boxes):
        tile = Image.new("L", (max(1, int(right - left)), int(bottom - top)), 0)
        ImageDraw.Draw(tile).text((-left, -top), t, fill=255, font=font)
        tiles.append(tile)
    order = sorted(range(len(texts)), key=lambda i: centers[i])

    def place(sizes: list[tuple[int, int]], keep: list[int]) -> dict[int, Box] | None:
        """Boxes for the labels ``keep`` (in x order), or None when two would come closer than ``gap``."""
        out: dict[int, Box] = {}
        prev_end = -math.inf
        for i in keep:
            w, h = sizes[i]
            if w > width:
                return None
            x0 = min(max(0, round(centers[i] - w / 2)), width - w)
            if x0 < prev_end + gap:
                return None
            out[i] = (x0, 0, x0 + w, h)
            prev_end = x0 + w
        return out

    visible = [i for i in order if texts[i]]
    placed = place([t.size for t in tiles], visible)
    rotated = placed is None
    if rotated:
        tiles = [t.rotate(90, expand=True) for t in tiles]
        for k in range(1, len(visible) + 1):
            placed = place([t.size for t in tiles], visible[::k])
            if placed is not None:
                break
    placed = placed or {}
    height = max([b[3] for b in placed.values()], default=0) + 1
    strip = Image.new("RGB", (width, height), tuple(background))
    for i, (x0, y0, _, _) in placed.items():
        strip.paste(Image.new("RGB", tiles[i].size, tuple(ink)), (x0, y0), tiles[i])
    return LabelStrip(strip, [placed.get(i) for i in range(len(texts))], texts, rotated)


def filter_grid(weight: torch.Tensor, scale: int = 8, per_filter: bool = True) -> Image.Image:
    """Show convolution filters ``O x I x kh x kw``, one tile per output filter, 0 as mid-grey.

    With ``I == 3`` each filter is an RGB image; otherwise each tile is a sub-grid of grayscale
    input-channel slices. Values are scaled symmetrically by the max absolute value of each filter
    (``per_filter``) or of the whole weight.
    """
    if weight.dim() != 4:
        raise ConvscopeError(
            f"filter_grid expects a conv weight O x I x kh x kw, got {tuple(weight.shape)}; "
            "pass e.g. model.conv1.weight."
        )
    w = weight.detach().float().cpu()
    shown = to_display(w if per_filter else w.reshape(1, 1, 1, -1), "signed").view_as(w)
    out_ch, in_ch = w.shape[:2]
    if in_ch == 3:
        tiles: list[Image.Image] = tensor_to_pils(shown)
        return grid(tiles, nrow=math.ceil(math.sqrt(out_ch)), padding=max(1, scale // 4), scale=scale)
    sub = math.ceil(math.sqrt(in_ch))
    tiles = [
        grid(list(shown[o]), nrow=sub, padding=1, scale=scale, background=(255, 255, 255))
        for o in range(out_ch)
    ]
    return grid(tiles, nrow=math.ceil(math.sqrt(out_ch)), padding=max(2, scale // 2))


# --------------------------------------------------------------------------- saving


def save_png(img: Image.Image | torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write an image (PIL, or a tensor in [0, 1]) as PNG, atomically, creating folders."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ConvscopeError(f"save_png({p}): the file name must end in .png.")
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return atomic_write_bytes(p, buf.getvalue())
