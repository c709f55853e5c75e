"""CNN fixations (Mopuri, Garg & Babu 2017, "CNN Fixations: an unraveling approach to visualize the
discriminative image regions", Sec. 3).

Starting from the target class neuron, the forward pass is unravelled layer by layer down to the image, keeping
at each layer the set of neurons that drove the kept neurons of the layer above. The contribution of an input
neuron ``i`` to a neuron ``j`` is ``a_i w_ji`` (activation times weight, the Hadamard product of Sec. 3):

* fully connected layer after a fully connected layer: every input neuron with a positive contribution to a kept
  neuron is kept;
* fully connected layer on a flattened feature volume with spatial extent (the first FC layer of AlexNet / VGG):
  each kept neuron keeps its most contributing input (channel, row, column), as in the authors' released code
  (keeping every positive one there would keep most of the volume); after global pooling (1 x 1 maps) the
  features count as fully connected ones;
* convolution: each kept neuron ``(c, y, x)`` keeps, within its receptive field, the input channel with the largest
  total contribution, at the position of its largest contribution in that field;
* max pooling: the winning location of the window; average pooling (also adaptive, also global): the largest input
  of the window, the term that dominates the average (our choice: the paper treats max pooling);
* ReLU-like activations, batch norm, dropout, local response normalization, identity: the same neurons
  (point-wise or per-channel operations); flatten / view / reshape: the same neurons reshaped;
* residual addition ``a + b``: each kept neuron follows the operand with the larger value there (the authors'
  ResNet rule: skip connection when its activation is at least the residual branch's).

The kept input pixels (any colour channel) are the fixations; the density map blurs them with a Gaussian (the
paper's heat maps, Fig. 1). ``rule="positive"`` keeps every positive contribution at convolutions and at the first
FC layer too (the literal "positive contribution" reading); those sets can grow to whole layers, so ``max_points``
caps every kept set at the neurons with the largest total positive contribution. Work is chunked: at most
``chunk`` kept neurons are unravelled at once.

The network is traced with ``torch.fx`` (any module whose forward pass is a fixed graph of the operations above),
every convolution kept one node (:class:`~convscope.methods.incremental.LeafTracer`), so a convolution that pads its
input itself (TensorFlow "SAME" padding computed from the input size, as in EfficientNet-Lite's ``SamePadConv2d``)
is unravelled with the zero padding it applies (:func:`~convscope.methods.incremental.conv_pads`); anything else is
a one-line :class:`~convscope.errors.ConvscopeError` naming the operation.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input
from ..core.probe import preserved_state
from ..core.targets import Target, target_scores, top_class
from ..errors import ConvscopeError
from .incremental import LeafTracer, conv_pads

RULES = ("max", "positive")

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.LocalResponseNorm,
                nn.Identity)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.dropout, F.batch_norm,
                  F.local_response_norm, torch.nn.functional.elu}
PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach"}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass
class FixationResult:
    """What :func:`cnn_fixations` found.

    Attributes:
        points: ``points[n][k]``: the fixations of image ``n`` for its ``k``-th target, a ``P x 2`` long tensor of
            (row, col) pixel positions (``P`` may be 0).
        density: ``N x K x H x W``: the fixations blurred with a Gaussian of ``sigma`` px, each map scaled to
            max 1 (all zero without fixations).
        targets: ``N x K`` class indices explained.
        sigma: the blur's standard deviation in pixels.
    """

    points: list[list[torch.Tensor]]
    density: torch.Tensor
    targets: torch.Tensor
    sigma: float

    @property
    def maps(self) -> torch.Tensor:
        """The density maps (the attribution-method interface)."""
        return self.density


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's value (the activations the unravelling reads)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(str(node.target))).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"operation {name!r} ({node.op})"


def cnn_fixations(model: nn.Module, x: torch.Tensor, target: Target = top_class, rule: str = "max",
                  max_points: int | None = 4096, sigma: float | None = None, chunk: int = 4096) -> FixationResult:
    """CNN fixations (Mopuri et al. 2017, Sec. 3) for a batch of images ``N x C x H x W``.

    Args:
        target: class indices (an int, one per image, ``N x K``, ``top_class``, ``top_k(k)``); each of the K
            targets of an image is unravelled separately.
        rule: ``"max"`` (default, the authors' rule, see the module docstring) or ``"positive"``.
        max_points: the most neurons kept per image and target at any layer (the ones with the largest total
            positive contribution); ``None``: no cap. Only steps that can grow a set apply it (FC layers, and
            every layer under ``rule="positive"``).
        sigma: the density blur in pixels (default ``min(H, W) / 16``).
        chunk: kept neurons unravelled at once through a convolution or FC layer (bounds memory).
    """
    check_input(x, "cnn_fixations")
    if x.dim() != 4:
        raise ConvscopeError(f"cnn_fixations needs images N x C x H x W, got {tuple(x.shape)}")
    if rule not in RULES:
        raise ConvscopeError(f"cnn_fixations(rule={rule!r}): use one of {', '.join(RULES)}")
    if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int)
                                   or max_points < 1):
        raise ConvscopeError(f"cnn_fixations(max_points={max_points!r}): use a positive int or None")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConvscopeError(f"cnn_fixations(chunk={chunk!r}): use a positive int")
    height, width = x.shape[-2:]
    sigma = float(min(height, width) / 16 if sigma is None else sigma)
    if not sigma >= 0:
        raise ConvscopeError(f"cnn_fixations(sigma={sigma!r}): use a blur in pixels >= 0")
    with preserved_state(model), torch.no_grad():
        try:
            gm = fx.GraphModule(model, LeafTracer().trace(model), type(model).__name__)
        except Exception as exc:  # data-dependent control flow and other untraceable forwards
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ConvscopeError(f"cnn_fixations cannot trace {type(model).__name__} with torch.fx ({first}); it "
                                 "needs a forward pass of conv / linear / pooling / ReLU / BN / flatten / add") from exc
        rec = _Recorder(gm)
        try:
            out = rec.run(x.detach())
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ConvscopeError(f"cnn_fixations: {type(model).__name__} failed on input {tuple(x.shape)} ({first}); "
                                 "pass images the model accepts") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ConvscopeError(f"cnn_fixations needs a model returning class scores N x classes, got "
                                 f"{tuple(getattr(out, 'shape', ()))}")
        _, idx = target_scores(out, target)
        if idx is None:
            raise ConvscopeError("cnn_fixations needs class indices as the target (an int, one per image, N x K, "
                                 "top_class or top_k), not a score function")
        pixels = _unravel(gm, rec.values, idx, rule, max_points, chunk)
    points = [[pixels[n, k].nonzero() for k in range(idx.shape[1])] for n in range(x.shape[0])]
    density = _blur(pixels.to(x.dtype if x.is_floating_point() else torch.float32), sigma)
    peak = density.flatten(2).amax(2)[:, :, None, None]
    density = torch.where(peak > 0, density / torch.where(peak > 0, peak, torch.ones_like(peak)), density)
    return FixationResult(points, density, idx, sigma)


def _unravel(gm: fx.GraphModule, values: dict[fx.Node, Any], idx: torch.Tensor, rule: str, max_points: int | None,
             chunk: int) -> torch.Tensor:
    """``N x K x H x W`` booleans: the input pixels kept for each image and target."""
    nodes = list(gm.graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    source = out_node.args[0]
    if not isinstance(source, fx.Node):
        raise ConvscopeError("cnn_fixations: the model's output is not a single tensor")
    num, k = idx.shape
    masks: dict[fx.Node, torch.Tensor] = {}
    first = torch.zeros(num, k, values[source].shape[1], dtype=torch.bool, device=idx.device)
    first.scatter_(2, idx[:, :, None], True)
    masks[source] = first

    def give(node: Any, m: torch.Tensor) -> None:
        if isinstance(node, fx.Node):
            masks[node] = masks[node] | m if node in masks else m

    placeholder = next(n for n in nodes if n.op == "placeholder")
    for node in reversed(nodes):
        if node not in masks or node.op == "placeholder":
            continue
        m = masks.pop(node)
        if not m.any():
            continue
        args = node.args
        inp = args[0] if args else None
        got = values.get(inp) if isinstance(inp, fx.Node) else None
        if not isinstance(got, torch.Tensor) and node.op != "call_function":
            raise ConvscopeError(f"cnn_fixations cannot unravel {_describe(node, gm)}: its input is not a tensor")
        a = got if isinstance(got, torch.Tensor) else torch.empty(0)  # add's operands are read by _add
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, PASS_MODULES):
                give(inp, m)
            elif isinstance(mod, nn.Flatten):
                give(inp, m.reshape(num, k, *a.shape[1:]))
            elif isinstance(mod, nn.Linear):
                give(inp, _linear(m, a, mod.weight, rule == "max" and _from_volume(inp, gm, values),
                                  max_points, chunk))
            elif isinstance(mod, nn.Conv2d):
                pads = conv_pads(mod, (a.shape[2], a.shape[3]))
                if pads is None:
                    raise ConvscopeError(f"cnn_fixations cannot unravel {_describe(node, gm)}: its zero padding is "
                                         "unknown (a custom forward or padding_mode); use a plain nn.Conv2d")
                give(inp, _conv(m, a, mod, pads, rule, max_points, chunk))
            elif isinstance(mod, POOL_MODULES):
                give(inp, _pool(m, a, _pool_indices(mod, a)))
            else:
                raise ConvscopeError(f"cnn_fixations cannot unravel {_describe(node, gm)}; it supports conv / linear /"
                                     " pooling / ReLU / BN / dropout / LRN / flatten / residual add")
        elif (node.op == "call_function" and node.target in PASS_FUNCTIONS) or \
                (node.op == "call_method" and node.target in PASS_METHODS):
            give(inp, m)
        elif (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target in RESHAPE_METHODS):
            give(inp, m.reshape(num, k, *a.shape[1:]))
        elif node.op == "call_function" and node.target in ADD_FUNCTIONS:
            _add(node, m, values, give)
        elif node.op == "call_function" and node.target in POOL_FUNCTIONS:
            give(inp, _pool(m, a, _pool_indices(node, a)))
        else:
            raise ConvscopeError(f"cnn_fixations cannot unravel {_describe(node, gm)}; it supports conv / linear / "
                                 "pooling / ReLU / BN / dropout / LRN / flatten / residual add")
    found = masks.get(placeholder)
    if found is None:
        return torch.zeros(num, k, *values[placeholder].shape[2:], dtype=torch.bool, device=idx.device)
    return found.any(dim=2)


def _from_volume(node: Any, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> bool:
    """Whether a linear layer's input is a flattened feature volume (through pass-through operations)."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Flatten) or \
                node.op == "call_function" and node.target is torch.flatten or \
                node.op == "call_method" and node.target in RESHAPE_METHODS:
            src = node.args[0]
            v = values.get(src) if isinstance(src, fx.Node) else None
            # a volume with spatial extent; 1 x 1 maps (after global pooling) are plain features, as the authors'
            # code squeezes them
            return isinstance(v, torch.Tensor) and v.dim() > 2 and v[0, 0].numel() > 1
        passing = (node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), PASS_MODULES)) or \
            (node.op == "call_function" and node.target in PASS_FUNCTIONS) or \
            (node.op == "call_method" and node.target in PASS_METHODS)
        if not passing:
            return False
        node = node.args[0]
    return False


