"""``convscope fooling``: images the network classifies with high confidence that show nothing a person would
recognize (Nguyen, Yosinski & Clune 2015, Sec. 3 "gradient ascent"; survey Sec. 7.1).

:func:`run_fooling` runs :func:`~convscope.methods.maximize.fooling_image` for a list of target classes (one image
each, one batch) and writes, atomically, into ``out/``: ``fooling.png`` (the labelled grid: class name over each
image, the probability reached below), ``images/<i>_<class>.png`` (each image at full size), ``fooling.html`` (the
grid and a table: class, name, probability, steps, top class; the PNGs linked, or embedded when
``self_contained``) and ``fooling.json`` (the same numbers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.io import atomic_write_text
from ..core.model import model_name
from ..core.render import grid, save_png
from ..core.report import HtmlReport
from ..errors import ConvscopeError
from ..methods.maximize import FoolingResult, fooling_image
from ..models.zoo import get_classes

__all__ = ["FoolingRun", "percent", "run_fooling"]


@dataclass(frozen=True)
class FoolingRun:
    """What :func:`run_fooling` made: the method's ``result``, one row per image (``class``, ``name``,
    ``probability``, ``steps``, ``success``, ``predicted``, ``predicted_name``, ``picture``), the grid, the single
    pictures, the HTML page and the JSON file."""

    result: FoolingResult
    rows: list[dict]
    grid: Path
    pictures: list[Path]
    html: Path
    json: Path


def _class_name(classes: Sequence[str] | None, c: int) -> str:
    """The class's name (the first of comma-separated synonyms), else ``class <c>``."""
    if classes is not None and 0 <= c < len(classes):
        return str(classes[c]).split(",")[0].strip() or f"class {c}"
    return f"class {c}"


def _short(text: str, width: int = 16) -> str:
    return text if len(text) <= width else text[:width - 1] + "."


def percent(p: float) -> str:
    """A probability as a percentage with 3 decimals that never rounds a value below 1 up to 100 %."""
    text = f"{100 * p:.3f}"
    return f"{text}%" if text != "100.000" or p >= 1 else ">99.999%"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "class"


def run_fooling(model: nn.Module, targets: Sequence[int], out: str | Path = Path("out/fooling"), *,
                confidence: float = 0.9999, max_steps: int = 500, size: int | None = None, seed: int = 0,
                score: str = "logit", regularize: str = "none", progress: bool | None = None,
                self_contained: bool = False) -> FoolingRun:
    """One fooling image per class of ``targets`` (gradient ascent from noise until the softmax probability of the
    class reaches ``confidence``, or ``max_steps``), written as pictures, HTML and JSON into ``out``.

    Args:
        targets: class indices, one image each (a class may repeat: image ``i`` starts from the noise of
            ``seed + i``).
        confidence, max_steps, size, seed, score, regularize: of
            :func:`~convscope.methods.maximize.fooling_image` (``score="log_softmax"`` also pushes the rival
            classes down; ``regularize="none"`` is Nguyen et al.'s plain gradient ascent).
        self_contained: embed the pictures in the HTML page (default: link the PNGs beside it).
    """
    targets = [int(t) for t in targets]
    if not targets:
        raise ConvscopeError("run_fooling: give at least one target class, e.g. targets=[0, 1, 2]")
    classes = get_classes(model)
    if classes is not None:
        bad = [t for t in targets if not 0 <= t < len(classes)]
        if bad:
            raise ConvscopeError(f"class {bad[0]} is out of range: the model has {len(classes)} classes; pick "
                                 f"classes from 0 to {len(classes) - 1}")
    out = Path(out)
    res = fooling_image(model, targets, confidence=confidence, max_steps=max_steps, size=size, seed=seed,
                        score=score, regularize=regularize, progress=progress)
    images = res.images.detach().float().cpu().clamp(0, 1)
    rows: list[dict] = []
    pictures: list[Path] = []
    for i, c in enumerate(targets):
        name = _class_name(classes, c)
        pred = int(res.predicted[i])
        picture = save_png(images[i], out / "images" / f"{i:02d}_{_slug(name)}.png")
        pictures.append(picture)
        rows.append({"class": c, "name": name, "probability": float(res.probabilities[i]),
                     "steps": int(res.steps[i]), "success": bool(res.success[i]), "predicted": pred,
                     "predicted_name": _class_name(classes, pred), "picture": str(picture.relative_to(out))})
    captions = [percent(r["probability"]) + ("" if r["success"] else " (not reached)") for r in rows]
    ncol = min(8, len(rows))
    labels = [_short(r["name"]) for r in rows]
    picture_grid = grid(list(images), nrow=ncol, cell_labels=[f"{lab}: {cap}" for lab, cap in zip(labels, captions)])
    grid_png = save_png(picture_grid, out / "fooling.png")

    net_name = model_name(model)
    reached = sum(r["success"] for r in rows)
    rep = HtmlReport(f"convscope fooling: {net_name}", self_contained=self_contained)
    rep.text(f"Gradient ascent on the {'class logit' if score == 'logit' else 'log-probability'} from noise "
             f"(Nguyen et al. 2015), regularization {regularize}, until the softmax probability of the target class "
             f"reaches {confidence:g} or {max_steps} steps; image size {tuple(images.shape[-2:])}, seed {seed}. "
             f"{reached} of {len(rows)} images reached the confidence. Steps = -1: not reached.")
    rep.image(grid_png, caption=f"{grid_png.name}: one image per target class, with the probability reached")
    rep.table([[r["class"], r["name"], f"{r['probability']:.6f}", r["steps"], r["success"], r["predicted_name"],
                r["picture"]] for r in rows],
              header=["class", "name", "probability", "steps", "reached", "top class", "picture"])
    rep.figure_row([(p, f"{p.name}: {r['name']} {percent(r['probability'])}") for p, r in zip(pictures, rows)])
    html = rep.write(out / "fooling.html")
    json_path = atomic_write_text(out / "fooling.json", json.dumps({
        "model": net_name, "confidence": confidence, "max_steps": max_steps, "size": list(images.shape[-2:]),
        "seed": seed, "score": score, "regularize": regularize, "reached": reached, "rows": rows}, indent=1))
    return FoolingRun(res, rows, grid_png, pictures, html, json_path)
