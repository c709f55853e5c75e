"""Network Dissection as files: an HTML page per layer, bar charts, and every IoU as CSV / JSON.

For each layer (Bau et al. 2017 Fig. 2; survey Fig. 16 and Fig. 17 left):

* ``dissect_<layer>.html`` (linking its PNGs, or with them embedded when self-contained): the per-category chart
  of unique detectors (``dissect_<layer>.png``), then one entry per unit (detectors first, by IoU): label,
  category, IoU, threshold, and its strongest images (``units_<layer>/unit_<u>.png``) with the region where the
  unit's upsampled map exceeds ``T_f`` highlighted (the rest dimmed, the region outlined);
* ``dissect_<layer>.csv``: one row per unit (unit, label, category, iou, threshold, detector);
  ``iou_<layer>.csv``: the full units x concepts IoU matrix;
* ``dissect.json``: every layer's rows, summary and IoU matrix; ``dissect_summary.png``: the chart of all layers.

Charts are drawn with PIL (:func:`category_chart`, :func:`comparison_chart`); every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_text
from ..core.model import input_normalizer
from ..core.render import fit_text, grid, label_strip, load_font, save_png, text_size
from ..core.report import HtmlReport
from ..core.stream import stream_layers
from ..data.broden import BrodenDataset
from ..errors import ConvscopeError
from ..methods.dissect import Comparison, DissectConfig, LayerDissection, compare, dissect, float32_below

__all__ = ["CheckpointComparison", "DissectReport", "category_chart", "comparison_chart", "dissect_checkpoints",
           "dissect_report", "unit_images"]

CATEGORY_COLORS = {"color": (214, 96, 77), "object": (67, 147, 195), "part": (146, 197, 222),
                   "scene": (90, 174, 97), "texture": (153, 112, 171), "material": (224, 176, 60)}
_FALLBACK = [(120, 120, 120), (191, 129, 45), (53, 151, 143), (197, 27, 125)]


def _color(cat: str, cats: Sequence[str]) -> tuple[int, int, int]:
    return CATEGORY_COLORS.get(cat, _FALLBACK[list(cats).index(cat) % len(_FALLBACK)] if cat in cats else (0, 0, 0))


def _bars(groups: Sequence[tuple[str, Mapping[str, int]]], cats: Sequence[str], title: str,
          sections: Sequence[tuple[str, int]] = ()) -> Image.Image:
    """Grouped bar chart: one group per (name, {category: count}), one bar per category; ``sections`` label runs
    of consecutive groups (name, number of groups) on a line below. Group names are drawn by
    :func:`~convscope.core.render.label_strip` (level, turned or thinned so that they never overlap); bars are as
    wide as their count labels, section names are shortened to their span."""
    font, small = load_font(14), load_font(11)
    vmax = max([1] + [int(v) for _, d in groups for v in d.values()])
    bar = max(14, text_size(small, str(vmax))[0] + 4)
    gap, pad_l, pad_t, h = 18, 40, 58, 180
    pitch = len(cats) * bar + gap
    width = pad_l + len(groups) * pitch + gap + 10
    legend_w = sum(text_size(small, c)[0] + 30 for c in cats)
    width = max(width, legend_w + 20, text_size(font, title)[0] + 20)
    centers = [pad_l + gap + i * pitch + len(cats) * bar / 2 for i in range(len(groups))]
    strip = label_strip([name for name, _ in groups], centers, width, font_size=11)
    sec_h = 22 if sections else 0
    y0 = pad_t + h
    img = Image.new("RGB", (width, y0 + 6 + strip.image.height + sec_h + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill=(0, 0, 0), font=font)
    x = 10
    for c in cats:  # legend
        d.rectangle([x, 28, x + 10, 38], fill=_color(c, cats))
        d.text((x + 14, 26), c, fill=(0, 0, 0), font=small)
        x += text_size(small, c)[0] + 30
    for t in range(0, vmax + 1, max(1, vmax // 4)):
        y = y0 - h * t / vmax
        d.line([pad_l - 4, y, width - 10, y], fill=(225, 225, 225))
        d.text((6, y - 7), str(t), fill=(80, 80, 80), font=small)
    d.line([pad_l, y0, width - 10, y0], fill=(0, 0, 0))
    x = pad_l + gap
    for _, counts in groups:
        for c in cats:
            v = int(counts.get(c, 0))
            if v:
                d.rectangle([x, y0 - h * v / vmax, x + bar - 2, y0], fill=_color(c, cats))
                tw = text_size(small, str(v))[0]
                d.text((x + (bar - 2 - tw) / 2, y0 - h * v / vmax - 13), str(v), fill=(0, 0, 0), font=small)
            x += bar
        x += gap
    img.paste(strip.image, (0, y0 + 6))
    x, ys = pad_l + gap, y0 + 6 + strip.image.height + 4
    for name, count in sections:
        span = count * pitch - gap
        d.line([x, ys, x + span, ys], fill=(120, 120, 120))
        label = fit_text(small, name, span)
        tw = text_size(small, label)[0]
        d.text((x + span / 2 - tw / 2, ys + 4), label, fill=(0, 0, 0), font=small)
        x += span + gap
    return img


def category_chart(results: Mapping[str, LayerDissection], title: str = "unique detectors per category"
                   ) -> Image.Image:
    """Unique detectors per category for each layer (survey Fig. 17 left), as a PIL bar chart."""
    if not results:
        raise ConvscopeError("category_chart() got no layers; pass the dict dissect() returns")
    cats: list[str] = []
    for d in results.values():
        cats += [c for c in d.categories if c not in cats]
    return _bars([(layer, d.summary()) for layer, d in results.items()], cats, title)


def comparison_chart(comparison: Comparison, title: str = "unique detectors per category") -> Image.Image:
    """:func:`~convscope.methods.dissect.compare` drawn as grouped bars, one group per (condition, layer)."""
    if len(comparison.layers) == 1:
        groups = [(str(r["condition"]), {c: r[c] for c in comparison.categories}) for r in comparison.rows]
        return _bars(groups, comparison.categories, title)
    groups = [(str(r["layer"]), {c: r[c] for c in comparison.categories}) for r in comparison.rows]
    sections: list[tuple[str, int]] = []
    for r in comparison.rows:
        if sections and sections[-1][0] == r["condition"]:
            sections[-1] = (sections[-1][0], sections[-1][1] + 1)
        else:
            sections.append((str(r["condition"]), 1))
    return _bars(groups, comparison.categories, title, sections)


def _load(dataset: BrodenDataset, ids: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([dataset.load_image(int(i)) for i in ids])).permute(0, 3, 1, 2).float() / 255


def unit_images(model: nn.Module, dataset: BrodenDataset, result: LayerDissection, units: Sequence[int],
                top: int = 4, batch_size: int = 16, size: int | None = 96) -> dict[int, list[Image.Image]]:
    """Each unit's ``top`` strongest images with its thresholded region highlighted (Bau et al. Fig. 2): the
    unit's map upsampled bilinearly to the image, ``> T_f`` kept bright and outlined, the rest dimmed."""
    pairs = [(u, int(i)) for u in units for i in result.top_images[u][:top].tolist()]
    ids = sorted({i for _, i in pairs})
    if not ids:
        return {u: [] for u in units}
    pixels = _load(dataset, ids)
    norm = input_normalizer(model)
    acts = torch.cat([cast(torch.Tensor, a[result.layer]).cpu() for _, a in stream_layers(
        model, norm(pixels).to(next((p.device for p in model.parameters()), torch.device("cpu"))),
        [result.layer], batch_size, progress=False)])
    if acts.dim() == 2:
        acts = acts[:, :, None, None]
    pos = {i: j for j, i in enumerate(ids)}
    thr = float32_below(result.thresholds.double()).float()
    out: dict[int, list[Image.Image]] = {u: [] for u in units}
    for u, i in pairs:
        img = pixels[pos[i]]
        a = F.interpolate(acts[pos[i]:pos[i] + 1, u:u + 1].float(), size=img.shape[-2:], mode="bilinear",
                          align_corners=False)[0, 0]
        mask = a > thr[u]
        edge = mask & ~(F.max_pool2d((~mask).float()[None, None], 3, 1, 1)[0, 0] == 0)
        shown = img * (0.3 + 0.7 * mask.float())
        shown[:, edge] = torch.tensor([1.0, 0.85, 0.0])[:, None]
        pil = Image.fromarray((shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        if size and pil.width != size:
            pil = pil.resize((size, round(pil.height * size / pil.width)), Image.Resampling.BILINEAR)
        out[u].append(pil)
    return out


def _slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer)


def _csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


@dataclass(frozen=True)
class DissectReport:
    """What :func:`dissect_report` wrote."""

    html: list[Path]
    csv: list[Path]
    json: Path
    chart: Path


def dissect_report(model: nn.Module, dataset: BrodenDataset, results: Mapping[str, LayerDissection],
                   out: str | os.PathLike[str], units: Sequence[int] | None = None, top: int = 4,
                   max_units: int | None = None, title: str = "Network Dissection",
                   self_contained: bool = False) -> DissectReport:
    """Write the HTML pages, CSV / JSON files and charts of a :func:`~convscope.methods.dissect.dissect` result.

    ``units`` limits the units shown (default: all, detectors first by IoU, at most ``max_units``); CSV and JSON
    always hold every unit and every IoU. The pages link their pictures (``dissect_<layer>.png`` and
    ``units_<layer>/unit_<u>.png``), or embed them when ``self_contained``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chart = save_png(category_chart(results), out / "dissect_summary.png")
    pages, csvs = [], []
    per_layer: dict[str, object] = {}
    payload = {"layers": per_layer}
    for layer, d in results.items():
        slug = _slug(layer)
        rows = d.table()
        csvs.append(out / f"dissect_{slug}.csv")
        atomic_write_text(csvs[-1], _csv(list(rows[0]) if rows else ["unit"], [list(r.values()) for r in rows]))
        csvs.append(out / f"iou_{slug}.csv")
        atomic_write_text(csvs[-1], _csv(["unit", *d.concepts],
                                         [[u, *[f"{v:.6g}" for v in d.iou[u].tolist()]] for u in range(len(d.rows))]))
        per_layer[layer] = {
            "units": rows, "summary": d.summary(), "detector_counts": d.detector_counts(),
            "concepts": d.concepts, "concept_categories": d.concept_categories, "images": d.images,
            "quantile": d.quantile, "iou_threshold": d.iou_threshold, "iou": [r.tolist() for r in d.iou]}

        order = sorted(range(len(d.rows)), key=lambda u: (not d.rows[u].detector, -d.rows[u].iou))
        shown = [u for u in order if units is None or u in set(units)][:max_units]
        pics = unit_images(model, dataset, d, shown, top=top)
        rep = HtmlReport(f"{title}: {layer}", self_contained=self_contained)
        rep.text(f"{len(d.detectors())} of {len(d.rows)} units are detectors (IoU > {d.iou_threshold}) over "
                 f"{d.images} images; thresholds at the top {d.quantile:g} of each unit's activations. "
                 "Images: the unit's strongest, with the region above its threshold highlighted.")
        rep.image(save_png(category_chart({layer: d}, f"{layer}: unique detectors per category"),
                           out / f"dissect_{slug}.png"))
        rep.table([[k, v, d.detector_counts()[k]] for k, v in d.summary().items()],
                  header=["category", "unique detectors", "detector units"])
        for u in shown:
            r = d.rows[u]
            tag = "" if r.detector else " (not a detector)"
            caption = f"unit {u}: {r.label} ({r.category}) IoU {r.iou:.3f}, T {r.threshold:.3g}{tag}"
            if pics[u]:
                png = save_png(grid(pics[u], nrow=len(pics[u]), padding=2), out / f"units_{slug}" / f"unit_{u}.png")
                rep.image(png, caption=caption)
            else:
                rep.text(caption)
        pages.append(rep.write(out / f"dissect_{slug}.html"))
    js = atomic_write_text(out / "dissect.json", json.dumps(payload))
    return DissectReport(pages, csvs, js, chart)


# --------------------------------------------------------------------------- conditions side by side (Sec. 6.3.2)


@dataclass(frozen=True)
class CheckpointComparison:
    """What :func:`dissect_checkpoints` wrote: the table, its chart and CSV, and each checkpoint's results."""

    comparison: Comparison
    chart: Path
    csv: Path
    results: dict[str, dict[str, LayerDissection]]


def dissect_checkpoints(architecture: str | nn.Module, checkpoints: str | Path | Sequence[str | Path],
                        dataset: str | os.PathLike[str], layers: Sequence[str], config: DissectConfig,
                        out: str | os.PathLike[str], device: str = "auto") -> CheckpointComparison:
    """Dissect several checkpoints of one architecture (e.g. ``train-demo``'s ``epoch_XX.pt``) on the same data and
    tabulate unique detectors per category side by side (survey Sec. 6.3.2; Bau et al. 2017 Fig. 12 follows
    detectors through training). Each checkpoint keeps its own resumable state in ``out/state/<label>``."""
    from .deconv import checkpoint_label, checkpoint_paths, load_checkpoint

    out = Path(out)
    results: dict[str, dict[str, LayerDissection]] = {}
    for path in checkpoint_paths(checkpoints):
        label = checkpoint_label(path)
        model = load_checkpoint(architecture, path, device)
        results[label] = dissect(model, dataset, layers, config, out=out / "state" / _slug(label))
    comparison = compare(results)
    chart = save_png(comparison_chart(comparison, "unique detectors per category, by checkpoint"),
                     out / "dissect_checkpoints.png")
    header = ["condition", "layer", *comparison.categories, "total", "detector_units", "units"]
    table = out / "dissect_checkpoints.csv"
    atomic_write_text(table, _csv(header, [[r[h] for h in header] for r in comparison.rows]))
    return CheckpointComparison(comparison, chart, table, results)
