"""Address layers by their ``named_modules()`` names (the names torchvision's feature extraction uses)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConvscopeError, LayerNotFoundError, closest


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by its dotted name, the root excluded."""
    return {name: mod for name, mod in model.named_modules() if name}


def resolve_layer(model: nn.Module, name: str | nn.Module,
                  layers: dict[str, nn.Module] | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` for a layer given by name (or by module object).

    Raises :class:`LayerNotFoundError` listing the closest valid names when the name is unknown.
    ``layers`` is ``named_layers(model)`` when the caller already has it.
    """
    layers = named_layers(model) if layers is None else layers
    if isinstance(name, nn.Module):
        for lname, mod in layers.items():
            if mod is name:
                return lname, mod
        raise LayerNotFoundError("the module passed as a layer is not a submodule of this model; "
                                 "pass one of model.named_modules() or its name")
    if name in layers:
        return name, layers[name]
    hint = closest(name, layers)
    listing = ", ".join(hint) if hint else ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
    raise LayerNotFoundError(
        f"unknown layer {name!r}; closest valid names: {listing}. "
        "Run `convscope layers MODEL` to list every layer."
    )


def resolve_layers(model: nn.Module, names: str | nn.Module | list) -> dict[str, nn.Module]:
    """Resolve one name, a comma-separated string, or a list of names, keeping order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    elif isinstance(names, nn.Module):
        names = [names]
    layers = named_layers(model)
    out: dict[str, nn.Module] = {}
    for n in names:
        lname, mod = resolve_layer(model, n, layers)
        out[lname] = mod
    return out


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`: name, module type, output shape (without batch), unit count."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    units: int | None
    calls: int
    params: int


MAX_INPUT_SIDE = 4096  # a zero probe image larger than this costs gigabytes before the model even runs


def list_layers(model: nn.Module, sample: torch.Tensor | None = None,
                input_size: int | tuple[int, int] | None = None) -> list[LayerInfo]:
    """Name, type, output shape and unit count (channels) of every layer, from one forward pass.

    ``sample`` is an input batch; without it a zero image of ``input_size`` (or the model's preprocess size,
    or 224x224) is used. Layers that never ran (``calls == 0``) have no shape. A size the model cannot take
    (or a forward pass that fails) is a :class:`~convscope.errors.ConvscopeError` naming the size; the model is
    left as it came.
    """
    from .probe import probe  # local: probe imports this module

    if sample is None:
        size = default_input_size(model, input_size)
        sample = torch.zeros(1, 3, *size, device=model_device(model))
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
        shape = tuple(outs[-1].shape[1:]) if outs and isinstance(outs[-1], torch.Tensor) else None
        units = shape[0] if shape else None
        rows.append(LayerInfo(name, type(mod).__name__, shape, units, len(outs),
                              sum(q.numel() for q in mod.parameters(recurse=False))))
    return rows


def check_input_size(size: object, what: str = "input_size") -> tuple[int, int]:
    """``size`` (an int or an (H, W) pair) as a pair of ints in 1..MAX_INPUT_SIDE, or a one-line error."""
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        if isinstance(pair, (str, bytes)) or any(isinstance(v, bool) for v in pair):  # type: ignore[union-attr]
            raise TypeError
        pair = tuple(operator.index(v) for v in pair)  # type: ignore[union-attr]
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ConvscopeError(f"{what}={size!r}: give an (height, width) pair of ints, e.g. (224, 224) (--size 224 224)")
    h, w = int(pair[0]), int(pair[1])
    if h < 1 or w < 1:
        raise ConvscopeError(f"{what} {h}x{w} is empty or negative; give a height and width of at least 1 pixel, "
                             "e.g. (224, 224) (--size 224 224)")
    if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
        raise ConvscopeError(f"{what} {h}x{w} is too large (at most {MAX_INPUT_SIDE} per side); give a smaller size, "
                             "e.g. the model's own input size")
    return h, w


def default_input_size(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The input size to probe a model with: explicit (validated), else its preprocess's, else 224x224."""
    if input_size is not None:
        return check_input_size(input_size)
    pre = getattr(model, "preprocess", None)
    size = getattr(pre, "input_size", None)
    if size:
        return tuple(size)  # type: ignore[return-value]
    return (224, 224)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameterless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
