"""``convscope similarity``: how similar are the layers of two networks (or of one network with itself)?

:func:`similarity_report` computes :func:`~convscope.methods.similarity.layer_similarity` (linear CKA by default,
Kornblith et al. 2019 / Nguyen et al. 2021; RBF CKA; SVCCA, Raghu et al. 2017) and writes, atomically, into ``out/``:
``similarity.png`` (the layer x layer heatmap, values printed in the cells when they fit), ``similarity.html`` (the
heatmap, the table, the settings) and ``similarity.json`` (the numbers). With ``match=(layer_a, layer_b)`` it also
matches the units of those two layers one to one by the correlation of their activations (Li et al. 2016,
:func:`~convscope.methods.similarity.match_units`) and shows, for the best-matched pairs, each unit's strongest image
patches (:func:`~convscope.methods.topk.top_k_activations`, cropped to the receptive field) side by side:
``matching.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_text, check_output_dir
from ..core.model import model_name
from ..core.render import colormap, fit_text, grid, label_strip, load_font, save_png, text_size
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.similarity import METHODS, SimilarityResult, UnitMatching, layer_similarity, match_units
from ..methods.topk import top_k_activations, top_k_patches
from .deconv import ImageSet, default_images

__all__ = ["SimilarityRun", "matching_picture", "similarity_heatmap", "similarity_report"]

METHOD_NAMES = {"linear_cka": "linear CKA (minibatch, unbiased HSIC)", "rbf_cka": "RBF CKA", "svcca": "SVCCA"}


@dataclass(frozen=True)
class SimilarityRun:
    """What :func:`similarity_report` made: the similarity ``result``, the unit ``matching`` (or None) and the
    files written (``matching_png`` None without matching)."""

    result: SimilarityResult
    matching: UnitMatching | None
    png: Path
    matching_png: Path | None
    html: Path
    json: Path


# --------------------------------------------------------------------------- the heatmap


def similarity_heatmap(result: SimilarityResult, title: str = "", label_a: str = "model A", label_b: str = "model B",
                       cmap: str = "viridis") -> Image.Image:
    """The layer x layer matrix as a heatmap (rows: ``layers_a``, columns: ``layers_b``; colour 0 .. 1), with the
    values printed in the cells when they fit, the layer names on both axes and a colour bar."""
    m = result.matrix.detach().double().cpu()
    rows, cols = m.shape
    cell = int(min(48, max(10, 480 // max(rows, cols))))
    font, small = load_font(12), load_font(10)
    line = text_size(font, "Agy|")[1]
    names_a = [fit_text(font, n, 160, 28) for n in result.layers_a]
    left = max(text_size(font, n)[0] for n in names_a) + 10
    top = (line + 8) if title else 4
    bar_w, gap = 14, 16
    w_map, h_map = cols * cell, rows * cell
    lut = (colormap(cmap) * 255).round().to(torch.uint8).numpy()
    values = m.clamp(0, 1)
    pix = lut[(values * 255).round().long().numpy()]  # rows x cols x 3
    heat = Image.fromarray(pix).resize((w_map, h_map), Image.Resampling.NEAREST)
    strip = label_strip(result.layers_b, [cell * (j + 0.5) for j in range(cols)], w_map, font_size=11)
    bar_label_w = text_size(small, "1.00")[0] + 4
    width = left + w_map + gap + bar_w + bar_label_w + 8
    height = top + h_map + strip.image.height + 2 * line + 12
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), fit_text(font, title, width - 8), fill=(0, 0, 0), font=font)
    canvas.paste(heat, (left, top))
    if cell >= 30:
        for i in range(rows):
            for j in range(cols):
                v = float(m[i, j])
                r, g, b = (int(c) for c in pix[i, j])
                ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
                text = f"{v:.2f}"
                tw, th = text_size(small, text)
                draw.text((left + j * cell + (cell - tw) // 2, top + i * cell + (cell - th) // 2), text, fill=ink,
                          font=small)
    for i, name in enumerate(names_a):
        tw = text_size(font, name)[0]
        draw.text((left - 6 - tw, top + i * cell + (cell - line) // 2), name, fill=(0, 0, 0), font=font)
    canvas.paste(strip.image, (left, top + h_map + 4))
    below = top + h_map + strip.image.height + 8
    caption = f"columns: {label_b}; rows: {label_a}"
    draw.text((left, below), fit_text(font, caption, width - left - 4), fill=(0, 0, 0), font=font)
    # colour bar 0 (bottom) .. 1 (top)
    x0 = left + w_map + gap
    ramp = torch.linspace(1, 0, h_map)
    bar = lut[(ramp * 255).round().long().numpy()][:, None, :].repeat(bar_w, 1)
    canvas.paste(Image.fromarray(bar), (x0, top))
    draw.rectangle([x0, top, x0 + bar_w - 1, top + h_map - 1], outline=(0, 0, 0))
    draw.text((x0 + bar_w + 3, top - 2), "1.00", fill=(0, 0, 0), font=small)
    draw.text((x0 + bar_w + 3, top + h_map - text_size(small, "0")[1]), "0.00", fill=(0, 0, 0), font=small)
    return canvas


# --------------------------------------------------------------------------- matched units


def matching_picture(model_a: nn.Module, model_b: nn.Module, images: ImageSet, matching: UnitMatching,
                     pairs: Sequence[int], k: int = 6, batch_size: int = 32, label_a: str = "model A",
                     label_b: str = "model B", progress: bool | None = None) -> Image.Image:
    """For the pairs ``pairs`` (row indices of ``matching.pairs``), each unit's ``k`` strongest image patches
    (receptive-field crops of its top-k activations over ``images``), unit of ``a`` beside its match in ``b``."""
    sel = matching.pairs[list(pairs)]
    units_a, units_b = sel[:, 0].tolist(), sel[:, 1].tolist()
    top_a = top_k_activations(model_a, images.batches(batch_size), matching.layer_a, k=k, progress=progress)
    top_b = top_k_activations(model_b, images.batches(batch_size), matching.layer_b, k=k, progress=progress)
    found_a = top_k_patches(model_a, images, top_a[matching.layer_a], units_a, projections=False,
                            batch_size=batch_size)
    found_b = top_k_patches(model_b, images, top_b[matching.layer_b], units_b, projections=False,
                            batch_size=batch_size)
    side = int(max((found_a.boxes[..., 2:] - found_a.boxes[..., :2]).max(),
                   (found_b.boxes[..., 2:] - found_b.boxes[..., :2]).max()))
    scale = max(1, 40 // max(1, side))
    ncol = min(k, 6)
    cells, labels = [], []
    for j, (ua, ub) in enumerate(zip(units_a, units_b)):
        cells.append(grid(found_a.patches[j], nrow=ncol, padding=1, scale=scale))
        cells.append(grid(found_b.patches[j], nrow=ncol, padding=1, scale=scale))
        labels.append(f"{ua} ~ {ub}  r={float(matching.correlation[ua, ub]):.2f}")
    return grid(cells, nrow=2, padding=6, row_labels=labels,
                col_labels=[f"{label_a}: {matching.layer_a}", f"{label_b}: {matching.layer_b}"])


# --------------------------------------------------------------------------- the report


def similarity_report(a: nn.Module, b: nn.Module, data: torch.Tensor | Sequence[str | Path] | ImageSet | None = None,
                      out: str | Path = Path("out/similarity"), *, layers_a: str | Sequence[str] | None = None,
                      layers_b: str | Sequence[str] | None = None, method: str = "linear_cka",
                      reduce: str = "flatten", batch_size: int = 64, match: tuple[str, str] | None = None,
                      match_method: str = "hungarian", n_pairs: int = 8, k: int = 6, synthetic: int | None = None,
                      label_a: str | None = None, label_b: str | None = None, progress: bool | None = None,
                      self_contained: bool = False) -> SimilarityRun:
    """Layer similarity of ``a`` and ``b`` over ``data`` as a heatmap, HTML and JSON in ``out``; optionally the unit
    matching of one pair of layers with the matched units' top patches.

    Args:
        data: images (a tensor in the models' input space, image paths or folders, an ImageSet); default: held-out
            synthetic scenes for demo_net (``synthetic`` of them), the bundled photos otherwise.
        layers_a, layers_b, method, reduce, batch_size: of :func:`~convscope.methods.similarity.layer_similarity`.
        match: ``(layer_a, layer_b)`` to match units (Li et al. 2016) with ``match_method`` (``hungarian``,
            ``greedy`` or ``semi``); the ``n_pairs`` best-correlated pairs are pictured with ``k`` patches each.
        label_a, label_b: names of the two models in the pictures (default: their model names).
    """
    if method not in METHODS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ConvscopeError(f"n_pairs={n_pairs!r}: give a positive number of matched pairs to show")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConvscopeError(f"k={k!r}: give a positive number of patches per unit")
    if match is not None and (isinstance(match, str) or len(match) != 2):
        raise ConvscopeError(f"match={match!r}: give a pair (layer of a, layer of b), e.g. ('features.relu2', "
                             "'features.relu2')")
    out = check_output_dir(out)
    label_a = label_a or model_name(a)
    label_b = label_b or (model_name(b) if b is not a else label_a)
    if label_a == label_b and b is not a:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    images = default_images(a, data, synthetic, progress=progress is not False)
    result = layer_similarity(a, b, images.batches(batch_size), layers_a, layers_b, method=method, reduce=reduce,
                              batch_size=batch_size, progress=progress)
    title = f"{METHOD_NAMES[method]}, {result.n_images} images, features {reduce}"
    png = save_png(similarity_heatmap(result, title, label_a, label_b), out / "similarity.png")

    matching = None
    matching_png = None
    shown: list[int] = []
    if match is not None:
        matching = match_units(a, b, images.batches(batch_size), match[0], match[1], method=match_method,
                               batch_size=batch_size, progress=progress)
        order = torch.argsort(matching.pair_correlation, descending=True, stable=True)
        shown = order[:n_pairs].tolist()
        picture = matching_picture(a, b, images, matching, shown, k=k, batch_size=batch_size, label_a=label_a,
                                   label_b=label_b, progress=progress)
        matching_png = save_png(picture, out / "matching.png")

    rep = HtmlReport(f"convscope similarity: {label_a} vs {label_b}", self_contained=self_contained)
    settings = (f"{METHOD_NAMES[method]} over {images.source} ({result.n_images} used"
                + (f", {result.skipped} left out in a last batch under 4 images" if result.skipped else "")
                + f"); features per image: {'every value C x H x W' if reduce == 'flatten' else 'spatial mean (C)'}")
    if method == "linear_cka":
        settings += (f"; {result.batches} minibatches of up to {batch_size} images, unbiased HSIC averaged over "
                     "minibatches (Nguyen et al. 2021).")
    elif method == "rbf_cka":
        settings += f"; bandwidth sigma = {result.params['sigma']:g} x the median distance (Kornblith et al. 2019)."
    else:
        settings += (f"; SVD keeps {result.params['keep']:g} of the variance, then CCA; mean canonical correlation "
                     f"(Raghu et al. 2017). Dimensions kept: {label_a} {result.params['dims_a']}, {label_b} "
                     f"{result.params['dims_b']}; where two add up to more than {result.n_images - 1} (images - 1) "
                     "the value is 1 by construction: use more images or reduce='mean'.")
    rep.text(settings)
    rep.image(png, caption=f"{png.name}: rows {label_a}, columns {label_b}")
    rep.table([[name, *[float(v) for v in row]] for name, row in zip(result.layers_a, result.matrix)],
              header=[f"{label_a} \\ {label_b}", *result.layers_b])
    if matching is not None and matching_png is not None:
        rep.heading("Matched units (Li et al. 2016, convergent learning)")
        rep.text(f"Correlation of every unit of {matching.layer_a} ({label_a}) with every unit of {matching.layer_b} "
                 f"({label_b}) over {matching.samples} image positions; {matching.method} matching, mean correlation "
                 f"of the pairs {matching.mean_correlation:.3f}. Constant (dead) units, correlation 0: "
                 f"{label_a} {matching.constant_a or 'none'}, {label_b} {matching.constant_b or 'none'}. "
                 f"The {len(shown)} best-correlated pairs, each unit's {k} strongest image patches:")
        rep.image(matching_png, caption=f"{matching_png.name}: unit of {label_a} ~ its match in {label_b}")
        rep.table([[int(p[0]), int(p[1]), float(c)] for p, c in zip(matching.pairs, matching.pair_correlation)],
                  header=[f"unit ({label_a})", f"unit ({label_b})", "correlation"])
    html = rep.write(out / "similarity.html")
    payload = {"model_a": label_a, "model_b": label_b, "images": images.source, **result.to_dict()}
    if matching is not None:
        payload["matching"] = {"layer_a": matching.layer_a, "layer_b": matching.layer_b, "method": matching.method,
                               "samples": matching.samples, "mean_correlation": matching.mean_correlation,
                               "pairs": matching.pairs.tolist(),
                               "correlations": [float(c) for c in matching.pair_correlation],
                               "constant_a": matching.constant_a, "constant_b": matching.constant_b}
    json_path = atomic_write_text(out / "similarity.json", json.dumps(payload, indent=1))
    return SimilarityRun(result, matching, png, matching_png, html, json_path)
