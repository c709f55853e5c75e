"""``convscope evaluate attribution``: score every attribution method on held-out synthetic images.

For ``n`` images of the synthetic concept dataset that training never saw, each method explains the true scene
class (the dominant object's shape) and is scored by

* the pointing game (Zhang et al. 2016) against the dominant object's pixel mask, tolerance 15 px at 224 px
  scaled to the image size;
* mask IoU: the map's top pixels, as many as the object has, against the mask;
* deletion / insertion AUC (Petsiuk et al. 2018) on the first ``n_curve`` images;
* the model-randomization sanity check (Adebayo et al. 2018): Spearman correlation of |map| with the original
  after re-initializing the top layer only and after re-initializing every layer (cascade), on ``n_sanity``
  images (lower is better: the map depends on what the network learned).

Two reference maps calibrate the scores: ``random`` (uniform noise) and ``center`` (a Gaussian at the image
centre, which needs no network at all). Writes ``evaluation.md`` (the table), ``evaluation.json``,
``evaluation.html`` with example overlays and a randomization cascade, into ``out/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.io import atomic_write_text
from ..core.progress import progress_bar
from ..core.render import grid, overlay, save_png, to_display
from ..core.report import HtmlReport
from ..data.groundtruth import mask_iou, pointing_game
from ..data.synthetic import HELD_OUT_START, SynthConfig, render_arrays
from ..errors import ConvscopeError
from ..methods.cam import default_cam_layer
from ..methods.evaluation import deletion_insertion_many, model_randomization, model_randomization_many
from ..methods.occlusion import occlusion, window_positions
from ..methods.registry import ATTRIBUTION_METHODS, AttributionMethod

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, str, "bool | None"], torch.Tensor]
"""``(model, x, labels, layer, progress) -> N x H x W`` maps; ``progress`` is passed to the slow methods' bars."""

CURVE_BATCH = 128
"""Rows per forward pass of the deletion / insertion curves."""


def _center(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, progress: bool | None) -> torch.Tensor:
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.exp(-(yy**2 + xx**2) / 0.5).expand(x.shape[0], h, w).to(x.device)


def _random(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, progress: bool | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(x.flatten()[:16].abs().sum() * 1e4) % 2**31)
    return torch.rand(x.shape[0], *x.shape[-2:], generator=g).to(x.device)


def _occlusion_grid(size: int) -> tuple[int, int]:
    """The occlusion window and stride evaluated at image side ``size``."""
    return max(4, size // 7), max(2, size // 14)


def _occlusion(m: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, progress: bool | None) -> torch.Tensor:
    window, stride = _occlusion_grid(x.shape[-1])
    return occlusion(m, x, y[:, None], window=window, stride=stride, batch_size=CURVE_BATCH,
                     progress=progress).maps[:, 0]


EVALUATED = ("saliency", "input_x_gradient", "smoothgrad", "guided", "deconv", "gradcam", "gradcam++",
             "guided-gradcam", "occlusion")
"""The registry methods scored, in table order (``gradient`` is saliency before its max, CAM needs a GAP net)."""

EVAL_NAMES = {"deconv": "deconvnet", "guided-gradcam": "guided_gradcam"}
"""Registry name -> the name in the evaluation's tables and ``--methods``, where they differ."""

SMOOTHGRAD_SAMPLES = 16
"""Noisy copies per SmoothGrad map in the evaluation."""


def _registry_map(entry: AttributionMethod) -> MapFn:
    """A registry method as ``N x H x W`` maps of the true class: per-channel results as max_c |.| (gradient x
    input: sum_c |.|)."""
    def fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, progress: bool | None) -> torch.Tensor:
        options = {"n": SMOOTHGRAD_SAMPLES, "progress": progress} if entry.name == "smoothgrad" else {}
        out = entry.maps(m, x, y[:, None], layer=layer, **options)[:, 0]
        if entry.per_channel:
            out = out.abs().sum(1) if entry.name == "input_x_gradient" else out.abs().amax(1)
        return out
    return fn


METHODS: dict[str, MapFn] = {
    **{EVAL_NAMES.get(n, n): _occlusion if n == "occlusion" else _registry_map(ATTRIBUTION_METHODS[n])
       for n in EVALUATED},
    "random": _random,
    "center": _center,
}
"""Evaluated method name -> map function: the registry's :data:`EVALUATED` methods, then two references."""


def method_cost(name: str, size: int) -> float:
    """Rough cost of one map of method ``name`` at image side ``size``, in forward passes (a backward pass counts
    two): what the progress bar of the maps stage counts, so its ETA holds across cheap and costly methods."""
    if name == "occlusion":
        window, stride = _occlusion_grid(size)
        return len(window_positions(size, window, stride)) ** 2 + 1.0
    return {"smoothgrad": 49.0, "guided_gradcam": 6.0, "random": 0.1, "center": 0.1}.get(name, 3.0)


