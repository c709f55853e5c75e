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

Transformers: the probe reads a ViT block's ``N x T x D`` tokens and a Swin stage's ``N x H x W x C`` output as
``N x C x H x W`` maps (``layout=``, default ``"auto"``; :mod:`convscope.core.tokens`), so every CAM works on them
with the class token dropped. ``layer="auto"`` (:func:`resolve_cam_layer`) is the last spatial map before global
pooling whose patch positions reach the classifier: on a ViT not the last block's output (the head reads only the
class token, and after the last attention the patch tokens never reach it, so their gradients are exactly zero)
but the last block's ``ln_1`` (the input of its attention; pytorch-grad-cam's choice too).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input, pinned_target
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.checks import input_channels
from ..core.layers import CALL_SEPARATOR, named_layers, resolve_layer, split_call
from ..core.model import default_input_size, float_dtype, model_device
from ..core.probe import Layout, preserved_state, probe
from ..core.progress import progress_bar
from ..core.targets import OutputTarget, Target, batched_grad, scores_of, target_scores, top_class
from ..errors import ConvscopeError, TargetError

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(A: N C h w, G: K N C h w) -> K N C`` per-channel weights, or ``K N C h w`` per-pixel weights."""

SCORECAM_SCORES = ("logit", "probability")
AUTO = "auto"
"""``layer=`` value (also ``""``) that picks the layer with :func:`default_cam_layer`."""
_AUTO_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[object, str]] = weakref.WeakKeyDictionary()
"""default_cam_layer's choice per model, kept while the model's module structure and the sample size are the same."""


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
                          relu: bool, upsample: bool, layout: Layout) -> torch.Tensor:
    with torch.enable_grad(), probe(model, layer, layout=layout) as p:  # works inside torch.no_grad() too
        out = model(x)
        scores, _ = target_scores(out, target)
        acts = _map_of(p.activations.get(layer), layer, p.layout_errors.get(layer))
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


def gradcam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = AUTO,
            upsample: bool = True, layout: Layout = "auto") -> torch.Tensor:
    """Grad-CAM maps ``N x K x H x W`` (Selvaraju et al. 2017)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_weights, True, upsample,
                                 layout)


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = AUTO,
               upsample: bool = True, layout: Layout = "auto") -> torch.Tensor:
    """Grad-CAM++ maps ``N x K x H x W`` (Chattopadhay et al. 2018)."""
    return _class_activation_map(model, x, target, _layer(model, layer), gradcam_pp_weights, True, upsample,
                                 layout)


def layercam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = AUTO,
             upsample: bool = True, layout: Layout = "auto") -> torch.Tensor:
    """Layer-CAM maps ``N x K x H x W`` (Jiang et al. 2021, Eq. 4-6): ``ReLU(sum_k ReLU(g_k) * A_k)``, the
    activations weighted position by position by their positive gradients; works on early layers too."""
    return _class_activation_map(model, x, target, _layer(model, layer), layercam_weights, True, upsample,
                                 layout)


def scorecam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = AUTO,
             batch_size: BatchSize = "auto", upsample: bool = True, score: str = "logit", progress: bool | None = None,
             layout: Layout = "auto") -> torch.Tensor:
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
    check_batch_size(batch_size, "scorecam")
    if x.dim() != 4:
        raise ConvscopeError(f"scorecam needs images N x C x H x W, got {tuple(x.shape)}")
    layer = _layer(model, layer)
    x = x.detach()
    num, size = x.shape[0], x.shape[-2:]
    with torch.no_grad(), probe(model, layer, detach=True, reduce=lambda _name, a: a.clone(), layout=layout) as p:
        out = scores_of(model(x), target)  # a copy of the activations is kept: a later in-place op cannot change it
        acts = _map_of(p.activations.get(layer), layer, p.layout_errors.get(layer))
    fixed = pinned_target(model, x, target, output=out)
    k = target_scores(out, fixed)[0].shape[1]
    channels = acts.shape[1]
    total = num * channels
    batch_size = resolve_batch_size(batch_size, model, x, "scorecam", limit=total)
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
            o = scores_of(model(x[img] * mask), target)
            rows_target: Target = fixed[img] if isinstance(fixed, (torch.Tensor, OutputTarget)) else fixed
            if score == "probability" and rows_target is not fixed:
                o = o.reshape(len(rows), -1).softmax(dim=1)
            sc, _ = target_scores(o, rows_target)
            if sc.shape[1] != k:
                raise TargetError(f"the target callable returned {sc.shape[1]} scores per image on masked copies "
                                  f"but {k} on the clean images; it must return the same number")
            s[start:start + len(rows)] = sc
            bar.update(len(rows))
    alpha = s.reshape(num, channels, k).softmax(dim=1).permute(2, 0, 1)  # K N C
    return weighted_maps(alpha.to(acts.dtype), acts, True, size if upsample else None)


