"""Input and output checks in one place: every bad model input is a one-line error with the fix.

* :func:`check_model_input` checks a batch against the model before a forward pass: a tensor of the model's rank
  (4-D for a ``Conv2d`` stem: ``N x C x H x W``; the rank of the first convolution's input), non-empty, a
  floating dtype equal to the model's (``uint8`` pixels, ``float64`` into a ``float32`` model...), the channel
  count of the first convolution, and the device: an input on another device than the model is MOVED to the
  model's device (``x.to(device)``, which returns ``x`` itself, no copy, when it is already there; gradients still
  flow back to the caller's tensor). The first convolution is found by a scan of ``model.named_modules()`` in
  registration order (the stem of every usual CNN), cached per model in a ``WeakKeyDictionary`` and re-checked
  against the model on every call (a replaced stem is noticed).
* :func:`check_forward_args` is the same check in the form of a root forward pre-hook (``(module, args)`` ->
  new args or None): inputs that are not a tensor are left to the model.
* :func:`check_finite` raises when a model output (or a method's map) holds NaN or inf, naming the FIRST layer
  whose output went non-finite, found with one extra forward pass with hooks on every leaf module (only on that
  failure path).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

from ..errors import ConvscopeError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Conv = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]
"""A module of :data:`CONVS`."""
LAYOUTS = ("NCHW", "NHWC")

_STEMS: weakref.WeakKeyDictionary[nn.Module, tuple[str, Conv] | None] = weakref.WeakKeyDictionary()
_TRACING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def first_conv(model: nn.Module) -> tuple[str, Conv] | None:
    """``(name, module)`` of the first convolution in ``model.named_modules()`` order, or None (cached)."""
    cached = _STEMS.get(model, ...)
    if cached is None or (cached is not ... and _still_there(model, cached)):
        return cached
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, CONVS)), None)
    _STEMS[model] = found
    return found


def _still_there(model: nn.Module, entry: tuple[str, Conv] | None) -> bool:
    if entry is None:
        return True
    try:
        return model.get_submodule(entry[0]) is entry[1]
    except AttributeError:
        return False


def input_channels(model: nn.Module, default: int = 3) -> int:
    """The channel count the model takes: its first convolution's ``in_channels`` (``default`` without one), for
    code that builds a sample input (``torch.zeros(1, input_channels(model), H, W)``)."""
    stem = first_conv(model)
    if stem is None or _lazy(stem[1]):
        return default
    return int(stem[1].in_channels)


def check_rgb_model(model: nn.Module, what: str) -> None:
    """One-line error when ``model`` does not take 3-channel input: the image parametrizations of
    :mod:`convscope.core.optim` (pixels, Fourier, decorrelated colour) build RGB images only."""
    channels = input_channels(model)
    if channels != 3:
        raise ConvscopeError(f"{what} optimizes RGB images, but this model takes {channels}-channel input; use a "
                             "3-channel model (or wrap yours: x.mean(1, keepdim=True) as its first op)")


def check_rgb_images(model: nn.Module, x: Any, what: str) -> None:
    """:func:`check_rgb_model`, and ``x`` must be ``N x 3 x H x W`` floats (photos in the model's input space)."""
    check_rgb_model(model, what)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConvscopeError(f"{what}: x must be N x 3 x H x W floats in the model's input space (e.g. from "
                             f"cs.load_images(paths, model)), got {shape}")


def model_float(model: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """dtype and device of the model's first floating-point parameter or buffer (None for a model without one)."""
    for t in itertools.chain(model.parameters(), model.buffers()):  # lazily: usually the first one answers
        if t.is_floating_point():
            return t.dtype, t.device
    return None


def check_model_input(model: nn.Module, x: Any, layout: str = "NCHW") -> torch.Tensor:
    """``x`` checked against ``model`` (and moved to its device); a one-line :class:`ConvscopeError` otherwise.

    ``layout``: ``"NCHW"`` (default) or ``"NHWC"`` when the model takes channels last (the channel count is then
    read from the last dimension).
    """
    if layout not in LAYOUTS:
        raise ConvscopeError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    if not isinstance(x, torch.Tensor):
        raise ConvscopeError(f"the model input is a {type(x).__name__}, not a tensor; load images with "
                             "cs.load_images(paths, model), or convert with torch.as_tensor(x)")
    stem = first_conv(model)
    rank = stem[1].weight.dim() if stem is not None and not _lazy(stem[1]) else None  # Conv2d: weight 4-D, input 4-D
    if rank is not None and x.dim() != rank:
        want = {3: "N x C x L", 4: "N x C x H x W", 5: "N x C x D x H x W"}.get(rank, f"{rank}-D")
        fix = ("add a batch dimension with x[None] (or x.unsqueeze(0))" if x.dim() == rank - 1
               else f"reshape it to {want}")
        raise ConvscopeError(f"the model takes {rank}-D input {want} but x has shape {tuple(x.shape)}; {fix}")
    if x.dim() == 0 or x.numel() == 0:
        raise ConvscopeError(f"the input batch is empty (shape {tuple(x.shape)}); give at least one image")
    info = model_float(model)
    if not x.is_floating_point():
        if not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
            if x.dtype == torch.uint8:
                raise ConvscopeError("x is uint8 (raw pixels 0-255); the model takes floats: use x.float() / 255 "
                                     "then the model's preprocess (model.preprocess.normalize), or "
                                     "cs.load_images(paths, model)")
            raise ConvscopeError(f"x is {_dtype(x.dtype)}; the model takes floating-point input: convert with "
                                 f"x.float()")
    elif info is not None and x.dtype != info[0]:
        want = _dtype(info[0])
        cast = {"float32": ".float()", "float64": ".double()", "float16": ".half()", "bfloat16": ".bfloat16()"}
        raise ConvscopeError(f"x is {_dtype(x.dtype)} but the model is {want}: convert x with "
                             f"x{cast.get(want, f'.to(torch.{want})')} (or the model with "
                             f"model{cast.get(_dtype(x.dtype), f'.to(torch.{_dtype(x.dtype)})')})")
    if stem is not None and not _lazy(stem[1]) and x.dim() >= 2:
        axis = 1 if layout == "NCHW" else x.dim() - 1
        want_c = int(stem[1].in_channels)
        if x.shape[axis] != want_c:
            raise ConvscopeError(_channel_message(stem[0], want_c, x, axis))
    if info is not None and x.device != info[1]:
        x = x.to(info[1])  # no copy when already there
    return x


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _lazy(conv: nn.Module) -> bool:
    return isinstance(conv.weight, nn.parameter.UninitializedParameter)


def _channel_message(name: str, want: int, x: torch.Tensor, axis: int) -> str:
    have = x.shape[axis]
    if axis == 1 and x.dim() == 4 and x.shape[-1] == want:
        fix = "x looks channels-last (N x H x W x C): use x.permute(0, 3, 1, 2)"
    elif have == 1 and want == 3:
        fix = "for a grayscale image repeat it: x.expand(-1, 3, -1, -1) (or load it with cs.load_images)"
    elif have == 4 and want == 3:
        fix = "drop the alpha channel: x[:, :3] (or load the image with cs.load_images)"
    elif have == 3 and want == 1:
        fix = "convert to grayscale: x.mean(1, keepdim=True)"
    else:
        fix = f"give {want}-channel images"
    return (f"the model's first convolution {name!r} takes {want} channels but x has {have} (shape "
            f"{tuple(x.shape)}); {fix}")


def check_forward_args(model: nn.Module, args: tuple[Any, ...], layout: str = "NCHW") -> tuple[Any, ...] | None:
    """Root forward pre-hook body: the first positional input checked with :func:`check_model_input`; new args
    when it was moved to the model's device, else None. A first input that is not a tensor (a dict, several
    inputs by keyword) is left to the model."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = check_model_input(model, args[0], layout)
    return None if x is args[0] else (x, *args[1:])


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 6 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif depth < 6 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, depth + 1)


def all_finite(value: Any) -> bool:
    """True when every floating-point tensor in ``value`` (a tensor or nested tuple / list / dict) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point() or t.is_complex())


def first_nonfinite_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """``(layer name, "input" | "output")``: the first leaf module, in execution order, whose output (or already its
    input: a functional op before it) holds NaN or inf, found with one forward pass of ``x`` (eval mode, no grad,
    the model restored); None when every leaf module's output is finite."""
    from .probe import preserved_state  # probe imports this module

    class Found(Exception):
        pass

    hit: list[tuple[str, str]] = []

    def make(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: Any) -> None:
            if not all_finite(inputs):
                hit.append((name, "input"))
            elif not all_finite(out):
                hit.append((name, "output"))
            if hit:
                raise Found
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = []
    _TRACING.add(model)
    try:
        with torch.no_grad(), preserved_state(model):
            handles = [m.register_forward_hook(make(n)) for n, m in leaves]
            with contextlib.suppress(Found):
                model(x)
    except Exception:  # the trace is a diagnosis: a model that fails here gives the plain message
        return None
    finally:
        for h in handles:
            h.remove()
        _TRACING.discard(model)
    return hit[0] if hit else None


def check_finite(model: nn.Module, x: torch.Tensor | None, value: Any, what: str = "the model's output") -> None:
    """Raise a one-line :class:`ConvscopeError` when ``value`` (a model output, a method's map) holds NaN or inf,
    naming the first layer whose output went non-finite on ``x`` (one extra forward pass, on this failure path
    only). A no-op while that diagnostic pass runs (safe in a forward hook)."""
    if model in _TRACING or all_finite(value):
        return
    bad = "NaN" if any(bool(torch.isnan(t).any()) for t in _tensors(value) if t.is_floating_point()) else "inf"
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        count = int((~torch.isfinite(x)).sum())
        raise ConvscopeError(f"{what} has {bad} because the input x holds {count} NaN/inf values; clean the input "
                             "(torch.nan_to_num(x), or check how it was loaded)")
    found = first_nonfinite_layer(model, x) if isinstance(x, torch.Tensor) else None
    if found is None:
        if what == "the model's output" or not isinstance(x, torch.Tensor):
            raise ConvscopeError(f"{what} has {bad}; check the model's weights and input (no layer could be "
                                 "named)")
        raise ConvscopeError(f"{what} has {bad} although every layer's output is finite: the gradients or the "
                             "method's arithmetic overflowed; try float64 (model.double(), x.double())")
    name, where = found
    module = model.get_submodule(name)
    weights = "" if all_finite([*module.parameters(recurse=False), *module.buffers(recurse=False)]) else \
        " (its weights hold NaN/inf: reload the checkpoint)"
    if where == "input":
        raise ConvscopeError(f"{what} has {bad}: it first appears in the input of layer {name!r} "
                             f"({type(module).__name__}), made by the model's forward code before it; check that "
                             "code (a log, sqrt or division of zero?)")
    raise ConvscopeError(f"{what} has {bad}: the first layer whose output is non-finite is {name!r} "
                         f"({type(module).__name__}){weights}")


def scripted_parts(model: nn.Module, modules: Iterable[nn.Module] = ()) -> bool:
    """True when ``model`` or one of ``modules`` is a TorchScript module (no Python hooks, no torch functions)."""
    return isinstance(model, torch.jit.ScriptModule) or any(isinstance(m, torch.jit.ScriptModule) for m in modules)


def refuse_scripted(model: nn.Module, layers: Mapping[str, nn.Module] | Iterable[str] = (),
                    rules: bool = False) -> None:
    """One-line :class:`~convscope.errors.ConvscopeError` when a layer method (``layers``: resolved names, or
    ``{name: module}``) or a backward rule (``rules``) meets TorchScript, which it cannot reach; else nothing."""
    names = list(layers)
    mods = list(layers.values()) if isinstance(layers, Mapping) else []
    fix = ("load the eager model instead (a zoo name or package.module:factory with --weights FILE holding its "
           "state dict) or a torch.export archive (.pt2, convscope.models.exported.export_model)")
    if names and (isinstance(model, torch.jit.ScriptModule) or scripted_parts(model, mods)):
        raise ConvscopeError(f"layer {names[0]!r} is inside a TorchScript model, whose modules take no hooks; {fix}")
    if rules and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise ConvscopeError(f"backward rules (guided backpropagation, DeconvNet) cannot reach the ReLUs of a "
                             f"TorchScript model; {fix}")
