"""Activation maximization, measured: pictures of what units and classes want, and how strongly they get it.

:func:`maximize_report` runs :func:`~convscope.methods.maximize.activation_maximization` for a set of units per
layer (and class logits), under one or more regularization presets, and measures for every unit:

* the objective reached (the channel's mean activation; the logit for a class) against the unit's highest value of
  the same objective over a dataset of real images (``ratio`` > 1: the synthetic image beats every real one), and the
  same for the strongest single position (spatial maximum; Zeiler & Fergus's top-1 value);
* for a class: the softmax probability the model gives the target class, and the probability other models give it
  (transfer, e.g. ``efficientnet_lite1`` / ``efficientnet_lite2``; the image resized to each model's input size; the
  model itself sees the image at the size it was optimized at):
  do the features found generalize, or are they the model's private adversarial patterns (Nguyen et al. 2015)?

Writes, atomically: ``am_<layer>.png`` per layer (rows = presets, columns = units, captions = ratio or
probability), ``am_overview.png`` (rows = layers, the last preset), ``maximize.html`` and ``maximize.json``.
Defaults: the bundled sample photos and textures for ImageNet models, 500 held-out synthetic images
(``render_sample(100000 + i, 112, 0)``) for ``demo_net``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.images import sample_images
from ..core.io import atomic_write_text
from ..core.layers import is_output, resolve_layer
from ..core.model import lenient_preprocess, model_classes, model_name, zoo_name
from ..core.probe import probe
from ..core.render import grid, save_png
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.maximize import PRESETS, activation_maximization
from ..models.zoo import get_classes, load_model
from .deconv import ImageSet, default_images, file_images, synthetic_images

LOGITS = "logits"  # the report's name for the model output (given as any spelling core.layers.is_output accepts)


@dataclass(frozen=True)
class MaximizeRun:
    """What :func:`maximize_report` wrote: ``rows`` (one dict per layer, preset and unit), ``summary`` (one per layer
    and preset), the grid PNGs, the HTML page and the JSON file."""

    rows: list[dict]
    summary: list[dict]
    pngs: list[Path]
    html: Path
    json: Path


def _dataset(model: nn.Module, images: ImageSet | torch.Tensor | Sequence[str | Path] | None,
             synthetic: int | None) -> ImageSet:
    if images is not None or synthetic is not None or zoo_name(model) == "demo_net":
        if images is None and synthetic is None:
            return synthetic_images(model, progress=False)
        return default_images(model, images, synthetic, progress=False)
    files = list(sample_images().values())
    if not files:
        raise ConvscopeError("no bundled sample images found (they come with scikit-image / scikit-learn); pass "
                             "images=DIR")
    return file_images(files, model)


def _dataset_stats(model: nn.Module, data: ImageSet, layers: list[str], batch_size: int) -> dict[str, dict]:
    """Per layer: the dataset maximum of every unit's channel mean and of its spatial maximum (and, for
    :data:`LOGITS`, of every logit and softmax probability)."""
    names = [n for n in layers if n != LOGITS]
    stats: dict[str, dict] = {}

    def fold(key: str, what: str, v: torch.Tensor) -> None:
        d = stats.setdefault(key, {})
        v = v.detach().float().cpu().amax(0)
        d[what] = v if what not in d else torch.maximum(d[what], v)

    with torch.no_grad(), probe(model, names, detach=True, stop_early=LOGITS not in layers) as p:
        for x in data.batches(batch_size):
            p.clear()
            out = p.forward(model, x)
            for n in names:
                a = p.activations[n]
                fold(n, "mean", a.flatten(2).mean(2) if a.dim() > 2 else a)
                fold(n, "max", a.flatten(2).amax(2) if a.dim() > 2 else a)
            if LOGITS in layers:
                logits = out.reshape(out.shape[0], -1)  # type: ignore[union-attr]
                fold(LOGITS, "mean", logits)
                fold(LOGITS, "max", logits)
                fold(LOGITS, "prob", F.softmax(logits.float(), 1))
    return stats


def _probabilities(model: nn.Module, rgb: torch.Tensor, classes: list[int], resize: bool = True,
                   ) -> tuple[list[float], list[int]]:
    """Softmax probability of each image's target class and the top-1 class, ``rgb`` (N x 3 x H x W in [0, 1])
    resized to the model's input size (``resize``; else as it is) and normalized by its preprocess."""
    pre = lenient_preprocess(model)
    x = rgb
    if resize and pre.input_size is not None and tuple(x.shape[-2:]) != tuple(pre.input_size):
        x = F.interpolate(x, size=pre.input_size, mode="bilinear", align_corners=False, antialias=True)
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), probe(model):
        p = F.softmax(model(pre.normalize(x).to(dev)).float().reshape(len(x), -1), 1).cpu()
    return p[torch.arange(len(x)), torch.tensor(classes)].tolist(), p.argmax(1).tolist()


