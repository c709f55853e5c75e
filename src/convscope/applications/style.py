"""Neural style transfer (Gatys, Ecker & Bethge 2016, "Image Style Transfer Using Convolutional Neural Networks";
survey Sec. 7.3, Eq. 22).

    L_total(p, a, x) = alpha L_content(p, x) + beta L_style(a, x)

* content (Gatys Eq. 1): ``L_content = 1/2 sum_ij (F^l_ij - P^l_ij)^2`` on one layer ``l`` (a feature-matching
  objective, :func:`~convscope.methods.invert.feature_match` unnormalized);
* style (Gatys Eq. 3-5): the Gram matrix ``G^l_ij = sum_k F^l_ik F^l_jk`` of each style layer, ``E_l = 1 / (4 N_l^2
  M_l^2) sum_ij (G^l_ij - A^l_ij)^2`` and ``L_style = sum_l w_l E_l`` (``w_l = 1 / L``). Grams are divided by
  ``M_l`` (positions) on both sides, which equals Gatys' ``1 / M_l^2`` at the same size and lets the style image
  have another size.

The image starts from the content image and descends ``L_total`` on the shared optimization loop of
:mod:`convscope.core.optim` (Adam on the pixels in the model's input space, kept in the valid pixel box), one
forward pass per step stopped after the deepest layer used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.images import Preprocess
from ..core.layers import resolve_layers
from ..core.model import float_dtype, model_preprocess, zoo_name
from ..core.optim import Objective, make_generators, make_param, optimize_images
from ..errors import ConvscopeError
from ..methods.invert import feature_match, layer_features

# Gatys et al. use conv1_1 .. conv5_1 (the first layer at each resolution) for style and conv4_2 for content
DEFAULT_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "efficientnet_lite0": ("blocks.6", ("stem.act", "blocks.1.act1", "blocks.3.act1", "blocks.5.act1",
                                        "blocks.11.act1")),
    "demo_net": ("features.relu4", ("features.relu1", "features.relu2", "features.relu3", "features.relu4",
                                    "features.relu5")),
}
DEFAULT_BETA = {"efficientnet_lite0": 1e6}  # alpha / beta = 1e-6 with Gatys' normalization, tuned on chelsea


def gram(features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Gram matrices ``G_ij = sum_k F_ik F_jk`` of ``N x C x H x W`` features (``F``: ``C x M``, ``M = H W``), ``N x
    C x C`` (Gatys et al. 2016, Eq. 3); divided by ``M`` when ``normalize``."""
    if features.dim() < 3:
        raise ConvscopeError(f"gram() needs N x C x H x W features, got {tuple(features.shape)}; pick a conv layer")
    f = features.flatten(2)
    g = f @ f.transpose(1, 2)
    return g / f.shape[2] if normalize else g


def gram_match(layer: str, target: torch.Tensor) -> Objective:
    """``-E_l = -1 / (4 C^2) sum_ij (G_ij / M - A_ij)^2`` per image, ``target`` the normalized Gram ``A / M'`` of the
    style image (``1 x C x C`` for all images, or one per image): Gatys et al.'s style loss of one layer, to ascend."""
    t = target.detach()

    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g = gram(acts[layer])
        c = g.shape[1]
        return -(g - t.to(g)).pow(2).flatten(1).sum(1) / (4 * c * c)
    return Objective(fn, [layer], f"gram_match({layer!r})")


@dataclass(frozen=True)
class StyleResult:
    """``images``: RGB in [0, 1], ``N x 3 x H x W``; ``x``: the same in the model's input space; ``content_loss``,
    ``style_loss``: ``L_content`` and ``L_style`` of each final image, ``N``; ``history``: ``-L_total`` per step."""

    images: torch.Tensor
    x: torch.Tensor
    content_loss: torch.Tensor
    style_loss: torch.Tensor
    history: torch.Tensor
    content_layer: str
    style_layers: list[str]


def default_layers(model: nn.Module) -> tuple[str, list[str]]:
    """Gatys-style content and style layers for a zoo model."""
    name = zoo_name(model) or None
    if name not in DEFAULT_LAYERS:
        raise ConvscopeError(f"no default style-transfer layers for {name or type(model).__name__}; pass "
                             "content_layer= and style_layers= (one layer per resolution, from `convscope layers`)")
    content, style = DEFAULT_LAYERS[name]
    return content, list(style)


