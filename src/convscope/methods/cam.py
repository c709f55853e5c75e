"""Class activation maps: one template, methods differ only in how they weight the feature maps.

* CAM (Zhou et al. 2016, Eq. 2): M_c = sum_k w^c_k A_k with w^c the classifier weights of a global-average-
  pooling net.
* Grad-CAM (Selvaraju et al. 2017, Eq. 1-2): alpha^c_k = mean_ij dy^c/dA^k_ij; M_c = ReLU(sum_k alpha^c_k A_k).
* Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 with exp(S) as the score): a^{kc}_ij = g^2 / (2 g^2 +
  sum_ab A^k_ab g^3), w^c_k = sum_ij a^{kc}_ij ReLU(g_ij); M_c = ReLU(sum_k w^c_k A_k).
* Layer-CAM (Jiang et al. 2021, Eq. 4-6): pixel-wise weights w^c_kij = ReLU(g^c_kij);
  M_c = ReLU(sum_k w^c_k * A_k) (element-wise product).
* Score-CAM (Wang et al. 2020, Sec. 3-4, Algorithm 1): gradient-free; each upsampled, min-max normalized map
  masks the input, and the target score of the masked image weights the map (see :func:`scorecam`).

The gradient CAMs share one template: a weighting turns activations ``A`` and gradients ``G`` into per-channel
(``K x N x C``) or per-pixel (``K x N x C x h x w``) weights. All take a batch of images and ``N x K`` targets:
one forward pass, K backward passes batched (Score-CAM: the masked forwards batched, all K targets read from
them). The backward stops at the chosen layer (parameters frozen by the probe). Returns ``N x K x H x W`` maps at
the input's resolution (``upsample=False``: the layer's resolution), unnormalized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input, pinned_target
from ..core.layers import resolve_layer
from ..core.probe import preserved_state, probe
from ..core.progress import progress_bar
from ..core.targets import Target, batched_grad, target_scores, top_class
from ..errors import ConvscopeError, TargetError

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(A: N C h w, G: K N C h w) -> K N C`` per-channel weights, or ``K N C h w`` per-pixel weights."""

SCORECAM_SCORES = ("logit", "probability")


def gradcam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: global-average-pooled gradients."""
    return grads.mean(dim=(-2, -1))


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++: pixel-wise weighted positive gradients."""
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(-2, -1), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    return (alpha * F.relu(grads)).sum(dim=(-2, -1))