def _strongest(stats: dict, n: int) -> list[int]:
    return stats["mean"].topk(min(n, len(stats["mean"]))).indices.tolist()


def _short(name: str, width: int = 12) -> str:
    name = name.split(",")[0]
    return name if len(name) <= width else name[:width - 1] + "."


def maximize_report(
    model: nn.Module, layers: Sequence[str], *, units: int | Sequence[int] = 16, classes: Sequence[int] | None = None,
    presets: Sequence[str] = ("none", "yosinski"), steps: int = 200, size: int | None = None,
    images: ImageSet | torch.Tensor | Sequence[str | Path] | None = None, synthetic: int | None = None,
    transfer: Sequence[str | nn.Module] = (), out: str | Path = Path("out/maximize"), seed: int = 0,
    batch_size: int = 32, progress: bool | None = None, cell: int | None = None, self_contained: bool = False,
) -> MaximizeRun:
    """Activation maximization for ``units`` of each of ``layers`` (``"logits"``: the classes ``classes``) under
    each preset, measured against the dataset (see the module docstring).

    Args:
        layers: layer names (``convscope layers MODEL``) and/or ``"logits"``.
        units: per layer, the ``units`` units with the highest dataset maximum of their channel mean (alive units)
            when an int, else these indices for every layer.
        classes: the classes for ``"logits"`` (default: the first ``units`` classes).
        presets: regularization presets (``none``, ``simonyan``, ``yosinski``, ``olah``; ``olah`` runs in the Fourier
            parametrization).
        steps, size, seed: of the optimization (size default: the model's input size).
        images / synthetic: the dataset (default: bundled photos + textures; ``demo_net``: 500 synthetic images).
        transfer: zoo names or models that also classify the class images (a model without ``zoo_name`` is
            reported as ``transfer<i>``).
        cell: pixels per picture in the grids (default: the image size, at most 128).
        self_contained: embed the grids in ``maximize.html`` (default: the page links the PNGs beside it).
    """
    layers = list(layers)
    if not layers:
        raise ConvscopeError("layers: give at least one layer name or 'logits'")
    for preset in presets:
        if preset not in PRESETS:
            raise ConvscopeError(f"preset {preset!r}: use one of {', '.join(PRESETS)}")
    names = [LOGITS if is_output(n, model) else resolve_layer(model, n)[0] for n in layers]
    out = Path(out)
    net_name = model_name(model)
    data = _dataset(model, images, synthetic)
    stats = _dataset_stats(model, data, names, batch_size)
    transfer_models = [(t, load_model(t)) if isinstance(t, str) else (getattr(t, "zoo_name", None) or f"transfer{i}", t)
                       for i, t in enumerate(transfer)]
    class_names = get_classes(model)
    rows: list[dict] = []
    pictures: dict[tuple[str, str], tuple[torch.Tensor, list[str], list[str]]] = {}
    for layer in names:
        if layer == LOGITS:
            n_cls = len(stats[LOGITS]["mean"])
            unit_list = list(classes) if classes is not None else list(range(min(n_cls, units if isinstance(units, int)
                                                                                   else len(units))))
        else:
            unit_list = _strongest(stats[layer], units) if isinstance(units, int) else [int(u) for u in units]
        for preset in presets:
            res = activation_maximization(
                model, None if layer == LOGITS else layer, unit_list, steps=steps, size=size, seed=seed,
                regularize=preset, parametrization="fourier" if preset == "olah" else "pixel", progress=progress)
            with torch.no_grad(), probe(model, [] if layer == LOGITS else [layer], detach=True,
                                        stop_after=None if layer == LOGITS else layer) as p:
                final = p.forward(model, res.x)
                a = final if layer == LOGITS else p.activations[layer]
            a = a.reshape(a.shape[0], a.shape[1], -1).float().cpu()  # type: ignore[union-attr]
            idx = torch.arange(len(unit_list))
            spatial = a[idx, torch.tensor(unit_list)].amax(1)
            captions, labels = [], []
            probs: dict[str, tuple[list[float], list[int]]] = {}
            if layer == LOGITS:
                probs[net_name] = _probabilities(model, res.images, unit_list, resize=False)  # as optimized
                for tname, tm in transfer_models:
                    probs[tname] = _probabilities(tm, res.images, unit_list)
            for i, u in enumerate(unit_list):
                ds_mean = float(stats[layer]["mean"][u])
                ds_max = float(stats[layer]["max"][u])
                value = float(res.activations[i])
                row = {"model": net_name, "layer": layer, "preset": preset, "unit": u, "value": value,
                       "dataset_max": ds_mean, "ratio": value / ds_mean if ds_mean > 0 else None,
                       "spatial_max": float(spatial[i]), "dataset_spatial_max": ds_max,
                       "spatial_ratio": float(spatial[i]) / ds_max if ds_max > 0 else None}
                if layer == LOGITS:
                    cls_name = class_names[u] if class_names and u < len(class_names) else str(u)
                    row["class"] = cls_name
                    row["dataset_max_prob"] = float(stats[LOGITS]["prob"][u])
                    for tname, (pv, top1) in probs.items():
                        row[f"p[{tname}]"] = pv[i]
                        row[f"top1[{tname}]"] = top1[i]
                    captions.append(f"p={probs[net_name][0][i]:.2f}")
                    labels.append(_short(cls_name))
                else:
                    captions.append(f"{row['ratio']:.1f}x" if row["ratio"] is not None else "dead")
                    labels.append(f"unit {u}")
                rows.append(row)
            pictures[(layer, preset)] = (res.images, captions, labels)
    summary = _summary(rows, names, presets, [net_name, *[t for t, _ in transfer_models]])
    pngs = _write_grids(pictures, names, presets, out, cell)
    html = _write_html(out, net_name, data, names, presets, steps, pngs, summary, rows, size or "model's",
                       self_contained)
    json_path = atomic_write_text(out / "maximize.json", json.dumps({
        "model": net_name, "layers": names, "presets": list(presets), "steps": steps,
        "size": size, "seed": seed, "dataset": data.source, "transfer": [t for t, _ in transfer_models],
        "hyperparameters": {p: PRESETS[p].__dict__ for p in presets},
        "summary": summary, "rows": rows}, indent=1, default=list))
    return MaximizeRun(rows, summary, pngs, html, json_path)