def style_transfer(
    model: nn.Module, content: torch.Tensor, style: torch.Tensor, content_layer: str | None = None,
    style_layers: str | Sequence[str] | None = None, *, alpha: float = 1.0, beta: float | None = None,
    style_weights: Sequence[float] | None = None, steps: int = 300, lr: float = 0.05,
    init: str | torch.Tensor = "content", seed: int = 0, progress: bool | None = None,
    preprocess: Preprocess | None = None,
) -> StyleResult:
    """Render each content image in the style of ``style`` (Gatys et al. 2016; survey Eq. 22).

    Args:
        content: ``N x 3 x H x W`` in the model's input space; style: ``1 x 3 x H' x W'`` (shared) or ``N x ...``,
            any size.
        content_layer, style_layers: default per zoo model (:data:`DEFAULT_LAYERS`, e.g. for efficientnet_lite0
            ``blocks.6`` and the first activation at each of the five resolutions).
        alpha, beta: weights of ``L_content`` and ``L_style`` (only ``alpha / beta`` matters much with Adam; default
            ``beta`` per model, :data:`DEFAULT_BETA`, else ``1e6``).
        style_weights: ``w_l`` per style layer (default ``1 / L``).
        init: ``"content"`` (Gatys' start for a faithful layout), ``"noise"`` or a tensor.
    """
    for what, t in (("content", content), ("style", style)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
            raise ConvscopeError(f"style_transfer: {what} must be N x 3 x H x W floats in the model's input space "
                                 "(cs.load_images(paths, model))")
    n = content.shape[0]
    if style.shape[0] not in (1, n):
        raise ConvscopeError(f"style has {style.shape[0]} images for {n} content images; give 1 or {n}")
    if content_layer is None or style_layers is None:
        dc, ds = default_layers(model)
        content_layer = dc if content_layer is None else content_layer
        style_layers = ds if style_layers is None else style_layers
    c_name = list(resolve_layers(model, content_layer))
    if len(c_name) != 1:
        raise ConvscopeError(f"content_layer: give one layer, got {c_name}")
    s_names = list(resolve_layers(model, style_layers))
    if not s_names:
        raise ConvscopeError("style_layers: give at least one layer")
    weights = [1.0 / len(s_names)] * len(s_names) if style_weights is None else [float(w) for w in style_weights]
    if len(weights) != len(s_names):
        raise ConvscopeError(f"style_weights: {len(weights)} weights for {len(s_names)} style layers")
    beta = DEFAULT_BETA.get(zoo_name(model), 1e6) if beta is None else float(beta)
    if not alpha >= 0 or not beta >= 0 or alpha + beta == 0:
        raise ConvscopeError(f"alpha={alpha}, beta={beta}: use non-negative weights, not both 0")
    pre = model_preprocess(model, preprocess)
    dtype = float_dtype(model)
    content, style = content.detach().to(dtype), style.detach().to(dtype)
    p_feats = layer_features(model, content, c_name)
    a_feats = layer_features(model, style, s_names)
    content_obj = 0.5 * feature_match(c_name[0], p_feats[c_name[0]], normalize=False)
    terms = [w * gram_match(k, gram(a_feats[k])) for w, k in zip(weights, s_names)]
    style_obj = sum(terms[1:], terms[0])  # s_names is not empty
    objective = alpha * content_obj + beta * style_obj
    gens = make_generators(seed, n)
    start = content if isinstance(init, str) and init == "content" else init
    param = make_param("pixel", start, n, (content.shape[-2], content.shape[-1]), pre, gens,
                       torch.zeros((), dtype=dtype, device=content.device))
    res = optimize_images(model, objective, param, steps=steps, lr=lr, generators=gens, progress=progress,
                          desc="style")
    with torch.no_grad():
        acts = res.activations
        lc = -content_obj(acts)
        ls = -style_obj(acts)
    return StyleResult(images=res.images, x=res.x, content_loss=lc.cpu(), style_loss=ls.cpu(),
                       history=res.history, content_layer=c_name[0], style_layers=s_names)
