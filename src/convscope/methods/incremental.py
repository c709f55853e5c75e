"""Incremental inference for occlusion (Nakandala et al., "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations", SIGMOD 2019, Sec. 3: "incremental CNN inference").

An occluding patch changes only the activations inside its receptive-field cone. The model is traced once
(``torch.fx``) into a graph of operations; the clean image runs through it once and every activation is cached.
For each window position the *dirty box* of every layer (the outputs whose receptive field meets the changed
input, Krypton's Eq. 1-2: ``o_lo = ceil((i_lo + p - (k - 1) d) / s)``, ``o_hi = floor((i_hi + p) / s)``) is
recomputed from the clean input of that layer with the changed patch written in, layer by layer; everything
outside the box keeps its clean value. Positions run as a batch: at each layer every position's box has the
same size (the largest, shifted to stay inside the map; recomputing clean pixels gives clean values).

Supported on boxes: 2-D convolution (zero padding, TF "SAME" convolutions of the EfficientNet-Lite models), max
and average pooling, batch norm in eval mode and other per-pixel modules and functions (activations, dropout in
eval, local response normalization), and element-wise sums/products/concatenation of such maps (residual
blocks). Global pooling, flattening and the classifier consume the whole map: they run in full on the patched
last map (cheap). Anything else that produces a spatial map from a changed map (squeeze-excitation's
global-times-local product, upsampling, ...) makes :func:`plan_incremental` return ``None`` with the reason,
and the caller runs full forward passes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Union, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.layers import split_call
from ..models.efficientnet import SamePadConv2d

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.LocalResponseNorm,
)
"""Modules that act on each pixel separately (in eval mode): applied to a dirty box as they are."""

POINTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clip, F.softplus, F.dropout,
    torch.exp, torch.abs, torch.neg,
})
POINTWISE_METHODS: frozenset[str] = frozenset({
    "relu", "sigmoid", "tanh", "clamp", "clip", "clamp_min", "clamp_max", "contiguous", "exp", "abs", "neg",
})
ARITHMETIC: dict[Any, Any] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv, torch.add: torch.add, torch.sub: torch.sub,
    torch.mul: torch.mul, torch.div: torch.div,
}
"""Element-wise binary operations (in-place forms run out of place, so cached clean values stay clean)."""
ARITHMETIC_METHODS: frozenset[str] = frozenset({"add", "sub", "mul", "div"})
GLOBAL_MODULES: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
"""Modules that may consume a whole changed map (the head); their result is computed in full."""


class LeafTracer(fx.Tracer):
    """``torch.fx`` tracer keeping every convolution (also subclasses such as ``SamePadConv2d``) one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class Axis:
    """A dirty box along one axis for every window index: ``starts[i] .. starts[i] + size`` of a map of ``length``."""

    starts: list[int]
    size: int
    length: int


@dataclass
class Window:
    """Op on boxes: ``kind`` conv / max / avg with its parameters, the pads (before, after) per axis.

    ``weight`` / ``bias``: the convolution's, or those with the following eval-mode batch norm folded in."""

    kind: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    module: nn.Module
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class Step:
    """One traced node: ``mode`` is ``const`` (no input dependence), ``local`` (dirty boxes) or ``full``."""

    node: fx.Node
    mode: str
    boxes: tuple[Axis, Axis] | None = None
    window: Window | None = None
    fn: Callable[..., Any] | None = None
    alias: bool = False
    inplace: bool = False
    need: tuple[Axis, Axis] | None = None
    padded_whole: bool = False


@dataclass
class IncrementalPlan:
    """A traced model ready to run occluded copies on dirty boxes (:func:`plan_incremental`)."""

    steps: list[Step]
    clean: dict[fx.Node, Any]
    output: fx.Node
    layer_node: fx.Node | None
    note: str
    modules: dict[str, nn.Module]
    step_index: dict[fx.Node, Step] = field(default_factory=dict)
    local_ops: int = 0
    full_ops: list[str] = field(default_factory=list)


class Unsupported(Exception):
    """Raised while planning when the model needs full forward passes (the message says why)."""


