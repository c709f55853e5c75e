"""Class activation maps: one template, methods differ only in how they weight the feature maps.

* CAM (Zhou et al. 2016, Eq. 2): M_c = sum_k w^c_k A_k with w^c the classifier weights of a global-average-
  pooling net.
* Grad-CAM (Selvaraju et al. 2017, Eq. 1-2): alpha^c_k = mean_ij dy^c/dA^k_ij; M_c = ReLU(sum_k alpha^c_k A_k).
* Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 with exp(S) as the score): a^{kc}_ij = g^2 / (2 g^2 +
  sum_ab A^k_ab g^3), w^c_k = sum_ij a^{kc}_ij ReLU(g_ij); M_c = ReLU(sum_k w^c_k A_k).

All take a batch of images and ``N x K`` targets: one forward pass, K backward passes batched. The backward
stops at the chosen layer (parameters frozen by the probe). Returns ``N x K x H x W`` maps at the input's
resolution (``upsample=False``: the layer's resolution), unnormalized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import resolve_layer
from ..core.probe import probe
from ..core.targets import Target, batched_grad, target_scores, top_class
from ..errors import ConvscopeError

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (A: N C h w, G: K N C h w) -> K N C


def gradcam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: global-average-pooled gradients."""
    return grads.mean(dim=(-2, -1))


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++: pixel-wise weighted positive gradients."""
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(-2, -1), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    return (alpha * F.relu(grads)).sum(dim=(-2, -1))


def _class_activation_map(model: nn.Module, x: torch.Tensor, target: Target, layer: str, weighting: Weighting,
                          relu: bool, upsample: bool) -> torch.Tensor:
    with torch.enable_grad(), probe(model, layer) as p:  # works inside torch.no_grad() too
        out = model(x)
        scores, _ = target_scores(out, target)
        acts = p.activations[layer]
        if acts.dim() != 4:
            raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(acts.shape)}; CAMs need a convolutional "
                                 "layer with N x C x H x W output")
        (grads,) = batched_grad(scores, [acts])  # K N C h w
    weights = weighting(acts.detach(), grads)  # K N C
    maps = torch.einsum("knc,nchw->nkhw", weights, acts.detach())
    if relu:
        maps = F.relu(maps)
    if upsample:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps


def gradcam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
            upsample: bool = True) -> torch.Tensor:
    """Grad-CAM maps ``N x K x H x W`` (Selvaraju et al. 2017)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_weights, True, upsample)


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
               upsample: bool = True) -> torch.Tensor:
    """Grad-CAM++ maps ``N x K x H x W`` (Chattopadhay et al. 2018)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_pp_weights, True, upsample)


def cam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
        classifier: str | None = None, upsample: bool = True) -> torch.Tensor:
    """CAM ``N x K x H x W`` (Zhou et al. 2016) for a net whose ``layer`` is global-average-pooled into a linear
    ``classifier`` (default: the model's last ``nn.Linear``)."""
    layer = _layer(model, layer)
    fc = _classifier(model, classifier)
    with torch.no_grad(), probe(model, layer) as p:
        out = model(x)
        _, idx = target_scores(out, target)
        acts = p.activations[layer]
    if idx is None:
        raise ConvscopeError("CAM needs class indices as targets (its weights are classifier rows), not scores")
    if acts.dim() != 4 or acts.shape[1] != fc.in_features:
        raise ConvscopeError(f"CAM needs layer {layer!r} ({tuple(acts.shape[1:])}) to feed the classifier by global "
                             f"average pooling ({fc.in_features} inputs); use gradcam for other layers")
    weights = fc.weight[idx]  # N K C
    maps = torch.einsum("nkc,nchw->nkhw", weights, acts)
    if upsample:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps


def default_cam_layer(model: nn.Module) -> str:
    """The last module whose output is a 4-D feature map and that is not a pooling, dropout or identity layer
    (found with one forward pass): the last convolutional block's output, as Grad-CAM uses (Selvaraju et al. 2017,
    Sec. 3), e.g. ``head.act`` for EfficientNet, ``features.relu5`` for demo_net."""
    from ..core.model import list_layers

    rows = [r for r in list_layers(model) if r.output_shape is not None and len(r.output_shape) == 3
            and r.output_shape[1] > 1]
    if not rows:
        raise ConvscopeError("this model has no layer with a spatial feature map; pass layer= explicitly")
    skip = ("Pool", "Dropout", "Identity", "Flatten")
    kept = [r for r in rows if not any(k in r.type for k in skip)]
    return (kept or rows)[-1].name


def _layer(model: nn.Module, layer: str) -> str:
    return resolve_layer(model, layer)[0] if layer else default_cam_layer(model)


def _classifier(model: nn.Module, name: str | None) -> nn.Linear:
    if name:
        _, mod = resolve_layer(model, name)
        if not isinstance(mod, nn.Linear):
            raise ConvscopeError(f"classifier {name!r} is a {type(mod).__name__}, not nn.Linear")
        return mod
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConvscopeError("CAM needs a linear classifier after global average pooling; this model has none")
    return linears[-1]
