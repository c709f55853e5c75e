"""Feature perturbation: what of a layer's code matters for the reconstruction? (Dosovitskiy & Brox 2016, Sec. 5;
survey Sec. 5.3.2, Fig. 13).

Each perturbation keeps the L2 norm of every image's code, so only the *pattern* changes:

* ``binarize``: keep the sign of every unit, give all nonzero units one magnitude ``||a|| / sqrt(#nonzero)``;
* ``dropout``: zero a random 50% of the units (seeded), scale the kept ones back to the original norm;
* ``drop_least``: zero the 50% least important feature maps (lowest mean activation per image; for a fully
  connected layer each unit is a map), scale the kept ones back to the original norm.

:func:`perturbation_study` reconstructs from the perturbed codes with either inverter (regularized inversion with
the perturbed features as targets, or an UpconvNet decoder applied to them) and compares with the reconstruction
from the unperturbed code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.layers import resolve_layer
from ..core.model import lenient_preprocess
from ..core.optim import centre_rgb
from ..core.stream import layer_features
from ..errors import ConvscopeError
from .invert import invert

if TYPE_CHECKING:
    from .upconv import UpconvNet

PERTURBATIONS = ("binarize", "dropout", "drop_least")


def _norms(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).norm(dim=1).view(-1, *[1] * (a.dim() - 1))


def _renorm(new: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``new`` scaled per image to the L2 norm of ``a`` (all-zero images stay zero)."""
    n_new = _norms(new)
    return torch.where(n_new > 0, new * (_norms(a) / n_new.clamp_min(1e-30)), torch.zeros_like(new))


def binarize(a: torch.Tensor) -> torch.Tensor:
    """``sign(a) * ||a|| / sqrt(#nonzero)`` per image: the signs (which units are on), one magnitude, same norm."""
    return _renorm(torch.sign(a), a)


def dropout(a: torch.Tensor, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Zero a random fraction ``p`` of the units (a seeded mask, drawn per image), scale the rest to the norm."""
    if not 0 <= p < 1:
        raise ConvscopeError(f"dropout(p={p}): the dropped fraction must be in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(a.shape, generator=g) >= p
    return _renorm(a * keep.to(a.device), a)


def drop_least(a: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Zero the ``fraction`` of feature maps with the lowest mean activation (per image), scale the rest to the
    norm. ``a`` is ``N x C x H x W`` (maps) or ``N x C`` (units)."""
    if not 0 <= fraction < 1:
        raise ConvscopeError(f"drop_least(fraction={fraction}): use a fraction in [0, 1)")
    importance = a.flatten(2).mean(2) if a.dim() > 2 else a
    c = importance.shape[1]
    k = int(round(fraction * c))
    order = importance.argsort(dim=1)  # ascending: least important first
    keep = torch.ones_like(importance, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return _renorm(a * keep.view(*keep.shape, *[1] * (a.dim() - 2)), a)


def perturb(a: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Apply one of ``PERTURBATIONS`` by name."""
    if kind == "binarize":
        return binarize(a)
    if kind == "dropout":
        return dropout(a, 0.5, seed)
    if kind == "drop_least":
        return drop_least(a, 0.5)
    raise ConvscopeError(f"unknown perturbation {kind!r}; use one of {', '.join(PERTURBATIONS)}")


@dataclass(frozen=True)
class PerturbationStudy:
    """Reconstructions from perturbed codes of one layer.

    ``kinds``: ``["none", *perturbations]``; ``images``: ``K x N x 3 x H x W`` RGB in [0, 1] (``images[0]`` from the
    unperturbed code); ``feature_error``: ``K x N``, ``||Phi(x_k) - Phi(x0)||^2 / ||Phi(x0)||^2`` of each
    reconstruction against the *unperturbed* features; ``image_error``: ``K x N``, the relative squared difference
    ``||x_k - x_none||^2 / ||x_none - c||^2`` (input space, ``c`` the mean image) to the unperturbed reconstruction.
    """

    layer: str
    method: str
    kinds: list[str]
    images: torch.Tensor
    feature_error: torch.Tensor
    image_error: torch.Tensor


def perturbation_study(model: nn.Module, x: torch.Tensor, layer: str,
                       perturbations: Sequence[str] = PERTURBATIONS, *, decoder: UpconvNet | None = None,
                       seed: int = 0, **invert_kwargs) -> PerturbationStudy:
    """Reconstruct ``x`` from the unperturbed and the perturbed codes of ``layer`` (survey Fig. 13).

    With ``decoder`` (an :class:`~convscope.methods.upconv.UpconvNet` trained on ``layer``) the decoder is applied
    to each code; without, regularized inversion (:func:`~convscope.methods.invert.invert`, ``invert_kwargs``
    passed on) matches each code. All reconstructions of a method run as one batch.
    """
    name = resolve_layer(model, layer)[0]
    kinds = ["none", *perturbations]
    for k in perturbations:
        if k not in PERTURBATIONS:
            raise ConvscopeError(f"unknown perturbation {k!r}; use one of {', '.join(PERTURBATIONS)}")
    phi0 = layer_features(model, x, [name])[name]
    codes = torch.cat([phi0] + [perturb(phi0, k, seed) for k in perturbations])
    n = x.shape[0]
    if decoder is not None:
        from .upconv import decode

        xs = decode(decoder, codes)
        images = decoder.preprocess.denormalize(xs).clamp(0, 1)
        method = "upconv"
    else:
        reps = len(kinds)  # one batch: K copies of the images, block k inverting code k, the same noise per image
        rec = invert(model, x.repeat(reps, 1, 1, 1), [name], target_features={name: codes},
                     seed=[seed + i for _ in kinds for i in range(n)], **invert_kwargs)
        xs, images = rec.x, rec.images
        method = "regularized"
    feats = layer_features(model, xs, [name])[name]
    target = phi0.repeat(len(kinds), *[1] * (phi0.dim() - 1))
    ferr = (feats - target).pow(2).flatten(1).sum(1) / target.pow(2).flatten(1).sum(1).clamp_min(1e-12)
    base = xs[:n].repeat(len(kinds), 1, 1, 1)
    pre = lenient_preprocess(model)
    centre = pre.normalize(torch.tensor(centre_rgb(pre), dtype=xs.dtype, device=xs.device).view(1, 3, 1, 1))
    ierr = (xs - base).pow(2).flatten(1).sum(1) / (base - centre).pow(2).flatten(1).sum(1).clamp_min(1e-12)
    rows = len(kinds)
    images = images.view(rows, n, *images.shape[1:])
    return PerturbationStudy(layer=name, method=method, kinds=kinds, images=images,
                             feature_error=ferr.view(rows, n).cpu(), image_error=ierr.view(rows, n).cpu())
