"""``convscope embed``: a dataset laid out by a layer's features (t-SNE / UMAP / PCA) as pictures.

:func:`embed_report` runs :func:`~convscope.methods.embed.embed` and writes

* ``embed.png``: every image as a small thumbnail at its 2-D position, framed in the colour of its label (or of the
  model's predicted class), with a legend (drawn with PIL);
* ``embed.html``: the same points as an inline SVG; hovering a point shows its image (a tiny script swaps in the
  thumbnail file ``thumbs/NNNNN.png``) and its name, label and predicted class (the point's ``<title>``);
* ``thumbs/``: one small PNG per image, linked from the page (the page itself stays small);
* ``embed.json``: layer, method, seed, class names and every point (id, name, x, y, label, prediction).
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_bytes, atomic_write_text, check_output_dir
from ..core.model import input_normalizer, lenient_preprocess, model_classes, model_name
from ..core.render import load_font, save_png
from ..core.stream import Images
from ..errors import ConvscopeError
from ..methods.embed import Embedding, embed

__all__ = ["PALETTE", "EmbedRun", "class_colours", "embed_report", "run_embed", "scatter_png", "synthetic_scenes"]

# 20 distinguishable colours (Tableau 20 order: dark then light of each hue)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141),
    (158, 218, 229))
OTHER = (90, 90, 90)
METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}


@dataclass(frozen=True)
class EmbedRun:
    """Files written by :func:`embed_report`, the embedding, and the name of each class shown."""

    png: Path
    html: Path
    json: Path
    thumbs: Path
    embedding: Embedding
    class_names: dict[int, str]


def class_colours(classes: torch.Tensor | None) -> dict[int, tuple[int, int, int]]:
    """A colour per class present: the 19 most frequent (20 when there are no more) get palette colours in class
    order, the rest share grey."""
    if classes is None:
        return {}
    ids, counts = np.unique(classes.numpy(), return_counts=True)
    if len(ids) <= len(PALETTE):
        return {int(c): PALETTE[i] for i, c in enumerate(ids)}
    top = sorted(int(c) for c in ids[np.argsort(-counts, kind="stable")[:len(PALETTE) - 1]])
    out = {c: PALETTE[i] for i, c in enumerate(top)}
    return {int(c): out.get(int(c), OTHER) for c in ids}


def _positions(coords: torch.Tensor, size: int, margin: float) -> np.ndarray:
    """Coordinates scaled uniformly (aspect kept) into ``[margin, size - margin]^2``, y pointing down."""
    c = coords.double().numpy()
    lo, hi = c.min(0), c.max(0)
    span = float(max(hi - lo)) or 1.0
    scale = (size - 2 * margin) / span
    centre = (lo + hi) / 2
    p = (c - centre) * scale + size / 2
    p[:, 1] = size - p[:, 1]
    return p


def _name(names: dict[int, str], c: int) -> str:
    return names.get(c, f"class {c}")


def scatter_png(emb: Embedding, class_names: dict[int, str] | None = None, size: int = 1000, thumb: int = 28,
                title: str = "") -> Image.Image:
    """The embedding as a picture: a framed thumbnail (or a dot, without thumbnails) per image at its position,
    coloured by class, and a legend on the right."""
    names = class_names or {}
    classes = emb.colours
    colours = class_colours(classes)
    legend_w = 240
    img = Image.new("RGB", (size + legend_w, size), "white")
    draw = ImageDraw.Draw(img)
    pos = _positions(emb.coords, size, thumb / 2 + 6)
    order = np.random.default_rng(emb.seed).permutation(len(pos))  # no class always drawn on top
    for i in order:
        x, y = pos[i]
        colour = colours.get(int(classes[i]), OTHER) if classes is not None else OTHER
        if emb.thumbnails is not None:
            t = Image.fromarray(emb.thumbnails[i].permute(1, 2, 0).numpy()).resize((thumb, thumb),
                                                                                   Image.Resampling.LANCZOS)
            x0, y0 = int(round(x - thumb / 2)), int(round(y - thumb / 2))
            draw.rectangle([x0 - 3, y0 - 3, x0 + thumb + 2, y0 + thumb + 2], fill=colour)
            img.paste(t, (x0, y0))
        else:
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour, outline=(255, 255, 255))
    draw.line([(size, 0), (size, size)], fill=(220, 220, 220))
    font, small = load_font(15), load_font(13)
    y = 14
    lines = [title, f"{METHOD_NAMES.get(emb.method, emb.method)} of {emb.layer}", f"{len(pos)} images, seed {emb.seed}"]
    for line in lines:
        if line:
            draw.text((size + 14, y), line[:30], fill=(30, 30, 30), font=font if y == 14 else small)
            y += 22
    y += 8
    if classes is not None:
        draw.text((size + 14, y), "label" if emb.labels is not None else "predicted class", fill=(90, 90, 90),
                  font=small)
        y += 22
        counts = {c: int((classes == c).sum()) for c in colours}
        shown = [c for c in sorted(colours) if colours[c] != OTHER]
        for c in shown:
            draw.rectangle([size + 14, y + 2, size + 28, y + 16], fill=colours[c])
            draw.text((size + 36, y), f"{_name(names, c)[:20]} ({counts[c]})", fill=(30, 30, 30), font=small)
            y += 22
        rest = sum(counts[c] for c in colours if colours[c] == OTHER)
        if rest:
            draw.rectangle([size + 14, y + 2, size + 28, y + 16], fill=OTHER)
            draw.text((size + 36, y), f"other classes ({rest})", fill=(30, 30, 30), font=small)
    return img


_SCRIPT = """
const peek = document.getElementById('peek');
for (const c of document.querySelectorAll('#scatter [data-t]')) {
  c.addEventListener('mouseenter', () => { peek.src = c.dataset.t; peek.style.display = 'block'; });
  c.addEventListener('mousemove', e => { peek.style.left = (e.clientX + 14) + 'px';
                                         peek.style.top = (e.clientY + 14) + 'px'; });
  c.addEventListener('mouseleave', () => { peek.style.display = 'none'; });
}
""".strip()

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
#scatter circle:hover { stroke: #000; stroke-width: 2; }
#peek { position: fixed; display: none; width: 128px; height: 128px; image-rendering: auto;
        border: 2px solid #333; background: #fff; pointer-events: none; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; }
""".strip()


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def embed_report(model: nn.Module, layer: str, data: Images, out: str | Path,
                 labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
                 class_names: Sequence[str] | dict[int, str] | None = None, names: Sequence[str] | None = None,
                 method: str = "tsne", seed: int = 0, batch_size: int = 32, thumbnail: int = 64, point: int = 28,
                 progress: bool | None = None, title: str = "") -> EmbedRun:
    """Embed ``data`` by ``layer`` (:func:`~convscope.methods.embed.embed`) and write ``embed.png``,
    ``embed.html``, ``thumbs/`` and ``embed.json`` into the folder ``out``.

    ``labels``: a class per image to colour by (default: the model's predicted class); ``class_names``: their
    names (a list indexed by class, or a dict; default: the model's classes); ``names``: a name per image for the
    tooltips; ``thumbnail``: the size of the hover pictures, ``point``: of the thumbnails in the PNG.
    """
    out = check_output_dir(out)
    if isinstance(point, bool) or not isinstance(point, int) or not 4 <= point <= 128:
        raise ConvscopeError(f"point={point!r}: give the thumbnail size in the picture in pixels, 4..128")
    if isinstance(thumbnail, bool) or not isinstance(thumbnail, int) or not 8 <= thumbnail <= 512:
        raise ConvscopeError(f"thumbnail={thumbnail!r}: give the hover picture size in pixels, 8..512")
    emb = embed(model, layer, data, labels, method=method, seed=seed, batch_size=batch_size, progress=progress,
                thumbnail=thumbnail)
    n = len(emb.coords)
    if names is not None and len(names) != n:
        raise ConvscopeError(f"names: give one name per image ({n}), got {len(names)}")
    img_names = [str(s) for s in names] if names is not None else [f"image {int(i)}" for i in emb.ids]
    known = class_names if class_names is not None else model_classes(model)
    cnames = dict(known) if isinstance(known, dict) else dict(enumerate(known or ()))
    cnames = {int(k): str(v) for k, v in cnames.items()}
    title = title or model_name(model)
    png = save_png(scatter_png(emb, cnames, thumb=point, title=title), out / "embed.png")
    thumbs = out / "thumbs"
    thumbs.mkdir(exist_ok=True)
    assert emb.thumbnails is not None
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(emb.thumbnails[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        atomic_write_bytes(thumbs / f"{i:05d}.png", buf.getvalue(), fsync=False)
    colours = class_colours(emb.colours)
    points: list[dict[str, Any]] = []
    for i in range(n):
        x, y = (float(v) for v in emb.coords[i])
        lab = int(emb.labels[i]) if emb.labels is not None else None
        pred = int(emb.predictions[i]) if emb.predictions is not None else None
        points.append({"id": int(emb.ids[i]), "name": img_names[i], "x": x, "y": y, "label": lab,
                       "prediction": pred, "thumbnail": f"thumbs/{i:05d}.png"})
    json_path = atomic_write_text(out / "embed.json", json.dumps(
        {"model": model_name(model), "layer": emb.layer, "method": emb.method, "seed": emb.seed,
         "class_names": {str(k): v for k, v in cnames.items()}, "points": points}, indent=1))

    esc = html.escape
    size = 800
    pos = _positions(emb.coords, size, 12)
    circles = []
    for i, pnt in enumerate(points):
        c = emb.colours
        colour = colours.get(int(c[i]), OTHER) if c is not None else OTHER
        tip = pnt["name"]
        if pnt["label"] is not None:
            tip += f" | label: {_name(cnames, pnt['label'])}"
        if pnt["prediction"] is not None:
            tip += f" | predicted: {_name(cnames, pnt['prediction'])}"
        circles.append(f'<circle cx="{pos[i, 0]:.1f}" cy="{pos[i, 1]:.1f}" r="5" fill="{_hex(colour)}" '
                       f'fill-opacity="0.85" data-t="{esc(pnt["thumbnail"])}"><title>{esc(tip)}</title></circle>')
    legend = ""
    if emb.colours is not None:
        counts = {c: int((emb.colours == c).sum()) for c in colours}
        legend = "<table><tr><th></th><th>{}</th><th>images</th></tr>{}</table>".format(
            "label" if emb.labels is not None else "predicted class",
            "".join(f'<tr><td><span class="swatch" style="background:{_hex(colours[c])}"></span></td>'
                    f"<td>{esc(_name(cnames, c))}</td><td>{counts[c]}</td></tr>" for c in sorted(colours)))
    settings = [("model", model_name(model)), ("layer", emb.layer), ("features", f"{emb.features.shape[1]} "
                "(global average pooled)"), ("images", str(n)), ("method", emb.method), ("seed", str(emb.seed))]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>convscope embed: {esc(title)} {esc(emb.layer)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            f"<body>\n<h1>{esc(title)}: {esc(METHOD_NAMES.get(emb.method, emb.method))} of {esc(emb.layer)}</h1>\n"
            "<p>Each point is an image, placed by the global-average-pooled features of the layer (images the layer "
            "finds alike are close). Hover a point to see the image.</p>\n<table>"
            + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings) + "</table>\n"
            f'<svg id="scatter" xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
            f'viewBox="0 0 {size} {size}" style="border:1px solid #ddd">\n' + "\n".join(circles) + "\n</svg>\n"
            + legend + '\n<h2>With the images</h2>\n<img src="embed.png" alt="the embedding with thumbnails" '
            'style="max-width:100%">\n<img id="peek" alt="">\n'
            f"<script>\n{_SCRIPT}\n</script>\n</body>\n</html>\n")
    html_path = atomic_write_text(out / "embed.html", page)
    return EmbedRun(png, html_path, json_path, thumbs, emb, cnames)


def synthetic_scenes(model: nn.Module, n: int = 300, seed: int = 0, start: int | None = None,
                     progress: bool | None = None, size: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` held-out synthetic scenes (:func:`convscope.data.synthetic.render_arrays`) at the model's input size
    (or ``size`` x ``size``), in its input space, with their scene classes and the class names:
    ``(x, labels, names)``."""
    from ..data.synthetic import HELD_OUT_START, SynthConfig, render_arrays

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"--synthetic {n!r}: give a positive number of images")
    hw = (size, size) if size is not None else lenient_preprocess(model).input_size or (112, 112)
    if hw[0] != hw[1]:
        raise ConvscopeError(f"synthetic images are square; the model's input is {hw[0]} x {hw[1]}")
    arrays = render_arrays(HELD_OUT_START if start is None else start, n, hw[0], seed, progress=progress)
    x = input_normalizer(model)(torch.from_numpy(arrays.images).permute(0, 3, 1, 2).float().div(255))
    return x, torch.from_numpy(arrays.scenes).long(), list(SynthConfig().shapes)


def run_embed(model: nn.Module, layer: str, out: str | Path, images: Sequence[str | Path] | None = None,
              synthetic: int | None = None, method: str = "tsne", seed: int = 0, batch_size: int = 32,
              progress: bool | None = None) -> EmbedRun:
    """What ``convscope embed`` runs: image files / folders (coloured by the predicted class) or ``synthetic``
    held-out synthetic scenes (coloured by their scene label)."""
    if bool(images) == (synthetic is not None):
        raise ConvscopeError("give either --images DIR (image files or folders) or --synthetic N, one of them")
    if synthetic is not None:
        from ..data.synthetic import HELD_OUT_START

        x, labels, names = synthetic_scenes(model, synthetic, seed, progress=progress)
        return embed_report(model, layer, x, out, labels=labels, class_names=names, method=method, seed=seed,
                            batch_size=batch_size, progress=progress,
                            names=[f"synthetic #{HELD_OUT_START + i}" for i in range(len(x))])
    from .deconv import file_images

    files = file_images(list(images or []), model)
    return embed_report(model, layer, files.batches(batch_size), out, method=method, seed=seed,
                        batch_size=batch_size, progress=progress, names=[Path(p).name for p in files.names])