def _cap(score: torch.Tensor, max_points: int | None) -> torch.Tensor:
    """Kept = positive score; at most ``max_points`` per image and target (the largest scores)."""
    keep = score > 0
    if max_points is None:
        return keep
    flat = score.flatten(2)
    if flat.shape[2] <= max_points:
        return keep
    top = flat.topk(max_points, dim=2)
    capped = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, top.indices, top.values > 0)
    return capped.reshape(score.shape)


def _linear(m: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, argmax: bool, max_points: int | None,
            chunk: int) -> torch.Tensor:
    """FC layer: ``m`` (N x K x out) -> kept inputs (N x K x in)."""
    if a.dim() != 2:
        raise ConvscopeError(f"cnn_fixations: a linear layer on input of shape {tuple(a.shape)}; it supports "
                             "N x features inputs")
    w = weight.to(a.dtype)
    num, k = m.shape[:2]
    if not argmax:
        mf = m.to(a.dtype).reshape(num * k, -1)
        pos = (mf @ w.clamp_min(0)).reshape(num, k, -1) * a[:, None].clamp_min(0)
        neg = (mf @ (-w).clamp_min(0)).reshape(num, k, -1) * (-a[:, None]).clamp_min(0)
        return _cap(pos + neg, max_points)
    new = torch.zeros(num, k, a.shape[1], dtype=torch.bool, device=a.device)
    kept = m.nonzero()
    for s in range(0, len(kept), chunk):
        n_i, k_i, j_i = kept[s:s + chunk].unbind(1)
        contrib = a[n_i] * w[j_i]
        best = contrib.argmax(1)
        ok = contrib.gather(1, best[:, None])[:, 0] > 0
        new[n_i[ok], k_i[ok], best[ok]] = True
    return new


