"""Gradient attributions: saliency maps, the raw gradient, gradient x input, SmoothGrad.

* Saliency (Simonyan, Vedaldi & Zisserman 2014, Sec. 3.1): ``w = d S_c / d I`` at the image; the map is
  ``M_ij = max_c |w_h(i,j,c)|``, the largest absolute derivative over the colour channels.
* Gradient x input (Shrikumar et al. 2016): ``x * d S_c / d x``, per channel, signed.
* SmoothGrad (Smilkov et al. 2017, Eq. 3): ``M_hat_c(x) = 1/n sum_1^n M_c(x + N(0, sigma^2))``, with sigma given
  as a fraction of the image's value range ``x_max - x_min`` (Sec. 3.2; they find 10-20% works best).

Scores are logits (Simonyan et al., Sec. 2). Every function takes a batch of images ``N x C x H x W`` and targets
(an int, one per image, ``N x K``, :func:`~convscope.top_class`, :func:`~convscope.top_k` or any callable on the
output, see :mod:`convscope.core.targets`): one forward pass, the K backward passes batched.

Shapes: per-channel results (``gradient``, ``input_x_gradient``, ``smoothgrad``) are ``N x K x C x H x W``;
``saliency`` reduces the channels to ``N x K x H x W``. Gradients are w.r.t. the model's input space (after
normalization), which is what the network sees.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.attribution import check_input, input_gradient, pinned_target, summed_input_gradient
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.rules import RELU_RULES
from ..core.targets import Target, pinned_indices, top_class
from ..errors import ConvscopeError

REDUCTIONS = ("max", "sum", "mean")


def gradient(model: nn.Module, x: torch.Tensor, target: Target = top_class) -> torch.Tensor:
    """The raw input gradient ``d score_k / d x``: ``N x K x C x H x W``, signed, per channel."""
    check_input(x, "gradient")
    return input_gradient(model, x, target).grads


def saliency(model: nn.Module, x: torch.Tensor, target: Target = top_class, abs: bool = True,
             reduce: str = "max") -> torch.Tensor:
    """Image-specific class saliency (Simonyan et al. 2014, Sec. 3.1): ``N x K x H x W``.

    ``abs=True, reduce="max"`` is the paper's map ``max_c |d S_c / d I|``. ``reduce`` may also be ``"sum"`` or
    ``"mean"`` over the channels; ``abs=False`` keeps the sign before reducing.
    """
    check_input(x, "saliency")
    if reduce not in REDUCTIONS:
        raise ConvscopeError(f"saliency(reduce={reduce!r}): use one of {', '.join(REDUCTIONS)}")
    if x.dim() != 4:
        raise ConvscopeError(f"saliency needs images N x C x H x W, got {tuple(x.shape)}; use gradient() for other "
                             "inputs")
    return _reduce_channels(gradient(model, x, target), abs, reduce)


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: Target = top_class) -> torch.Tensor:
    """Gradient x input (Shrikumar et al. 2016): ``x * d score_k / d x``, ``N x K x C x H x W``, signed."""
    check_input(x, "input_x_gradient")
    return x.detach().unsqueeze(1) * input_gradient(model, x, target).grads


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = top_class, n: int = 50, sigma: float = 0.15,
               seed: int | torch.Generator = 0, batch_size: BatchSize = "auto", relu_rule: str | None = None,
               progress: bool | None = None) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the input gradient averaged over ``n`` noisy copies, ``N x K x C x H x W``.

    Noise is Gaussian with standard deviation ``sigma * (x.max() - x.min())`` per image. Samples are drawn from a
    ``torch.Generator`` (``seed`` an int, or a generator you pass), never the global RNG, one ``x``-shaped draw
    per sample in order, so the result does not depend on ``batch_size``. Noisy copies run through the model
    ``batch_size`` rows at a time (rows = images x samples, through
    :func:`~convscope.core.attribution.summed_input_gradient`), which bounds memory; ``"auto"`` (default) picks it
    from the model's activation sizes and the allocator (:mod:`convscope.core.batching`). Targets are fixed on the
    clean images first (``top_class`` is the clean image's top class for every noisy copy); a callable returning
    scores is applied to each noisy copy's output. ``relu_rule="guided"`` smooths guided backpropagation instead of
    the gradient (the paper's Fig. 5). ``sigma=0`` gives the plain gradient. ``progress``: a bar with an ETA over
    the noise samples (``True``, ``False``, or ``None``: once the work has run for 2 s).

    For a saliency-style map, reduce the channels: ``smoothgrad(...).abs().amax(2)``.
    """
    check_input(x, "smoothgrad")
    if not isinstance(n, int) or n < 1:
        raise ConvscopeError(f"smoothgrad(n={n!r}): the number of noise samples must be a positive int")
    if not sigma >= 0:
        raise ConvscopeError(f"smoothgrad(sigma={sigma!r}): sigma is a fraction of the input range, >= 0 (0.1-0.2)")
    check_batch_size(batch_size, "smoothgrad")
    if relu_rule is not None and relu_rule not in RELU_RULES:
        raise ConvscopeError(f"smoothgrad(relu_rule={relu_rule!r}): use None or one of {', '.join(RELU_RULES)}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=x.device).manual_seed(int(seed))
    x = x.detach()
    num = x.shape[0]
    span = x.reshape(num, -1)
    std = (sigma * (span.amax(1) - span.amin(1))).reshape(num, *([1] * (x.dim() - 1)))
    fixed = pinned_target(model, x, target)
    idx = pinned_indices(fixed)
    rows = resolve_batch_size(batch_size, model, x, "smoothgrad", multiplier=1 if idx is None else idx.shape[1],
                              grad=True, limit=n * num)

    def noisy(s0: int, s1: int) -> torch.Tensor:  # samples s0 .. s1 - 1, one x-shaped draw each, in order
        noise = torch.stack([torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                             for _ in range(s1 - s0)])
        return x + std * noise

    total = summed_input_gradient(model, x, fixed, n, noisy, batch_size=rows, relu_rule=relu_rule,
                                  progress=progress, desc="smoothgrad")
    return total / n


def _reduce_channels(grads: torch.Tensor, absolute: bool, reduce: str) -> torch.Tensor:
    """``N x K x C x H x W`` -> ``N x K x H x W`` (``abs`` first when asked)."""
    g = grads.abs() if absolute else grads
    if reduce == "max":
        return g.amax(dim=2)
    return g.sum(dim=2) if reduce == "sum" else g.mean(dim=2)
