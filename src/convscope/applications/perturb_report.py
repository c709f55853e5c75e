"""``convscope perturb``: what of a layer's code does the reconstruction need? (Dosovitskiy & Brox 2016, Sec. 5;
survey Sec. 5.3.2, Fig. 13).

:func:`run_perturbation` reconstructs images from one layer's code, unperturbed and perturbed (``binarize``: only
the signs, one magnitude; ``dropout``: a random half of the units zeroed; ``drop_least``: the weaker half of the
feature maps zeroed; every perturbation keeps the code's L2 norm), with regularized inversion or a trained
UpconvNet decoder (:func:`~convscope.methods.perturb.perturbation_study`), and writes, atomically, into ``out/``:
``perturb.png`` (one row per image: the original, the reconstruction from the unperturbed code, one per
perturbation, each captioned with its errors), ``perturb.html`` (settings, picture, mean and per-image numbers;
the PNG linked, or embedded when ``self_contained``) and ``perturb.json``.

Numbers per reconstruction: ``feature_error`` ``||Phi(x_k) - Phi(x0)||^2 / ||Phi(x0)||^2`` against the
*unperturbed* code of the original, ``image_error`` the relative squared difference to the unperturbed
reconstruction (0 for it), and PSNR against the original and against the unperturbed reconstruction (None:
identical images).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.images import expand_inputs, load_images, unique_names
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_name
from ..core.render import grid, save_png
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.perturb import PERTURBATIONS, PerturbationStudy, perturbation_study
from .invert_report import psnr

__all__ = ["DESCRIPTIONS", "PerturbationRun", "run_perturbation"]

DESCRIPTIONS = {
    "none": "unperturbed code",
    "binarize": "signs only: every nonzero unit one magnitude",
    "dropout": "a random 50% of the units zeroed",
    "drop_least": "the 50% weakest feature maps zeroed",
}
_COLUMNS = {"none": "unperturbed", "binarize": "binarized", "dropout": "dropout 50%", "drop_least": "drop least 50%"}


@dataclass(frozen=True)
class PerturbationRun:
    """What :func:`run_perturbation` made: the method's ``study``, ``rows`` (one dict per perturbation and image:
    ``kind``, ``image``, ``name``, ``feature_error``, ``image_error``, ``psnr_original_db``,
    ``psnr_unperturbed_db``), ``summary`` (one dict per perturbation: the means), and the files written."""

    study: PerturbationStudy
    rows: list[dict]
    summary: list[dict]
    picture: Path
    html: Path
    json: Path


def _model_name(model: nn.Module) -> str:
    return model_name(model)


def run_perturbation(model: nn.Module, images: Sequence[str | Path], layer: str | None,
                     out: str | Path = Path("out/perturb"), *, perturbations: Sequence[str] = PERTURBATIONS,
                     decoder: str | Path | None = None, steps: int = 200, seed: int = 0,
                     progress: bool | None = None, self_contained: bool = False) -> PerturbationRun:
    """Reconstruct ``images`` (files, folders, ``sample:NAME``) from the unperturbed and the perturbed codes of
    ``layer`` and write the picture grid, HTML page and JSON into ``out``.

    Args:
        layer: the layer (``convscope layers MODEL``); None with ``decoder``: the decoder's layer.
        perturbations: some of ``binarize``, ``dropout``, ``drop_least``.
        decoder: an UpconvNet file (``convscope upconv train MODEL --layer L``) trained on ``layer``; without,
            regularized inversion with ``steps`` Adam steps.
        seed: the dropout mask and the inversion's start noise.
    """
    from ..methods.upconv import load_upconv

    perturbations = list(perturbations)
    if not perturbations:
        raise ConvscopeError(f"give at least one perturbation: {', '.join(PERTURBATIONS)}")
    for given in perturbations:
        if given not in PERTURBATIONS:
            raise ConvscopeError(f"unknown perturbation {given!r}; use one of {', '.join(PERTURBATIONS)}")
    if len(set(perturbations)) != len(perturbations):
        raise ConvscopeError(f"perturbations {perturbations} repeat one; give each at most once")
    paths = expand_inputs(list(images) if not isinstance(images, str | Path) else [images])
    names = unique_names(paths)
    dev = next((p.device for p in model.parameters()), None)
    dec = None
    if decoder is not None:
        dec = load_upconv(decoder, device=dev or "cpu")
        if dec.model_name and dec.model_name != _model_name(model):
            raise ConvscopeError(f"decoder {str(decoder)!r} was trained on {dec.model_name!r}, not "
                                 f"{_model_name(model)!r}; train one for this model with `convscope upconv train "
                                 f"{_model_name(model)} --layer L`")
        if layer is None:
            layer = dec.layer
        elif resolve_layer(model, layer)[0] != dec.layer:
            raise ConvscopeError(f"decoder {str(decoder)!r} decodes layer {dec.layer!r}, not {layer!r}; pass "
                                 f"--layer {dec.layer} or a decoder trained on {layer!r}")
    if layer is None:
        raise ConvscopeError("run_perturbation: give a layer (`convscope layers MODEL` lists them) or a decoder")
    name = resolve_layer(model, layer)[0]
    x = load_images(paths, model)
    if dev is not None:
        x = x.to(dev)
    kwargs = {} if dec is not None else {"steps": steps, "progress": progress}
    study = perturbation_study(model, x, name, perturbations, decoder=dec, seed=seed, **kwargs)

    originals = input_denormalizer(model)(x).clamp(0, 1).float().cpu()
    recs = study.images.float().cpu()  # K x N x 3 x H x W
    rows: list[dict[str, Any]] = [
        {"kind": kind, "image": str(path), "name": names[i],
         "feature_error": float(study.feature_error[k, i]), "image_error": float(study.image_error[k, i]),
         "psnr_original_db": _finite(psnr(recs[k, i], originals[i])),
         "psnr_unperturbed_db": None if kind == "none" else _finite(psnr(recs[k, i], recs[0, i]))}
        for k, kind in enumerate(study.kinds) for i, path in enumerate(paths)]
    tiles, captions = [], []
    for i in range(len(paths)):
        tiles.append(originals[i])
        captions.append(names[i][:18])
        for k, kind in enumerate(study.kinds):
            r = rows[k * len(paths) + i]
            tiles.append(recs[k, i])
            captions.append(f"feat {r['feature_error']:.2f}" if kind == "none" else
                            f"feat {r['feature_error']:.2f} img {r['image_error']:.2f}")
    summary: list[dict[str, Any]] = []
    for kind in study.kinds:
        rs = [r for r in rows if r["kind"] == kind]
        summary.append({"kind": kind, "description": DESCRIPTIONS[kind],
                        "mean_feature_error": statistics.fmean(r["feature_error"] for r in rs),
                        "mean_image_error": statistics.fmean(r["image_error"] for r in rs),
                        "mean_psnr_original_db": _mean([r["psnr_original_db"] for r in rs])})
    out = Path(out)
    cols = ["original", *[_COLUMNS[k] for k in study.kinds]]
    picture = save_png(grid(tiles, nrow=len(cols), col_labels=cols, cell_labels=captions), out / "perturb.png")

    model_name = _model_name(model)
    how = (f"regularized inversion, {steps} steps" if dec is None else f"UpconvNet decoder {decoder}")
    rep = HtmlReport(f"convscope perturb: {model_name} {name}", self_contained=self_contained)
    rep.text(f"Each image is reconstructed ({how}) from the code of layer {name!r}, unperturbed and perturbed; every "
             "perturbation keeps the code's L2 norm, so only its pattern changes (Dosovitskiy & Brox 2016, Sec. 5). "
             "feat: the feature error ||phi(x_k) - phi(x0)||^2 / ||phi(x0)||^2 of the reconstruction against the "
             "unperturbed code of the original; img: the relative squared difference to the unperturbed "
             "reconstruction (in the model's input space, relative to its distance from the mean image).")
    settings: list[list[object]] = [["model", model_name], ["layer", name], ["method", study.method],
                                    ["images", len(paths)], ["perturbations", ", ".join(perturbations)],
                                    ["seed", seed], ["steps", steps] if dec is None else ["decoder", str(decoder)]]
    rep.table(settings, header=["setting", "value"])
    rep.image(picture, caption=f"{picture.name}: per image, the original, the reconstruction from the unperturbed "
                               "code and one per perturbation, captioned feature error / image error")
    rep.heading("Per perturbation (means over the images)")
    rep.table([[s["kind"], s["description"], s["mean_feature_error"], s["mean_image_error"],
                _cell(s["mean_psnr_original_db"])] for s in summary],
              header=["perturbation", "what", "feature error", "image error", "PSNR vs original (dB)"])
    rep.heading("Per image")
    rep.table([[r["kind"], r["name"], r["feature_error"], r["image_error"], _cell(r["psnr_original_db"]),
                _cell(r["psnr_unperturbed_db"])] for r in rows],
              header=["perturbation", "image", "feature error", "image error", "PSNR vs original (dB)",
                      "PSNR vs unperturbed (dB)"])
    html = rep.write(out / "perturb.html")
    json_path = atomic_write_text(out / "perturb.json", json.dumps({
        "model": model_name, "layer": name, "method": study.method, "kinds": study.kinds, "seed": seed,
        "steps": steps if dec is None else None, "decoder": str(decoder) if dec is not None else None,
        "summary": summary, "rows": rows}, indent=1))
    return PerturbationRun(study, rows, summary, picture, html, json_path)


def _finite(value: float) -> float | None:
    """``value``, or None for an infinite PSNR (identical images), so the JSON stays standard."""
    return value if value != float("inf") else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _cell(value: float | None) -> float | str:
    return "identical" if value is None else value
