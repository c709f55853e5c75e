"""Regularized network inversion: which image does a layer's code describe? (Mahendran & Vedaldi 2015; survey
Sec. 5.2.1, Eq. 13-15).

    x* = argmin_x  ||Phi(x) - Phi(x0)||^2 / ||Phi(x0)||^2  +  lambda_alpha R_alpha(x)  +  lambda_tv R_TV(x)

with ``R_alpha(x) = ||x / B||_alpha^alpha / (H W)`` (alpha = 6) and ``R_TV(x) = TV_beta(x / V) / (H W)`` (beta = 2),
``x`` the deviation from the mean image, ``B`` a typical pixel magnitude and ``V = B / 6.5`` a typical difference
between neighbouring pixels (the paper's normalization, Sec. 3.3, so the lambdas are dimensionless and transfer
between models: ``B = 80`` on the 0..255 scale, converted here to the model's input units). The reconstruction
starts from noise; jitter (a random shift each step: the paper's IJCV version, Olah et al. 2017's transformation
robustness) is available but off by default: measured on efficientnet_lite0 and demo_net it raised the feature
error at every depth (docs/inversion.md, "Defaults by measurement"). By default the TV weight is annealed
geometrically from a strong to a weak prior over the steps (the strong prior fixes a smooth image early, the weak one
lets the features match late) and Adam's step decays to 0 at the end (a half cosine; Mahendran & Vedaldi's own
momentum descent also lowers its learning rate as it goes): both are schedules of the shared loop
(:func:`~convscope.core.optim.loop.geometric`, :func:`~convscope.core.optim.loop.cosine_decay`). Below relative
depth 0.4 each image is inverted with two step sizes and keeps the reconstruction of lower feature error (no single
step suited every measured layer there; the objective picks, so no image is needed).

Everything runs on the shared image-optimization loop of :mod:`convscope.core.optim` (the data term is an
:class:`~convscope.core.optim.Objective`, the two priors are :class:`~convscope.core.optim.AlphaNorm` and
:class:`~convscope.core.optim.TotalVariation`). N images x L layers are one optimization batch of ``L * N`` rows,
row ``l * N + i`` reconstructing image ``i`` from layer ``l``: one forward pass per step, stopped after the deepest
layer (layers of different step sizes get per-row step factors). Row ``(l, i)`` draws its noise and jitter from a
generator seeded ``seed + i``, so a batch of layers gives the same pictures as inverting each layer alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.checks import check_rgb_images
from ..core.images import Preprocess
from ..core.layers import named_layers, resolve_layers
from ..core.model import float_dtype, model_preprocess
from ..core.optim import (
    AlphaNorm,
    Jitter,
    Objective,
    Regularizer,
    TotalVariation,
    make_generators,
    make_param,
    optimize_images,
)
from ..core.optim.loop import cosine_decay, geometric
from ..core.optim.regularizers import Scheduled
from ..core.probe import probe
from ..core.stream import layer_features
from ..errors import ConvscopeError

B_PIXELS = 80 / 255  # Mahendran & Vedaldi's typical pixel magnitude B = 80 (0..255 scale), as RGB in [0, 1]
V_RATIO = 6.5  # V = B / 6.5: typical difference between neighbouring pixels
DEFAULT_LR = 0.05  # Adam step in the model's input units (~[-1, 1] for the zoo models)


# --------------------------------------------------------------------------- objectives


def feature_match(layer: str, target: torch.Tensor, normalize: bool = True) -> Objective:
    """``-||Phi_l(x) - Phi0||^2 / ||Phi0||^2`` per image (survey Eq. 13; unnormalized with ``normalize=False``):
    the data term of inversion, and the content loss of style transfer, as an objective to ascend."""
    t = target.detach()
    denom = t.pow(2).flatten(1).sum(1).clamp_min(1e-12) if normalize else None

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = acts[layer]
        if a.shape != t.shape:
            raise ConvscopeError(f"feature_match({layer!r}): the activations are {tuple(a.shape)} but the target is "
                                 f"{tuple(t.shape)}; give one target per image, at the same image size")
        d = (a - t.to(a)).pow(2).flatten(1).sum(1)
        return -(d / denom.to(d)) if denom is not None else -d
    return Objective(fn, [layer], f"feature_match({layer!r})")


def per_rows(objectives: Sequence[Objective], counts: Sequence[int]) -> Objective:
    """Stack row blocks: the first ``counts[0]`` images are scored by ``objectives[0]``, the next ``counts[1]`` by
    ``objectives[1]``, ... (each sees only its own rows of every activation)."""
    if len(objectives) != len(counts) or not objectives:
        raise ConvscopeError("per_rows() needs one row count per objective")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([o({k: v[a:b] for k, v in acts.items()}) for o, a, b in zip(objectives, bounds, bounds[1:])])
    layers = [name for o in objectives for name in o.layers]
    return Objective(fn, layers, "rows[" + ", ".join(o.name for o in objectives) + "]")


# --------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class InversionDefaults:
    """Hyperparameters chosen from a layer's relative depth ``d`` (0: first module, 1: the output). ``lambda_tv``:
    the TV weight at the first step, annealed geometrically to ``lambda_tv_end`` at the last (None: constant);
    ``lr``: Adam's step size, or several: each image is inverted with each and keeps the reconstruction of lowest
    feature error; ``lr_decay``: the fraction of the steps, at the end, over which it decays to 0 (cosine)."""

    lambda_alpha: float
    lambda_tv: float
    jitter: int
    lambda_tv_end: float | None = None
    lr: float | tuple[float, ...] = DEFAULT_LR
    lr_decay: float = 0.0


# The defaults by relative depth: (depth from which they apply, hyperparameters at 224 px). Chosen by measurement
# over a grid of settings (docs/make_inversion_table.py; docs/inversion.md, "Defaults by measurement"):
# efficientnet_lite0 at 224 px and demo_net at 112 px, 200 Adam steps. No jitter (it raised the error at every
# depth), lambda_alpha 1e-3, lambda_TV annealed geometrically from 3e-2 to 1e-4 at 224 px (the last weight is lower
# on smaller images: :data:`TV_END_BY_SIZE`); the step size, below relative depth 0.4 (demo_net relu1-relu3, lite0
# blocks.1-blocks.4): both 0.2 and 0.3, decayed over the last 70 % of the steps, each image keeping the one of lower
# feature error (the objective itself picks; no single step suited every layer there: 0.3 matched demo_net relu2
# 1.4x closer, 0.2 matched relu3 and lite0's quarter depth 1.1-1.2x closer; twice the rows for these layers), and
# 0.05 decayed over the last 20 % from depth 0.4 on (demo_net relu4-relu5, lite0 blocks.8: there the larger steps
# left the error 1.2-2.4x higher).
DEFAULTS_BY_DEPTH: tuple[tuple[float, InversionDefaults], ...] = (
    (0.0, InversionDefaults(lambda_alpha=1e-3, lambda_tv=3e-2, jitter=0, lambda_tv_end=1e-4, lr=(0.2, 0.3),
                            lr_decay=0.7)),
    (0.4, InversionDefaults(lambda_alpha=1e-3, lambda_tv=3e-2, jitter=0, lambda_tv_end=1e-4, lr=0.05,
                            lr_decay=0.2)),
)

# The last TV weight by image size (pixels, weight), measured at these two sizes only (issue 22, third round):
# demo_net at 112 px matched its features 1.1-1.3x closer with 3e-5 than with 1e-4 at the same PSNR ratio (a natural
# image's own R_TV is 1.3-2x larger per pixel at 112 px than at 224 px), while efficientnet_lite0 at 224 px lost
# PSNR with it (0.88 of the best at its quarter depth). Geometric in the size between them, constant outside.
TV_END_BY_SIZE: tuple[tuple[int, float], tuple[int, float]] = ((112, 3e-5), (224, 1e-4))


def final_tv_weight(size: int, at_224: float = 1e-4) -> float:
    """The default last TV weight at image size ``size`` (:data:`TV_END_BY_SIZE`: ``at_224`` times 0.3 at 112 px,
    geometric in the size between 112 and 224 px, constant outside)."""
    (s0, w0), (s1, w1) = TV_END_BY_SIZE
    t = min(max(math.log(max(int(size), 1) / s0) / math.log(s1 / s0), 0.0), 1.0)
    return at_224 * (w0 / w1) ** (1.0 - t)


def default_hyperparameters(depth: float, size: int = 224) -> InversionDefaults:
    """The measured defaults for a layer at relative depth ``depth`` of a model seeing ``size``-pixel images
    (:data:`DEFAULTS_BY_DEPTH`, :data:`TV_END_BY_SIZE`): no jitter, ``lambda_alpha = 1e-3``, ``lambda_TV`` annealed
    geometrically from 3e-2 (a smooth start) to 1e-4 at 224 px, 3e-5 at 112 px (the features matched closely at the
    end; :func:`final_tv_weight`), and Adam's step decayed to 0 by a half cosine at the end: below depth 0.4 both 0.2
    and 0.3 over the last 70 % of the steps (the lower feature error kept), 0.05 over the last 20 % from there."""
    d = min(max(float(depth), 0.0), 1.0)
    chosen = DEFAULTS_BY_DEPTH[0][1]
    for start, h in DEFAULTS_BY_DEPTH:
        if d >= start:
            chosen = h
    if chosen.lambda_tv_end is None:
        return chosen
    return replace(chosen, lambda_tv_end=final_tv_weight(size, chosen.lambda_tv_end))


def layer_depths(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> dict[str, float]:
    """Relative depth of each layer in ``(0, 1]``: its position among the module calls of one forward pass of
    ``x[:1]`` (leaf modules and the layers themselves), divided by their number."""
    mods = named_layers(model)
    watch = [n for n, m in mods.items() if next(m.children(), None) is None or n in layers]
    order: list[str] = []

    def rec(name: str):
        def f(t: torch.Tensor) -> torch.Tensor:
            order.append(name)
            return t
        return f

    with torch.no_grad(), probe(model, watch, edit={n: rec(n) for n in watch}, detach=True,
                                keep_all_calls=True) as p:
        p.forward(model, x[:1])
    out = {}
    for name in layers:
        if name not in order:
            raise ConvscopeError(f"layer {name!r} did not run in the forward pass; pick a layer from "
                                 "`convscope layers MODEL` that the model's forward() calls")
        out[name] = (order.index(name) + 1) / len(order)
    return out


# --------------------------------------------------------------------------- inversion


@dataclass(frozen=True)
class InversionResult:
    """Reconstructions of images from a layer's code.

    ``images``: RGB in [0, 1], ``R x 3 x H x W`` with ``R = L * N`` rows, row ``l * N + i`` reconstructing image
    ``i`` from layer ``layers[l * N + i]``; ``x``: the same in the model's input space; ``error``: the normalized
    feature reconstruction error ``||Phi(x*) - Phi0||^2 / ||Phi0||^2`` of each row (against the target features
    used, perturbed ones included); ``layers``: the layer of each row; ``image_index``: the input image of each row;
    ``history``: the normalized error at each step (``steps x R``, on the jittered image), None for one-pass methods;
    ``lr``: the step size of each row's reconstruction (the lowest-error one where several were tried), None for
    one-pass methods.
    """

    images: torch.Tensor
    x: torch.Tensor
    error: torch.Tensor
    layers: list[str]
    image_index: torch.Tensor
    history: torch.Tensor | None = None
    lr: torch.Tensor | None = None

    def for_layer(self, layer: str) -> torch.Tensor:
        """The ``N x 3 x H x W`` reconstructions from ``layer``."""
        rows = [i for i, name in enumerate(self.layers) if name == layer]
        if not rows:
            raise ConvscopeError(f"no reconstruction from layer {layer!r}; the result holds {sorted(set(self.layers))}")
        return self.images[rows]


def invert(
    model: nn.Module, x: torch.Tensor, layers: str | Sequence[str], *, steps: int = 200,
    lambda_alpha: float | None = None, lambda_tv: float | tuple[float, float] | None = None, alpha: float = 6.0,
    beta: float = 2.0, jitter: int | None = None, lr: float | Sequence[float] | None = None,
    lr_decay: float | None = None,
    B: float = B_PIXELS, V: float | None = None,
    target_features: Mapping[str, torch.Tensor] | None = None, init: str | torch.Tensor = "noise",
    seed: int | Sequence[int] = 0, progress: bool | None = None, preprocess: Preprocess | None = None,
    batch_size: BatchSize = "auto",
) -> InversionResult:
    """Reconstruct each image of ``x`` from each layer's code by regularized inversion (Mahendran & Vedaldi 2015,
    survey Eq. 13-15); the ``len(layers) * N`` reconstructions are optimized ``batch_size`` rows at a time (whole
    images: at least the ``len(layers)`` rows of one image per batch; rows are independent, so the result does not
    depend on it). ``"auto"`` (default): from the model's activation sizes and the allocator
    (:mod:`convscope.core.batching`).

    Args:
        x: ``N x 3 x H x W`` images in the model's input space (``cs.load_images(paths, model)``).
        layers: a layer name, a comma-separated string or a list (``convscope layers MODEL``).
        steps: Adam steps; ``lr``: their size in the model's input units (None: the measured default by depth;
            layers of different step sizes still share one batch: each row's update is scaled to its step). Several
            sizes, e.g. ``lr=(0.2, 0.3)``: each image is inverted with each (more rows of the same batch, so that
            much more work) and keeps the reconstruction of lowest feature error (the objective picks, not the
            image; ``InversionResult.lr`` says which). The default does so below depth 0.4.
        lambda_alpha, lambda_tv: weights of the normalized alpha-norm and TV_beta priors; None picks them from the
            layer's depth and the image size (:func:`default_hyperparameters`, measured). A single value applies to
            every layer; a pair ``lambda_tv=(first, last)`` anneals the TV weight geometrically from ``first`` at
            step 0 to ``last`` at the last step (a strong prior fixes a smooth image early, the weak one lets the
            features match late).
        lr_decay: the fraction of the steps, at the end, over which the step size ``lr`` decays to 0 by a half
            cosine (:func:`~convscope.core.optim.loop.cosine_decay`; 0: constant); None: the measured default.
        alpha, beta: the exponents (6 and 2 as in the paper).
        jitter: random shift in pixels each step (None: the measured default, 0 at every depth).
        B, V: typical pixel magnitude and neighbour difference as RGB in [0, 1] (default ``80/255`` and ``B/6.5``),
            converted to the model's input units with its preprocess std.
        target_features: ``{layer: N x ...}`` features to invert instead of the layer's features of ``x`` (e.g.
            perturbed ones, :mod:`convscope.methods.perturb`); ``x`` then only gives the image size.
        init: ``"noise"`` (mean colour + noise, the paper's start), ``"mean"``, or images in the input space.
        seed: row ``(l, i)`` uses the generator seeded ``seed + i`` (same pictures batched or layer by layer), or
            ``seed[i]`` for a list of N seeds.
    """
    check_rgb_images(model, x, "invert")
    check_batch_size(batch_size, "invert")
    names = list(resolve_layers(model, layers))
    if not names:
        raise ConvscopeError("invert: give at least one layer, e.g. layers='features.relu3'")
    if not isinstance(steps, int) or steps < 0:
        raise ConvscopeError(f"steps={steps!r}: use an int >= 0")
    for name, v in (("alpha", alpha), ("beta", beta), ("B", B), ("V", 1.0 if V is None else V)):
        if not v > 0:
            raise ConvscopeError(f"invert: {name}={v!r} must be > 0 (the paper uses alpha=6, beta=2, B=80/255)")
    pre = model_preprocess(model, preprocess)
    dtype = float_dtype(model)
    x = x.detach().to(dtype)
    n = x.shape[0]
    if target_features is None:
        targets = layer_features(model, x, names)
    else:
        unknown = [k for k in names if k not in target_features]
        if unknown:
            raise ConvscopeError(f"target_features has no entry for layer(s) {unknown}; give {{layer: N x ...}} for "
                                 "every layer inverted")
        targets = {k: target_features[k].detach().to(x.device, dtype) for k in names}
        bad = [k for k in names if targets[k].shape[0] != n]
        if bad:
            raise ConvscopeError(f"target_features[{bad[0]!r}] has {targets[bad[0]].shape[0]} rows for {n} images")
    if lr_decay is not None and not 0 <= lr_decay <= 1:
        raise ConvscopeError(f"invert: lr_decay={lr_decay!r}; give the decayed fraction of the steps in [0, 1]")
    tv_given = _tv_pair(lambda_tv)
    if lambda_alpha is not None and not lambda_alpha >= 0:
        raise ConvscopeError(f"invert: lambda_alpha={lambda_alpha!r} must be >= 0 (0 switches the prior off)")
    depths = layer_depths(model, names, x) if None in (lambda_alpha, lambda_tv, jitter, lr, lr_decay) else {}
    size = int(max(x.shape[-2:]))
    std = sum(abs(s) for s in pre.std) / len(pre.std)
    b_in = B / std
    v_in = (V if V is not None else B / V_RATIO) / std
    hyper = {k: default_hyperparameters(depths[k], size) if depths else None for k in names}

    def pick(k: str, given: float | int | None, field: str) -> float:
        return given if given is not None else getattr(hyper[k], field)

    def penalties(k: str) -> list[Regularizer]:
        """Layer ``k``'s priors: alpha-norm, and TV with a constant or an annealed weight."""
        h = hyper[k]
        la = float(pick(k, lambda_alpha, "lambda_alpha"))
        if tv_given is not None:
            first, last = tv_given
        else:
            assert h is not None  # depths were measured: lambda_tv was not given
            first, last = h.lambda_tv, h.lambda_tv_end
        out: list[Regularizer] = [AlphaNorm(la, alpha, b_in)] if la else []
        if last is not None and last != first:
            out.append(Scheduled(TotalVariation(1.0, beta, v_in), geometric(first, last, steps)))
        elif first:
            out.append(TotalVariation(first, beta, v_in))
        return out

    # one block of rows per run, a layer with one of its step sizes: its priors, jitter, step size and decay
    def step_sizes(k: str) -> tuple[float, ...]:
        return _step_sizes(lr if lr is not None else cast(InversionDefaults, hyper[k]).lr)

    runs = [(k, s) for k in names for s in step_sizes(k)]
    run_layers = [k for k, _ in runs]
    blocks = [penalties(k) for k in run_layers]
    amplitudes = [int(pick(k, jitter, "jitter")) for k in run_layers]
    if any(a < 0 for a in amplitudes):
        raise ConvscopeError(f"invert: jitter={jitter!r} must be >= 0 pixels")
    # the same step size and decay for every run (a plain schedule), or per row (a tensor)
    lrs = [s for _, s in runs]
    decays = [float(pick(k, lr_decay, "lr_decay")) for k in run_layers]
    r = len(runs)
    if isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [] if isinstance(seed, bool) else list(seed)
        if len(seeds) != n or not all(isinstance(s, int) for s in seeds):
            raise ConvscopeError(f"seed: give an int or {n} ints (one per image), got {seed!r}")
    like = torch.zeros((), dtype=dtype, device=x.device)
    per_image = isinstance(init, torch.Tensor) and init.dim() == 4 and init.shape[0] == n
    step = max(1, resolve_batch_size(batch_size, model, x, "invert", grad=True, limit=r * n) // r)
    parts = []
    for i0 in range(0, n, step):  # images i0 .. i1 - 1 with all their runs: rows (run, i), run-major
        i1 = min(n, i0 + step)
        m = i1 - i0
        gens = make_generators([s for _ in runs for s in seeds[i0:i1]], r * m)
        start = init
        if per_image and isinstance(init, torch.Tensor):
            start = init[i0:i1].repeat(r, 1, 1, 1)
        param = make_param("pixel", start, r * m, (int(x.shape[-2]), int(x.shape[-1])), pre, gens, like)
        objective = per_rows([feature_match(k, targets[k][i0:i1]) for k in run_layers], [m] * r)
        transforms = [_RowJitter(amplitudes, m)] if any(amplitudes) else []
        parts.append(optimize_images(model, objective, param, steps=steps, lr=max(lrs),
                                     lr_schedule=_layer_schedule(lrs, decays, steps, m),
                                     transforms=transforms, regularizers=[_BlockPenalty(blocks, m)],
                                     generators=gens, progress=progress, desc="invert"))

    def run_major(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Per-chunk rows (run, i in chunk) -> rows (run, i) over all images."""
        split = [t.unflatten(dim, (r, -1)) for t in ts]
        return torch.cat(split, dim + 1).flatten(dim, dim + 1)

    err = -run_major([p.values for p in parts]).cpu()  # the data term alone, on the final (unjittered) images
    keep = lowest_error_rows(err, run_layers, names)  # each (layer, image): its run of lowest error
    at = keep.to(parts[0].images.device) if parts else keep
    return InversionResult(images=run_major([p.images for p in parts])[at], x=run_major([p.x for p in parts])[at],
                           error=err[keep], layers=[k for k in names for _ in range(n)],
                           image_index=torch.arange(n).repeat(len(names)),
                           history=-run_major([p.history for p in parts], 1).cpu()[:, keep],
                           lr=torch.tensor(lrs, dtype=torch.float64).repeat_interleave(n)[keep])


def lowest_error_rows(error: torch.Tensor, run_layers: Sequence[str], layers: Sequence[str]) -> torch.Tensor:
    """Rows ``(run, i)`` (run-major, ``N`` per run) of ``error`` keeping, for each layer of ``layers`` and image
    ``i``, the run of that layer with the lowest error (the first on a tie; NaN loses): ``len(layers) * N`` row
    indices, layer-major. Selection by the objective itself, which does not need the image."""
    n = error.shape[0] // max(len(run_layers), 1)
    keep = []
    for k in layers:
        idx = torch.tensor([j for j, name in enumerate(run_layers) if name == k])
        e = error.view(len(run_layers), n)[idx].nan_to_num(nan=math.inf, posinf=math.inf)
        keep.append(idx[e.argmin(0)] * n + torch.arange(n))
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


def _step_sizes(lr: float | Sequence[float]) -> tuple[float, ...]:
    """``lr`` as a tuple of distinct finite step sizes > 0 (checked)."""
    vals = tuple(lr) if isinstance(lr, (tuple, list)) else (lr,)
    if not vals or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
                           and float(v) > 0 for v in vals):
        raise ConvscopeError(f"invert: lr={lr!r}; give a finite step size > 0, or several to keep each image's "
                             "best of, e.g. lr=(0.2, 0.3)")
    return tuple(dict.fromkeys(float(v) for v in vals))


def _layer_schedule(lrs: Sequence[float], decays: Sequence[float], steps: int, m: int,
                    ) -> Callable[[int], float | torch.Tensor] | None:
    """The loop's step-size schedule (factors of ``max(lrs)``) for rows (run, i), ``m`` rows per run (a layer with
    one of its step sizes): run ``j`` steps ``lrs[j]``, cosine-decayed over the last ``decays[j]`` of the steps; a
    plain schedule when all runs agree, one factor per row otherwise."""
    if len(set(zip(lrs, decays))) == 1:
        return cosine_decay(steps, decays[0]) if decays[0] else None
    base = max(lrs)
    curves = [cosine_decay(steps, f) for f in decays]

    def rows(k: int) -> torch.Tensor:
        return torch.tensor([lr / base * c(k) for lr, c in zip(lrs, curves)], dtype=torch.float64).repeat_interleave(m)
    return rows


class _BlockPenalty(Regularizer):
    """Block ``b`` of ``n`` rows (one run: a layer with one of its step sizes) gets the penalties ``blocks[b]``."""

    def __init__(self, blocks: Sequence[Sequence[Regularizer]], n: int) -> None:
        self.regs = [list(b) for b in blocks]
        self.n = n

    def set_step(self, step: int) -> None:
        for regs in self.regs:
            for r in regs:
                r.set_step(step)

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        n = self.n
        out = []
        for b, regs in enumerate(self.regs):
            total = torch.zeros(n, dtype=delta.dtype, device=delta.device)
            for r in regs:
                pen = r.penalty(delta[b * n:(b + 1) * n])
                if pen is not None:
                    total = total + pen
            out.append(total)
        return torch.cat(out)


def _tv_pair(lambda_tv: float | tuple[float, float] | None) -> tuple[float, float | None] | None:
    """``lambda_tv`` as (first, last); last None: constant."""
    if lambda_tv is None:
        return None
    if isinstance(lambda_tv, (tuple, list)):
        if len(lambda_tv) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in lambda_tv):
            raise ConvscopeError(f"invert: lambda_tv={lambda_tv!r}; an annealed TV weight is a pair (first, last) of "
                                 "weights > 0, e.g. (1e-2, 1e-4)")
        return float(lambda_tv[0]), float(lambda_tv[1])
    if not isinstance(lambda_tv, (int, float)) or not lambda_tv >= 0:
        raise ConvscopeError(f"invert: lambda_tv={lambda_tv!r}; give a weight >= 0 or a pair (first, last)")
    return float(lambda_tv), None


class _RowJitter(Jitter):
    """Jitter with one amplitude per block of ``n`` rows (layers of different depth jitter differently)."""

    def __init__(self, amplitudes: Sequence[int], n: int) -> None:
        super().__init__(max(amplitudes))
        self.amplitudes, self.n = [int(a) for a in amplitudes], n
        self.parts = nn.ModuleList(Jitter(a) for a in self.amplitudes)

    def forward(self, x: torch.Tensor, generators) -> torch.Tensor:
        if len(set(self.amplitudes)) == 1:
            return self.parts[0](x, generators)
        n = self.n
        return torch.cat([j(x[i * n:(i + 1) * n], generators[i * n:(i + 1) * n]) for i, j in enumerate(self.parts)])