def _conv(m: torch.Tensor, a: torch.Tensor, mod: nn.Conv2d, pads: tuple[tuple[int, int], tuple[int, int]],
          rule: str, max_points: int | None, chunk: int) -> torch.Tensor:
    """Convolution: ``m`` (N x K x C_out x h x w) -> kept inputs (N x K x C_in x H x W); ``pads``: the zero padding
    (before, after) per axis the convolution applies to its input."""
    num, k = m.shape[:2]
    c_in, hi, wi = a.shape[1:]
    w = mod.weight.to(a.dtype)
    (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
    (top, bottom), (left, right) = pads
    groups = mod.groups
    if rule == "positive":
        mf = m.to(a.dtype).reshape(num * k, *m.shape[2:])

        def back(weight: torch.Tensor) -> torch.Tensor:  # onto the padded input, then cropped to the input
            t = F.conv_transpose2d(mf, weight, stride=(sh, sw), dilation=(dh, dw), groups=groups)
            t = t[:, :, top:top + hi, left:left + wi]
            return F.pad(t, (0, wi - t.shape[3], 0, hi - t.shape[2])).reshape(num, k, c_in, hi, wi)
        score = back(w.clamp_min(0)) * a[:, None].clamp_min(0) + back((-w).clamp_min(0)) * (-a[:, None]).clamp_min(0)
        return _cap(score, max_points)
    per_in, per_out = c_in // groups, w.shape[0] // groups
    padded = F.pad(a, (left, right, top, bottom))
    new = torch.zeros(num, k, c_in, hi, wi, dtype=torch.bool, device=a.device)
    kept = m.nonzero()
    dy, dx = torch.arange(kh, device=a.device) * dh, torch.arange(kw, device=a.device) * dw
    within_group = torch.arange(per_in, device=a.device)
    for s in range(0, len(kept), chunk):
        n_i, k_i, c_i, y_i, x_i = kept[s:s + chunk].unbind(1)
        rows, cols = y_i[:, None] * sh + dy, x_i[:, None] * sw + dx            # P x kh, P x kw (padded coords)
        chans = (c_i // per_out * per_in)[:, None] + within_group              # P x C_in/groups: the group's inputs
        field = padded[n_i[:, None, None, None], chans[:, :, None, None], rows[:, None, :, None],
                       cols[:, None, None, :]]                                 # P x C_in/groups x kh x kw
        contrib = field * w[c_i]
        pick = contrib.sum(dim=(2, 3)).argmax(1)
        ch = chans.gather(1, pick[:, None])[:, 0]
        within = contrib[torch.arange(len(pick), device=a.device), pick].flatten(1)
        best = within.argmax(1)
        yy, xx = rows.gather(1, (best // kw)[:, None])[:, 0] - top, cols.gather(1, (best % kw)[:, None])[:, 0] - left
        ok = (within.gather(1, best[:, None])[:, 0] > 0) & (yy >= 0) & (yy < hi) & (xx >= 0) & (xx < wi)
        new[n_i[ok], k_i[ok], ch[ok], yy[ok], xx[ok]] = True
    return new


def _pool_indices(op: nn.Module | fx.Node, a: torch.Tensor) -> torch.Tensor:
    """Flat index (into H x W) of the largest input of each pooling window: ``N x C x h x w``."""
    params: dict[str, Any]
    if isinstance(op, fx.Node):
        adaptive = op.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
        names = ("output_size",) if adaptive else ("kernel_size", "stride", "padding", "dilation", "ceil_mode") \
            if op.target is F.max_pool2d else ("kernel_size", "stride", "padding", "ceil_mode")
        params = dict(zip(names, op.args[1:]))
        params.update({key: v for key, v in op.kwargs.items() if key in names})
    elif isinstance(op, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        adaptive, params = True, {"output_size": op.output_size}
    elif isinstance(op, nn.MaxPool2d | nn.AvgPool2d):
        adaptive = False
        params = {"kernel_size": op.kernel_size, "stride": op.stride, "padding": op.padding,
                  "dilation": getattr(op, "dilation", 1), "ceil_mode": op.ceil_mode}
    else:
        raise ConvscopeError(f"cnn_fixations cannot unravel {type(op).__name__}; it supports max / average pooling")
    if adaptive:
        return F.adaptive_max_pool2d(a, params["output_size"], return_indices=True)[1]
    kernel = params["kernel_size"]
    return F.max_pool2d(a, kernel, params.get("stride") or kernel, params.get("padding", 0), params.get("dilation", 1),
                        ceil_mode=params.get("ceil_mode", False), return_indices=True)[1]


def _pool(m: torch.Tensor, a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pooling: each kept output neuron keeps its window's largest input."""
    num, k, c = m.shape[:3]
    flat_idx = indices.flatten(2)[:, None].expand(num, k, c, -1)
    hits = torch.zeros(num, k, c, a.shape[2] * a.shape[3], dtype=torch.int32, device=a.device)
    hits.scatter_add_(3, flat_idx, m.flatten(3).to(torch.int32))
    return (hits > 0).reshape(num, k, *a.shape[1:])


def _add(node: fx.Node, m: torch.Tensor, values: dict[fx.Node, Any], give: Any) -> None:
    """Residual addition: each kept neuron follows the operand with the larger value (ties: the first)."""
    ops = [o for o in node.args[:2] if isinstance(o, fx.Node) and isinstance(values.get(o), torch.Tensor)]
    if len(ops) == 1:
        give(ops[0], m)
        return
    a, b = values[ops[0]], values[ops[1]]
    if a.shape != b.shape:
        raise ConvscopeError(f"cnn_fixations: an addition of shapes {tuple(a.shape)} and {tuple(b.shape)}; it "
                             "supports residual additions of equal shapes")
    first = (a >= b)[:, None]
    give(ops[0], m & first)
    give(ops[1], m & ~first)


def _blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``N x K x H x W`` maps (zero outside the image)."""
    if sigma == 0:
        return pixels
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    num, k, h, w = pixels.shape
    flat = pixels.reshape(num * k, 1, h, w)
    flat = F.conv2d(flat, g.reshape(1, 1, -1, 1), padding=(radius, 0))
    flat = F.conv2d(flat, g.reshape(1, 1, 1, -1), padding=(0, radius))
    return flat.reshape(num, k, h, w)


__all__ = ["FixationResult", "RULES", "cnn_fixations"]