def cam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = AUTO,
        classifier: str | None = None, upsample: bool = True, layout: Layout = "auto") -> torch.Tensor:
    """CAM ``N x K x H x W`` (Zhou et al. 2016) for a net whose ``layer`` is global-average-pooled into a linear
    ``classifier`` (default: the model's last ``nn.Linear``). On a token layer with extra tokens (a ViT block) the
    premise is checked: the logits must equal ``classifier(mean of the patch map)``, which fails where the head
    reads a class token."""
    layer = _layer(model, layer)
    fc = _classifier(model, classifier)
    with torch.no_grad(), probe(model, layer, layout=layout) as p:
        out = model(x)
        _, idx = target_scores(out, target)
        acts = _map_of(p.activations.get(layer), layer, p.layout_errors.get(layer))
        info = p.token_info.get(layer)
    if idx is None:
        raise ConvscopeError("CAM needs class indices as targets (its weights are classifier rows), not scores")
    if acts.dim() != 4 or acts.shape[1] != fc.in_features:
        raise ConvscopeError(f"CAM needs layer {layer!r} ({tuple(acts.shape[1:])}) to feed the classifier by global "
                             f"average pooling ({fc.in_features} inputs); use gradcam for other layers")
    if info is not None and info.extra_tokens and not torch.allclose(
            fc(acts.mean((2, 3))), out.reshape(len(out), -1), rtol=1e-4, atol=1e-4):
        raise ConvscopeError(f"CAM needs the classifier to read the global average of layer {layer!r}'s map, but this "
                             f"model's head reads its {info.extra_tokens} extra (class) token(s); use gradcam")
    weights = fc.weight[idx]  # N K C
    maps = torch.einsum("nkc,nchw->nkhw", weights, acts)
    if upsample:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps


def default_cam_layer(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> str:
    """The last spatial feature map the model computes before global pooling, in the order its modules RUN (one
    forward pass on a random image of ``input_size``, default the model's own size): the last convolutional block's
    output, as Grad-CAM uses (Selvaraju et al. 2017, Sec. 3), e.g. ``layer4.1`` on ResNet-18 (not its ``bn2``,
    registered last but followed by the residual add and ReLU), ``head.act`` on EfficientNet, ``features.relu5`` on
    demo_net, ``permute`` on Swin.

    A spatial map is an ``N x C x H x W`` output with ``H x W > 1`` (token and channels-last outputs count, read as
    maps by the probe's ``layout="auto"``). Modules returning the same tensor (a ReLU, its residual block, its stage)
    are one candidate, named by the innermost of them that runs once per pass and needs no layout reading (a shared
    module's call, ``relu:1``, when none does); a candidate whose innermost module is a pooling or flatten layer is
    skipped. When the last one is a token layer, a second pass with gradients keeps only layers whose patch
    positions reach the classifier's input (the last ``nn.Linear``, random weights on its inputs, so an all-zero
    head does not hide them): on a ViT the layers after the last attention carry the class token alone to the head,
    and the choice is the last block's ``ln_1``. The choice is cached per model while its module structure (names
    and types) and the input size stay the same."""
    size = default_input_size(model, input_size) if input_size is not None else _sample_size(model)
    key = (size, tuple((n, type(m).__name__) for n, m in model.named_modules()))
    cached = _AUTO_LAYERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, input_channels(model), *size, generator=gen).to(model_device(model), float_dtype(model))
    names, tokens = _spatial_maps_in_order(model, x)
    if not names:
        raise ConvscopeError("this model has no layer with a spatial feature map; pass layer= explicitly")
    chosen = _last_reaching(model, names, x, gen) if names[-1] in tokens else names[-1]
    _AUTO_LAYERS[model] = (key, chosen)
    return chosen


_NOT_A_MAP = ("Pool", "Flatten")
"""Module types whose output is no candidate of :func:`default_cam_layer` (pooled, flattened)."""


