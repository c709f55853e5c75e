"""The one loop behind every input-gradient attribution: one forward pass, K vector-Jacobian products.

Saliency, gradient x input and SmoothGrad (``methods/saliency.py``), guided backpropagation, the DeconvNet rule
and guided Grad-CAM (``methods/backprop.py``) differ only in the probe configuration (which ReLU backward rule)
and in what they do with the gradient afterwards, so the loop lives here once. Methods that sum gradients over
many altered copies of the images (SmoothGrad's noisy copies, Integrated Gradients' path points) share the
batched loop :func:`summed_input_gradient`.

Shape convention: gradients w.r.t. an ``N x C x H x W`` input are returned ``N x K x C x H x W`` (K targets per
image, ``K = 1`` for a single class); for a non-image input ``N x D...`` they are ``N x K x D...``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConvscopeError, TargetError
from .probe import preserved_state, probe
from .progress import progress_bar
from .targets import OutputTarget, Target, batched_grad, class_indices, pinned, pinned_indices, target_scores


@dataclass(frozen=True)
class InputGradient:
    """Gradients of the target scores w.r.t. the input, with the scores and class indices they belong to.

    ``grads``: ``N x K x (input shape)``; ``scores``: ``N x K`` (detached); ``indices``: ``N x K`` class indices,
    or ``None`` when the target was a callable returning scores.
    """

    grads: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor | None


def check_input(x: torch.Tensor, what: str) -> None:
    """A floating-point batch ``N x ...`` with at least one image, or a clear error."""
    if not isinstance(x, torch.Tensor):
        raise ConvscopeError(f"{what} expects a tensor N x C x H x W, got {type(x).__name__}; "
                             "use cs.load_images(paths, model)")
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ConvscopeError(f"{what} expects a non-empty floating-point batch N x C x H x W, got "
                             f"{x.dtype} {tuple(x.shape)}; add a batch dimension with x[None], convert with .float()")


def input_gradient(model: nn.Module, x: torch.Tensor, target: Target, relu_rule: str | None = None) -> InputGradient:
    """d score_k / d x for each image and each of its K targets, under a probe configuration.

    One forward pass of the whole batch, then the K vector-Jacobian products batched (``is_grads_batched``);
    images are independent, so each gets its own gradient. ``relu_rule`` swaps the backward rule of every
    ReLU / ReLU6 (``"guided"``, ``"deconvnet"``; see :func:`convscope.probe`). The model's parameters are frozen
    for the pass (no weight gradients are computed or stored) and everything is restored afterwards. Works
    inside ``torch.no_grad()`` too.
    """
    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), probe(model, relu_rule=relu_rule):
        out = model(xx)
        scores, idx = target_scores(out, target)
        (g,) = batched_grad(scores, [xx])  # K x N x ...
    return InputGradient(g.movedim(0, 1), scores.detach(), idx)


def pinned_target(model: nn.Module, x: torch.Tensor, target: Target,
                  output: torch.Tensor | None = None) -> torch.Tensor | Callable:
    """Fix a target to the class indices it names on the clean images (``N x K``), with one forward pass.

    Methods that run the model on altered copies (noisy for SmoothGrad, occluded for occlusion) explain the class
    chosen on the original image: ``top_class`` must not switch class from one noisy copy to the next. A callable
    that returns scores (not indices) is returned unchanged and applied to the altered copies' outputs.
    ``output``: the model's output on ``x`` when the caller already has it (no forward pass then).
    """
    if output is None:
        known = class_indices(target, x.shape[0], x.device)
        if known is not None:  # explicit indices: no forward pass needed to fix them
            return known
        with torch.no_grad(), preserved_state(model):
            output = model(x)
    _, idx = target_scores(output, target)
    # no indices: the target is a callable returning scores (bare or wrapped by output()), applied to each copy
    return cast(Callable[..., Any], target) if idx is None else pinned(target, idx)


def pinned_class(model: nn.Module, x: torch.Tensor, target: Target, what: str,
                 output: torch.Tensor | None = None) -> torch.Tensor:
    """One class index per image (``N``), fixed on the clean images, for methods that follow a single class
    (attacks, deletion / insertion); several targets or a score callable give a clear error naming ``what``."""
    idx = pinned_indices(pinned_target(model, x, target, output))
    if idx is None or idx.shape[1] != 1:
        raise ConvscopeError(f"{what} needs one class per image as its target (an int, a list of N ints or "
                             "top_class), not several or a score function")
    return idx[:, 0]


def repeat_target(target: torch.Tensor | Callable, reps: int) -> torch.Tensor | Callable:
    """Indices ``N x K`` for a batch of ``reps`` copies of the N images laid out copy-major (row ``r * N + i``)."""
    return target.repeat(reps, 1) if isinstance(target, (torch.Tensor, OutputTarget)) else target


Copies = Callable[[int, int], torch.Tensor]
"""``copies(s0, s1)``: the altered copies ``s0 .. s1 - 1`` of every image, ``(s1 - s0) x N x ...``."""


def summed_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor | Callable, n: int,
                          copies: Copies, weights: torch.Tensor | None = None, batch_size: int = 32,
                          relu_rule: str | None = None, progress: bool | None = None,
                          desc: str = "gradient") -> torch.Tensor:
    """``sum_s w_s * d score_k / d x`` at ``n`` altered copies of each image (SmoothGrad's noisy copies, Integrated
    Gradients' path points): ``N x K x ...``, the input gradient taken at copy ``s`` of image ``i`` and summed
    over ``s``.

    Rows (copy ``s`` of image ``i``) run through :func:`input_gradient` at most ``batch_size`` at a time:
    ``batch_size // N`` whole copies of the batch per pass, or, when ``N > batch_size``, one copy split into
    slices of images. ``copies`` is called once per pass in increasing ``s`` (a random draw per copy stays in
    order, so the result does not depend on ``batch_size``). ``target`` is already pinned
    (:func:`pinned_target`: ``N x K`` indices, or a score callable applied to every copy's output). ``weights``:
    ``n`` weights ``w_s`` (default 1). A progress bar counts the copies.
    """
    num = x.shape[0]
    per = max(1, batch_size // num)
    w_all = None if weights is None else weights.to(device=x.device, dtype=x.dtype)
    total: torch.Tensor | None = None
    with progress_bar(total=n, desc=desc, unit="step", progress=progress, leave=False) as bar:
        for s0 in range(0, n, per):
            m = min(per, n - s0)
            points = copies(s0, s0 + m)
            for i0 in range(0, num, batch_size):  # one slice unless N > batch_size (then m == 1)
                i1 = min(num, i0 + batch_size)
                rows = points[:, i0:i1].reshape(m * (i1 - i0), *x.shape[1:])  # row s * n_i + i
                t = target[i0:i1] if isinstance(target, (torch.Tensor, OutputTarget)) else target
                g = input_gradient(model, rows, repeat_target(t, m), relu_rule).grads
                g = g.reshape(m, i1 - i0, *g.shape[1:])
                if w_all is not None:
                    g = g * w_all[s0:s0 + m].reshape(m, *([1] * (g.dim() - 1)))
                if total is None:
                    total = torch.zeros(num, *g.shape[2:], dtype=g.dtype, device=g.device)
                if total.shape[1:] != g.shape[2:]:
                    raise TargetError(f"the target callable returned {g.shape[2]} scores per image on one pass but "
                                      f"{total.shape[1]} on another; it must return the same number every time")
                total[i0:i1] += g.sum(0)
            bar.update(m)
    assert total is not None  # n >= 1
    return total
