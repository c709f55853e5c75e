"""The image-optimization loop (:func:`optimize_images`): one forward and one backward pass per step for the whole
batch, Adam / plain / normalized gradient ascent, penalties and projections, early stop per image, and schedules
(:data:`Schedule`: a factor per step for the step size, :func:`cosine_decay`, or a penalty's weight,
:func:`geometric` with :class:`~convscope.core.optim.regularizers.Scheduled`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from ...errors import ConvscopeError
from ..layers import OUTPUT
from ..probe import Probe, probe
from ..progress import progress_bar
from ..stream import last_layer
from .objectives import Objective
from .params import Generators, ImageParam, make_generators
from .regularizers import Regularization, Regularizer, Schedule, schedule_factor
from .transforms import Transform

OPTIMIZERS = ("adam", "sgd", "normalized")


def cosine_decay(steps: int, fraction: float = 1.0, floor: float = 0.0) -> Schedule:
    """A step-size schedule: factor 1 for the first ``steps - m`` steps, ``m = round(fraction * steps)``, then a
    half cosine ``floor + (1 - floor) (1 + cos(pi t)) / 2``, ``t = (k - (steps - m)) / m``, from 1 towards ``floor``
    over the last ``m`` steps (Loshchilov & Hutter 2017's cosine annealing, without restarts). Mahendran & Vedaldi
    2015 likewise lower the learning rate of their momentum gradient descent as the optimization proceeds."""
    if not isinstance(steps, int) or steps < 0:
        raise ConvscopeError(f"cosine_decay: steps={steps!r}; use an int >= 0")
    if not 0 <= fraction <= 1 or not 0 <= floor <= 1:
        raise ConvscopeError(f"cosine_decay: fraction={fraction!r}, floor={floor!r}; both must be in [0, 1]")
    m = round(fraction * steps)
    start = steps - m

    def factor(k: int) -> float:
        if k < start or m == 0:
            return 1.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (k - start) / m))
    return factor


def geometric(first: float, last: float, steps: int, fraction: float = 1.0) -> Schedule:
    """A schedule moving geometrically (linearly in log) from ``first`` at step 0 to ``last`` at step
    ``round(fraction * steps) - 1``, then staying at ``last``: e.g. a penalty weight annealed from strong to weak
    (:class:`~convscope.core.optim.regularizers.Scheduled`)."""
    if not first > 0 or not last > 0:
        raise ConvscopeError(f"geometric: first={first!r}, last={last!r}; both must be > 0 (use a weight of 0 to "
                             "switch a penalty off)")
    if not isinstance(steps, int) or steps < 0 or not 0 < fraction <= 1:
        raise ConvscopeError(f"geometric: steps={steps!r}, fraction={fraction!r}; use an int >= 0 and (0, 1]")
    m = max(1, round(fraction * steps))
    ratio = math.log(last / first)

    def factor(k: int) -> float:
        t = min(k, m - 1) / (m - 1) if m > 1 else 1.0
        return float(first * math.exp(ratio * t))
    return factor


def _row_factors(value: float | torch.Tensor, n: int, step: int) -> torch.Tensor | None:
    """A schedule's tensor of per-image factors (checked), or None for a plain float."""
    if not isinstance(value, torch.Tensor):
        return None
    f = value.detach().reshape(-1)
    if f.shape != (n,) or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ConvscopeError(f"lr schedule gave {tuple(value.shape)} factors at step {step}; a per-image schedule must "
                             f"return {n} finite factors >= 0 (one per image), or one float")
    return f


@dataclass(frozen=True)
class OptimResult:
    """What :func:`optimize_images` returns.

    ``x``: final images in the model's input space; ``images``: the same as RGB in [0, 1]; ``values``: the objective
    of each final (untransformed) image, ``N``; ``history``: the objective at every step (on the transformed images
    the step used), ``steps_run x N``; ``steps``: per image, the number of updates applied (fewer than ``steps`` when
    ``stop`` ended it early); ``output``: the model output on the final images when the objective reads it.
    """

    x: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    history: torch.Tensor
    steps: torch.Tensor
    output: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)