def _spatial_maps_in_order(model: nn.Module, x: torch.Tensor) -> tuple[list[str], set[str]]:
    """The candidate layers of :func:`default_cam_layer` in execution order, and those read from tokens.

    One probed forward pass records, for every module call in the order the outputs arrive (a child before its
    parent), the identity of the output map (storage, offset, shape, strides, in-place version). Consecutive calls
    with the same identity return the same tensor and form one group. Only the previous output is kept alive, so a
    freed buffer cannot be reused by the next output and be taken for the same tensor."""
    layers = named_layers(model)
    arrivals: list[tuple[str, tuple[object, ...], bool]] = []  # (module, identity of its map, spatial)
    held: list[torch.Tensor] = []

    def note(name: str, out: torch.Tensor) -> None:
        ident = (out.untyped_storage().data_ptr(), out.storage_offset(), tuple(out.shape), out.stride(),
                 out._version, out.dtype)
        arrivals.append((name, ident, out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1))
        held[:] = [out]

    try:
        with torch.no_grad(), probe(model, list(layers), detach=True, keep_all_calls=True, reduce=note) as p:
            model(x)
            info = dict(p.token_info)
    except RuntimeError as exc:  # shape errors, out of memory: one line naming the input (the probe restored the model)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConvscopeError(f"{type(model).__name__} failed on a random image of {x.shape[-2]}x{x.shape[-1]} "
                             f"({first}) while looking for its CAM layer; pass layer= explicitly") from exc
    held.clear()
    runs = {n: sum(1 for a in arrivals if a[0] == n) for n in layers}
    groups: list[tuple[bool, list[tuple[str, bool]]]] = []  # (spatial, [(layer, runs once and native)]) innermost first
    last: tuple[object, ...] | None = None
    seen: dict[str, int] = {}
    for name, ident, spatial in arrivals:
        k = seen.get(name, 0)
        seen[name] = k + 1
        member = (name if runs[name] == 1 else f"{name}{CALL_SEPARATOR}{k}",
                  runs[name] == 1 and (name not in info or info[name].layout == "nchw"))
        if ident == last and groups:
            groups[-1][1].append(member)
        else:
            groups.append((spatial, [member]))
        last = ident
    names: list[str] = []
    for spatial, group in groups:
        first = type(layers[split_call(group[0][0])[0]]).__name__
        if spatial and not any(kind in first for kind in _NOT_A_MAP):
            names.append(next((n for n, best in group if best), next(
                (n for n, _ in group if split_call(n)[1] is None), group[0][0])))
    tokens = {n for n in names if n in info and info[n].layout == "tokens"}
    return names, tokens


def _sample_size(model: nn.Module) -> tuple[int, int]:
    """The input size of the layer search: the model's declared ``image_size`` (a ViT's), else its preprocess size
    or 224 x 224."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    return default_input_size(model)


def _last_reaching(model: nn.Module, names: list[str], x: torch.Tensor, gen: torch.Generator) -> str:
    """The last of ``names`` that is not a token layer or whose patch map reaches the classifier's input (a random
    projection of that input has a non-zero gradient there)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0])) if linears else None
    try:
        with torch.enable_grad(), probe(model, names) as p:
            out = model(x)
            feats = seen[-1] if seen else out
            r = torch.randn(feats.shape, generator=gen).to(feats)
            acts = p.activations
            tokens = [n for n in names if n in p.token_info and p.token_info[n].layout == "tokens"]
            grads = dict(zip(tokens, torch.autograd.grad((feats * r).sum(), [acts[n] for n in tokens],
                                                         allow_unused=True)))
    finally:
        if handle is not None:
            handle.remove()
    for name in reversed(names):
        g = grads.get(name)
        if name not in grads or (g is not None and bool(g.abs().amax() > 0)):
            return name
    return names[-1]


def resolve_cam_layer(model: nn.Module, layer: str = AUTO) -> str:
    """The layer a CAM uses: ``layer``'s canonical name, or for ``"auto"`` / ``""`` :func:`default_cam_layer`'s
    choice (so reports can print it)."""
    if layer in (AUTO, "") or layer is None:
        return default_cam_layer(model)
    return resolve_layer(model, layer)[0]


def _layer(model: nn.Module, layer: str) -> str:
    return resolve_cam_layer(model, layer)


def _map_of(acts: object, layer: str, why: str | None) -> torch.Tensor:
    """The layer's recorded map, or a one-line error naming the fix."""
    if isinstance(acts, torch.Tensor) and acts.dim() == 4:
        return acts
    if acts is None:
        raise ConvscopeError(f"layer {layer!r} did not run in the forward pass; pick a layer from `convscope layers "
                             "MODEL` that the model's forward() calls")
    shape = tuple(getattr(acts, "shape", ())) or type(acts).__name__
    reason = f" ({why.split(';')[0]})" if why else ""
    raise ConvscopeError(f"layer {layer!r} outputs {shape}{reason}; CAMs need a convolutional layer's N x C x H x W "
                         "map (or tokens / channels-last ones, read with layout='tokens:E' / 'nhwc'): pass layout= or "
                         "choose another layer")


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
