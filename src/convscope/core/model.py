"""Model facts every method reads in one place: the pixel transform, the float dtype, the input normalizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConvscopeError
from .images import Preprocess


def model_preprocess(model: nn.Module, preprocess: Preprocess | None = None) -> Preprocess:
    """The ``Preprocess`` mapping pixels in [0, 1] to the model's input: ``preprocess`` when given, else the
    model's ``.preprocess``, else identity. A ``.preprocess`` that is not a ``Preprocess`` cannot be inverted, so it
    is refused with the fix."""
    pre = preprocess if preprocess is not None else getattr(model, "preprocess", None)
    if pre is None:
        return Preprocess.identity()
    if not isinstance(pre, Preprocess):
        raise ConvscopeError(f"{type(model).__name__}.preprocess is a {type(pre).__name__}; pass preprocess="
                             "Preprocess(mean=..., std=...) so images can be mapped to and from pixels")
    return pre


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 for none): images match it."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def input_normalizer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.preprocess.normalize`` (pixels in [0, 1] -> model input) where the model has one, else identity."""
    pre = getattr(model, "preprocess", None)
    normalize = getattr(pre, "normalize", None)
    return normalize if callable(normalize) else (lambda x: x)
