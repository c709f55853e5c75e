"""First-layer filters as images (Krizhevsky et al. 2012, Fig. 3; Zeiler & Fergus 2014, Fig. 5 and 6).

The first convolution acts directly on pixels, so its weights are pictures of what each unit looks for. Dead
units (never active over a dataset) are found by :func:`convscope.dead_units`, in the streaming pass of
:func:`convscope.top_k_activations`.
"""

from __future__ import annotations

from PIL import Image
from torch import nn

from ..core.layers import resolve_layer
from ..core.render import filter_grid
from ..errors import ConvscopeError


def first_conv(model: nn.Module) -> str:
    """The name of the first ``nn.Conv2d`` (in ``named_modules()`` order, the definition order)."""
    for name, mod in model.named_modules():
        if name and isinstance(mod, nn.Conv2d):
            return name
    raise ConvscopeError("the model has no nn.Conv2d layer; pass layer= naming a module with a 4-D weight")


def first_layer_filters(model: nn.Module, layer: str | None = None, scale: int = 8,
                        per_filter: bool = True) -> Image.Image:
    """The filters of ``layer`` (default: the first convolution) as a grid of images, 0 as mid-grey.

    Each filter is scaled symmetrically by its own largest absolute weight (``per_filter``) or by the layer's;
    RGB filters show as colour tiles, others as grey sub-grids of their input channels (see ``filter_grid``).
    """
    name, mod = resolve_layer(model, layer if layer is not None else first_conv(model))
    weight = getattr(mod, "weight", None)
    if weight is None or weight.dim() != 4:
        raise ConvscopeError(f"layer {name!r} ({type(mod).__name__}) has no 4-D convolution weight; "
                             "pick a convolution layer")
    return filter_grid(weight, scale=scale, per_filter=per_filter)


__all__ = ["first_conv", "first_layer_filters"]
