"""DeconvNet projection of units back to pixel space (Zeiler & Fergus 2014, Sec. 2.1, Fig. 1).

A forward pass records the max-pooling *switches* (where each pooled maximum came from). To see what one unit of
a layer responds to, every other unit of that layer is set to zero -- all other feature maps, and in ``mode="max"``
also every position of the chosen map but its strongest one -- and the remaining signal ``R`` is sent down through
the layers below, each inverted approximately:

* **unpooling**: ``R`` is placed at the switch positions, zeros elsewhere. Where overlapping pooling windows (e.g.
  3x3, stride 2) pick the same input position, their values **add up** there: the transpose of max pooling, the
  gradient's convention, so the explicit and autograd paths agree. Zeiler & Fergus do not say which they used; the
  alternative, ``F.max_unpool2d``, writes each window's value to its switch and keeps only one of the colliding
  values (which one is unspecified), so it drops signal wherever windows share a maximum;
* **rectification**: ``R <- max(R, 0)`` at every ReLU / ReLU6, whatever the forward pass did;
* **filtering**: the transposed filters of the same convolution, ``conv_transpose2d`` with the same weights,
  stride, padding, dilation and groups, no bias; a linear layer by its transposed weight ``R <- R W``;
* **local response normalization** is passed through unchanged: Zeiler & Fergus do not invert it (their
  Sec. 2.1 inverts only pooling, rectification and filtering);
* ``Flatten``, ``Dropout`` (eval), ``Identity`` and an ``AdaptiveAvgPool2d`` that keeps the size are reshapes.

``path="explicit"`` builds this chain from the named leaf modules in forward order (``nn.Conv2d``, ``nn.ReLU``,
``nn.ReLU6``, ``nn.MaxPool2d``, ``nn.LocalResponseNorm``, ``nn.Linear``, ``nn.Flatten``, ``nn.Dropout``,
``nn.Identity``, identity-size ``nn.AdaptiveAvgPool2d``; ``demo_net`` is made of these) and checks that it
reproduces the layer's output. Every other network (batch norm, "same"-padded or depthwise convolutions, residual
additions, average pooling: ``efficientnet_lite0``) takes ``path="autograd"``: the gradient of the masked activation
w.r.t. the input under the DeconvNet ReLU rule (``probe(..., relu_rule="deconvnet")``), which is the same chain
wherever both apply, and extends it by each operation's transpose:

* convolution and linear layers: the gradient *is* the transposed weight; max pooling: the gradient routes to the
  switches (the unpooling above);
* batch norm in eval mode is a per-channel affine map ``y = a x + b``; its transpose scales ``R`` by ``a``;
* average pooling spreads ``R`` evenly over each window; a residual addition sends ``R`` to both branches;
* local response normalization: passed through unchanged here as well (its gradient is replaced by the identity,
  by intercepting ``F.local_response_norm``), so both paths give the same projection on ``demo_net``.

``path="auto"`` (default) takes the explicit path when the network allows it, else autograd.

Batched over units: the N images are expanded to ``N x U`` rows (image-major), ``batch_size`` rows per backward
pass; :func:`deconvnet_rows` takes any rows ``(image, unit)`` instead (an image may come back in many rows, as in
the top-k pictures). Each image's forward pass is run once for all its rows: the explicit path runs one forward
pass per group of images (about ``batch_size`` rows) and reuses its switches for all their rows; the autograd path
runs one forward pass of an image with several rows and sends its rows down in one batched backward pass per
``batch_size`` rows (``torch.autograd.grad(..., is_grads_batched=True)``: the saved forward tensors are shared by
the rows), and one forward and backward pass per chunk of ``batch_size`` images that have a single row each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input
from ..core.layers import resolve_layer
from ..core.probe import Probe, preserved_state, probe
from ..core.rules import DECONVNET, LRN_PASS_THROUGH
from ..errors import ConvscopeError, TargetError

Units = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
Mode = Literal["max", "map"]
Path = Literal["auto", "explicit", "autograd"]

_RESHAPES = (nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.AdaptiveAvgPool2d)
_KINDS: dict[type, str] = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.ReLU6: "relu", nn.MaxPool2d: "pool",
                           nn.LocalResponseNorm: "lrn", nn.Linear: "linear", **{t: "reshape" for t in _RESHAPES}}


# --------------------------------------------------------------------------- the explicit chain


@dataclass(frozen=True)
class Step:
    """One module of a sequential chain: its name, the module, what it does, its input shape (without batch)."""

    name: str
    module: nn.Module
    kind: str  # conv | relu | pool | lrn | linear | reshape
    in_shape: tuple[int, ...]


@dataclass(frozen=True)
class Chain:
    """The leaf modules that compute ``layer`` from the input one after the other (forward order)."""

    layer: str
    steps: list[Step]


def trace_calls(model: nn.Module, x: torch.Tensor, names: Sequence[str], stop_after: str | None = None,
                ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, int], dict[str, torch.Tensor]]:
    """One forward pass (no gradients) recording, in call order, the tensor output of every named module.

    Returns ``(calls, call counts per name, the probe's activations)``; stops after ``stop_after``.
    """
    calls: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def record(out: torch.Tensor) -> torch.Tensor:
            calls.append((name, out))
            return out
        return record

    with torch.no_grad(), probe(model, list(names), edit={n: recorder(n) for n in names}, stop_after=stop_after,
                                detach=True, keep_all_calls=True) as p:
        p.forward(model, x)
        counts = {n: len(p.outputs(n)) for n in p.names}
        acts = p.activations
    return calls, counts, acts


def build_chain(model: nn.Module, x: torch.Tensor, layer: str) -> Chain | str:
    """The explicit DeconvNet chain from the input to ``layer``, or a sentence saying why there is none.

    ``x`` is one sample input (``1 x C x H x W``). The chain is checked by running it and comparing every step's
    output with the model's own.
    """
    layer = resolve_layer(model, layer)[0]
    leaves = {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    calls, counts, acts = trace_calls(model, x, list(dict.fromkeys([*leaves, layer])), stop_after=layer)
    if layer not in acts:
        raise ConvscopeError(f"layer {layer!r} never ran in the forward pass; pick a layer that computes the output "
                             "(`convscope layers MODEL` lists them)")
    steps: list[Step] = []
    shape = tuple(x.shape[1:])
    for name, out in calls:
        if name not in leaves:
            continue
        mod = leaves[name]
        if counts[name] != 1:
            return f"{name} runs {counts[name]} times"
        reason = _unsupported(mod, shape, tuple(out.shape[1:]))
        if reason:
            return f"{name} ({type(mod).__name__}) {reason}"
        steps.append(Step(name, mod, _KINDS[type(mod)], shape))
        shape = tuple(out.shape[1:])
    silent = [n for n, c in counts.items() if c and n in leaves and n not in {s.name for s in steps}]
    if silent:
        return f"{silent[0]} does not return a tensor"
    if not steps:
        return "no module computes it"
    chain = Chain(layer, steps)
    # replay: every step must reproduce the model's own output (no functional ops, branches or reused inputs)
    h = x
    outs = [out for name, out in calls if name in leaves]
    with torch.no_grad(), preserved_state(model):
        for step, out in zip(steps, outs):
            try:
                h = _step_forward(step, h)[0]
            except RuntimeError:
                return f"{step.name}'s input is not the previous module's output"
            if not _same(h, out):
                return f"{step.name}'s input is not the previous module's output"
    if not _same(h, acts[layer]):
        return f"the chain of leaf modules does not reproduce the output of {layer!r}"
    return chain


def _same(a: torch.Tensor, b: object) -> bool:
    """``a`` equals ``b`` up to float rounding (relative to ``b``'s largest magnitude)."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    return bool((a - b).abs().max() <= 1e-5 * (1 + float(b.abs().max()))) if b.numel() else True


def _unsupported(mod: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """Why ``mod`` has no explicit DeconvNet inverse ('' when it has one)."""
    kind = _KINDS.get(type(mod))  # exact types: a subclass may compute something else (e.g. its own padding)
    if kind is None:
        return "has no explicit DeconvNet inverse"
    if kind == "conv" and (isinstance(mod.padding, str) or mod.padding_mode != "zeros"):
        return "uses string or non-zero padding"
    if kind == "pool" and mod.return_indices:
        return "returns indices"
    if isinstance(mod, nn.AdaptiveAvgPool2d) and in_shape != out_shape:
        return "changes the size (average pooling)"
    return ""


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _step_forward(step: Step, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the forward pass: ``(output, switches or None)``."""
    m = step.module
    if isinstance(m, nn.MaxPool2d):  # kind "pool" (kinds go by exact type)
        return F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    if step.kind == "linear":
        return m(h.flatten(1)), None  # a torch.flatten between modules is allowed
    if step.kind == "reshape" and not isinstance(m, nn.Flatten):
        return h, None  # dropout in eval, identity, identity-size adaptive average pooling
    return m(h), None


def chain_forward(chain: Chain, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The layer's output and the max-pooling switches ``{step index: indices}`` (no gradients)."""
    switches: dict[int, torch.Tensor] = {}
    h = x
    with torch.no_grad():
        for i, step in enumerate(chain.steps):
            h, idx = _step_forward(step, h)
            if idx is not None:
                switches[i] = idx
    return h, switches


def chain_down(chain: Chain, signal: torch.Tensor, switches: dict[int, torch.Tensor],
               rows: torch.Tensor) -> torch.Tensor:
    """Send ``signal`` (one row per projection) down the chain to the input; row ``r`` uses the switches of image
    ``rows[r]`` of the forward pass."""
    r = signal
    with torch.no_grad():
        for i in range(len(chain.steps) - 1, -1, -1):
            step = chain.steps[i]
            m = step.module
            if isinstance(m, nn.Conv2d):  # kind "conv"
                padding = m.padding
                assert not isinstance(padding, str), "a chain has no string padding (_unsupported refuses it)"
                out_pad = []
                for d, (size, s, p, dil, k) in enumerate(zip(step.in_shape[1:], _pair(m.stride), _pair(padding),
                                                             _pair(m.dilation), _pair(m.kernel_size))):
                    out_pad.append(size - ((r.shape[2 + d] - 1) * s - 2 * p + dil * (k - 1) + 1))
                r = F.conv_transpose2d(r, m.weight, None, m.stride, padding, tuple(out_pad), m.groups, m.dilation)
            elif step.kind == "relu":
                r = DECONVNET.backward(r, None)  # rectification of the backward signal
            elif step.kind == "pool":
                idx = switches[i][rows].flatten(2)
                c, h, w = step.in_shape
                r = torch.zeros(len(r), c, h * w, dtype=r.dtype, device=r.device).scatter_add_(2, idx, r.flatten(2))
            elif isinstance(m, nn.Linear):  # kind "linear"
                r = r @ m.weight
            # lrn: passed through unchanged (not inverted, as in Zeiler & Fergus); reshapes: only the shape
            r = r.reshape(len(r), *step.in_shape)
    return r


# --------------------------------------------------------------------------- unit selection


def spatial_max(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, flat index)`` of the strongest position of every feature map: ``N x C`` each (0 for ``N x C``)."""
    flat = act.flatten(2) if act.dim() > 2 else act[:, :, None]
    return flat.max(dim=2)


def unit_signal(act: torch.Tensor, units: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The layer's output with everything but unit ``units[r]`` of row ``r`` set to zero (``mode="max"``: all but
    its strongest position)."""
    rows = torch.arange(len(act), device=act.device)
    chosen = act[rows, units]  # R x (spatial)
    if mode == "max" and chosen.dim() > 1:
        flat = chosen.flatten(1)
        _, idx = flat.max(dim=1, keepdim=True)  # the same position as spatial_max
        chosen = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx)).view_as(chosen)
    signal = torch.zeros_like(act)
    signal[rows, units] = chosen
    return signal


def _unit_table(units: Units, n: int, device: torch.device) -> torch.Tensor:
    """``N x U`` long tensor of unit indices (a list of ints is the same units for every image)."""
    if isinstance(units, bool):
        raise TargetError("deconvnet(units=...): give unit indices (ints), not a bool")
    t = torch.as_tensor(units, device=device) if not isinstance(units, torch.Tensor) else units.to(device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TargetError("deconvnet(units=...): unit indices must be integers")
    t = t.long()
    if t.dim() <= 1:
        t = t.reshape(1, -1).expand(n, -1)
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] == 0:
        raise TargetError(f"deconvnet(units=...) of shape {tuple(t.shape)} does not fit {n} images; give an int, a "
                          f"list of units for every image, or an {n} x U table")
    return t


def _check_units(table: torch.Tensor, act: torch.Tensor, layer: str) -> None:
    if act.dim() not in (2, 4):
        raise ConvscopeError(f"layer {layer!r} outputs shape {tuple(act.shape)}; DeconvNet projects units of a "
                             "convolutional (N x C x H x W) or linear (N x C) layer")
    c = act.shape[1]
    if table.min() < 0 or table.max() >= c:
        bad = int(table.max() if table.max() >= c else table.min())
        raise TargetError(f"unit {bad} is out of range: layer {layer!r} has {c} units (valid 0..{c - 1})")


# --------------------------------------------------------------------------- the public function


def _prepare(model: nn.Module, x: torch.Tensor, layer: str, units: Units, mode: Mode, batch_size: int,
             name: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Checked arguments of a projection of units to the input: ``(layer name, detached x, N x U unit table)``."""
    check_input(x, name)
    if x.dim() != 4:
        raise ConvscopeError(f"{name} expects images N x C x H x W, got {tuple(x.shape)}")
    if mode not in ("max", "map"):
        raise ConvscopeError(f"{name}(mode={mode!r}): use 'max' (strongest activation) or 'map' (feature map)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"{name}(batch_size={batch_size!r}): use a positive int")
    x = x.detach()
    return resolve_layer(model, layer)[0], x, _unit_table(units, len(x), x.device)


def unit_backprop(model: nn.Module, x: torch.Tensor, layer: str, units: Units, rule: str = "guided",
                  mode: Mode = "max", batch_size: int = 32) -> torch.Tensor:
    """Units of ``layer`` back-propagated to the input through autograd with every ReLU under ``rule``:
    ``"guided"`` (guided backpropagation, Springenberg et al. 2015, from a unit instead of a class score, as in
    Yosinski et al.'s toolbox), ``"deconvnet"`` (the DeconvNet rule) or ``"gradient"`` (plain ``d a / d x``).

    ``units`` / ``mode`` / ``batch_size`` as in :func:`deconvnet`. Returns ``N x U x C x H x W``, signed.
    """
    rules = {"guided": "guided", "deconvnet": "deconvnet", "gradient": None}
    if rule not in rules:
        raise ConvscopeError(f"unit_backprop(rule={rule!r}): use one of {', '.join(rules)}")
    layer, x, table = _prepare(model, x, layer, units, mode, batch_size, "unit_backprop")
    out = torch.empty(*table.shape, *x.shape[1:], dtype=x.dtype, device=x.device)
    rows_img = torch.arange(len(x), device=x.device).repeat_interleave(table.shape[1])
    _autograd(model, layer, x, rows_img, table.reshape(-1), mode, batch_size, out.view(-1, *x.shape[1:]),
              rules[rule])
    return out


def deconvnet_rows(model: nn.Module, x: torch.Tensor, layer: str, images: torch.Tensor | Sequence[int],
                   units: torch.Tensor | Sequence[int], mode: Mode = "max", path: Path = "auto",
                   batch_size: int = 32) -> torch.Tensor:
    """DeconvNet projections (Zeiler & Fergus 2014, Sec. 2.1) of rows ``r`` = unit ``units[r]`` of image
    ``images[r]`` of ``x``: ``R x C x H x W``. Each image's forward pass is shared by all its rows (the top-k
    pictures project many units of few images). ``mode`` / ``path`` / ``batch_size`` as in :func:`deconvnet`."""
    rows_img = torch.as_tensor(images).reshape(-1)
    rows_unit = torch.as_tensor(units).reshape(-1)
    if rows_img.is_floating_point() or rows_unit.is_floating_point() or rows_img.shape != rows_unit.shape:
        raise TargetError("deconvnet_rows(images=..., units=...): give two integer sequences of the same length")
    if len(rows_img) and (int(rows_img.min()) < 0 or int(rows_img.max()) >= len(x)):
        raise TargetError(f"deconvnet_rows(images=...): image indices must be in 0..{len(x) - 1}")
    if not len(rows_unit):
        raise TargetError("deconvnet_rows(units=...): give at least one row")
    layer, x, table = _prepare(model, x, layer, rows_unit, mode, batch_size, "deconvnet")  # N x R, the same rows
    out = torch.empty(len(rows_unit), *x.shape[1:], dtype=x.dtype, device=x.device)
    _project(model, layer, x, rows_img.long().to(x.device), table[0], mode, path, batch_size, out)
    return out


def _project(model: nn.Module, layer: str, x: torch.Tensor, rows_img: torch.Tensor, rows_unit: torch.Tensor,
             mode: Mode, path: Path, batch_size: int, out: torch.Tensor) -> None:
    """Rows ``(rows_img[r], rows_unit[r])`` projected into ``out[r]`` by the explicit chain or autograd."""
    chain: Chain | str = "path='autograd' was asked for"
    if path != "autograd":
        chain = build_chain(model, x[:1], layer)
        if isinstance(chain, str) and path == "explicit":
            raise ConvscopeError(f"deconvnet(path='explicit'): {layer!r} cannot be reached through the classic "
                                 f"DeconvNet layers: {chain}. Use path='autograd' (or 'auto')")
    if isinstance(chain, Chain):
        _explicit(model, chain, x, rows_img, rows_unit, mode, batch_size, out)
    else:
        _autograd(model, layer, x, rows_img, rows_unit, mode, batch_size, out)


def deconvnet(model: nn.Module, x: torch.Tensor, layer: str, units: Units, mode: Mode = "max", path: Path = "auto",
              batch_size: int = 32) -> torch.Tensor:
    """DeconvNet projections (Zeiler & Fergus 2014, Sec. 2.1) of units of ``layer`` down to the input.

    Args:
        x: images ``N x C x H x W`` in the model's input space.
        layer: a layer name from ``model.named_modules()``.
        units: an int, a list of U units (the same for every image), or an ``N x U`` table.
        mode: ``"max"`` projects only each unit's strongest activation in the image (their Fig. 2); ``"map"``
            its whole feature map.
        path: ``"explicit"`` (switches, rectification, transposed filters), ``"autograd"`` (the DeconvNet
            backward rule through autograd, any architecture) or ``"auto"`` (explicit where possible).
        batch_size: projections (image-unit pairs) per backward pass.

    Returns:
        ``N x U x C x H x W``, signed, in the input's units (show with ``to_display(..., "signed")``).
    """
    if path not in ("auto", "explicit", "autograd"):
        raise ConvscopeError(f"deconvnet(path={path!r}): use 'auto', 'explicit' or 'autograd'")
    layer, x, table = _prepare(model, x, layer, units, mode, batch_size, "deconvnet")
    out = torch.empty(*table.shape, *x.shape[1:], dtype=x.dtype, device=x.device)
    rows_img = torch.arange(len(x), device=x.device).repeat_interleave(table.shape[1])
    _project(model, layer, x, rows_img, table.reshape(-1), mode, path, batch_size, out.view(-1, *x.shape[1:]))
    return out


def _by_image(rows_img: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The rows of each image, ``[(image, row indices)]``, images in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r, i in enumerate(rows_img.tolist()):
        groups.setdefault(i, []).append(r)
    return [(i, torch.tensor(rows, device=rows_img.device)) for i, rows in groups.items()]


def _explicit(model: nn.Module, chain: Chain, x: torch.Tensor, rows_img: torch.Tensor, rows_unit: torch.Tensor,
              mode: Mode, batch_size: int, out: torch.Tensor) -> None:
    groups = _by_image(rows_img)
    most = max(len(r) for _, r in groups)
    per = max(1, batch_size // most)  # images per forward pass; their switches serve all their rows
    with preserved_state(model):
        for g0 in range(0, len(groups), per):
            part = groups[g0:g0 + per]
            act, switches = chain_forward(chain, x[[i for i, _ in part]])
            if g0 == 0:
                _check_units(rows_unit[:, None], act, chain.layer)
            rows = torch.cat([r for _, r in part])
            local = torch.cat([torch.full((len(r),), j, device=x.device) for j, (_, r) in enumerate(part)])
            for r0 in range(0, len(rows), batch_size):
                ri, rr = local[r0:r0 + batch_size], rows[r0:r0 + batch_size]
                out[rr] = chain_down(chain, unit_signal(act[ri], rows_unit[rr], mode), switches, ri)


def _autograd(model: nn.Module, layer: str, x: torch.Tensor, rows_img: torch.Tensor, rows_unit: torch.Tensor,
              mode: Mode, batch_size: int, out: torch.Tensor, rule: str | None = "deconvnet") -> None:
    """Images with several rows: one forward pass each, their rows sent down together (``is_grads_batched``,
    ``batch_size`` rows per backward pass); images with one row: forward and backward ``batch_size`` at a time."""
    groups = _by_image(rows_img)
    shared = [(i, r) for i, r in groups if len(r) > 1]
    single = torch.cat([r for _, r in groups if len(r) == 1] or [rows_img[:0]])
    rules = [LRN_PASS_THROUGH] if rule == "deconvnet" else []
    checked = [False]

    def layer_output(p: Probe, xx: torch.Tensor) -> torch.Tensor:
        p.forward(model, xx)
        act = p.activations.get(layer)
        if not isinstance(act, torch.Tensor):
            raise ConvscopeError(f"layer {layer!r} did not output a tensor in the forward pass; pick a layer "
                                 "that computes the output (`convscope layers MODEL` lists them)")
        if not checked[0]:
            _check_units(rows_unit[:, None], act, layer)
            checked[0] = True
        return act

    with torch.enable_grad(), probe(model, layer, relu_rule=rule, rules=rules, stop_after=layer) as p:
        for r0 in range(0, len(single), batch_size):
            rr = single[r0:r0 + batch_size]
            xx = x[rows_img[rr]].clone().requires_grad_(True)
            act = layer_output(p, xx)
            (g,) = torch.autograd.grad(act, xx, grad_outputs=unit_signal(act.detach(), rows_unit[rr], mode),
                                       allow_unused=True)
            p.clear()
            out[rr] = torch.zeros_like(xx) if g is None else g
        for i, rows in shared:
            xx = x[i:i + 1].clone().requires_grad_(True)
            act = layer_output(p, xx)
            for r0 in range(0, len(rows), batch_size):
                rr = rows[r0:r0 + batch_size]
                signal = unit_signal(act.detach().expand(len(rr), *act.shape[1:]), rows_unit[rr], mode)
                (g,) = torch.autograd.grad(act, xx, grad_outputs=signal[:, None], allow_unused=True,
                                           retain_graph=r0 + batch_size < len(rows), is_grads_batched=True)
                out[rr] = 0 if g is None else g[:, 0]
            p.clear()


__all__ = ["Chain", "Step", "build_chain", "chain_down", "chain_forward", "deconvnet", "deconvnet_rows", "spatial_max",
           "trace_calls", "unit_backprop", "unit_signal"]
