"""``convscope evaluate attribution``: score every attribution method on held-out synthetic images.

For ``n`` images of the synthetic concept dataset that training never saw (by default the ``off-centre`` set of
:data:`EVAL_SETS`: the dominant object at radii 16-23 % of the side, placed so that a centred map scores a random
map's pointing game and mask IoU), each method explains the true scene class (the dominant object's shape) and is
scored by

* the pointing game (Zhang et al. 2016) against the dominant object's pixel mask, tolerance 15 px at 224 px
  scaled to the image size;
* mask IoU: the map's top pixels, as many as the object has, against the mask;
* deletion / insertion AUC (Petsiuk et al. 2018) on the first ``n_curve`` images;
* the model-randomization sanity check (Adebayo et al. 2018): Spearman correlation of |map| with the original
  after re-initializing the top layer only and after re-initializing every layer (cascade), on ``n_sanity``
  images (lower is better: the map depends on what the network learned).

Two reference maps calibrate the scores: ``random`` (uniform noise) and ``center`` (a Gaussian at the image
centre, which needs no network at all); the pointing game's chance level is the share of the image within the
tolerance of the object (:func:`~convscope.data.groundtruth.pointing_chance`). Every figure comes with a 95 %
bootstrap interval over images (seeded; the same resamples for every method, so differences are paired), and each
method is flagged on the metrics where it is not better than the better reference map beyond that interval.
Writes ``evaluation.md`` (the table), ``evaluation.json``, ``evaluation.html`` with example overlays and a
randomization cascade, into ``out/``.
"""

from __future__ import annotations

import json
import math
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
from ..core.stats import bootstrap_weights
from ..data.groundtruth import mask_iou, pointing_chance, pointing_game
from ..data.synthetic import HELD_OUT_START, SynthConfig, render_arrays
from ..errors import ConvscopeError
from ..methods.cam import resolve_cam_layer
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
             "guided-gradcam", "occlusion", "integrated-gradients", "lrp", "layercam", "scorecam", "visual-backprop",
             "cnn-fixations", "prediction-difference", "rollout")
"""The registry methods scored, in table order (``gradient`` is saliency before its max, CAM needs a GAP net;
``rollout`` applies to ViTs only and is left out on CNNs when every method is scored)."""

EVAL_NAMES = {"deconv": "deconvnet", "guided-gradcam": "guided_gradcam"}
"""Registry name -> the name in the evaluation's tables and ``--methods``, where they differ."""

SMOOTHGRAD_SAMPLES = 16
"""Noisy copies per SmoothGrad map in the evaluation."""

EVAL_OPTIONS: dict[str, dict[str, object]] = {
    "smoothgrad": {"n": SMOOTHGRAD_SAMPLES},
    "integrated-gradients": {"steps": 16},
    "scorecam": {"batch_size": 128},
    "prediction-difference": {"window": 16, "stride": 16, "samples": 4},
}
"""Per-method settings of the evaluation (smaller than the defaults, so 200 images stay affordable)."""

SUMMED_CHANNELS = ("input_x_gradient", "integrated-gradients", "lrp")
"""Per-channel methods whose channels are summed as |.| (attributions that add up); the others take max_c |.|."""