def _summary(rows: list[dict], layers: list[str], presets: Sequence[str], prob_models: list[str]) -> list[dict]:
    out = []
    for layer in layers:
        for preset in presets:
            rs = [r for r in rows if r["layer"] == layer and r["preset"] == preset]
            ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
            sratios = [r["spatial_ratio"] for r in rs if r["spatial_ratio"] is not None]
            s = {"layer": layer, "preset": preset, "units": len(rs),
                 "median_ratio": statistics.median(ratios) if ratios else None,
                 "min_ratio": min(ratios) if ratios else None,
                 "beats_dataset": sum(r > 1 for r in ratios),
                 "median_spatial_ratio": statistics.median(sratios) if sratios else None}
            if layer == LOGITS:
                for m in prob_models:
                    ps = [r[f"p[{m}]"] for r in rs]
                    s[f"mean p[{m}]"] = sum(ps) / len(ps)
                    s[f"top1 hits[{m}]"] = sum(r[f"top1[{m}]"] == r["unit"] for r in rs)
            out.append(s)
    return out


def _fname(layer: str) -> str:
    return "am_" + layer.replace(".", "_").replace("/", "_") + ".png"


def _write_grids(pictures: dict, layers: list[str], presets: Sequence[str], out: Path, cell: int | None) -> list[Path]:
    pngs = []

    def fit(images: torch.Tensor) -> torch.Tensor:
        side = cell or min(128, images.shape[-1])
        if images.shape[-1] == side:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)

    for layer in layers:
        cells, captions = [], []
        labels: list[str] = []
        for preset in presets:
            imgs, caps, labels = pictures[(layer, preset)]
            cells += list(fit(imgs).clamp(0, 1))
            captions += caps
        img = grid(cells, nrow=len(labels), padding=2, row_labels=list(presets), col_labels=labels,
                   cell_labels=captions)
        pngs.append(save_png(img, out / _fname(layer)))
    last = presets[-1]
    n = min(len(pictures[(layer, last)][2]) for layer in layers)
    cells = [c for layer in layers for c in fit(pictures[(layer, last)][0][:n]).clamp(0, 1)]
    caps = [c for layer in layers for c in pictures[(layer, last)][2][:n]]
    img = grid(cells, nrow=n, padding=2, row_labels=layers, cell_labels=caps)
    pngs.append(save_png(img, out / "am_overview.png"))
    return pngs