def layercam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Layer-CAM (Jiang et al. 2021, Eq. 4): the positive gradient at every position, ``K N C h w``."""
    return F.relu(grads)


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
    return weighted_maps(weighting(acts.detach(), grads), acts.detach(), relu, x.shape[-2:] if upsample else None)


def weighted_maps(weights: torch.Tensor, acts: torch.Tensor, relu: bool = True,
                  size: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """``sum_k w_k A_k`` for every target: ``N x K x h x w`` (bilinearly upsampled to ``size`` when given).

    ``weights`` are per channel (``K x N x C``) or per pixel (``K x N x C x h x w``, multiplied element-wise);
    ``acts`` is ``N x C x h x w``. ``relu``: keep only the positive part (before upsampling).
    """
    if weights.dim() == 3:
        maps = torch.einsum("knc,nchw->nkhw", weights, acts)
    else:
        maps = torch.einsum("knchw,nchw->nkhw", weights, acts)
    if relu:
        maps = F.relu(maps)
    if size is not None:
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


def gradcam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
            upsample: bool = True) -> torch.Tensor:
    """Grad-CAM maps ``N x K x H x W`` (Selvaraju et al. 2017)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_weights, True, upsample)


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
               upsample: bool = True) -> torch.Tensor:
    """Grad-CAM++ maps ``N x K x H x W`` (Chattopadhay et al. 2018)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_pp_weights, True, upsample)


def layercam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "",
             upsample: bool = True) -> torch.Tensor:
    """Layer-CAM maps ``N x K x H x W`` (Jiang et al. 2021, Eq. 4-6): ``ReLU(sum_k ReLU(g_k) * A_k)``, the
    activations weighted position by position by their positive gradients; works on early layers too."""
    return _class_activation_map(model, x, target, _layer(model, layer), layercam_weights, True, upsample)


def scorecam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "", batch_size: int = 64,
             upsample: bool = True, score: str = "logit", progress: bool | None = None) -> torch.Tensor:
    """Score-CAM maps ``N x K x H x W`` (Wang et al. 2020): gradient-free, one masked forward pass per channel.

    For every channel ``k`` of ``layer``: ``H_k = s(Up(A_k))``, the map upsampled bilinearly to the input size
    and min-max normalized to [0, 1] (Eq. 5-6; a constant map gives ``H_k = 0``); the masked image ``x * H_k``
    (in the model's input space) is classified, and the weights are ``alpha_k = softmax_k(S_k)`` over the
    channels, with ``S_k = f^c(x * H_k) - f^c(x_b)`` the channel-wise increase of confidence (Eq. 5) as in their
    Algorithm 1. The baseline term is the same for every channel, so the softmax cancels it and ``x_b`` needs no
    forward pass. The map is ``ReLU(sum_k alpha_k A_k)`` (Eq. 7) at the layer's resolution, then upsampled to
    the input's (``upsample=False``: left at the layer's; the masks are always at the input's resolution).

    ``score="logit"`` (default): ``f^c`` is the class logit, as pytorch-grad-cam and torch-cam compute Score-CAM.
    ``score="probability"``: the softmax probability of the class (the paper's Sec. 3 wording; the authors' code
    uses it without the softmax over channels). A target callable returning scores gives ``f^c`` directly.

    Targets are fixed on the clean images (``top_class`` is the image's own class on every masked copy). The
    ``N x C`` masked images run ``batch_size`` at a time (memory is bounded by ``batch_size`` images and masks)
    and all K targets are read from the same outputs. ``progress``: a bar over the masked images.
    """
    check_input(x, "scorecam")
    if score not in SCORECAM_SCORES:
        raise ConvscopeError(f"scorecam(score={score!r}): use one of {', '.join(SCORECAM_SCORES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"scorecam(batch_size={batch_size!r}): use a positive int")
    if x.dim() != 4:
        raise ConvscopeError(f"scorecam needs images N x C x H x W, got {tuple(x.shape)}")
    layer = _layer(model, layer)
    x = x.detach()
    num, size = x.shape[0], x.shape[-2:]
    with torch.no_grad(), probe(model, layer, detach=True, reduce=lambda _name, a: a.clone()) as p:
        out = model(x)  # a copy of the activations is kept: a later in-place op cannot change it
        acts = p.activations[layer]
    if not isinstance(acts, torch.Tensor) or acts.dim() != 4:
        raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(getattr(acts, 'shape', ()))}; CAMs need a "
                             "convolutional layer with N x C x H x W output")
    fixed = pinned_target(model, x, target, output=out)
    k = target_scores(out, fixed)[0].shape[1]
    channels = acts.shape[1]
    total = num * channels
    s = torch.empty(total, k, dtype=out.dtype, device=out.device)
    with torch.no_grad(), preserved_state(model), \
            progress_bar(total=total, desc="scorecam", unit="mask", progress=progress, leave=False) as bar:
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total), device=x.device)
            img, ch = rows // channels, rows % channels  # image-major: row i * C + k
            up = F.interpolate(acts[img, ch][:, None].to(x.dtype), size=size, mode="bilinear",
                               align_corners=False)
            lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
            mask = torch.where(hi > lo, (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)),
                               torch.zeros_like(up))
            o = model(x[img] * mask)
            if score == "probability" and isinstance(fixed, torch.Tensor):
                o = o.reshape(len(rows), -1).softmax(dim=1)
            sc, _ = target_scores(o, fixed[img] if isinstance(fixed, torch.Tensor) else fixed)
            if sc.shape[1] != k:
                raise TargetError(f"the target callable returned {sc.shape[1]} scores per image on masked copies "
                                  f"but {k} on the clean images; it must return the same number")
            s[start:start + len(rows)] = sc
            bar.update(len(rows))
    alpha = s.reshape(num, channels, k).softmax(dim=1).permute(2, 0, 1)  # K N C
    return weighted_maps(alpha.to(acts.dtype), acts, True, size if upsample else None)


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
