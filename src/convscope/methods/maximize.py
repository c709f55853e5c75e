"""Activation maximization: synthesize the images that most excite chosen units, many units in one batch.

* Vanilla AM (Erhan et al. 2009; survey Eq. 7-8): ``x* = argmax_x a_i(x)`` by gradient ascent
  ``x <- x + eta * d a_i / d x`` from noise (or a given start).
* Regularized AM (survey Eq. 9: ``x* = argmax_x a_i(x) - R(x)``):
  Simonyan et al. 2014 (Eq. 1): an L2 penalty ``S_c(I) - lambda ||I||^2`` on the class logit;
  Yosinski et al. 2015 (Sec. 3): after each step, L2 decay ``x <- (1 - theta_decay) x``, a Gaussian blur of width
  ``theta_b_width`` every ``theta_b_every`` steps, zeroing the pixels whose norm is below the ``theta_n_pct``
  percentile, and those whose contribution ``|sum_c x ⊙ grad|`` is below the ``theta_c_pct`` percentile;
  Olah et al. 2017: random jitter / scale (transformation robustness) and a decorrelated Fourier parametrization.
* Fooling images (Nguyen et al. 2015, Sec. 3 "gradient ascent"; survey Sec. 7.1): ascend a class logit from noise
  until the softmax probability reaches ``confidence``.
* Multifaceted AM (Nguyen, Yosinski & Clune 2016): cluster a unit's top real images into facets and start one
  optimization from each facet's mean image (:func:`multifaceted`).
* DGN-AM (Nguyen et al. 2016; survey Eq. 10): optimize the code ``h`` of a frozen generator ``G`` so the unit fires
  on ``G(h)``, with an L2 prior on ``h`` (:func:`dgn_am`; ``core.optim.GeneratorParam``).

Objectives are units: a conv channel's mean (:func:`channel`), one neuron (:func:`neuron`, the centre by default),
a class logit (:func:`logit`; always the logit before the softmax, never the probability: maximizing the
probability can be done by lowering the other classes, survey Sec. 3.2.1), and sums, differences and scalar
multiples of them. ``units`` are a batch dimension: image i maximizes unit i, all in one forward/backward pass per
step. Images are RGB in [0, 1]; the optimization runs in the model's input space (``model.preprocess``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.checks import check_rgb_model
from ..core.images import Preprocess
from ..core.layers import OUTPUT, layer_or_output, resolve_layer
from ..core.model import default_input_size, float_dtype, model_device, model_preprocess
from ..core.optim import (
    Fourier,
    Objective,
    OptimResult,
    ParamSpec,
    Pixel,
    Regularization,
    Regularizer,
    Seed,
    Transform,
    make_generators,
    make_param,
    optimize_images,
)
from ..core.probe import probe
from ..core.stream import Images, stream_layers
from ..errors import ConvscopeError, TargetError

Units = int | Sequence[int] | torch.Tensor

# --------------------------------------------------------------------------- objectives


def _unit_index(unit: Units) -> torch.Tensor:
    t = torch.as_tensor(unit)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1:
        raise TargetError(f"a unit is an int index or a list of them (one per image), not {unit!r}")
    return t.long()


def _pick(a: torch.Tensor, idx: torch.Tensor, layer: str) -> torch.Tensor:
    """``a[i, idx_i]`` per image (``idx`` a scalar for all images or one index per image)."""
    n, c = a.shape[0], a.shape[1]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
        bad = int(idx.max()) if int(idx.max()) >= c else int(idx.min())
        what = "classes" if layer == OUTPUT else "units"
        where = "the model output" if layer == OUTPUT else f"layer {layer!r}"
        raise TargetError(f"unit {bad} is out of range: {where} has {c} {what} (valid 0..{c - 1})")
    if idx.dim() == 0:
        return a[:, int(idx)]
    if idx.shape[0] != n:
        raise TargetError(f"{idx.shape[0]} units for a batch of {n} images; give one unit per image or one for all")
    return a[torch.arange(n, device=a.device), idx.to(a.device)]


def _label(kind: str, layer: str, unit: Units) -> str:
    u = unit.tolist() if isinstance(unit, torch.Tensor) else unit
    return f"{kind}({u})" if layer == OUTPUT else f"{kind}({layer!r}, {u})"


def channel(layer: str, unit: Units) -> Objective:
    """Mean activation of channel ``unit`` of a conv layer (its only value for a linear layer's ``N x C`` output).

    ``unit`` may be a list with one index per image: image i then maximizes ``unit[i]``.
    """
    idx = _unit_index(unit)

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _pick(acts[layer], idx, layer)
        return a.flatten(1).mean(1) if a.dim() > 1 else a
    return Objective(fn, [layer], _label("channel", layer, unit))


def neuron(layer: str, unit: Units, y: int | None = None, x: int | None = None) -> Objective:
    """One neuron: ``A[unit, y, x]`` of a conv layer (the centre ``(H // 2, W // 2)`` by default), or unit ``unit``
    of a linear layer. ``unit`` may be one index per image."""
    idx = _unit_index(unit)

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = _pick(acts[layer], idx, layer)
        if a.dim() == 1:
            if y is not None or x is not None:
                raise TargetError(f"layer {layer!r} has no spatial dimensions; drop y/x for a linear layer's neuron")
            return a
        if a.dim() != 3:
            raise TargetError(f"neuron() needs N x C or N x C x H x W activations; {layer!r} gives "
                              f"{tuple(acts[layer].shape)}")
        h, w = a.shape[-2:]
        yy, xx = h // 2 if y is None else y, w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise TargetError(f"neuron position ({yy}, {xx}) is outside layer {layer!r}'s {h} x {w} map")
        return a[:, yy, xx]
    return Objective(fn, [layer], _label("neuron", layer, unit))


def logit(cls: Units) -> Objective:
    """The logit of class ``cls`` (the model output before any softmax; one class per image allowed)."""
    idx = _unit_index(cls)

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = acts[OUTPUT]
        return _pick(out.reshape(out.shape[0], -1), idx, OUTPUT)
    return Objective(fn, [OUTPUT], _label("logit", OUTPUT, cls))


def log_softmax(cls: Units) -> Objective:
    """``log p_c = z_c - log sum_j exp z_j``: the log of the softmax probability of class ``cls``. Not for
    visualizing a class (it also rewards lowering the other classes, survey Sec. 3.2.1); used for fooling images."""
    idx = _unit_index(cls)

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = acts[OUTPUT]
        return _pick(torch.log_softmax(out.reshape(out.shape[0], -1), 1), idx, OUTPUT)
    return Objective(fn, [OUTPUT], _label("log_softmax", OUTPUT, cls))


def per_image(objectives: Sequence[Objective]) -> Objective:
    """Image i maximizes ``objectives[i]`` (each evaluated on its own image's activations)."""
    objs = list(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs):
        raise ConvscopeError("per_image() needs a non-empty list of objectives (channel(), neuron(), logit(), ...)")

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(acts.values())).shape[0]
        if n != len(objs):
            raise ConvscopeError(f"{len(objs)} objectives for {n} images")
        return torch.cat([o({k: v[i:i + 1] for k, v in acts.items()}) for i, o in enumerate(objs)])
    layers = [name for o in objs for name in o.layers]
    return Objective(fn, layers, "[" + ", ".join(o.name for o in objs) + "]")


# --------------------------------------------------------------------------- regularization presets


PRESETS: dict[str, Regularization] = {
    # vanilla AM (Erhan et al. 2009): gradient ascent only
    "none": Regularization(),
    # Simonyan et al. 2014: L2 penalty in the objective
    "simonyan": Regularization(lambda_l2=1e-4),
    # Yosinski et al. 2015: all four projections combined (blur width 1 every 4 steps as their third combination;
    # decay and clip percentiles re-tuned for Adam, see DEFAULT_LR), plus jitter and a mild random scale
    "yosinski": Regularization(theta_decay=0.05, blur_every=4, blur_sigma=1.0, theta_n_pct=20, theta_c_pct=20,
                               jitter=4, scales=(0.95, 1.0, 1.05)),
    # Olah et al. 2017 (Lucid's standard transforms, simplified): jitter + random scale, for the Fourier images
    "olah": Regularization(jitter=8, scales=(0.9, 0.95, 1.0, 1.05, 1.1)),
}
DEFAULT_LR = {"pixel": 0.1, "rgb": 0.05, "fourier": 0.05}  # Adam step sizes (input space of the zoo models ~[-1, 1])


def _regularization(regularize: str | Regularization | None, param: ParamSpec,
                    overrides: Mapping[str, Any]) -> Regularization:
    if regularize is None:
        regularize = "olah" if isinstance(param, Fourier) or param == "fourier" else "yosinski"
    if isinstance(regularize, str):
        if regularize not in PRESETS:
            raise ConvscopeError(f"regularize={regularize!r}: use one of {', '.join(PRESETS)} or a Regularization(...)")
        regularize = PRESETS[regularize]
    if not isinstance(regularize, Regularization):
        raise ConvscopeError("regularize must be a preset name or Regularization(...), not "
                             f"{type(regularize).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(regularize, **given) if given else regularize


def _default_lr(param: ParamSpec) -> float:
    if isinstance(param, Fourier):
        return DEFAULT_LR["fourier"]
    if isinstance(param, Pixel):
        return DEFAULT_LR["pixel" if param.space == "input" else "rgb"]
    return DEFAULT_LR.get(param, DEFAULT_LR["pixel"]) if isinstance(param, str) else DEFAULT_LR["pixel"]


def _split(extra: Sequence[Regularizer | Transform]) -> tuple[list[Regularizer], list[Transform]]:
    regs, trans = [], []
    for r in extra:
        if isinstance(r, Transform):
            trans.append(r)
        elif isinstance(r, Regularizer):
            regs.append(r)
        else:
            raise ConvscopeError(f"regularizers: expected Regularizer or Transform objects (Decay(0.01), Blur(1.0, 4), "
                                 f"Jitter(4), ...), got {type(r).__name__}")
    return regs, trans


# --------------------------------------------------------------------------- activation maximization


@dataclass(frozen=True)
class MaximizationResult:
    """Images that maximize each objective.

    ``images``: RGB in [0, 1], ``N x 3 x H x W``, one per unit; ``x``: the same in the model's input space;
    ``activations``: the objective value of each final image, ``N``; ``history``: the objective at each step,
    ``steps x N``; ``layer`` / ``units`` (None when objectives were given); ``names``: a label per image.
    """

    images: torch.Tensor
    x: torch.Tensor
    activations: torch.Tensor
    history: torch.Tensor
    layer: str | None
    units: list[int] | None
    names: list[str]




def _size(model: nn.Module, size: int | tuple[int, int] | None, init: object) -> tuple[int, int]:
    if isinstance(init, torch.Tensor):
        return int(init.shape[-2]), int(init.shape[-1])
    if size is None:
        return default_input_size(model)
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise ConvscopeError(f"size={size!r}: use an int or an (height, width) pair of positive ints")
    return int(pair[0]), int(pair[1])


def _all_units(model: nn.Module, name: str, size: tuple[int, int]) -> list[int]:
    """Every unit of the resolved layer ``name`` (the classes for :data:`OUTPUT`)."""
    x = torch.zeros(1, 3, *size, dtype=float_dtype(model), device=model_device(model))
    output = name == OUTPUT
    with torch.no_grad(), probe(model, [] if output else name, stop_after=None if output else name, detach=True) as p:
        out = p.forward(model, x)
        a = out if output else p.activations[name]
    if not isinstance(a, torch.Tensor) or a.dim() < 2:
        raise ConvscopeError(f"{'the model output' if output else f'layer {name!r}'} is not an N x units tensor; "
                             "give the units explicitly or pick another layer")
    return list(range(a.shape[1]))


def _unit_list(units: Units) -> list[int]:
    if isinstance(units, bool):
        raise TargetError("units must be ints, not a bool")
    if isinstance(units, int):
        return [units]
    lst = units.tolist() if isinstance(units, torch.Tensor) else list(units)
    if not lst or not all(isinstance(u, int) and not isinstance(u, bool) for u in lst):
        raise TargetError(f"units must be a non-empty list of ints, got {units!r}")
    return lst


def _objective_for(layer: str, units: list[int], kind: str) -> Objective:
    if layer == OUTPUT:
        return logit(units)
    if kind == "channel":
        return channel(layer, units)
    if kind == "neuron":
        return neuron(layer, units)
    raise ConvscopeError(f"kind={kind!r}: use 'channel' (the channel's mean) or 'neuron' (its centre neuron)")


def activation_maximization(
    model: nn.Module, layer: str | None = None, units: Units | None = None, *,
    objective: Objective | Sequence[Objective] | None = None, kind: str = "channel",
    steps: int = 256, lr: float | None = None, optimizer: str = "adam",
    regularize: str | Regularization | None = None, regularizers: Sequence[Regularizer | Transform] = (),
    lambda_l2: float | None = None, theta_decay: float | None = None, blur_every: int | None = None,
    blur_sigma: float | None = None, theta_n_pct: float | None = None, theta_c_pct: float | None = None,
    jitter: int | None = None, scales: Sequence[float] | None = None,
    parametrization: ParamSpec = "pixel", init: str | torch.Tensor = "noise", size: int | tuple[int, int] | None = None,
    seed: Seed = 0, batch_size: BatchSize = "auto", progress: bool | None = None,
    preprocess: Preprocess | None = None,
) -> MaximizationResult:
    """Synthesize one image per unit that maximizes it (Erhan et al. 2009; regularized per Simonyan et al. 2014,
    Yosinski et al. 2015 or Olah et al. 2017). All units of a batch are optimized together.

    Args:
        layer: a layer name (``convscope layers MODEL``), or None for the class logits (then ``units`` are classes;
            ``"logits"``, ``"output"`` and ``convscope.core.layers.OUTPUT`` say the same, see ``is_output``).
        units: unit (channel) indices, one image each; default every unit of the layer.
        objective: instead of layer/units, an :class:`Objective` (one image) or a list (one image each), e.g.
            ``channel("blocks.10", 3) - 0.5 * channel("blocks.10", 7)``.
        kind: ``"channel"`` (mean over the map) or ``"neuron"`` (the centre neuron) for conv layers.
        steps, lr, optimizer: ``"adam"`` or ``"sgd"`` (plain gradient ascent ``x <- x + lr * grad``, survey Eq. 8);
            ``lr`` defaults to 0.1 for ``"pixel"``, 0.05 for ``"rgb"`` and ``"fourier"``.
        regularize: a preset, ``"yosinski"`` (default for pixels), ``"olah"`` (default for ``"fourier"``),
            ``"simonyan"`` or ``"none"`` (vanilla AM); or a :class:`Regularization`. The keyword hyperparameters
            (``lambda_l2``, ``theta_decay``, ``blur_every``, ``blur_sigma``, ``theta_n_pct``, ``theta_c_pct``,
            ``jitter``, ``scales``) override single terms of it; ``regularizers`` adds your own objects.
        parametrization: ``"pixel"`` (model input space), ``"rgb"`` (RGB through the preprocess), ``"fourier"``
            (Olah et al.'s decorrelated 1/f spectrum), or ``Pixel(...)`` / ``Fourier(decay_power=, decorrelate=)``.
        init: ``"noise"`` (the mean colour plus N(0, 10/255) noise, Yosinski et al.'s start), ``"mean"`` (the mean
            colour) or a tensor in the model's input space (``3 x H x W`` or one per image).
        size: image size (default the model's preprocess size, else 224).
        seed: image i draws its start and transforms from a generator seeded ``seed + i`` (so a batch equals its
            units run one at a time with those seeds); or one seed per image.
        batch_size: at most this many images are optimized jointly (more units run in successive batches; the
            results do not depend on it); ``"auto"`` (default): from the model's activation sizes at ``size`` and
            the allocator (:mod:`convscope.core.batching`).
    """
    check_rgb_model(model, "activation_maximization")
    pre = model_preprocess(model, preprocess)
    hw = _size(model, size, init)
    reg = _regularization(regularize, parametrization, dict(
        lambda_l2=lambda_l2, theta_decay=theta_decay, blur_every=blur_every, blur_sigma=blur_sigma,
        theta_n_pct=theta_n_pct, theta_c_pct=theta_c_pct, jitter=jitter,
        scales=tuple(scales) if scales is not None else None))
    extra_regs, extra_trans = _split(regularizers)
    lr = _default_lr(parametrization) if lr is None else lr
    check_batch_size(batch_size, "activation_maximization")
    like = torch.zeros((1, 3, *hw), dtype=float_dtype(model), device=model_device(model))
    if objective is not None:
        objs = [objective] if isinstance(objective, Objective) else list(objective)
        if not objs or not all(isinstance(o, Objective) for o in objs):
            raise ConvscopeError("objective must be an Objective or a list of them (channel(), neuron(), logit())")
        batch_size = resolve_batch_size(batch_size, model, like, "activation_maximization", grad=True,
                                        limit=len(objs))
        unit_list, layer_name = None, None
        names = [o.name for o in objs]
        chunks = [(start, per_image(objs[start:start + batch_size]) if len(objs) > 1 else objs[0],
                   min(batch_size, len(objs) - start)) for start in range(0, len(objs), batch_size)]
    else:
        name = layer_or_output(model, layer)
        layer_name = None if name == OUTPUT else name
        unit_list = _all_units(model, name, hw) if units is None else _unit_list(units)
        batch_size = resolve_batch_size(batch_size, model, like, "activation_maximization", grad=True,
                                        limit=len(unit_list))
        names = [_label("logit" if name == OUTPUT else kind, name, u) for u in unit_list]
        chunks = [(start, _objective_for(name, unit_list[start:start + batch_size], kind),
                   len(unit_list[start:start + batch_size])) for start in range(0, len(unit_list), batch_size)]
    results = [_optimize(model, obj, n, start, pre, hw, parametrization, init, seed, steps, lr, optimizer, reg,
                         extra_regs, extra_trans, progress, "maximize")
               for start, obj, n in chunks]
    return MaximizationResult(
        images=torch.cat([r.images for r in results]), x=torch.cat([r.x for r in results]),
        activations=torch.cat([r.values for r in results]), history=torch.cat([r.history for r in results], 1),
        layer=layer_name, units=unit_list, names=names)




def _optimize(model: nn.Module, obj: Objective, n: int, start: int, pre: Preprocess, hw: tuple[int, int],
              parametrization: ParamSpec, init: str | torch.Tensor, seed: Seed, steps: int, lr: float, optimizer: str,
              reg: Regularization, extra_regs: list[Regularizer], extra_trans: list[Transform], progress: bool | None,
              desc: str, stop: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None) -> OptimResult:
    if isinstance(seed, int) and not isinstance(seed, bool) or isinstance(seed, torch.Generator):
        gens = make_generators(seed, n, offset=start)
    else:
        seeds = list(seed)  # type: ignore[arg-type]
        gens = make_generators(seeds[start:start + n], n)
    if isinstance(init, torch.Tensor) and init.dim() == 4 and init.shape[0] > 1:
        init = init[start:start + n]
    like = torch.zeros((), dtype=float_dtype(model), device=model_device(model))
    param = make_param(parametrization, init, n, hw, pre, gens, like)
    return optimize_images(model, obj, param, steps=steps, lr=lr, optimizer=optimizer, regularization=reg,
                           transforms=extra_trans, regularizers=extra_regs, generators=gens, stop=stop,
                           progress=progress, desc=desc)


# --------------------------------------------------------------------------- fooling images


@dataclass(frozen=True)
class FoolingResult:
    """Fooling images (Nguyen et al. 2015): unrecognizable images classified with high confidence.

    ``images``: RGB in [0, 1]; ``x``: the same in the model's input space; ``target``: the class of each image;
    ``probabilities``: the softmax probability of the target reached; ``predicted``: the top class; ``steps``: the
    gradient steps each image took until ``probabilities >= confidence`` (``-1``: not reached in ``max_steps``);
    ``success``: reached; ``history``: the score ascended (logit or log-probability) at each step, ``steps x N``.
    """

    images: torch.Tensor
    x: torch.Tensor
    target: torch.Tensor
    probabilities: torch.Tensor
    predicted: torch.Tensor
    steps: torch.Tensor
    success: torch.Tensor
    confidence: float
    history: torch.Tensor


def fooling_image(
    model: nn.Module, target: Units, confidence: float = 0.9999, max_steps: int = 500, *, lr: float | None = None,
    optimizer: str = "adam", regularize: str | Regularization = "none",
    regularizers: Sequence[Regularizer | Transform] = (), parametrization: ParamSpec = "pixel",
    init: str | torch.Tensor = "noise", size: int | tuple[int, int] | None = None, seed: Seed = 0,
    score: str = "logit", progress: bool | None = None, preprocess: Preprocess | None = None,
) -> FoolingResult:
    """Gradient ascent on the logit of each ``target`` class from noise until its softmax probability reaches
    ``confidence`` (Nguyen et al. 2015, Sec. 3; survey Sec. 7.1). One image per target, all in one batch; an image
    stops changing once it is confident enough. The probability is checked on the image itself before each step.

    ``score="logit"`` ascends the class logit (as activation maximization does). Raising one logit can raise a rival
    class's logit faster, so some classes never reach the confidence that way; ``score="log_softmax"`` ascends
    ``log p_c = z_c - log sum_j exp z_j`` instead (the direction of Nguyen et al.'s softmax-output gradient), which
    also pushes the rivals down.
    """
    if not 0 < confidence < 1:
        raise ConvscopeError(f"confidence={confidence!r}: a softmax probability in (0, 1), e.g. 0.9999")
    if score not in ("logit", "log_softmax"):
        raise ConvscopeError(f"score={score!r}: use 'logit' or 'log_softmax'")
    targets = _unit_list(target)
    pre = model_preprocess(model, preprocess)
    hw = _size(model, size, init)
    reg = _regularization(regularize, parametrization, {})
    extra_regs, extra_trans = _split(regularizers)
    lr = _default_lr(parametrization) if lr is None else lr
    tgt = torch.tensor(targets)

    def reached(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = acts[OUTPUT]
        return F.softmax(out.reshape(out.shape[0], -1).float(), 1)[torch.arange(len(targets)), tgt.to(out.device)] \
            >= confidence

    obj = logit(targets) if score == "logit" else log_softmax(targets)
    res = _optimize(model, obj, len(targets), 0, pre, hw, parametrization, init, seed, max_steps, lr,
                    optimizer, reg, extra_regs, extra_trans, progress, "fooling", stop=reached)
    probs = F.softmax(res.output.reshape(len(targets), -1).float(), 1)  # type: ignore[union-attr]
    p_target = probs[torch.arange(len(targets)), tgt.to(probs.device)]
    return FoolingResult(images=res.images, x=res.x, target=tgt, probabilities=p_target.cpu(),
                         predicted=probs.argmax(1).cpu(), steps=res.steps, success=res.steps >= 0,
                         confidence=float(confidence), history=res.history)


# --------------------------------------------------------------------------- multifaceted feature visualization


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 10, iters: int = 100,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (Lloyd's algorithm, k-means++ starts, the best of ``n_init`` by inertia) on the rows of ``x`` (``n x
    d``). Returns ``(labels n, centres k x d)``; every cluster is non-empty. Deterministic for a ``seed``."""
    x = x.detach().double().cpu()
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConvscopeError(f"kmeans(k={k!r}): use a positive int")
    if torch.unique(x, dim=0).shape[0] < k:
        raise ConvscopeError(f"{k} clusters need at least {k} distinct points, got {n}; ask for fewer facets or give "
                             "more images (a larger top)")
    gen = torch.Generator().manual_seed(int(seed))
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(max(1, n_init)):
        centres = x[torch.randint(n, (1,), generator=gen)]
        for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance to the nearest
            d2 = torch.cdist(x, centres).min(1).values.pow(2)
            centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
        labels = torch.full((n,), -1, dtype=torch.long)
        for _ in range(iters):
            new = torch.cdist(x, centres).argmin(1)
            for j in range(k):  # an emptied cluster takes the point farthest from its centre
                if not (new == j).any():
                    far = torch.cdist(x, centres).gather(1, new[:, None]).squeeze(1).argmax()
                    new[far] = j
            if torch.equal(new, labels):
                break
            labels = new
            centres = torch.stack([x[labels == j].mean(0) for j in range(k)])
        inertia = float((x - centres[labels]).pow(2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2].to(torch.float32)


def _pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Rows of ``x`` projected on their first ``dims`` principal components (centred, not whitened)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    if dims >= min(x.shape):
        return x
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:dims].T


def encode(model: nn.Module, layer: str, x: torch.Tensor, batch_size: BatchSize = "auto") -> torch.Tensor:
    """The output of ``layer`` for images ``x`` (no gradients, detached): e.g. the code of a real image for an
    UpconvNet decoder trained from that layer, to start :func:`dgn_am` from. ``batch_size``: images per forward
    pass (``"auto"``: :mod:`convscope.core.batching`)."""
    name = resolve_layer(model, layer)[0]
    check_batch_size(batch_size, "encode")
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        batch_size = resolve_batch_size(batch_size, model, x, "encode", limit=len(x))
    batch_size = batch_size if isinstance(batch_size, int) else 32
    return torch.cat([cast(torch.Tensor, acts[name])
                      for _, acts in stream_layers(model, x, [name], batch_size, progress=False)])


@dataclass(frozen=True)
class MultifacetedResult:
    """Multifaceted feature visualization (Nguyen, Yosinski & Clune 2016): one image per unit and facet.

    ``images``: RGB in [0, 1], ``U x F x 3 x H x W``; ``x``: the same in the model's input space; ``activations``:
    the objective of each final image, ``U x F``; ``starts``: the cluster mean images they started from, RGB,
    ``U x F x 3 x H x W``; ``members[u][f]``: the image ids (positions in the dataset) of facet f of unit u,
    strongest first; ``top_ids`` / ``top_values``: each unit's top images and their activations (spatial maximum),
    ``U x top``; ``labels``: the facet of each top image, ``U x top``; ``history``: ``steps x (U F)`` (unit-major).
    Facets are ordered by size, largest first.
    """

    images: torch.Tensor
    x: torch.Tensor
    activations: torch.Tensor
    starts: torch.Tensor
    members: list[list[list[int]]]
    top_ids: torch.Tensor
    top_values: torch.Tensor
    labels: torch.Tensor
    history: torch.Tensor
    layer: str
    units: list[int]
    embed_layer: str


def _gather(images: object, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The images with ``ids`` (sorted, unique), from a tensor or by iterating a re-iterable stream again."""
    from ..core.stream import image_batches

    if isinstance(images, torch.Tensor):
        return images[ids.to(images.device)]
    wanted = {int(i): j for j, i in enumerate(ids.tolist())}
    out: list[torch.Tensor | None] = [None] * len(wanted)
    for batch, bid in image_batches(images, batch_size):  # type: ignore[arg-type]
        for r, i in enumerate(bid.tolist()):
            if i in wanted and out[wanted[i]] is None:
                out[wanted[i]] = batch[r]
    if any(t is None for t in out):
        raise ConvscopeError("the image stream gave different images the second time; pass a tensor or a stream that "
                             "yields the same batches each time it is iterated")
    return torch.stack(out)  # type: ignore[arg-type]


def multifaceted(
    model: nn.Module, layer: str, units: Units, images: Images,
    facets: int = 4, *, top: int = 50, embed_layer: str | None = None, pca_dims: int = 50, kind: str = "channel",
    steps: int = 256, regularize: str | Regularization | None = None, seed: Seed = 0, batch_size: BatchSize = "auto",
    progress: bool | None = None, **am_kwargs: object,
) -> MultifacetedResult:
    """Multifaceted feature visualization (Nguyen, Yosinski & Clune 2016, "Multifaceted feature visualization:
    uncovering the different types of features learned by each neuron"): a unit responds to several kinds of inputs
    (facets); visualize each from its own start.

    1. The ``top`` images of ``images`` that most excite each unit (:func:`~convscope.methods.topk.top_k_activations`,
       the spatial maximum).
    2. Embed them: the output of ``embed_layer`` (default ``layer`` itself, all its channels), averaged over space,
       L2-normalized, reduced to ``pca_dims`` principal components. The paper clusters fc7 codes embedded by t-SNE;
       PCA + k-means is the deterministic stand-in (give a late layer as ``embed_layer`` to cluster by semantics).
    3. k-means (:func:`kmeans`, seeded) into ``facets`` clusters per unit.
    4. Activation maximization of the unit from each cluster's mean image (as the paper initializes each facet),
       all facets of all units in ONE batch (unit-major). ``am_kwargs`` go to
       :func:`activation_maximization` (``lr``, ``regularizers``, ``lambda_l2``, ``jitter``, ...).

    ``images``: a tensor ``N x C x H x W`` in the model's input space, or a re-iterable stream of batches (a list,
    a DataLoader of images; it is read twice: once for the top-k, once for the chosen images).
    """
    name = resolve_layer(model, layer)[0]
    unit_list = _unit_list(units)
    if isinstance(facets, bool) or not isinstance(facets, int) or facets < 1:
        raise ConvscopeError(f"facets={facets!r}: use a positive int")
    if isinstance(top, bool) or not isinstance(top, int) or top < facets:
        raise ConvscopeError(f"top={top!r}: use an int >= facets ({facets}); the paper clusters a unit's top images")
    if isinstance(pca_dims, bool) or not isinstance(pca_dims, int) or pca_dims < 1:
        raise ConvscopeError(f"pca_dims={pca_dims!r}: use a positive int")
    if not isinstance(images, torch.Tensor) and iter(images) is images:
        raise ConvscopeError("multifaceted() reads the images twice: pass a tensor or a re-iterable stream (a list of "
                             "batches, a DataLoader), not a one-shot generator")
    bad = set(am_kwargs) & {"init", "size", "units", "objective", "batch_size", "layer"}
    if bad:
        raise ConvscopeError(f"multifaceted() sets {', '.join(sorted(bad))} itself; drop them")
    from .topk import top_k_activations

    check_batch_size(batch_size, "multifaceted")
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch_size = resolve_batch_size(batch_size, model, images, "multifaceted", limit=len(images))
    batch_size = batch_size if isinstance(batch_size, int) else 32  # a stream's own batches are used as given
    found = top_k_activations(model, images, name, k=top, batch_size=batch_size, progress=progress)[name]
    n_units = found.values.shape[0]
    for u in unit_list:
        if not 0 <= u < n_units:
            raise TargetError(f"unit {u} is out of range: layer {name!r} has {n_units} units (valid 0..{n_units - 1})")
    top_ids = found.image_ids[unit_list].cpu()
    top_values = found.values[unit_list].cpu()
    needed = torch.unique(top_ids)
    chosen = _gather(images, needed, batch_size)
    emb_name = name if embed_layer is None else resolve_layer(model, embed_layer)[0]
    codes = []
    for _, acts in stream_layers(model, chosen, [emb_name], batch_size, progress=False):
        a = cast(torch.Tensor, acts[emb_name])
        codes.append((a.flatten(2).mean(2) if a.dim() > 2 else a.flatten(1)).double().cpu())
    emb = F.normalize(torch.cat(codes), dim=1)
    pos = {int(i): j for j, i in enumerate(needed.tolist())}
    starts, members, labels_all = [], [], []
    for r, u in enumerate(unit_list):
        rows = torch.tensor([pos[int(i)] for i in top_ids[r]])
        labels, _ = kmeans(_pca(emb[rows], pca_dims), facets, seed=(seed if isinstance(seed, int) else 0) + u)
        sizes = torch.bincount(labels, minlength=facets)
        order = sorted(range(facets), key=lambda f: (-int(sizes[f]), int((labels == f).nonzero()[0])))
        relabel = torch.empty(facets, dtype=torch.long)
        relabel[torch.tensor(order)] = torch.arange(facets)
        labels = relabel[labels]
        labels_all.append(labels)
        members.append([[int(top_ids[r, j]) for j in (labels == f).nonzero().flatten()] for f in range(facets)])
        imgs = chosen[rows.to(chosen.device)]
        starts.append(torch.stack([imgs[(labels == f).to(imgs.device)].mean(0) for f in range(facets)]))
    init = torch.cat(starts)  # (U F) x C x H x W, unit-major
    res = activation_maximization(model, name, [u for u in unit_list for _ in range(facets)], kind=kind,
                                  init=init, steps=steps, regularize=regularize, seed=seed, batch_size=len(init),
                                  progress=progress, **am_kwargs)  # type: ignore[arg-type]
    pre = model_preprocess(model, am_kwargs.get("preprocess"))  # type: ignore[arg-type]
    u_n, shape = len(unit_list), tuple(init.shape[1:])
    return MultifacetedResult(
        images=res.images.view(u_n, facets, *res.images.shape[1:]), x=res.x.view(u_n, facets, *shape),
        activations=res.activations.view(u_n, facets),
        starts=pre.denormalize(init.detach()).clamp(0, 1).view(u_n, facets, *shape).cpu(), members=members,
        top_ids=top_ids, top_values=top_values, labels=torch.stack(labels_all), history=res.history, layer=name,
        units=unit_list, embed_layer=emb_name)


# --------------------------------------------------------------------------- DGN-AM


@dataclass(frozen=True)
class GeneratorResult:
    """DGN-AM (Nguyen et al. 2016): the images ``G(h*)`` whose codes ``h*`` maximize each unit.

    ``images``: RGB in [0, 1], one per unit; ``x``: the same in the model's input space; ``codes``: ``h*``,
    ``N x code_shape``; ``activations``: each unit's value on its final image (without the code penalty);
    ``history``: the same at each step, ``steps x N``; ``layer`` / ``units`` / ``names`` as
    :class:`MaximizationResult`.
    """

    images: torch.Tensor
    x: torch.Tensor
    codes: torch.Tensor
    activations: torch.Tensor
    history: torch.Tensor
    layer: str | None
    units: list[int] | None
    names: list[str]


def dgn_am(
    model: nn.Module, generator: nn.Module, layer: str | None = None, units: Units | None = None, *,
    objective: Objective | Sequence[Objective] | None = None, kind: str = "channel",
    code_init: str | torch.Tensor = "zeros", code_shape: Sequence[int] | None = None, lambda_code: float = 1e-3,
    output: str = "rgb", code_range: tuple[float, float] | None = None, steps: int = 200, lr: float = 0.05,
    optimizer: str = "adam", regularizers: Sequence[Regularizer | Transform] = (), seed: Seed = 0,
    batch_size: BatchSize = "auto", progress: bool | None = None, preprocess: Preprocess | None = None,
) -> GeneratorResult:
    """Activation maximization through a deep generator network, DGN-AM (Nguyen et al. 2016, "Synthesizing the
    preferred inputs for neurons in neural networks via deep generator networks"; survey Eq. 10):
    ``h* = argmax_h a_i(G(h)) - lambda_code ||h||^2``, ``x* = G(h*)``. Only the codes move; the image prior is the
    generator (e.g. an UpconvNet decoder trained to invert a layer). All units of a batch are optimized together.

    Args:
        generator: any ``nn.Module`` from codes ``N x code_shape`` to images ``N x 3 x H x W``; left untouched (run
            in eval mode with frozen parameters, restored after each call; no hooks; no gradient into it).
        layer, units, objective, kind: as :func:`activation_maximization` (``layer=None``: class logits).
        code_init: ``"zeros"``, ``"noise"`` (N(0, 1), seeded per image) or codes ``1 x code_shape`` / ``N x
            code_shape`` (e.g. ``encode(model, decoder_layer, x)`` of a real or mean image).
        code_shape: the code's shape without the batch; default ``generator.code_shape`` or ``code_init.shape[1:]``.
        lambda_code: weight of the L2 prior on the code (its scale depends on the code's: 1e-3 suits codes of
            order 1 with thousands of entries).
        output: ``"rgb"`` (G gives RGB in [0, 1], mapped through the model's preprocess) or ``"input"`` (G gives the
            model's input space); clipped to the valid pixel box either way, as Nguyen et al. clip the image.
        code_range: ``(low, high)`` clip of the codes after each step (e.g. ``(0, max)`` for ReLU features).
        regularizers: extra transforms (``Jitter(4)``) or penalties on the image; projections are refused.
    """
    from ..core.optim import CodePenalty, GeneratorParam

    pre = model_preprocess(model, preprocess)
    if not isinstance(generator, nn.Module):
        raise ConvscopeError(f"generator must be an nn.Module mapping codes to images, not {type(generator).__name__}")
    if not lambda_code >= 0:
        raise ConvscopeError(f"lambda_code={lambda_code!r}: use a weight >= 0")
    check_batch_size(batch_size, "dgn_am")
    if code_shape is None:
        if isinstance(code_init, torch.Tensor):
            if code_init.dim() < 2:
                raise ConvscopeError("code_init: give codes batch-first, 1 x code_shape or N x code_shape")
            code_shape = tuple(code_init.shape[1:])
        elif getattr(generator, "code_shape", None) is not None:
            code_shape = tuple(generator.code_shape)  # type: ignore[arg-type]
        else:
            raise ConvscopeError("code_shape: give the generator's code shape (without the batch), e.g. "
                                 "code_shape=(112, 8, 8), or a code tensor as code_init")
    spec = GeneratorParam(generator, tuple(int(s) for s in code_shape), output, code_range)
    extra_regs, extra_trans = _split(regularizers)
    like = torch.zeros((), dtype=float_dtype(model), device=model_device(model))
    probe_code = spec.build("zeros", 1, (1, 1), pre, make_generators(0, 1), like)
    with torch.no_grad():
        sample = probe_code().detach()  # one generated image: the model's input shape
    if objective is not None:
        objs = [objective] if isinstance(objective, Objective) else list(objective)
        if not objs or not all(isinstance(o, Objective) for o in objs):
            raise ConvscopeError("objective must be an Objective or a list of them (channel(), neuron(), logit())")
        batch_size = resolve_batch_size(batch_size, model, sample, "dgn_am", grad=True, limit=len(objs))
        unit_list, layer_name, names = None, None, [o.name for o in objs]
        chunks = [(s, per_image(objs[s:s + batch_size]) if len(objs) > 1 else objs[0], min(batch_size, len(objs) - s))
                  for s in range(0, len(objs), batch_size)]
    else:
        name = layer_or_output(model, layer)
        layer_name = None if name == OUTPUT else name
        if units is None:
            unit_list = _all_units(model, name, (int(sample.shape[-2]), int(sample.shape[-1])))
        else:
            unit_list = _unit_list(units)
        batch_size = resolve_batch_size(batch_size, model, sample, "dgn_am", grad=True, limit=len(unit_list))
        names = [_label("logit" if name == OUTPUT else kind, name, u) for u in unit_list]
        chunks = [(s, _objective_for(name, unit_list[s:s + batch_size], kind), len(unit_list[s:s + batch_size]))
                  for s in range(0, len(unit_list), batch_size)]
    results, codes = [], []
    for start, obj, n in chunks:
        if isinstance(seed, int) and not isinstance(seed, bool) or isinstance(seed, torch.Generator):
            gens = make_generators(seed, n, offset=start)
        else:
            gens = make_generators(list(seed)[start:start + n], n)  # type: ignore[arg-type]
        init = code_init
        if isinstance(init, torch.Tensor) and init.dim() == len(spec.code_shape) + 1 and init.shape[0] > 1:
            init = init[start:start + n]
        param = spec.build(init, n, (1, 1), pre, gens, like)
        res = optimize_images(model, obj, param, steps=steps, lr=lr, optimizer=optimizer, transforms=extra_trans,
                              regularizers=[CodePenalty(param, lambda_code), *extra_regs], generators=gens,
                              progress=progress, desc="dgn-am")
        results.append(res)
        codes.append(param.code.detach().clone())
    return GeneratorResult(
        images=torch.cat([r.images for r in results]), x=torch.cat([r.x for r in results]), codes=torch.cat(codes),
        activations=torch.cat([r.values for r in results]), history=torch.cat([r.history for r in results], 1),
        layer=layer_name, units=unit_list, names=names)