@dataclass(frozen=True)
class Evaluation:
    """One row per method, the table as Markdown, and the files written."""

    rows: list[dict]
    markdown: str
    accuracy: float
    files: list[Path]


def synthetic_eval_set(n: int, size: int, seed: int = 0, start: int = HELD_OUT_START, workers: int = 2,
                       progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` held-out synthetic images (uint8 ``N x 3 x H x W``), their scene classes and dominant-object masks."""
    arrays = render_arrays(start, n, size, seed, workers=workers, masks=True, progress=progress is not False)
    images = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(arrays.scenes), torch.from_numpy(arrays.target_masks)


@contextmanager
def channels_last_inputs(model: nn.Module) -> Iterator[None]:
    """While open, ``model`` receives its 4-d inputs in channels-last memory order (faster convolutions and
    pooling on CPU; the same values). A forward pre-hook, removed on exit; deep copies made meanwhile keep it."""
    def hook(_module: nn.Module, args: tuple) -> tuple:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return args

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def evaluate_attribution(model: nn.Module, out: Path, n: int = 200, methods: list[str] | None = None,
                         layer: str = "", n_curve: int = 50, n_sanity: int = 8, steps: int = 32,
                         batch_size: int = 50, progress: bool | None = True) -> Evaluation:
    """Score ``methods`` (default: all of :data:`METHODS`) on ``model``, which must classify the 8 synthetic scene
    classes (``demo_net``, or a network trained with ``convscope train-demo``).

    Three stages, each with a progress bar and an ETA (``progress``: ``True``, ``False``, or ``None``: bars that
    appear once a stage has run 2 s): every method's maps (``batch_size`` images per call), then the deletion /
    insertion curves of all methods in one batched pass, then the randomization check of all methods on one
    cascade (top layer and all layers; every stage for Grad-CAM, for the figure).
    """
    names = list(METHODS) if methods is None else methods
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConvscopeError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    classes = getattr(model, "classes", None)
    if classes is not None and list(classes) != list(SynthConfig().shapes):
        raise ConvscopeError(f"evaluate attribution needs a model of the synthetic scene classes "
                             f"({', '.join(SynthConfig().shapes)}), e.g. demo_net; this one has {len(classes)} "
                             "other classes")
    pre = getattr(model, "preprocess", None)
    size = (pre.input_size or (112, 112))[0] if pre is not None else 112
    device = next(model.parameters()).device
    images, labels, masks = synthetic_eval_set(n, size, progress=progress)
    x = images.float().div(255)
    x = (pre.normalize(x) if pre is not None else x).to(device)
    labels = labels.to(device)
    layer = layer or default_cam_layer(model)
    inner = False if progress is False else None  # the slow methods' own bars: when they run long
    k, s = min(n_curve, n), min(n_sanity, n)
    with channels_last_inputs(model):
        with torch.no_grad():
            acc = float(torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)]).eq(labels).float().mean())
        maps, seconds = {}, {}
        cost = {m: method_cost(m, x.shape[-1]) for m in names}
        total = sum(round(len(xb) * cost[m]) for m in names for xb in x.split(batch_size))
        with progress_bar(total=total, desc="maps", unit="fwd", progress=progress) as bar:
            for name in names:
                bar.set_description_str(f"maps ({name})", refresh=False)
                fn, parts = METHODS[name], []
                t0 = time.perf_counter()
                for xb, yb in zip(x.split(batch_size), labels.split(batch_size)):
                    parts.append(fn(model, xb, yb, layer, inner).detach().float())
                    bar.update(round(len(xb) * cost[name]))
                seconds[name] = (time.perf_counter() - t0) / n
                maps[name] = torch.cat(parts).cpu()
        curves = deletion_insertion_many(model, x[:k], {m: maps[m][:k].to(device) for m in names},
                                         labels[:k].tolist(), steps=steps, batch_size=CURVE_BATCH, progress=progress)
        explainers = {m: _explainer(m, labels[:s], layer, inner) for m in names}
        rand = model_randomization_many(model, x[:s], explainers, stages=[0, -1], progress=progress)
        cascade = (model_randomization(model, x[:s], explainers["gradcam"], progress=progress,
                                       desc="randomization (gradcam cascade)")
                   if "gradcam" in names else None)
    tol = 15 * size / 224
    rows = []
    for name in names:
        hits = pointing_game(maps[name], masks, tolerance_px=tol).float().mean()
        iou = mask_iou(maps[name], masks).mean()
        rows.append({"method": name, "pointing_game": float(hits), "mask_iou": float(iou),
                     "deletion_auc": float(curves[name].deletion_auc.mean()),
                     "insertion_auc": float(curves[name].insertion_auc.mean()),
                     "spearman_top_layer": float(rand[name].spearman_abs[0].nanmean()),
                     "spearman_all_layers": float(rand[name].spearman_abs[-1].nanmean()),
                     "ms_per_image": 1000 * seconds[name]})
    examples: dict = {m: maps[m][:6] for m in names}
    if cascade is not None:
        examples["_cascade"] = (cascade.layers, [mp[0] for mp in cascade.maps])
    md = _markdown(rows, n, k, s, acc, layer, getattr(model, "zoo_name", ""))
    out = Path(out)
    files = [atomic_write_text(out / "evaluation.md", md),
             atomic_write_text(out / "evaluation.json", json.dumps({
                 "n": n, "n_curve": k, "n_sanity": s, "steps": steps, "layer": layer,
                 "accuracy": acc, "rows": rows}, indent=1))]
    files += _html(out, rows, md, examples, images[:6].float().div(255), masks[:6], layer)
    return Evaluation(rows, md, acc, files)


def _explainer(name: str, labels: torch.Tensor, layer: str, progress: bool | None
               ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    fn = METHODS[name]
    return lambda m, xx: fn(m, xx, labels, layer, progress)


def _markdown(rows: list[dict], n: int, n_curve: int, n_sanity: int, acc: float, layer: str, model: str) -> str:
    head = (f"Attribution methods on {n} held-out synthetic images ({model or 'model'}, top-1 accuracy {acc:.1%}); "
            f"target: the true scene class; CAM layer `{layer}`. Pointing game and mask IoU against the dominant "
            f"object's mask; deletion (lower is better) / insertion (higher is better) AUC of the class probability "
            f"on {n_curve} images; Spearman rank correlation of |map| with the original after randomizing the top "
            f"layer / all layers (Adebayo et al. 2018; lower is better) on {n_sanity} images.\n\n")
    lines = ["| method | pointing game | mask IoU | deletion AUC | insertion AUC | rand. top layer | rand. all "
             "| ms / image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pointing_game']:.3f} | {r['mask_iou']:.3f} | {r['deletion_auc']:.3f} | "
                     f"{r['insertion_auc']:.3f} | {r['spearman_top_layer']:.2f} | {r['spearman_all_layers']:.2f} | "
                     f"{r['ms_per_image']:.1f} |")
    return head + "\n".join(lines) + "\n"


def _html(out: Path, rows: list[dict], md: str, examples: dict, pixels: torch.Tensor, masks: torch.Tensor,
          layer: str) -> list[Path]:
    rep = HtmlReport("convscope evaluate attribution")
    rep.text(md.split("\n\n")[0])
    rep.table([[r["method"], f"{r['pointing_game']:.3f}", f"{r['mask_iou']:.3f}", f"{r['deletion_auc']:.3f}",
                f"{r['insertion_auc']:.3f}", f"{r['spearman_top_layer']:.2f}", f"{r['spearman_all_layers']:.2f}",
                f"{r['ms_per_image']:.1f}"] for r in rows],
              header=["method", "pointing game", "mask IoU", "deletion AUC", "insertion AUC", "rand. top layer",
                      "rand. all", "ms / image"])
    methods = [m for m in examples if not m.startswith("_")]
    tiles = []
    for i in range(pixels.shape[0]):
        outline = pixels[i].clone()
        outline[:, masks[i]] = 0.6 * outline[:, masks[i]] + 0.4 * torch.tensor([1.0, 1.0, 0.0]).view(3, 1)
        tiles.append(outline)
        for m in methods:
            shown = to_display(examples[m][i][None, None], "percentile", 0.0, 99.5)[0]
            tiles.append(overlay(pixels[i:i + 1], shown[None], alpha=0.6, normalize=False)[0])
    png = save_png(grid(tiles, nrow=len(methods) + 1, col_labels=["image + mask", *methods]), out / "examples.png")
    rep.image(png, caption="first images (dominant object tinted yellow) and each method's map for the true class")
    files = [png]
    if "_cascade" in examples:
        names, maps = examples["_cascade"]
        stages = ["original", *[f"..{n.split('.')[-1]}" for n in names]]
        tiles = [overlay(pixels[:1], to_display(m[None, None], "minmax")[0][None], alpha=0.6, normalize=False)[0]
                 for m in maps]
        png = save_png(grid(tiles, nrow=len(tiles), col_labels=stages), out / "randomization.png")
        rep.image(png, caption=f"Grad-CAM ({layer}) as layers are re-initialized from the top down (Adebayo et al. "
                               "2018, cascading randomization)")
        files.append(png)
    files.append(rep.write(out / "evaluation.html"))
    return files
