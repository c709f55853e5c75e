"""VisualBackProp (Bojarski et al. 2016, "VisualBackProp: efficient visualization of CNNs", Sec. 2, Fig. 2).

The feature maps after each ReLU are averaged over channels, one map per layer. Starting from the deepest, the
averaged map is scaled up to the size of the next shallower one by a deconvolution (transposed convolution) whose
weights are all 1 and bias 0, with the kernel size and stride of the step between the two layers, then multiplied
point-wise with the shallower averaged map; this repeats down to the input resolution, and the mask is normalized
to [0, 1]. Class-agnostic: one forward pass, no gradient.

The step between two chosen layers is read from one traced forward pass: the ``Conv2d`` / ``MaxPool2d`` /
``AvgPool2d`` modules run between them whose sizes chain from the shallower map to the deeper one are composed
into one kernel, stride and padding per axis (``K = k1 + sum_j (k_j - 1) prod_{i<j} s_i``, ``S = prod s_i``,
``P = p1 + sum_j p_j prod_{i<j} s_i``; a dilated kernel counts with its extent ``d (k - 1) + 1``), which for a
single convolution is the paper's deconvolution exactly. The deconvolution of ones is the transpose of that
window sum (each input position sums the deeper values whose windows cover it, padding cropped). Where no such
chain is found (functional pooling, other resampling modules) but the sizes differ by an integer factor ``r``, the
deconvolution uses kernel = stride = ``r``; only where the size ratio is not an integer is the map resized
bilinearly instead. :func:`visual_backprop_steps` reports the step taken between every pair of layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input
from ..core.layers import named_layers, resolve_layers
from ..core.probe import probe
from ..core.targets import Target, top_class
from ..errors import ConvscopeError

RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
             nn.Hardswish, nn.RReLU)
"""Module types whose outputs are VisualBackProp's default feature maps."""

GEOMETRIC = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
"""Module types whose kernel, stride and padding define the deconvolution between two layers."""