def _pair2(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_pads(m: nn.Conv2d, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The (before, after) zero padding per axis that ``m`` applies to an input of ``size``; None if unknown."""
    if isinstance(m, SamePadConv2d) and type(m).forward is SamePadConv2d.forward:
        pads = []
        for n, k, s, d in zip(size, m.kernel_size, m.stride, m.dilation):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    if type(m).forward is not nn.Conv2d.forward or m.padding_mode != "zeros":
        return None
    if m.padding == "valid":
        return (0, 0), (0, 0)
    if m.padding == "same":
        tot = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
        return (tot[0] // 2, tot[0] - tot[0] // 2), (tot[1] // 2, tot[1] - tot[1] // 2)
    ph, pw = _pair2(m.padding)
    return (ph, ph), (pw, pw)


def window_op(m: nn.Module, size: tuple[int, int]) -> Window | None:
    """The box rule of a convolution or pooling module, or None when it is not one we can run on boxes."""
    if isinstance(m, nn.Conv2d):
        pads = conv_pads(m, size)
        if pads is None:
            return None
        return Window("conv", _pair2(m.kernel_size), _pair2(m.stride), _pair2(m.dilation), pads, m)
    if type(m) is nn.MaxPool2d and not m.ceil_mode and not m.return_indices:
        ph, pw = _pair2(m.padding)
        return Window("max", _pair2(m.kernel_size), _pair2(m.stride if m.stride is not None else m.kernel_size),
                      _pair2(m.dilation), ((ph, ph), (pw, pw)), m)
    if type(m) is nn.AvgPool2d and not m.ceil_mode:
        ph, pw = _pair2(m.padding)
        if (ph or pw) and not m.count_include_pad:
            return None
        return Window("avg", _pair2(m.kernel_size), _pair2(m.stride if m.stride is not None else m.kernel_size),
                      (1, 1), ((ph, ph), (pw, pw)), m)
    return None


def cone(box: Axis, k: int, s: int, d: int, pad: int, length: int) -> Axis:
    """Outputs whose receptive field ``[o s - pad, o s - pad + (k - 1) d]`` meets the box (Krypton Eq. 1-2)."""
    lo = [max(0, -(-(r + pad - (k - 1) * d) // s)) for r in box.starts]
    hi = [min(length - 1, (r + box.size - 1 + pad) // s) for r in box.starts]
    size = max(1, *(h - l_ + 1 for l_, h in zip(lo, hi)))
    return Axis([min(max(l_, 0), length - size) for l_ in lo], size, length)


def hull(boxes: Sequence[Axis]) -> Axis:
    """The smallest common-size box containing each input's box (for sums and concatenations)."""
    length = boxes[0].length
    lo = [min(b.starts[i] for b in boxes) for i in range(len(boxes[0].starts))]
    hi = [max(b.starts[i] + b.size for b in boxes) for i in range(len(boxes[0].starts))]
    size = max(h - l_ for l_, h in zip(lo, hi))
    return Axis([min(l_, length - size) for l_ in lo], size, length)


def _depends(node: fx.Node, dep: dict[fx.Node, bool]) -> bool:
    return any(dep.get(a, False) for a in node.all_input_nodes)


def _is_map(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4


def _spatial_free(v: Any) -> bool:
    """A constant that broadcasts over a map without varying in space (scalar, or ``... x 1 x 1``)."""
    if not isinstance(v, torch.Tensor):
        return isinstance(v, int | float | bool)
    return v.numel() == 1 or (v.dim() >= 3 and v.shape[-1] == 1 and v.shape[-2] == 1)


def _run_node(node: fx.Node, modules: dict[str, nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Execute one traced node on concrete values (in-place arithmetic out of place)."""
    if node.op == "call_module":
        return modules[str(node.target)](*args, **kwargs)
    if node.op == "call_function":
        fn = ARITHMETIC.get(node.target, node.target)
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return fn(*args, **kwargs)
    if node.op == "call_method":
        self_, *rest = args
        name = str(node.target)
        if name.endswith("_") and hasattr(self_, name[:-1]):
            name = name[:-1]
        return getattr(self_, name)(*rest, **kwargs)
    raise Unsupported(f"node {node.name} ({node.op})")


def _fetch(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    obj: Any = modules[""]
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def plan_incremental(model: nn.Module, x: torch.Tensor, out: torch.Tensor, rows: Sequence[int],
                     cols: Sequence[int], window: tuple[int, int], layer: str | None = None,
                     layer_value: torch.Tensor | None = None) -> tuple[IncrementalPlan | None, str]:
    """Trace ``model`` and plan the dirty boxes of windows ``window`` at top-left ``rows`` x ``cols`` on ``x``.

    ``out`` is ``model(x)`` (the trace must reproduce it) and ``layer_value`` the output of ``layer`` on ``x``
    (for the strongest-unit curve). Returns ``(plan, note)``; ``plan`` is None when full forward passes are
    needed, and ``note`` (one line) says why. The model must already be in eval mode (``preserved_state``).
    """
    try:
        return _plan(model, x, out, list(rows), list(cols), window, layer, layer_value)
    except Unsupported as e:
        return None, f"full forward passes: {e}"


def _plan(model: nn.Module, x: torch.Tensor, out: torch.Tensor, rows: list[int], cols: list[int],
          window: tuple[int, int], layer: str | None, layer_value: torch.Tensor | None
          ) -> tuple[IncrementalPlan | None, str]:
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        raise Unsupported("the model has forward hooks, which a traced graph would skip")
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: run the model as it is
        raise Unsupported(f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                          ) from None
    modules = dict(model.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"the traced forward takes {len(placeholders)} inputs, not one image batch")
    clean: dict[fx.Node, Any] = {}
    dep: dict[fx.Node, bool] = {}
    steps: list[Step] = []
    output: fx.Node | None = None
    n_local, full_ops = 0, []
    height, width = x.shape[-2:]
    for node in graph.nodes:
        if node.op == "output":
            output = cast(fx.Node, node.args[0])  # checked below: the forward must return one tensor
            break
        if node.op == "placeholder":
            clean[node] = x
            dep[node] = True
            boxes = (Axis(list(rows), window[0], height), Axis(list(cols), window[1], width))
            steps.append(Step(node, "local", boxes))
            continue
        args = fx.node.map_arg(node.args, lambda n: clean[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: clean[n])
        value = _fetch(node, modules) if node.op == "get_attr" else _run_node(node, modules, args, kwargs)
        clean[node] = value
        dep[node] = node.op != "get_attr" and _depends(node, dep)
        if not dep[node]:
            steps.append(Step(node, "const"))
            continue
        local_in = [a for a in node.all_input_nodes if dep[a] and _mode(steps, a) == "local"]
        step = _local_step(node, modules, clean, dep, steps) if all(
            _mode(steps, a) == "local" for a in node.all_input_nodes if dep[a]) else None
        if step is not None:
            steps.append(step)
            n_local += 1
            continue
        if local_in and not _reduces(node, modules, value):
            raise Unsupported(f"{_describe(node, modules)} turns a changed map into another map in a way the "
                              "dirty-box rules do not cover")
        steps.append(Step(node, "full"))
        full_ops.append(str(node.target) if node.op == "call_module" else node.name)
    if output is None or not isinstance(output, fx.Node):
        raise Unsupported("the traced forward does not return one tensor")
    ref = clean[output]
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape or not torch.allclose(
            ref, out, rtol=1e-4, atol=1e-5 * float(out.abs().max()) + 1e-12):
        raise Unsupported("the traced graph does not reproduce model(x)")
    layer_node = None
    if layer is not None:
        layer_node = _layer_node(graph, layer, clean, layer_value)
    n_conv = sum(1 for s in steps if s.mode == "local" and s.window is not None)
    if n_conv == 0:
        raise Unsupported("no convolution or pooling runs on dirty boxes")
    _fuse(steps, modules, layer_node)
    plan = IncrementalPlan(steps, clean, output, layer_node, "", modules, local_ops=n_local, full_ops=full_ops)
    plan.note = (f"incremental inference: {n_local} ops on dirty boxes ({n_conv} conv/pool), "
                 f"{len(full_ops)} in full ({', '.join(full_ops[:4])}{', ...' if len(full_ops) > 4 else ''})")
    return plan, plan.note


def fold_batchnorm(w: Window, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the convolution before it: ``W' = W g / sqrt(v + e)``,
    ``b' = (b - m) g / sqrt(v + e) + beta`` (exact up to float rounding)."""
    assert bn.running_mean is not None and bn.running_var is not None
    conv = cast(nn.Conv2d, w.module)  # a conv window's module
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    w.weight = conv.weight * scale.view(-1, 1, 1, 1)
    w.bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0.0)


def _fuse(steps: list[Step], modules: dict[str, nn.Module], layer_node: fx.Node | None) -> None:
    """Fold eval batch norms into the convolution before them and run ReLU / ReLU6 in place on values that
    nothing else reads (fewer passes over memory; the layer of ``strongest_unit`` is never overwritten)."""
    by_node = {s.node: s for s in steps}
    for s in steps:
        if s.mode != "local" or s.node.op != "call_module" or not s.node.args:
            continue
        m = modules[str(s.node.target)]
        src = s.node.args[0]
        if not isinstance(src, fx.Node):
            continue
        prev = by_node.get(src)
        if prev is None or prev.mode != "local" or len(src.users) != 1 or src is layer_node:
            continue
        if isinstance(m, nn.BatchNorm2d) and prev.window is not None and prev.window.kind == "conv" \
                and prev.window.weight is None:
            fold_batchnorm(prev.window, m)
            s.alias = True
        elif type(m) in (nn.ReLU, nn.ReLU6, nn.Hardtanh) and src.op != "placeholder":
            s.inplace = True


def _mode(steps: list[Step], node: fx.Node) -> str:
    for s in reversed(steps):
        if s.node is node:
            return s.mode
    return "const"


def _step_of(steps: list[Step], node: fx.Node) -> Step:
    for s in reversed(steps):
        if s.node is node:
            return s
    raise KeyError(node.name)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"layer {node.target} ({type(modules[str(node.target)]).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {name} (node {node.name})"


def _reduces(node: fx.Node, modules: dict[str, nn.Module], value: Any) -> bool:
    """May ``node`` take a whole changed map and run in full? Global pooling and whatever leaves no H x W map."""
    if node.op == "call_module" and isinstance(modules[str(node.target)], GLOBAL_MODULES):
        return True
    return not (_is_map(value) and value.shape[-1] * value.shape[-2] > 1)


def _local_step(node: fx.Node, modules: dict[str, nn.Module], clean: dict[fx.Node, Any],
                dep: dict[fx.Node, bool], steps: list[Step]) -> Step | None:
    """The dirty-box rule of ``node`` when every changed input is a local map, else None."""
    if not _is_map(clean[node]):
        return None
    changed = [a for a in node.all_input_nodes if dep[a]]
    found = [_step_of(steps, a).boxes for a in changed]
    boxes = [b for b in found if b is not None]
    if len(boxes) != len(found):
        return None
    size = tuple(clean[node].shape[-2:])
    if node.op == "call_module":
        m = modules[str(node.target)]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        in_size = tuple(clean[src].shape[-2:])
        w = window_op(m, in_size)
        if w is not None:
            b = _step_of(steps, src).boxes
            assert b is not None
            out = (cone(b[0], w.kernel[0], w.stride[0], w.dilation[0], w.pads[0][0], size[0]),
                   cone(b[1], w.kernel[1], w.stride[1], w.dilation[1], w.pads[1][0], size[1]))
            need = (_needed(out[0], w, 0), _needed(out[1], w, 1))
            whole = all(b[i].size == b[i].length and w.pads[i][0] == w.pads[i][1] and set(need[i].starts) == {0}
                        and need[i].size == b[i].length + sum(w.pads[i]) for i in (0, 1))
            return Step(node, "local", out, window=w, need=need, padded_whole=whole)
        pointwise = isinstance(m, POINTWISE_MODULES) or (
            isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and not m.training)
        if pointwise and in_size == size:
            return Step(node, "local", _step_of(steps, src).boxes, fn=m)
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    consts_ok = all(_spatial_free(clean[a]) for a in node.all_input_nodes if not dep[a]) and all(
        _spatial_free(v) or v is None or isinstance(v, str | tuple) for v in node.args if not isinstance(v, fx.Node)
        and not isinstance(v, list | tuple))
    is_pointwise = (node.op == "call_function" and target in POINTWISE_FUNCTIONS) or (
        node.op == "call_method" and target in POINTWISE_METHODS)
    if is_pointwise and len(changed) == 1 and node.args and node.args[0] is changed[0] and consts_ok:
        if tuple(clean[changed[0]].shape[-2:]) == size:
            return Step(node, "local", _step_of(steps, changed[0]).boxes)
        return None
    is_arith = (node.op == "call_function" and target in ARITHMETIC) or (
        node.op == "call_method" and target in ARITHMETIC_METHODS)
    is_cat = node.op == "call_function" and target is torch.cat
    if is_arith and consts_ok and len(node.args) == 2 and not node.kwargs:
        if any(tuple(clean[a].shape[-2:]) != size for a in changed):
            return None
        return Step(node, "local", _hulls(boxes))
    if is_cat:
        seq = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if (not isinstance(seq, list | tuple) or dim not in (1, -3) or len(node.args) + len(node.kwargs) > 2
                or not all(isinstance(a, fx.Node) and dep[a] for a in seq)
                or any(tuple(clean[a].shape[-2:]) != size for a in changed)):
            return None
        return Step(node, "local", _hulls(boxes))
    return None


def _needed(out: Axis, w: Window, i: int) -> Axis:
    """The input rows (axis ``i``, padded coordinates) that window op ``w`` reads to compute the box ``out``."""
    return Axis([s * w.stride[i] for s in out.starts],
                (out.size - 1) * w.stride[i] + (w.kernel[i] - 1) * w.dilation[i] + 1, 0)


def _hulls(boxes: list[tuple[Axis, Axis]]) -> tuple[Axis, Axis]:
    return hull([b[0] for b in boxes]), hull([b[1] for b in boxes])


def _layer_node(graph: fx.Graph, layer: str, clean: dict[fx.Node, Any], value: torch.Tensor | None) -> fx.Node:
    """The node whose output is ``layer``'s output (a leaf's call, or the last node inside a container)."""
    base, call = split_call(layer)
    hits = [n for n in graph.nodes if n.op == "call_module" and n.target == base]
    if hits:
        if len(hits) > 1 and call is None:
            raise Unsupported(f"layer {layer!r} runs {len(hits)} times")
        node = hits[call or 0] if (call or 0) < len(hits) else None
    else:
        inside = [n for n in graph.nodes if n.op != "output" and any(
            key == base or str(v[0] if isinstance(v, tuple) else v) == base
            for key, v in (n.meta.get("nn_module_stack") or {}).items())]
        node = inside[-1] if inside else None
    if node is None or value is None or not isinstance(clean[node], torch.Tensor) or clean[node].shape != value.shape \
            or not torch.equal(clean[node], value):
        raise Unsupported(f"layer {layer!r} is not one node of the traced graph")
    return node


Env = dict[Union[fx.Node, tuple[str, fx.Node]], Any]
"""A run's values: each node's occluded output, and ``("full", node)`` for a local map materialized whole."""


COPY_WORKSPACE = 4
"""Buffers per copy beyond its largest dirty box (the gathered, padded input window, the convolution's own
workspace): measured on efficientnet_lite0 under glibc's default malloc, 32/32 windows (0.5 MiB boxes), 16 copies
per pass run without page faults, 32 copies fault 659 times per copy."""


def copy_bytes(plan: IncrementalPlan) -> int:
    """The memory one occluded copy needs when run through ``plan``: :data:`COPY_WORKSPACE` x its largest dirty
    box (box area x channels; a full step's whole map); what ``batch_size="auto"`` sizes occlusion's rows by."""
    largest = 1
    for step in plan.steps:
        value = plan.clean.get(step.node)
        if step.mode == "const" or not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        per_image = value[0].numel() * value.element_size()
        if step.mode == "local" and step.boxes is not None and value.dim() == 4:
            rows, cols = step.boxes
            per_image = value.shape[1] * rows.size * cols.size * value.element_size()
        largest = max(largest, per_image)
    return COPY_WORKSPACE * largest


class IncrementalRunner:
    """Runs a batch of occluded copies through an :class:`IncrementalPlan` (one call per chunk of positions)."""

    def __init__(self, plan: IncrementalPlan, fill: torch.Tensor) -> None:
        self.plan = plan
        self.fill = fill
        self.device = fill.device
        self.clean_cl: dict[tuple[Any, ...], torch.Tensor] = {}
        self.fill_cl = fill.permute(0, 2, 3, 1).contiguous()

    def padded(self, node: fx.Node, pads: tuple[tuple[int, int], tuple[int, int]], value: float) -> torch.Tensor:
        """The clean map of ``node`` padded with ``value``, channels-last (N x H x W x C), cached."""
        key = (node, pads, value)
        if key not in self.clean_cl:
            src = self.plan.clean[node]
            (pt, pb), (pl, pr) = pads
            padded = F.pad(src, (pl, pr, pt, pb), value=value) if (pt or pb or pl or pr) else src
            self.clean_cl[key] = padded.permute(0, 2, 3, 1).contiguous()
        return self.clean_cl[key]

    def gather(self, src: torch.Tensor, batch: Batch, rows: Axis, cols: Axis) -> torch.Tensor:
        """``src[img, r : r + h, c : c + w, :]`` of a channels-last ``src`` (N x H x W x C) at each position's
        window (``rows.starts[a]``, ``cols.starts[b]``), as B x C x h x w (channels-last memory).

        On a GPU one indexing kernel; on a CPU one slice copy per position (contiguous runs of ``w x C``
        values: several times faster there than an indexing kernel)."""
        h, w = rows.size, cols.size
        if src.device.type != "cpu":
            r0 = torch.tensor(rows.starts, device=self.device)[batch.a]
            c0 = torch.tensor(cols.starts, device=self.device)[batch.b]
            ri = r0[:, None] + torch.arange(h, device=self.device)
            ci = c0[:, None] + torch.arange(w, device=self.device)
            return src[batch.img[:, None, None], ri[:, :, None], ci[:, None, :]].permute(0, 3, 1, 2)
        out = src.new_empty(batch.n, h, w, src.shape[-1])
        for j, (i, a, b) in enumerate(zip(batch.img_list, batch.a_list, batch.b_list)):
            r, c = rows.starts[a], cols.starts[b]
            out[j] = src[i, r:r + h, c:c + w]
        return out.permute(0, 3, 1, 2)

    def materialize(self, node: fx.Node, env: Env, boxes: tuple[Axis, Axis],
                    pads: tuple[tuple[int, int], tuple[int, int]], value: float, batch: Batch) -> torch.Tensor:
        """``node``'s occluded output on ``boxes`` (padded coordinates) for each position in ``batch``."""
        src = _step_of_cached(self.plan, node)
        sb = src.boxes
        assert sb is not None
        same = not any(pads[0] + pads[1]) and all(
            sb[i].size == boxes[i].size and sb[i].starts == boxes[i].starts for i in (0, 1))
        patch = env[node]
        if same:
            return patch
        (tb_r, tb_c) = boxes
        h, w = tb_r.size, tb_c.size
        if sb[0].size == sb[0].length and sb[1].size == sb[1].length:
            # the dirty box is the whole map (deep layers): the window is read from the padded patch alone
            (pt, pb), (pl, pr) = pads
            padded = F.pad(patch, (pl, pr, pt, pb), value=value) if (pt or pb or pl or pr) else patch
            starts: dict[tuple[int, int], list[int]] = {}
            for j, (a, b) in enumerate(zip(batch.a_list, batch.b_list)):
                starts.setdefault((tb_r.starts[a], tb_c.starts[b]), []).append(j)
            if len(starts) == 1 and (0, 0) in starts and padded.shape[-2:] == (h, w):
                return padded
            out = padded.new_empty(batch.n, padded.shape[1], h, w)
            for (y, x), idx in starts.items():
                if len(idx) == batch.n:
                    out.copy_(padded[:, :, y:y + h, x:x + w])
                else:
                    sel = torch.tensor(idx, device=self.device)
                    out[sel] = padded[sel, :, y:y + h, x:x + w]
            return out
        # the clean window (starts in padded coordinates), then each position's patch written in
        if h == sb[0].length + sum(pads[0]) and w == sb[1].length + sum(pads[1]):
            base = self.padded(node, pads, value)[batch.img].permute(0, 3, 1, 2)
        else:
            base = self.gather(self.padded(node, pads, value), batch, tb_r, tb_c)
        # write each position's patch in: group positions by the patch's offset inside the window
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (a, b) in enumerate(zip(batch.a_list, batch.b_list)):
            off = (sb[0].starts[a] + pads[0][0] - tb_r.starts[a], sb[1].starts[b] + pads[1][0] - tb_c.starts[b])
            groups.setdefault(off, []).append(j)
        for (orr, occ), idx in groups.items():
            y0, y1 = max(orr, 0), min(orr + sb[0].size, h)
            x0, x1 = max(occ, 0), min(occ + sb[1].size, w)
            if y1 <= y0 or x1 <= x0:
                continue
            part = patch[:, :, y0 - orr:y1 - orr, x0 - occ:x1 - occ]
            if len(idx) == batch.n:
                base[:, :, y0:y1, x0:x1] = part
            elif base.device.type == "cpu":
                for j in idx:
                    base[j, :, y0:y1, x0:x1] = part[j]
            else:
                sel = torch.tensor(idx, device=self.device)
                base[sel, :, y0:y1, x0:x1] = part[sel]
        return base

    def run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model outputs (B x ...) of the occluded copies, and the layer's output (a local patch or full map)."""
        plan = self.plan
        env: Env = {}
        for step in plan.steps:
            node = step.node
            if step.mode == "const":
                continue
            if node.op == "placeholder":
                assert step.boxes is not None
                env[node] = self.gather(self.fill_cl, batch, step.boxes[0], step.boxes[1])
                continue
            if step.mode == "local" and step.window is not None:
                w = step.window
                assert step.boxes is not None and step.need is not None
                src = cast(fx.Node, node.args[0])  # a window step's input is a node (checked when planning)
                if step.padded_whole and w.kind != "avg":
                    # the input's box is the whole map: let the op pad it (one pass over memory, no copy)
                    env[node] = _apply_window(w, env[src], (w.pads[0][0], w.pads[1][0]))
                    continue
                inp = self.materialize(src, env, step.need, w.pads, -math.inf if w.kind == "max" else 0.0,
                                       batch)
                env[node] = _apply_window(w, inp)
                continue
            if step.alias:
                env[node] = env[cast(fx.Node, node.args[0])]
                continue
            if step.inplace:
                m = plan.modules[str(node.target)]
                t = env[cast(fx.Node, node.args[0])]
                env[node] = t.relu_() if type(m) is nn.ReLU else t.clamp_(m.min_val, m.max_val)
                continue
            if step.mode == "local":
                assert step.boxes is not None
                local = partial(self._arg, env=env, boxes=step.boxes, batch=batch)
                args = fx.node.map_arg(node.args, local)
                kwargs = fx.node.map_arg(node.kwargs, local)
                env[node] = _run_node(node, plan.modules, args, kwargs)
                continue
            args = fx.node.map_arg(node.args, lambda n: self._full(n, env, batch))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self._full(n, env, batch))
            env[node] = _run_node(node, plan.modules, args, kwargs)
        out = self._full(plan.output, env, batch)
        return out, env.get(plan.layer_node) if plan.layer_node is not None else None

    def unit_sums(self, layer_out: torch.Tensor, unit: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each copy's sum over space of feature map ``unit[image]`` of the layer (Zeiler & Fergus Fig. 7 (b)).

        On dirty boxes: the clean sum, minus the clean box (an integral image), plus the recomputed box."""
        node = self.plan.layer_node
        assert node is not None
        step = _step_of_cached(self.plan, node)
        ch = unit[batch.img]
        rows = torch.arange(batch.n, device=self.device)
        if step.mode != "local":
            return layer_out.flatten(2)[rows, ch].sum(1)
        assert step.boxes is not None
        key = ("integral", node)
        if key not in self.clean_cl:
            c = self.plan.clean[node].double()
            self.clean_cl[key] = F.pad(c.cumsum(2).cumsum(3), (1, 0, 1, 0))
        ii = self.clean_cl[key][batch.img, ch]  # B x (H + 1) x (W + 1)
        r0 = torch.tensor(step.boxes[0].starts, device=self.device)[batch.a]
        c0 = torch.tensor(step.boxes[1].starts, device=self.device)[batch.b]
        r1, c1 = r0 + step.boxes[0].size, c0 + step.boxes[1].size
        box = ii[rows, r1, c1] - ii[rows, r0, c1] - ii[rows, r1, c0] + ii[rows, r0, c0]
        total = ii[rows, -1, -1]
        patch = layer_out[rows, ch].flatten(1).sum(1).double()
        return (total - box + patch).to(layer_out.dtype)

    def _arg(self, n: fx.Node, env: Env, boxes: tuple[Axis, Axis] | None, batch: Batch) -> Any:
        s = _step_of_cached(self.plan, n)
        if s.mode == "const":
            return self.plan.clean[n]
        assert boxes is not None
        return self.materialize(n, env, boxes, ((0, 0), (0, 0)), 0.0, batch)

    def _full(self, n: fx.Node, env: Env, batch: Batch) -> Any:
        s = _step_of_cached(self.plan, n)
        if s.mode == "const":
            return self.plan.clean[n]
        if s.mode == "full":
            return env[n]
        key = ("full", n)
        if key not in env:
            assert s.boxes is not None
            whole = (Axis([0] * len(s.boxes[0].starts), s.boxes[0].length, s.boxes[0].length),
                     Axis([0] * len(s.boxes[1].starts), s.boxes[1].length, s.boxes[1].length))
            env[key] = self.materialize(n, env, whole, ((0, 0), (0, 0)), 0.0, batch).contiguous()
        return env[key]


def _step_of_cached(plan: IncrementalPlan, node: fx.Node) -> Step:
    if not plan.step_index:
        plan.step_index.update((s.node, s) for s in plan.steps)
    return plan.step_index[node]


def _apply_window(w: Window, inp: torch.Tensor, padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    if w.kind == "conv":
        conv = cast(nn.Conv2d, w.module)
        weight, bias = (conv.weight, conv.bias) if w.weight is None else (w.weight, w.bias)
        return F.conv2d(inp, weight, bias, w.stride, padding, w.dilation, conv.groups)
    if w.kind == "max":
        return F.max_pool2d(inp, w.kernel, w.stride, padding, w.dilation)
    return F.avg_pool2d(inp, w.kernel, w.stride, 0, divisor_override=cast(nn.AvgPool2d, w.module).divisor_override)


@dataclass
class Batch:
    """A chunk of occluded copies: image index and window row / column index of each (tensors and lists)."""

    img: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    img_list: list[int]
    a_list: list[int]
    b_list: list[int]

    @property
    def n(self) -> int:
        return len(self.a_list)


def make_batch(flat: torch.Tensor, n_pos: int, n_cols: int) -> Batch:
    """The :class:`Batch` of flat copy indices ``image * n_pos + row * n_cols + col``."""
    img, pos = flat // n_pos, flat % n_pos
    a, b = pos // n_cols, pos % n_cols
    return Batch(img, a, b, img.tolist(), a.tolist(), b.tolist())


__all__ = ["Axis", "Batch", "IncrementalPlan", "IncrementalRunner", "LeafTracer", "cone", "conv_pads", "hull",
           "make_batch", "plan_incremental", "window_op"]
