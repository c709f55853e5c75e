"""Address layers by their ``named_modules()`` names (the names torchvision's feature extraction uses).

The model facts built on them (the layer table, the default input size) live in :mod:`convscope.core.model`."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, cast

from torch import nn

from ..errors import ConvscopeError, LayerNotFoundError, closest


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by its dotted name, the root excluded."""
    return {name: mod for name, mod in model.named_modules() if name}


OUTPUT = "@output"
"""The layer name that stands for the model's output (the class logits), e.g. the key of the output among captured
activations (``acts[OUTPUT]`` in an optimization objective). No submodule set as an attribute can be named so
(``@`` is not a Python identifier character). Users may write it as listed in :func:`is_output`."""
OUTPUT_NAMES = ("logits", "output")
"""What users type for the output on the command line (``--layer logits``); they name the output only when the model
has no layer of that name."""


def is_output(layer: object, model: nn.Module | None = None) -> bool:
    """True when ``layer`` names the model's output rather than a layer: ``None``, ``""`` (the model itself in
    ``named_modules()``), :data:`OUTPUT`, the model object itself, or one of :data:`OUTPUT_NAMES` (``"logits"``,
    ``"output"``) unless ``model`` has a layer of that name."""
    if layer is None or (model is not None and layer is model):
        return True
    if not isinstance(layer, str):
        return False
    if layer in ("", OUTPUT):
        return True
    return layer in OUTPUT_NAMES and (model is None or layer not in dict(model.named_modules()))


def layer_or_output(model: nn.Module, layer: str | nn.Module | None) -> str:
    """:data:`OUTPUT` when ``layer`` names the model's output (:func:`is_output`), else the layer's resolved name."""
    return OUTPUT if is_output(layer, model) else resolve_layer(model, cast(str | nn.Module, layer))[0]


CALL_SEPARATOR = ":"
"""``"name:k"`` addresses the k-th call (from 0) of a module that runs several times in one forward pass."""


def split_call(name: str) -> tuple[str, int | None]:
    """``"layer1.0.relu:1"`` -> ``("layer1.0.relu", 1)``; a plain name -> ``(name, None)``."""
    base, sep, call = name.rpartition(CALL_SEPARATOR)
    if sep and base and call.isdigit():
        return base, int(call)
    return name, None


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
    base, call = split_call(name)
    if call is not None and base in layers:
        return name, layers[base]
    hint = closest(name, layers)
    listing = ", ".join(hint) if hint else ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
    raise LayerNotFoundError(
        f"unknown layer {name!r}; closest valid names: {listing}. "
        "Run `convscope layers MODEL` to list every layer."
    )


def resolve_layers(model: nn.Module, names: str | nn.Module | Sequence[str | nn.Module]) -> dict[str, nn.Module]:
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


MAX_INPUT_SIDE = 4096  # a zero probe image larger than this costs gigabytes before the model even runs


def check_input_size(size: object, what: str = "input_size") -> tuple[int, int]:
    """``size`` (an int or an (H, W) pair) as a pair of ints in 1..MAX_INPUT_SIDE, or a one-line error."""
    given = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    pair: tuple[int, ...]
    try:
        if isinstance(given, (str, bytes)) or any(isinstance(v, bool) for v in cast(Iterable[Any], given)):
            raise TypeError
        pair = tuple(operator.index(v) for v in cast(Iterable[Any], given))
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