def _registry_map(entry: AttributionMethod) -> MapFn:
    """A registry method as ``N x H x W`` maps of the true class: per-channel results as max_c |.| (gradient x
    input: sum_c |.|)."""
    def fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, progress: bool | None) -> torch.Tensor:
        options = dict(EVAL_OPTIONS.get(entry.name, {}))
        if entry.name in ("smoothgrad", "integrated-gradients", "scorecam", "prediction-difference"):
            options["progress"] = progress
        out = entry.maps(m, x, y[:, None], layer=layer, **options)[:, 0]
        if entry.per_channel:
            out = out.abs().sum(1) if entry.name in SUMMED_CHANNELS else out.abs().amax(1)
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
    return {"smoothgrad": 49.0, "guided_gradcam": 6.0, "integrated-gradients": 48.0, "scorecam": 256.0,
            "prediction-difference": (size // 16) ** 2 * 4.0, "visual-backprop": 1.0, "rollout": 1.0, "random": 0.1,
            "center": 0.1}.get(name, 3.0)


POINTING_TOLERANCE = 15 / 224
"""The pointing game's tolerance as a fraction of the image side (Zhang et al.: 15 px at 224 px)."""

EVAL_SETS: dict[str, SynthConfig] = {
    "off-centre": SynthConfig(target_radius=(0.16, 0.23), distractor_radius=(0.05, 0.10),
                              centre_at_chance=POINTING_TOLERANCE),
    "centred": SynthConfig(),
}
"""Evaluation sets: ``off-centre`` (default) draws the dominant object at several scales (radius 16-23 % of the side:
up to that size every shape can be placed so that a centred disc of its area overlaps it no more than a random
region would) and places it so that a centre prior scores a random map's expected value per image in the pointing
game (the image centre lies within the tolerance of the object as often as a uniformly random pixel does) and in
mask IoU (``SynthConfig.centre_at_chance``); ``centred`` is the training distribution (large objects, centre near
the object: a centred Gaussian points at it 85 % of the time)."""

METRICS: tuple[tuple[str, int], ...] = (("pointing_game", 1), ("mask_iou", 1), ("deletion_auc", -1),
                                        ("insertion_auc", 1), ("spearman_top_layer", -1), ("spearman_all_layers", -1))
"""The scored figures and their direction (1: higher is better, -1: lower is better)."""

BASELINES = ("random", "center")
"""The reference maps a method must beat."""


def bootstrap_means(values: torch.Tensor, resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """Means of ``values`` (``N x M``: N images, M methods) over ``resamples`` bootstrap resamples of the images
    (``resamples x M``), the same resampled images for every column; NaN entries (e.g. a constant map's rank
    correlation) are left out of each mean."""
    n = values.shape[0]
    weight = bootstrap_weights(n, resamples, seed)
    v = values.double()
    ok = ~torch.isnan(v)
    return (weight @ torch.where(ok, v, 0.0)) / (weight @ ok.double()).clamp(min=1e-12)


def intervals(per_image: dict[str, dict[str, torch.Tensor]], resamples: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> dict[str, dict]:
    """Per method: for every metric of :data:`METRICS`, the ``confidence`` bootstrap interval of its mean
    (``<metric>_ci``), and ``not_beyond_baseline``: the metrics on which it is not better than the better of the
    reference maps (:data:`BASELINES`, by their mean) beyond the interval of the paired difference (empty for
    the reference maps themselves, None for all when no reference map was scored)."""
    names = list(per_image)
    a = (1 - confidence) / 2
    out: dict[str, dict] = {m: {"not_beyond_baseline": [] if any(b in names for b in BASELINES) else None}
                            for m in names}
    for j, (metric, sign) in enumerate(METRICS):
        values = torch.stack([per_image[m][metric].double().cpu() for m in names], 1)  # N x M
        means = bootstrap_means(values, resamples, seed + j)  # R x M
        lo, hi = torch.quantile(means, a, dim=0), torch.quantile(means, 1 - a, dim=0)
        refs = [i for i, m in enumerate(names) if m in BASELINES]
        best = max(refs, key=lambda i: sign * float(values[:, i].nanmean())) if refs else None
        for i, m in enumerate(names):
            if bool(torch.isnan(values[:, i]).all()):  # undefined on every image (constant maps): not judged
                out[m][f"{metric}_ci"] = [math.nan, math.nan]
                continue
            out[m][f"{metric}_ci"] = [float(lo[i]), float(hi[i])]
            if best is None or m in BASELINES:
                continue
            diff = sign * (means[:, i] - means[:, best])
            if not float(torch.quantile(diff, a)) > 0:
                out[m]["not_beyond_baseline"].append(metric)
    return out


@dataclass(frozen=True)
class Evaluation:
    """One row per method, the table as Markdown, and the files written."""

    rows: list[dict]
    markdown: str
    accuracy: float
    files: list[Path]


def synthetic_eval_set(n: int, size: int, seed: int = 0, start: int = HELD_OUT_START, workers: int = 2,
                       progress: bool | None = None, eval_set: str = "off-centre"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` held-out synthetic images (uint8 ``N x 3 x H x W``) of ``eval_set`` (:data:`EVAL_SETS`), their scene
    classes and dominant-object masks."""
    if eval_set not in EVAL_SETS:
        raise ConvscopeError(f"unknown evaluation set {eval_set!r}; choose from {', '.join(EVAL_SETS)}")
    arrays = render_arrays(start, n, size, seed, workers=workers, masks=True, progress=progress is not False,
                           config=EVAL_SETS[eval_set])
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
                         batch_size: int = 50, progress: bool | None = True, eval_set: str = "off-centre",
                         resamples: int = 1000, seed: int = 0) -> Evaluation:
    """Score ``methods`` (default: all of :data:`METHODS`) on ``model``, which must classify the 8 synthetic scene
    classes (``demo_net``, or a network trained with ``convscope train-demo``), on ``n`` images of ``eval_set``
    (:data:`EVAL_SETS`), with ``resamples`` bootstrap resamples (seeded by ``seed``) for the 95 % intervals.

    Three stages, each with a progress bar and an ETA (``progress``: ``True``, ``False``, or ``None``: bars that
    appear once a stage has run 2 s): every method's maps (``batch_size`` images per call), then the deletion /
    insertion curves of all methods in one batched pass, then the randomization check of all methods on one
    cascade (top layer and all layers; every stage for Grad-CAM, for the figure). With ``methods=None`` a method
    that does not apply to ``model`` (its first call raises a :class:`ConvscopeError`, e.g. LRP on a ViT's
    LayerNorm, rollout on a CNN) is left out and listed under the table with its reason; named methods must apply.
    """
    names = list(METHODS) if methods is None else methods
    if eval_set not in EVAL_SETS:
        raise ConvscopeError(f"unknown evaluation set {eval_set!r}; choose from {', '.join(EVAL_SETS)}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ConvscopeError(f"evaluate_attribution(resamples={resamples!r}): use a positive int, e.g. 1000")
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
    images, labels, masks = synthetic_eval_set(n, size, progress=progress, eval_set=eval_set)
    x = images.float().div(255)
    x = (pre.normalize(x) if pre is not None else x).to(device)
    labels = labels.to(device)
    layer = resolve_cam_layer(model, layer)
    inner = False if progress is False else None  # the slow methods' own bars: when they run long
    k, s = min(n_curve, n), min(n_sanity, n)
    with channels_last_inputs(model):
        with torch.no_grad():
            acc = float(torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)]).eq(labels).float().mean())
        maps, seconds, skipped = {}, {}, {}
        cost = {m: method_cost(m, x.shape[-1]) for m in names}
        total = sum(round(len(xb) * cost[m]) for m in names for xb in x.split(batch_size))
        with progress_bar(total=total, desc="maps", unit="fwd", progress=progress) as bar:
            for name in names:
                bar.set_description_str(f"maps ({name})", refresh=False)
                fn, parts = METHODS[name], []
                t0 = time.perf_counter()
                for xb, yb in zip(x.split(batch_size), labels.split(batch_size)):
                    try:
                        parts.append(fn(model, xb, yb, layer, inner).detach().float())
                    except ConvscopeError as e:
                        if methods is not None or parts:  # a named method, or one that failed after its first batch
                            raise
                        skipped[name] = str(e)
                        bar.update(round(n * cost[name]))
                        break
                    bar.update(round(len(xb) * cost[name]))
                if name in skipped:
                    continue
                seconds[name] = (time.perf_counter() - t0) / n
                maps[name] = torch.cat(parts).cpu()
        names = [m for m in names if m not in skipped]
        curves = deletion_insertion_many(model, x[:k], {m: maps[m][:k].to(device) for m in names},
                                         labels[:k].tolist(), steps=steps, batch_size=CURVE_BATCH, progress=progress)
        explainers = {m: _explainer(m, labels[:s], layer, inner) for m in names}
        rand = model_randomization_many(model, x[:s], explainers, stages=[0, -1], progress=progress)
        cascade = (model_randomization(model, x[:s], explainers["gradcam"], progress=progress,
                                       desc="randomization (gradcam cascade)")
                   if "gradcam" in names else None)
    tol = POINTING_TOLERANCE * size
    per_image = {name: {"pointing_game": pointing_game(maps[name], masks, tolerance_px=tol).float(),
                        "mask_iou": mask_iou(maps[name], masks), "deletion_auc": curves[name].deletion_auc,
                        "insertion_auc": curves[name].insertion_auc,
                        "spearman_top_layer": rand[name].spearman_abs[0],
                        "spearman_all_layers": rand[name].spearman_abs[-1]} for name in names}
    ci = intervals(per_image, resamples, seed)
    chance = pointing_chance(masks, tol).double()
    chance_ci = torch.quantile(bootstrap_means(chance[:, None], resamples, seed)[:, 0],
                               torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    rows = []
    for name in names:
        row = {"method": name, **{m: float(per_image[name][m].double().nanmean()) for m, _ in METRICS},
               "ms_per_image": 1000 * seconds[name]}
        rows.append({**row, **ci[name]})
    examples: dict = {m: maps[m][:6] for m in names}
    if cascade is not None:
        examples["_cascade"] = (cascade.layers, [mp[0] for mp in cascade.maps])
    pointing = {"chance": float(chance.mean()), "chance_ci": chance_ci, "tolerance_px": tol}
    md = _markdown(rows, n, k, s, acc, layer, getattr(model, "zoo_name", ""), eval_set, pointing)
    if skipped:
        md += "\nNot applicable to this model (left out):\n\n" + "".join(f"* `{m}`: {why}\n"
                                                                          for m, why in skipped.items())
    out = Path(out)
    files = [atomic_write_text(out / "evaluation.md", md),
             atomic_write_text(out / "evaluation.json", json.dumps({
                 "n": n, "n_curve": k, "n_sanity": s, "steps": steps, "layer": layer, "eval_set": eval_set,
                 "resamples": resamples, "seed": seed, "pointing_game": pointing,
                 "accuracy": acc, "rows": [json_safe(r) for r in rows], "not_applicable": skipped}, indent=1))]
    files += _html(out, rows, md, examples, images[:6].float().div(255), masks[:6], layer)
    return Evaluation(rows, md, acc, files)


def _explainer(name: str, labels: torch.Tensor, layer: str, progress: bool | None
               ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    fn = METHODS[name]
    return lambda m, xx: fn(m, xx, labels, layer, progress)


def json_safe(value: object) -> object:
    """``value`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _cell(r: dict, key: str, digits: int) -> str:
    """A figure with its interval: ``0.690 [0.62, 0.75]``; a figure undefined on every image (a rank correlation
    of maps that are constant after randomization) says so instead of printing NaN."""
    if math.isnan(r[key]):
        return "undefined (constant maps)"
    lo, hi = r.get(f"{key}_ci", (float("nan"), float("nan")))
    return f"{r[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


SHORT = {"pointing_game": "pointing", "mask_iou": "IoU", "deletion_auc": "deletion", "insertion_auc": "insertion",
         "spearman_top_layer": "rand. top", "spearman_all_layers": "rand. all"}

HEADER = ["method", "pointing game", "mask IoU", "deletion AUC", "insertion AUC", "rand. top layer", "rand. all",
          "ms / image", "not beyond the references"]


def _cells(r: dict) -> list[str]:
    flag = r.get("not_beyond_baseline")
    flagged = ("(reference)" if r["method"] in BASELINES else "-" if flag is None
               else ", ".join(SHORT[m] for m in flag) or "none")
    return [r["method"], _cell(r, "pointing_game", 3), _cell(r, "mask_iou", 3), _cell(r, "deletion_auc", 3),
            _cell(r, "insertion_auc", 3), _cell(r, "spearman_top_layer", 2), _cell(r, "spearman_all_layers", 2),
            f"{r['ms_per_image']:.1f}", flagged]


def _markdown(rows: list[dict], n: int, n_curve: int, n_sanity: int, acc: float, layer: str, model: str,
              eval_set: str = "off-centre", pointing: dict | None = None) -> str:
    pointing = pointing or {}
    chance = (f" Pointing-game chance (a random point, {pointing['tolerance_px']:.1f} px tolerance): "
              f"{pointing['chance']:.3f} [{pointing['chance_ci'][0]:.3f}, {pointing['chance_ci'][1]:.3f}]."
              if pointing else "")
    head = (f"Attribution methods on {n} held-out synthetic images of the `{eval_set}` set ({model or 'model'}, "
            f"top-1 accuracy {acc:.1%}); target: the true scene class; CAM layer `{layer}`. Pointing game and mask "
            f"IoU against the dominant object's mask; deletion (lower is better) / insertion (higher is better) AUC "
            f"of the class probability on {n_curve} images; Spearman rank correlation of |map| with the original "
            f"after randomizing the top layer / all layers (Adebayo et al. 2018; lower is better) on {n_sanity} "
            f"images. Brackets: 95 % bootstrap intervals over images; last column: the figures on which the method "
            f"is not better than the better of `random` / `center` beyond the interval of the paired difference."
            f"{chance}\n\n")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _html(out: Path, rows: list[dict], md: str, examples: dict, pixels: torch.Tensor, masks: torch.Tensor,
          layer: str) -> list[Path]:
    rep = HtmlReport("convscope evaluate attribution")
    rep.text(md.split("\n\n")[0])
    rep.table([_cells(r) for r in rows], header=HEADER)
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
