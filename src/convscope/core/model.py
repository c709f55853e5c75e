"""Model facts every method reads in one place.

The pixel transform (``model.preprocess``), class names (``model.classes``), float dtype, device, the input size
to probe it with, the layer table of one forward pass, and a hash of its weights. Zoo models carry
``.preprocess`` / ``.classes``; a bare ``nn.Module`` gets identity / ``None``. No other module reads these
attributes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError
from .checks import input_channels
from .layers import CALL_SEPARATOR, check_input_size, named_layers
from .preprocess import Preprocess
from .probe import probe


def set_model_facts(model: nn.Module, *, preprocess: Preprocess | None = None,
                    classes: tuple[str, ...] | None = None, zoo_name: str | None = None,
                    pretrained: bool | None = None, **other: object) -> nn.Module:
    """Attach the facts this module reads (``.preprocess``, ``.classes``, ``.zoo_name``, ``.pretrained``, and any
    ``other`` attribute) to ``model``; a ``None`` fact is left as it is. The one writer: ``nn.Module`` types its
    attribute assignment as tensors and modules only, so a plain ``model.classes = ...`` does not type-check."""
    facts: dict[str, object] = {"preprocess": preprocess, "classes": classes, "zoo_name": zoo_name,
                                "pretrained": pretrained, **other}
    for key, value in facts.items():
        if value is not None:
            setattr(model, key, value)
    return model


def model_preprocess(model: nn.Module, preprocess: Preprocess | None = None) -> Preprocess:
    """The ``Preprocess`` mapping pixels in [0, 1] to the model's input: ``preprocess`` when given, else the
    model's ``.preprocess``, else identity. A ``.preprocess`` that is not a ``Preprocess`` cannot be inverted, so it
    is refused with the fix."""
    pre = preprocess if preprocess is not None else declared_preprocess(model)
    if pre is None:
        return Preprocess.identity()
    if not isinstance(pre, Preprocess):
        raise ConvscopeError(f"{type(model).__name__}.preprocess is a {type(pre).__name__}; pass preprocess="
                             "Preprocess(mean=..., std=...) so images can be mapped to and from pixels")
    return pre


def declared_preprocess(model: object) -> Any:
    """What the model declares as its ``.preprocess`` (``None`` when nothing): the one read of that attribute."""
    return getattr(model, "preprocess", None)


def lenient_preprocess(model: nn.Module) -> Preprocess:
    """The model's ``Preprocess`` when it declares one, else identity (RGB in [0, 1] at the data's own size)."""
    pre = declared_preprocess(model)
    return pre if isinstance(pre, Preprocess) else Preprocess.identity()


def zoo_name(model: nn.Module) -> str:
    """The zoo name the model was loaded by (``.zoo_name``), or ``""`` for a user's own module."""
    return str(getattr(model, "zoo_name", "") or "")


def model_name(model: nn.Module) -> str:
    """A name to show for the model: its zoo name, else its class name."""
    return zoo_name(model) or type(model).__name__


def model_classes(model: nn.Module) -> tuple[str, ...] | None:
    """The model's class names (``.classes``) where known, else ``None``."""
    classes = getattr(model, "classes", None)
    return tuple(classes) if classes is not None else None


def model_hash(model: nn.Module) -> str:
    """SHA-1 of the model's state dict (names and bytes): tells whether saved state belongs to these weights."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 for none): images match it."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def input_normalizer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.preprocess.normalize`` (pixels in [0, 1] -> model input) where the model has one, else identity."""
    normalize = getattr(declared_preprocess(model), "normalize", None)
    return normalize if callable(normalize) else (lambda x: x)


def input_denormalizer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.preprocess.denormalize`` (model input -> pixels in [0, 1], not clamped) where the model has one, else
    identity."""
    denormalize = getattr(declared_preprocess(model), "denormalize", None)
    return denormalize if callable(denormalize) else (lambda x: x)


def default_input_size(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The input size to probe a model with: explicit (validated), else its preprocess's, else 224x224."""
    if input_size is not None:
        return check_input_size(input_size)
    size = getattr(declared_preprocess(model), "input_size", None)
    if size:
        return tuple(size)
    return (224, 224)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameterless model)."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`: name, module type, output shape (without batch), unit count."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    units: int | None
    calls: int
    params: int


def list_layers(model: nn.Module, sample: torch.Tensor | None = None,
                input_size: int | tuple[int, int] | None = None) -> list[LayerInfo]:
    """Name, type, output shape and unit count (channels) of every layer, from one forward pass. A module that
    runs several times (a shared module) has a row with its call count, then one row per call, ``name:k``.

    ``sample`` is an input batch; without it a zero image of ``input_size`` (or the model's preprocess size,
    or 224x224) is used. Layers that never ran (``calls == 0``) have no shape. A size the model cannot take
    (or a forward pass that fails) is a :class:`~convscope.errors.ConvscopeError` naming the size; the model is
    left as it came.
    """
    if sample is None:
        size = default_input_size(model, input_size)
        sample = torch.zeros(1, input_channels(model), *size, device=model_device(model))
        what = f"a zero image of {size[0]}x{size[1]}"
        fix = "pass another input size (input_size=(H, W), --size H W)"
    else:
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.dim() < 2:
            raise ConvscopeError(f"list_layers(sample=...) needs a floating-point batch N x C x H x W, got "
                                 f"{type(sample).__name__} {tuple(getattr(sample, 'shape', ()))}")
        what = f"the sample of shape {tuple(sample.shape)}"
        fix = "pass a sample the model accepts"
    layers = named_layers(model)
    try:
        with probe(model, list(layers), keep_all_calls=True) as p, torch.no_grad():
            model(sample)
    except RuntimeError as exc:  # shape errors, out of memory: one line naming the input (probe restored the model)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConvscopeError(f"{type(model).__name__} failed on {what} ({first}); {fix}") from exc
    rows = []
    for name, mod in layers.items():
        outs = p.outputs(name)
        params = sum(q.numel() for q in mod.parameters(recurse=False))

        def row(row_name: str, out: object, calls: int, kind: str = type(mod).__name__, params: int = params
                ) -> LayerInfo:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
            return LayerInfo(row_name, kind, shape, shape[0] if shape else None, calls, params)

        rows.append(row(name, outs[-1] if outs else None, len(outs)))
        if len(outs) > 1:  # a shared module: one row per call, each addressable as "name:k"
            rows.extend(row(f"{name}{CALL_SEPARATOR}{k}", out, 1) for k, out in enumerate(outs))
    return rows
