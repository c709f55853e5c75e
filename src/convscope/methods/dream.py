"""DeepDream (Mordvintsev, Olah & Tyka 2015, "Inceptionism: Going Deeper into Neural Networks").

Start from a real photo and let a layer amplify whatever it sees: gradient ascent on

    J(x) = 1/2 ||A_layer(x)||_2^2        (``objective_L2`` of the reference notebook; dJ/dA = A)

with the normalized step ``x <- x + lr * g / mean|g|`` (``g = dJ/dx``, per image), a random cyclic shift of up to
``jitter`` pixels before each step (undone after it), and pixels kept in the valid range. The image is processed
at ``octaves`` scales, smallest first, each ``octave_scale`` times the previous one: the details the ascent adds at
one octave (the dreamed image minus the photo at that scale) are upsampled and added to the photo at the next, so
large structures grow at the coarse scales and fine ones at the full size.

Every octave runs the shared optimization loop (:func:`convscope.core.optim.optimize_images`) with the objective
:func:`~convscope.core.optim.activation_l2`, a pixel parametrization in RGB (so ``lr`` is in pixel units: the
reference's 1.5 on the 0..255 scale is ``1.5 / 255``), the ``"normalized"`` optimizer and a
:class:`~convscope.core.optim.Jitter` transform (``Regularization(jitter=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_rgb_images
from ..core.layers import resolve_layer
from ..core.model import model_preprocess
from ..core.optim import PixelImage, Regularization, activation_l2, make_generators, optimize_images
from ..core.stream import layer_features
from ..errors import ConvscopeError

__all__ = ["DreamResult", "deep_dream", "octave_sizes"]

MIN_OCTAVE_SIDE = 8


@dataclass(frozen=True)
class DreamResult:
    """What :func:`deep_dream` returns.

    ``images``: the dreams as RGB in [0, 1], ``N x 3 x H x W``; ``x``: the same in the model's input space;
    ``octave_sizes``: ``(H, W)`` of each octave, smallest first (the last is the photo's size); ``history``: per
    octave, the objective ``1/2 ||A||^2`` at every step (``steps x N``, on the jittered images); ``norm_before`` /
    ``norm_after``: ``||A_layer||_2`` of the photos and of the dreams at full size, ``N``.
    """

    images: torch.Tensor
    x: torch.Tensor
    layer: str
    octave_sizes: list[tuple[int, int]]
    history: list[torch.Tensor]
    norm_before: torch.Tensor
    norm_after: torch.Tensor


def octave_sizes(size: tuple[int, int], octaves: int = 4, octave_scale: float = 1.4) -> list[tuple[int, int]]:
    """``(H, W)`` of each octave, smallest first: the photo's size divided by ``octave_scale`` again and again,
    rounded each time (as the reference's ``nd.zoom(img, 1 / octave_scale)``)."""
    sizes = [(int(size[0]), int(size[1]))]
    for _ in range(octaves - 1):
        h, w = sizes[-1]
        sizes.append((max(1, round(h / octave_scale)), max(1, round(w / octave_scale))))
    return sizes[::-1]


def _layer_norm(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    return layer_features(model, x, [layer])[layer].flatten(1).float().norm(dim=1).cpu()


def deep_dream(model: nn.Module, x: torch.Tensor, layer: str, steps: int = 10, lr: float = 1.5 / 255,
               octaves: int = 4, octave_scale: float = 1.4, jitter: int = 32, seed: int = 0,
               progress: bool | None = None) -> DreamResult:
    """DeepDream of the photos ``x`` (``N x 3 x H x W`` in the model's input space) for ``layer``.

    ``steps`` normalized gradient-ascent steps of size ``lr`` (pixel units) per octave; ``octaves`` scales, each
    ``octave_scale`` times the previous; a random shift of up to ``jitter`` pixels per step (seeded by ``seed``,
    one generator per image). ``progress``: a bar per octave (``True``, ``False``, ``None``: once it has run 2 s).
    The model is left as it came.
    """
    check_rgb_images(model, x, "deep_dream")
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ConvscopeError(f"octaves={octaves!r}: use an int >= 1")
    if not (isinstance(octave_scale, int | float) and octave_scale > 1):
        raise ConvscopeError(f"octave_scale={octave_scale!r}: use a factor > 1 between octaves (e.g. 1.4)")
    if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
        raise ConvscopeError(f"jitter={jitter!r}: use a shift in pixels, an int >= 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConvscopeError(f"steps={steps!r}: use an int >= 0")
    if not (isinstance(lr, int | float) and lr > 0):
        raise ConvscopeError(f"lr={lr!r}: the step size must be > 0 (pixel units, e.g. 1.5/255)")
    name = resolve_layer(model, layer)[0]
    sizes = octave_sizes((int(x.shape[-2]), int(x.shape[-1])), octaves, octave_scale)
    if min(sizes[0]) < MIN_OCTAVE_SIDE:
        raise ConvscopeError(f"{octaves} octaves of scale {octave_scale} shrink the {x.shape[-2]}x{x.shape[-1]} photo "
                             f"to {sizes[0][0]}x{sizes[0][1]}; use fewer octaves or a larger photo (smallest side "
                             f">= {MIN_OCTAVE_SIDE})")
    pre = model_preprocess(model)
    x = x.detach()
    bases = [x]
    for size in sizes[-2::-1]:  # each octave from the one above it, as the reference
        bases.append(F.interpolate(bases[-1], size=size, mode="bilinear", align_corners=False, antialias=True))
    bases.reverse()
    objective = activation_l2(name)
    generators = make_generators(seed, len(x))
    regularization = Regularization(jitter=jitter)  # DeepDream's only regularizer: the random shift
    detail = torch.zeros_like(bases[0])
    history = []
    dream = x
    for k, base in enumerate(bases):
        if detail.shape[-2:] != base.shape[-2:]:
            detail = F.interpolate(detail, size=tuple(base.shape[-2:]), mode="bilinear", align_corners=False)
        param = PixelImage(base + detail, pre, space="rgb")
        try:
            res = optimize_images(model, objective, param, steps=steps, lr=float(lr), optimizer="normalized",
                                  regularization=regularization, generators=generators, progress=progress,
                                  desc=f"deep dream {k + 1}/{len(bases)}")
        except RuntimeError as exc:  # e.g. an octave too small for the network
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ConvscopeError(f"{type(model).__name__} failed on the {base.shape[-2]}x{base.shape[-1]} octave "
                                 f"({first}); use fewer octaves or a smaller octave_scale") from exc
        history.append(res.history.cpu())
        dream = res.x
        detail = dream - base
    return DreamResult(images=pre.denormalize(dream).clamp(0, 1), x=dream, layer=name, octave_sizes=sizes,
                       history=history, norm_before=_layer_norm(model, x, name), norm_after=_layer_norm(model, dream,
                                                                                                      name))