def _write_html(out: Path, net_name: str, data: ImageSet, layers: list[str], presets: Sequence[str], steps: int,
                pngs: list[Path], summary: list[dict], rows: list[dict], size: object, self_contained: bool) -> Path:
    rep = HtmlReport(f"Activation maximization: {net_name}", self_contained=self_contained)
    rep.text(f"{steps} steps, size {size}, presets {', '.join(presets)}. Dataset for the comparison: {data.source}. "
             "ratio = the unit's channel-mean activation on its synthetic image / its highest channel mean over the "
             "dataset; spatial ratio the same for the strongest single position. Captions: ratio per unit, softmax "
             "probability of the target class per class.")
    rep.heading("Summary")
    keys = list(dict.fromkeys(k for s in summary for k in s))
    rep.table([[s.get(k, "") if s.get(k) is not None else "" for k in keys] for s in summary], header=keys)
    for layer, png in zip(layers, pngs):
        rep.heading(f"{layer}", 3)
        rep.image(png, caption=f"rows: {', '.join(presets)}")
    rep.heading("Overview", 3)
    rep.image(pngs[-1], caption=f"preset {presets[-1]}, rows = layers")
    rep.heading("Every unit")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rep.table([[r.get(k, "") if r.get(k) is not None else "" for k in keys] for r in rows], header=keys)
    return rep.write(out / "maximize.html")


__all__ = ["LOGITS", "MaximizeCommand", "MaximizeRun", "load_generator", "maximize_report", "run_maximize"]


@dataclass(frozen=True)
class MaximizeCommand:
    """``convscope maximize``: the grid and per-unit PNGs written, the final objective values (one per picture,
    in the order of ``pictures``) and the HTML page showing them."""

    grid: Path
    pictures: list[Path]
    activations: list[float]
    html: Path


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, str, str | None]:
    """A DGN-AM generator from a file: an UpconvNet checkpoint (``train_upconv``; loaded with ``weights_only``)
    or a TorchScript archive. Returns ``(generator, output space, layer it decodes or None)``."""
    from ..errors import ModelLoadError
    from ..methods.upconv import load_upconv

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"generator file {str(p)!r} does not exist; train one with `convscope upconv train "
                             "MODEL --layer L --out FILE`")
    try:
        dec = load_upconv(p, device=device)
        return dec, "input", dec.layer
    except ModelLoadError:
        pass
    try:
        return torch.jit.load(str(p), map_location=device), "rgb", None
    except Exception as exc:  # noqa: BLE001 - any failure means "not TorchScript either"
        raise ModelLoadError(f"{str(p)!r} is neither an UpconvNet checkpoint nor a TorchScript generator "
                             f"({type(exc).__name__}); a TorchScript generator maps codes to RGB in [0, 1]") from None


