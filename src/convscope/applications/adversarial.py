"""``convscope adversarial``: attack images, then show what changed inside the network (survey Sec. 7.2, Fig. 20).

Writes into ``out/``: ``adversarial.png`` (per image: clean, the perturbation magnified, adversarial, with the
top class and its probability), ``features_<stem>.png`` (per image: the units of the chosen layer whose maps
change most, each as clean map | adversarial map | absolute difference, clean and adversarial on one colour
scale), ``adversarial.html`` with both and a table, and ``adversarial.json`` with the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.images import load_images
from ..core.io import atomic_write_text
from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_classes
from ..core.render import apply_colormap, grid, save_png
from ..core.report import HtmlReport
from ..core.targets import Target, top_class
from ..methods.adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .report import unit_layer


@dataclass(frozen=True)
class AdversarialRun:
    """The attack, the feature comparison and the files written."""

    result: AdversarialResult
    features: FeatureChange
    html: Path
    pictures: list[Path]


def perturbation_display(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """The perturbation as an image: grey is 0, black/white are -eps/+eps per channel (L-inf scale); an L2
    perturbation is scaled by its own largest entry."""
    scale = max(eps, float(delta.abs().max())) if delta.numel() else eps
    return (0.5 + delta / (2 * scale)).clamp(0, 1)


def unit_comparison(fc: FeatureChange, image: int, units: list[int], size: int = 96) -> list[torch.Tensor]:
    """Tiles clean | adversarial | |difference| for each unit, the first two on a shared colour scale."""
    tiles = []
    for u in units:
        a, b = fc.clean[image, u], fc.adversarial[image, u]
        pair = torch.stack([a, b, (b - a).abs()])[:, None]
        pair = F.interpolate(pair, size=(size, size), mode="nearest")
        top = float(torch.maximum(a.abs().max(), b.abs().max()).clamp_min(1e-12))
        shown = torch.cat([pair[:2] / top, pair[2:] / top]).clamp(0, 1)
        tiles += list(apply_colormap(shown, "viridis"))
    return tiles


def run_adversarial(model: nn.Module, paths: list[Path], out: Path, eps: float = 2 / 255, attack: str = "pgd",
                    norm: str = "linf", steps: int = 10, target: Target = top_class, targeted: bool = False,
                    layer: str = "", n_units: int = 6) -> AdversarialRun:
    """Attack the images, compare feature maps at ``layer`` (default: the report's middle layer), write pictures."""
    out = Path(out)
    x = load_images(paths, model).to(next(model.parameters()).device)
    layer = resolve_layer(model, layer)[0] if layer else unit_layer(model)
    if attack == "fgsm":
        res = fgsm(model, x, target, eps=eps, targeted=targeted)
    else:
        res = pgd(model, x, target, eps=eps, steps=steps, norm=norm, targeted=targeted)
    fc = feature_change(model, x, res.x, layer)
    classes = model_classes(model)
    denormalize = input_denormalizer(model)

    def name(c: int) -> str:
        return (classes[c] if classes is not None and c < len(classes) else f"class {c}")[:22]

    clean_px = denormalize(x).clamp(0, 1).float().cpu()
    adv_px = (clean_px + res.delta.float().cpu()).clamp(0, 1)
    tiles, labels = [], []
    for i in range(len(paths)):
        tiles += [clean_px[i], perturbation_display(res.delta[i].float().cpu(), eps), adv_px[i]]
        labels += [f"{name(int(res.clean_class[i]))} {float(res.clean_prob[i]):.0%}", "perturbation",
                   f"{name(int(res.adv_class[i]))} {float(res.adv_prob[i]):.0%}"]
    overview = save_png(grid(tiles, nrow=3, cell_labels=labels, col_labels=["clean", "perturbation", "adversarial"],
                             row_labels=[p.stem[:16] for p in paths]), out / "adversarial.png")
    desc = (f"{attack.upper()} {'' if attack == 'fgsm' else norm + ' '}eps={eps:.4g} (pixel units)"
            + ("" if attack == "fgsm" else f", {steps} steps") + (", targeted" if targeted else ", untargeted"))
    rep = HtmlReport(f"convscope adversarial: {desc}")
    rep.text(f"{desc}. Perturbation shown magnified: grey is 0, black/white are -eps/+eps. Feature maps of layer "
             f"{layer!r}: the {n_units} units whose maps change most (relative L2), clean | adversarial | "
             "|difference|, clean and adversarial on one colour scale (viridis).")
    rep.image(overview, caption="clean, perturbation, adversarial; top class and its probability")
    rows: list[dict[str, Any]] = []
    pictures, top = [overview], fc.top_units(n_units).cpu()
    for i, path in enumerate(paths):
        units = top[i].tolist()
        png = save_png(grid(unit_comparison(fc, i, units), nrow=3, col_labels=["clean", "adversarial", "|diff|"],
                            row_labels=[f"unit {u}: {float(fc.change[i, u]):.2f}" for u in units]),
                       out / f"features_{path.stem}.png")
        pictures.append(png)
        rep.image(png, caption=f"{path.name}: units of {layer} ranked by relative change")
        rows.append({"image": str(path), "clean_class": int(res.clean_class[i]),
                     "clean_name": name(int(res.clean_class[i])), "clean_prob": float(res.clean_prob[i]),
                     "adv_class": int(res.adv_class[i]), "adv_name": name(int(res.adv_class[i])),
                     "adv_prob": float(res.adv_prob[i]), "success": bool(res.success[i]),
                     "steps_to_success": int(res.steps[i]),
                     "linf": float(res.delta[i].abs().max()), "l2": float(res.delta[i].norm()),
                     "top_units": [{"unit": u, "relative_change": float(fc.change[i, u])} for u in units]})
    rep.table([[r["image"], f"{r['clean_name']} {r['clean_prob']:.1%}", f"{r['adv_name']} {r['adv_prob']:.1%}",
                r["success"], r["steps_to_success"], f"{r['linf'] * 255:.2f}/255", f"{r['l2']:.3f}"] for r in rows],
              header=["image", "clean", "adversarial", "success", "first step", "L-inf", "L2"])
    html = rep.write(out / "adversarial.html")
    atomic_write_text(out / "adversarial.json", json.dumps({
        "attack": attack, "norm": norm, "eps": eps, "steps": steps, "targeted": targeted, "layer": layer,
        "images": rows}, indent=1))
    return AdversarialRun(res, fc, html, pictures)
