"""``convscope dream``: DeepDream of a photo, before and after, as PNGs and an HTML page.

:func:`dream_report` loads one photo at the model's input size (or ``size``), runs
:func:`~convscope.methods.dream.deep_dream` and writes ``before.png``, ``after.png``, ``dream.json`` (settings,
octave sizes, the layer's norm before and after, the objective per octave) and ``dream.html`` (the settings,
before | after, and a table per octave), all atomically; the page links the PNGs, or embeds them when
``self_contained``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.images import expand_inputs, image_name, load_images
from ..core.io import atomic_write_text, check_output_dir
from ..core.layers import check_input_size
from ..core.model import lenient_preprocess, model_device, model_name
from ..core.render import save_png
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.dream import DreamResult, deep_dream

__all__ = ["DreamRun", "dream_report"]


@dataclass(frozen=True)
class DreamRun:
    """Files written by :func:`dream_report` and the result."""

    before: Path
    after: Path
    html: Path
    json: Path
    result: DreamResult


def dream_report(model: nn.Module, photo: str | Path, out: str | Path, layer: str, steps: int = 10,
                 lr: float = 1.5 / 255, octaves: int = 4, octave_scale: float = 1.4, jitter: int = 32, seed: int = 0,
                 size: int | None = None, progress: bool | None = None, self_contained: bool = False) -> DreamRun:
    """DeepDream of one ``photo`` (a file or ``sample:NAME``) for ``layer``, written into the folder ``out``.

    ``size``: resize the photo's short side to ``size`` and crop the centre square (default: the model's own
    preprocessing, e.g. 112 px for demo_net; DeepDream works at any size a convolutional layer accepts).
    """
    out = check_output_dir(out)
    files = expand_inputs([photo])
    if len(files) != 1:
        raise ConvscopeError(f"PHOTO {photo!r} names {len(files)} images; give one image file or sample:NAME")
    pre = lenient_preprocess(model)
    if size is not None:
        side = check_input_size(size, "size")[0]
        pre = dataclasses.replace(pre, resize=side, crop=side)
    x = load_images(files, pre).to(model_device(model))
    res = deep_dream(model, x, layer, steps=steps, lr=lr, octaves=octaves, octave_scale=octave_scale,
                     jitter=jitter, seed=seed, progress=progress)
    before = save_png(pre.denormalize(x[0]).clamp(0, 1).cpu(), out / "before.png")
    after = save_png(res.images[0].cpu(), out / "after.png")
    octave_rows: list[dict[str, Any]] = [
        {"octave": k + 1, "size": list(s), "objective_first": float(h[0, 0]) if len(h) else None,
         "objective_last": float(h[-1, 0]) if len(h) else None}
        for k, (s, h) in enumerate(zip(res.octave_sizes, res.history))]
    settings = {"model": model_name(model), "photo": str(files[0]), "layer": res.layer, "steps": steps, "lr": lr,
                "octaves": octaves, "octave_scale": octave_scale, "jitter": jitter, "seed": seed,
                "size": list(x.shape[-2:])}
    json_path = atomic_write_text(out / "dream.json", json.dumps(
        {**settings, "norm_before": float(res.norm_before[0]), "norm_after": float(res.norm_after[0]),
         "octaves_run": octave_rows}, indent=1))
    rep = HtmlReport(f"convscope dream: {model_name(model)} {res.layer}", self_contained=self_contained)
    rep.text("DeepDream (Mordvintsev, Olah & Tyka 2015): gradient ascent on 1/2 ||A||^2 of the layer's activation, "
             "starting from the photo, with steps normalized by the gradient's mean absolute value, random shifts "
             "(jitter) and several octaves (scales), smallest first.")
    rep.table([[k, v] for k, v in settings.items() if k != "size"] + [["image size", "x".join(map(str, x.shape[-2:]))]],
              header=["setting", "value"])
    rep.figure_row([(before, f"before: {image_name(files[0])}"), (after, f"after: {res.layer}")])
    rep.table([["before", float(res.norm_before[0])], ["after", float(res.norm_after[0])],
               ["ratio", float(res.norm_after[0] / res.norm_before[0].clamp_min(1e-12))]],
              header=[f"||A|| of {res.layer}", "value"])
    rep.heading("Octaves")
    rep.table([[r["octave"], "x".join(map(str, r["size"])), r["objective_first"], r["objective_last"]]
               for r in octave_rows], header=["octave", "size", "objective at the first step", "at the last step"])
    html_path = rep.write(out / "dream.html")
    return DreamRun(before, after, html_path, json_path, res)