def run_maximize(model: nn.Module, layer: str | None, units: list[int], out: Path, *, steps: int = 256,
                 regularize: str | None = None, kind: str = "channel", size: int | None = None, seed: int = 0,
                 parametrization: str = "pixel", facets: int = 0, images: ImageSet | None = None, top: int = 50,
                 generator: str | Path | None = None, code_init: str | Path = "zeros", lambda_code: float = 1e-3,
                 progress: bool = True, self_contained: bool = False) -> MaximizeCommand:
    """Activation maximization for ``units`` of ``layer`` (``None``, ``"logits"``, ``"output"``: class logits, as
    :func:`~convscope.core.layers.is_output`), plain, multifaceted
    (``facets > 0``, needs ``images``: an ImageSet from ``applications.deconv.default_images``) or through a
    generator (DGN-AM). Writes ``maximize_<layer>.png`` (labelled grid), ``units/<layer>_<unit>[_f<k>].png``,
    ``maximize.json`` and ``maximize_<layer>.html`` (settings, pictures, the objective reached per picture; it links
    the PNGs, or embeds them when ``self_contained``)."""
    from ..core.images import load_images
    from ..methods.maximize import activation_maximization, dgn_am, encode, multifaceted

    out = Path(out)
    if is_output(layer, model):
        layer = None
    tag = (layer or "logits").replace("/", "_")
    classes = model_classes(model)

    def name(u: int) -> str:
        if layer is None and classes is not None and u < len(classes):
            return f"{u} {classes[u]}"[:20]
        return f"unit {u}"

    if facets:
        if layer is None or images is None:
            raise ConvscopeError("facets cluster a layer's top images: give a layer (not the logits) and images "
                                 "(applications.deconv.default_images)")
        data = images.load(range(len(images)))
        mres = multifaceted(model, layer, units, data, facets=facets, top=top, kind=kind, steps=steps,
                            regularize=regularize, seed=seed, progress=progress)
        tiles = [t for u in range(len(units)) for t in [*mres.starts[u], *mres.images[u]]]
        cells = [f"{lab}" for _ in units for lab in [*[f"start {f}" for f in range(facets)],
                                                     *[f"facet {f}" for f in range(facets)]]]
        picture = grid(tiles, nrow=2 * facets, row_labels=[name(u) for u in units], cell_labels=cells)
        per_unit = [(f"{tag}_{u}_f{f}", mres.images[i, f]) for i, u in enumerate(units) for f in range(facets)]
        acts = mres.activations.flatten().tolist()
    elif generator is not None:
        gen, space, gen_layer = load_generator(generator, next(model.parameters()).device)
        start = str(code_init)
        init: str | torch.Tensor = start
        if start not in ("zeros", "noise"):
            if gen_layer is None:
                raise ConvscopeError("--code-init PHOTO needs an UpconvNet generator (it encodes the photo with "
                                     "the layer the decoder inverts); use zeros or noise for this generator")
            photo = encode(model, gen_layer, load_images([start], model))
            init = photo.expand(len(units), *photo.shape[1:]).clone()
        gres = dgn_am(model, gen, layer, units, kind=kind, code_init=init, lambda_code=lambda_code, output=space,
                      steps=steps, seed=seed, progress=progress)
        picture = grid(list(gres.images), nrow=min(8, len(units)), cell_labels=[name(u) for u in units])
        per_unit = [(f"{tag}_{u}", gres.images[i]) for i, u in enumerate(units)]
        acts = gres.activations.tolist()
    else:
        ares = activation_maximization(model, layer, units, steps=steps, regularize=regularize, kind=kind, size=size,
                                       seed=seed, parametrization=parametrization, progress=progress)
        picture = grid(list(ares.images), nrow=min(8, len(units)), cell_labels=[name(u) for u in units])
        per_unit = [(f"{tag}_{u}", ares.images[i]) for i, u in enumerate(units)]
        acts = ares.activations.tolist()
    png = save_png(picture, out / f"maximize_{tag}.png")
    pictures = [save_png(img.float().cpu(), out / "units" / f"{stem}.png") for stem, img in per_unit]
    atomic_write_text(out / "maximize.json", json.dumps({
        "layer": layer, "units": units, "kind": kind, "steps": steps, "regularize": regularize, "facets": facets,
        "generator": str(generator) if generator else None, "activations": acts}, indent=1))
    settings: dict[str, object] = {
        "model": model_name(model), "layer": layer or "logits (classes)",
        "units": ", ".join(map(str, units)), "objective": kind, "steps": steps, "regularization": regularize or "none",
        "seed": seed}
    if facets:
        settings.update({"facets": facets, "top images clustered": top, "images": len(data)})
    elif generator is not None:
        settings.update({"generator": str(generator), "code init": str(code_init), "lambda_code": lambda_code})
    else:
        settings.update({"parametrization": parametrization, "size": size or "the model's input size"})
    labels = [(name(u), f) for u in units for f in (range(facets) if facets else [None])]
    table = [[lab, *([f] if facets else []), a, p.name] for (lab, f), a, p in zip(labels, acts, pictures)]
    header = ["unit", *(["facet"] if facets else []), "objective reached", "picture"]
    rep = HtmlReport(f"convscope maximize: {settings['model']}, {settings['layer']}", self_contained=self_contained)
    rep.text("Images optimized to maximize each unit's objective (Erhan et al. 2009; Simonyan et al. 2014; Yosinski "
             "et al. 2015). objective reached: the value of the objective on the final image.")
    rep.table([[k, v] for k, v in settings.items()], header=["setting", "value"])
    rep.image(png, caption="rows: units; columns: each facet's start (the mean of its cluster of top images), then "
                           "the optimized facets" if facets else "one optimized image per unit")
    rep.heading("Objective reached")
    rep.table(table, header=header)
    html = rep.write(out / f"maximize_{tag}.html")
    return MaximizeCommand(png, pictures, acts, html)