def _run(p: Probe, model: nn.Module, x: torch.Tensor, layers: Sequence[str], need_output: bool,
         ) -> dict[str, torch.Tensor]:
    p.clear()
    out = p.forward(model, x)
    acts = dict(p.activations)
    missing = [n for n in layers if n not in acts]
    if missing:
        raise ConvscopeError(f"layer(s) {', '.join(map(repr, missing))} did not run in the forward pass; pick a "
                             "layer from `convscope layers MODEL` that the model's forward() calls")
    if need_output:
        if not isinstance(out, torch.Tensor):
            raise ConvscopeError(f"the model returned {type(out).__name__}, not a tensor of logits; wrap it so "
                                 "forward() returns N x classes")
        acts[OUTPUT] = out
    return acts


def _check_objective(value: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConvscopeError(f"an objective must return one value per image, shape ({n},); got {shape}. Reduce over "
                             "units and space inside the objective (e.g. acts[layer][:, k].mean((1, 2)))")
    return value


def mean_abs_normalized(grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row (image) of ``grad`` divided by its mean absolute value, so a step of ``lr`` moves the pixels by
    ``lr`` on average (DeepDream's normalized ascent step, Mordvintsev et al. 2015)."""
    scale = grad.abs().flatten(1).mean(1).clamp_min(eps)
    return grad / scale.view(-1, *([1] * (grad.dim() - 1)))


def optimize_images(model: nn.Module, objective: Objective, param: ImageParam, *, steps: int, lr: float,
                    optimizer: str = "adam", regularization: Regularization | None = None,
                    transforms: Sequence[Transform] = (), regularizers: Sequence[Regularizer] = (),
                    generators: Generators | None = None,
                    stop: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                    callback: Callable[[int, ImageParam], None] | None = None,
                    progress: bool | None = None, desc: str = "optimize",
                    lr_schedule: Callable[[int], float | torch.Tensor] | None = None) -> OptimResult:
    """Ascend ``objective`` (one value per image) over the images of ``param`` for ``steps`` steps.

    One forward and one backward pass per step for the whole batch; the forward pass stops after the deepest layer
    the objective reads (unless it reads the output). ``optimizer``: ``"adam"`` (Kingma & Ba 2015) or ``"sgd"``,
    plain gradient ascent ``x <- x + lr * dJ/dx`` (survey Eq. 8), or ``"normalized"``: gradient ascent with each
    image's gradient divided by its mean absolute value (:func:`mean_abs_normalized`; DeepDream). ``stop(acts)``
    (on the untransformed images, before each update) returns a boolean ``N``: images for which it is true keep
    their current pixels from then on, and the loop ends when all are done. ``callback(k, param)`` runs after the
    k-th update (``k = 1..steps``, without gradients), e.g. to keep ``param().clone()`` at checkpoints; it must not
    change ``param`` nor run the model (still hooked). ``progress``: a bar with an ETA
    (``True``, ``False``, or ``None``: once the loop has run for 2 s;
    see :func:`~convscope.core.progress.progress_bar`). ``regularization``: its penalties, projections and
    transforms run before the ``regularizers`` and ``transforms`` given one by one. ``lr_schedule(k)``: the step
    size of step ``k`` (0-based) is ``lr * lr_schedule(k)`` (a :data:`Schedule`, e.g. :func:`cosine_decay`), or, when
    it returns a tensor of ``N`` factors, ``lr * factor_i`` for image ``i`` (each image's update is scaled: exactly a
    per-image step size for Adam and plain ascent, whose updates are linear in it). Penalties whose weight follows a
    schedule are :class:`~convscope.core.optim.regularizers.Scheduled` (every regularizer is told the step first).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ConvscopeError(f"steps={steps!r}: use an int >= 0")
    if not lr > 0:
        raise ConvscopeError(f"lr={lr!r}: the step size must be > 0")
    if optimizer not in OPTIMIZERS:
        raise ConvscopeError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if regularization is not None:
        if not isinstance(regularization, Regularization):
            raise ConvscopeError("regularization must be a Regularization(...), not "
                                 f"{type(regularization).__name__}")
        regularizers = [*regularization.regularizers(), *regularizers]
        transforms = [*regularization.transforms(), *transforms]
    projections = [r for r in regularizers if r.projection]
    if projections and not param.projectable:
        names = ", ".join(type(r).__name__ for r in projections)
        raise ConvscopeError(f"{names} edit pixels after each step and need a pixel parametrization; use "
                             "parametrization='pixel' (or 'rgb'), or drop them (penalties and transforms work with "
                             "any parametrization)")
    with torch.no_grad():
        n = param().shape[0]
    generators = generators if generators is not None else make_generators(0, n)
    layers = [name for name in objective.layers if name != OUTPUT]
    need_output = OUTPUT in objective.layers
    if not layers and not need_output:
        raise ConvscopeError("the objective reads no layer; build it from channel(), neuron() or logit()")
    stop_after = None if need_output else last_layer(model, layers, param()[:1].detach())
    params = list(param.parameters())
    if optimizer == "adam":
        # the fused kernel: one pass over the images instead of ~10 (same update, rounded differently)
        fused = all(q.is_floating_point() and q.device.type in ("cpu", "cuda") for q in params) or None
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, maximize=True, fused=fused)
    else:
        opt = torch.optim.SGD(params, lr=lr, maximize=True)
    done = torch.zeros(n, dtype=torch.bool)
    taken = torch.full((n,), steps, dtype=torch.long)
    history: list[torch.Tensor] = []
    with torch.enable_grad(), probe(model, layers, stop_after=stop_after) as p, \
            progress_bar(total=steps, desc=desc, unit="step", progress=progress, leave=False) as bar:
        for step in range(steps):
            rows = None
            if lr_schedule is not None:
                value = lr_schedule(step)
                rows = _row_factors(value, n, step)
                for group in opt.param_groups:
                    group["lr"] = lr if rows is not None else lr * schedule_factor(float(value), step, "lr")
            for r in regularizers:
                r.set_step(step)
            x = param()
            xt = x
            for t in transforms:
                xt = t(xt, generators)
            acts = _run(p, model, xt, layers, need_output)
            value = _check_objective(objective(acts), n)
            if stop is not None:
                if transforms:
                    with torch.no_grad():
                        clean = _run(p, model, x.detach(), layers, need_output)
                else:
                    clean = {k: v.detach() for k, v in acts.items()}
                now = stop(clean).detach().cpu().bool() & ~done
                taken[now] = step
                done |= now
                if bool(done.all()):
                    break
            loss = value
            for r in regularizers:
                pen = r.penalty(x - param.centre_input)
                if pen is not None:
                    loss = loss - pen
            grads = torch.autograd.grad(loss.sum(), params)
            history.append(value.detach())
            keep = [q.detach()[done.to(q.device)].clone() for q in params] if bool(done.any()) else None
            for q, g in zip(params, grads):
                q.grad = mean_abs_normalized(g) if optimizer == "normalized" else g
            before = [q.detach().clone() for q in params] if rows is not None else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if before is not None and rows is not None:
                with torch.no_grad():
                    for q, b in zip(params, before):  # every parameter has the images as its first dimension
                        q.copy_(b + (q - b) * rows.to(q).view(-1, *([1] * (q.dim() - 1))))
            with torch.no_grad():
                if projections:
                    delta = cast(torch.Tensor, param.delta)  # projectable: a pixel parametrization
                    for r in projections:
                        delta = r.project(delta, grads[0], step)
                    cast(torch.Tensor, param.delta).copy_(delta)
                param.clamp_()
                if keep is not None:
                    for q, k in zip(params, keep):
                        q[done.to(q.device)] = k
                if callback is not None:
                    callback(step + 1, param)
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(objective=f"{float(value.detach().mean()):.3g}", refresh=False)
            bar.update(1)
        with torch.no_grad():
            x = param().detach()
            acts = _run(p, model, x, layers, need_output)
            values = _check_objective(objective(acts), n).detach()
            if stop is not None:
                now = stop(acts).detach().cpu().bool() & ~done
                taken[now] = len(history)
                done |= now
        acts = {k: v.detach() for k, v in acts.items()}
    hist = torch.stack(history) if history else torch.zeros(0, n)
    if stop is not None:
        taken[~done] = -1
    return OptimResult(x=x, images=param.pixels().detach(), values=values, history=hist, steps=taken,
                       output=acts.get(OUTPUT), activations={k: v for k, v in acts.items() if k != OUTPUT})