@dataclass(frozen=True)
class UpscaleStep:
    """How one averaged map is brought to the next shallower size: a deconvolution of ones (``kernel``,
    ``stride``, ``padding`` per axis, ``modules`` it was composed from, empty for the integer-ratio fallback) or,
    where ``bilinear`` is True, a bilinear resize."""

    source: str
    dest: str
    size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    modules: tuple[str, ...]
    bilinear: bool = False


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def module_geometry(mod: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool]:
    """``(kernel extent, stride, padding, dilation, ceil_mode)`` per axis of a conv / pooling module."""
    if not isinstance(mod, GEOMETRIC):
        raise ConvscopeError(f"module_geometry: {type(mod).__name__} is not a Conv2d, MaxPool2d or AvgPool2d; "
                             "pass one of those")
    k = _pair(mod.kernel_size)
    s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    d = _pair(getattr(mod, "dilation", 1))
    extent = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    if isinstance(mod.padding, str):  # "valid": none; "same": PyTorch pads (extent - 1) // 2 before
        p = (0, 0) if mod.padding == "valid" else ((extent[0] - 1) // 2, (extent[1] - 1) // 2)
    else:
        p = _pair(mod.padding)
    return extent, s, p, d, bool(getattr(mod, "ceil_mode", False))


def _out_size(size: int, extent: int, stride: int, pad: int, ceil: bool, same: bool) -> int:
    if same:
        return size
    num = size + 2 * pad - extent
    out = (-(-num // stride) if ceil else num // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:  # PyTorch: the last window must start inside the input
        out -= 1
    return out


def compose(geoms: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """One axis: ``(extent, stride, padding)`` of a chain of windows, shallow to deep, as one window."""
    k, s, p = geoms[0]
    for e, st, pd in geoms[1:]:
        k, p, s = k + (e - 1) * s, p + pd * s, s * st
    return k, s, p


def deconv_ones(m: torch.Tensor, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
    """Transposed convolution of ``m`` (``N x h x w``) with a kernel of ones, cropped to ``size``: each output
    position sums the values of ``m`` whose windows (``kernel``, ``stride``, ``padding``) cover it."""
    ones = torch.ones(1, 1, *kernel, dtype=m.dtype, device=m.device)
    full = F.conv_transpose2d(m[:, None], ones, stride=stride)[:, 0]
    full = full[:, padding[0]:padding[0] + size[0], padding[1]:padding[1] + size[1]]
    short = (size[0] - full.shape[1], size[1] - full.shape[2])
    if short[0] > 0 or short[1] > 0:  # input rows / columns no window reached (floor in the forward size)
        full = F.pad(full, (0, max(short[1], 0), 0, max(short[0], 0)))
    return full


def visual_backprop_steps(model: nn.Module, x: torch.Tensor, layers: str | Sequence[str] | None = None
                          ) -> tuple[dict[str, torch.Tensor], list[UpscaleStep]]:
    """The averaged feature maps (``{layer: N x h x w}``, execution order) and the upscaling steps, deepest first,
    that :func:`visual_backprop` uses; one forward pass."""
    check_input(x, "visual_backprop")
    if x.dim() != 4:
        raise ConvscopeError(f"visual_backprop needs images N x C x H x W, got {tuple(x.shape)}")
    all_layers = named_layers(model)
    leaves = {n: m for n, m in all_layers.items() if not any(True for _ in m.children())}
    chosen: list[str] | None = None
    if layers is not None:
        chosen = list(resolve_layers(model, layers))
        if not chosen:
            raise ConvscopeError("visual_backprop(layers=[]): name at least one layer, or pass layers=None")
    hooked = list(dict.fromkeys([*leaves, *(chosen or [])]))
    candidates = set(chosen) if chosen is not None else {n for n, m in leaves.items()
                                                         if isinstance(m, RELU_LIKE + (nn.Conv2d,))}

    def reduce(name: str, out: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor | None]:
        if out.dim() != 4:
            return (), None
        # the spatial size, and for a candidate the paper's average over its feature maps
        return tuple(out.shape[-2:]), (out.mean(dim=1) if name in candidates else None)

    try:
        with torch.no_grad(), probe(model, hooked, detach=True, reduce=reduce) as p:
            model(x)
    except RuntimeError as exc:  # shape errors: one line naming the input (the probe restored the model)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConvscopeError(f"visual_backprop: {type(model).__name__} failed on input {tuple(x.shape)} ({first}); "
                             "pass images the model accepts") from exc
    order = {name: i for i, name in enumerate(p.called)}  # the last call of each module
    recorded: Mapping[str, object] = p.activations  # the reduce's (size, map) pairs
    sizes_of = {n: r[0] for n, r in recorded.items() if isinstance(r, tuple) and r[0]}
    maps = {n: r[1] for n, r in recorded.items() if isinstance(r, tuple) and r[1] is not None}
    if chosen is not None:
        bad = [n for n in chosen if n not in maps]
        if bad:
            raise ConvscopeError(f"visual_backprop: layer {bad[0]!r} did not output N x C x H x W feature maps "
                                 "(or never ran); choose convolutional layers or ReLUs after them")
    else:
        relu = {n: a for n, a in maps.items() if isinstance(leaves[n], RELU_LIKE)}
        maps = relu or maps  # ReLU outputs as in the paper; conv outputs where the ReLUs are functional
    if not maps:
        raise ConvscopeError(f"visual_backprop found no ReLU or Conv2d layer with N x C x H x W output in "
                             f"{type(model).__name__}; pass layers=[...] naming its feature layers")
    names = sorted(maps, key=order.__getitem__)
    maps = {n: maps[n] for n in names}
    sizes = [(x.shape[-2], x.shape[-1])] + [(maps[n].shape[-2], maps[n].shape[-1]) for n in names]
    positions = [-1] + [order[n] for n in names]
    labels = ["input", *names]
    steps = []
    for i in range(len(names), 0, -1):
        shallow, deep = sizes[i - 1], sizes[i]
        if deep[0] > shallow[0] or deep[1] > shallow[1]:
            raise ConvscopeError(f"visual_backprop: layer {labels[i]!r} ({deep[0]}x{deep[1]}) is larger than the "
                                 f"shallower {labels[i - 1]!r} ({shallow[0]}x{shallow[1]}); it needs maps that "
                                 "shrink with depth, pass layers=[...] of an encoder")
        between = [n for n in p.called[positions[i - 1] + 1:positions[i] + 1]
                   if n in leaves and isinstance(leaves[n], GEOMETRIC) and n in sizes_of]
        steps.append(_step(labels[i], labels[i - 1], shallow, deep, between, leaves, sizes_of))
    return maps, steps


def _step(source: str, dest: str, shallow: tuple[int, int], deep: tuple[int, int], between: list[str],
          leaves: dict[str, nn.Module], sizes: dict[str, tuple[int, ...]]) -> UpscaleStep:
    cur, used, geoms = shallow, [], []
    for n in between:
        mod = leaves[n]
        extent, s, pad, _, ceil = module_geometry(mod)
        same = isinstance(mod, nn.Conv2d) and mod.padding == "same"
        out = [_out_size(cur[a], extent[a], s[a], pad[a], ceil, same) for a in range(2)]
        nxt = (out[0], out[1])
        if nxt == sizes[n]:
            used.append(n)
            geoms.append((extent, s, pad))
            cur = nxt
    if used and cur == deep:
        axes = [compose([(g[0][a], g[1][a], g[2][a]) for g in geoms]) for a in range(2)]
        return UpscaleStep(source, dest, shallow, (axes[0][0], axes[1][0]), (axes[0][1], axes[1][1]),
                           (axes[0][2], axes[1][2]), tuple(used))
    if shallow[0] % deep[0] == 0 and shallow[1] % deep[1] == 0:
        r = (shallow[0] // deep[0], shallow[1] // deep[1])
        return UpscaleStep(source, dest, shallow, r, r, (0, 0), ())
    return UpscaleStep(source, dest, shallow, (0, 0), (0, 0), (0, 0), (), bilinear=True)


def visual_backprop(model: nn.Module, x: torch.Tensor, target: Target = top_class,
                    layers: str | Sequence[str] | None = None) -> torch.Tensor:
    """VisualBackProp masks (Bojarski et al. 2016, Fig. 2): ``N x 1 x H x W``, each image normalized to [0, 1].

    Args:
        target: unused; the method is class-agnostic (kept for the common ``fn(model, x, target)`` signature).
        layers: the feature layers (names, or a comma-separated string); default: the output of every ReLU-like
            module with ``N x C x H x W`` output, in execution order (the Conv2d outputs where the ReLUs are
            functional). Their maps must shrink (or keep their size) with depth.

    An image whose mask is constant (for example all zero: a dead deepest layer) gets an all-zero mask.
    """
    maps, steps = visual_backprop_steps(model, x, layers)
    names = list(maps)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = maps[names[-1]].to(dtype)
    for step in steps:
        if step.bilinear:
            m = F.interpolate(m[:, None], size=step.size, mode="bilinear", align_corners=False)[:, 0]
        else:
            m = deconv_ones(m, step.size, step.kernel, step.stride, step.padding)
        if step.dest != "input":
            m = m * maps[step.dest].to(dtype)
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.reshape(m.shape[0], 1, *m.shape[1:]).to(x.dtype)


__all__ = ["GEOMETRIC", "RELU_LIKE", "UpscaleStep", "compose", "deconv_ones", "module_geometry", "visual_backprop",
           "visual_backprop_steps"]
