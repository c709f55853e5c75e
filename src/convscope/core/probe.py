"""One probe for every method: capture or edit activations and gradients of named layers.

``probe(model, layers)`` is a context manager. Inside it:

* a forward hook on each named layer records the layer's output (``p.activations[name]``), optionally
  replaces it (``edit={name: fn}``), optionally rewrites the gradient flowing back into it
  (``grad_edit={name: fn}``), and can stop the forward pass early (``stop_after=name``);
* the model is in eval mode, its parameters have ``requires_grad=False`` (autograd then skips the weight
  gradients: the cheapest backward, and the user's ``.grad`` buffers are never written), and in-place
  activations (``nn.ReLU(inplace=True)`` and friends) run out of place, so captured values stay the layer's
  true output;
* optionally every ReLU / ReLU6 call (module or functional) uses a modified backward rule
  (``relu_rule="guided"`` for guided backpropagation, Springenberg et al. 2015; ``"deconvnet"`` for the
  DeconvNet rectification, Zeiler & Fergus 2014).

On exit, always (also when the body raises): hooks are removed, every module's train/eval flag, every
parameter's ``requires_grad`` and every ``inplace`` attribute are restored. Parameters are never modified.

Gradients at a layer are taken with ``torch.autograd.grad`` on the captured output (never
``register_full_backward_hook``, which breaks on in-place ReLUs; never ``.backward()`` into parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .layers import resolve_layers

EditFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook to end the forward pass after the last layer of interest."""


class Probe:
    """Handle yielded by :func:`probe`: the captured activations and helpers to take gradients."""

    def __init__(self, names: Sequence[str], keep_all_calls: bool) -> None:
        self.names = list(names)
        self._calls: dict[str, list[Any]] = {n: [] for n in self.names}
        self._keep_all = keep_all_calls
        self.stop_after: str | None = None
        self.called: list[str] = []  # layer names in the order their outputs arrived (since the last clear)

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        """Output of each layer (the last call when a module ran several times)."""
        return {n: c[-1] for n, c in self._calls.items() if c}

    def outputs(self, name: str) -> list[Any]:
        """Every recorded output of ``name`` (one per call; only the last unless ``keep_all_calls``)."""
        return list(self._calls[name])

    def clear(self) -> None:
        """Forget the recorded outputs (to reuse the probe for another forward pass)."""
        for c in self._calls.values():
            c.clear()
        self.called.clear()

    def _record(self, name: str, out: Any) -> None:
        self.called.append(name)
        if self._keep_all:
            self._calls[name].append(out)
        else:
            self._calls[name][:] = [out]

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Run ``model(x)``; returns ``None`` when the pass was stopped early by ``stop_after``."""
        try:
            return model(x)
        except StopForward:
            return None

    def gradients(self, outputs: torch.Tensor, layers: Sequence[str] | None = None,
                  grad_outputs: torch.Tensor | None = None, retain_graph: bool | None = None,
                  is_grads_batched: bool = False) -> dict[str, torch.Tensor]:
        """d(outputs)/d(activation) for the given layers, via ``torch.autograd.grad``.

        ``outputs`` is a scalar, or a tensor with ``grad_outputs`` (a batch of them with
        ``is_grads_batched=True``: many targets in one backward pass).
        """
        names = list(layers) if layers is not None else list(self.activations)
        acts = [self.activations[n] for n in names]
        grads = torch.autograd.grad(outputs, acts, grad_outputs=grad_outputs, retain_graph=retain_graph,
                                    is_grads_batched=is_grads_batched, allow_unused=True)
        return {n: (torch.zeros_like(a) if g is None else g) for n, a, g in zip(names, acts, grads)}


class _GradEdit(torch.autograd.Function):
    """Identity forward; backward applies ``fn`` to the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: EditFn) -> torch.Tensor:  # type: ignore[override]
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.fn(grad), None


class _RuleReLU(torch.autograd.Function):
    """Clamp to ``[lo, hi]`` in the forward pass; a ReLU backward rule in the backward pass.

    ``rule="guided"``: grad_in = max(grad_out, 0) * 1[lo < x < hi]   (Springenberg et al. 2015, Eq. in Fig. 1)
    ``rule="deconvnet"``: grad_in = max(grad_out, 0)                  (Zeiler & Fergus 2014, Sec. 2.1 "rectification")
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float | None, rule: str) -> torch.Tensor:  # type: ignore[override]
        ctx.rule, ctx.lo, ctx.hi = rule, lo, hi
        y = x.clamp(min=lo, max=hi)
        if rule == "guided":
            # the mask lo < x < hi equals lo < y < hi; saving y (not x) lets an in-place relu_ overwrite x
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        g = grad.clamp(min=0)
        if ctx.rule == "guided":
            (y,) = ctx.saved_tensors
            mask = y > ctx.lo
            if ctx.hi is not None:
                mask &= y < ctx.hi
            g = g * mask
        return g, None, None, None


RELU_RULES = ("guided", "deconvnet")


class _ReLURuleMode(TorchFunctionMode):
    """Routes every ReLU-like call (module or functional, in place or not) through :class:`_RuleReLU`."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        F = torch.nn.functional
        self._relu = {F.relu, torch.relu, torch.Tensor.relu}
        self._relu_ = {torch.relu_, torch.Tensor.relu_, F.relu_}
        self._hardtanh = {F.hardtanh, F.relu6}
        self._hardtanh_ = {F.hardtanh_, torch._C._nn.hardtanh_} if hasattr(torch._C._nn, "hardtanh_") else {F.hardtanh_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._relu or func in self._relu_:
            inplace = func in self._relu_ or kwargs.get("inplace", False) or (len(args) > 1 and args[1] is True)
            return self._apply(args[0], 0.0, None, inplace)
        if func in self._hardtanh or func in self._hardtanh_:
            if func is torch.nn.functional.relu6:
                lo, hi = 0.0, 6.0
                inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            else:
                lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
                hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
                inplace = func in self._hardtanh_ or kwargs.get("inplace", args[3] if len(args) > 3 else False)
            if lo == 0.0:  # a ReLU6-style clamp; other hardtanh ranges are not ReLUs
                return self._apply(args[0], float(lo), float(hi), bool(inplace))
        return func(*args, **kwargs)

    def _apply(self, x: torch.Tensor, lo: float, hi: float | None, inplace: bool) -> torch.Tensor:
        y = _RuleReLU.apply(x, lo, hi, self.rule)
        if inplace:
            with torch.no_grad() if not x.requires_grad else contextlib.nullcontext():
                return x.copy_(y)
        return y


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters and out-of-place activations; restore all on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p, _ in grads:
                p.requires_grad_(False)
        for m, _ in inplace:
            m.inplace = False
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in inplace:
            m.inplace = flag


@contextlib.contextmanager
def probe(model: nn.Module, layers: str | Sequence[str] | None = None, *, edit: dict[str, EditFn] | None = None,
          grad_edit: dict[str, EditFn] | None = None, relu_rule: str | None = None,
          stop_after: str | None = None, eval_mode: bool = True, freeze: bool = True, detach: bool = False,
          keep_all_calls: bool = False, reduce: Callable[[str, torch.Tensor], Any] | None = None) -> Iterator[Probe]:
    """Capture/edit the outputs of named layers for the forward passes run inside the block.

    Args:
        model: any ``nn.Module``.
        layers: names from ``model.named_modules()`` (a list, or a comma-separated string).
        edit: ``{layer: fn}``; the layer's output is replaced by ``fn(output)`` (recorded after the edit).
        grad_edit: ``{layer: fn}``; the gradient flowing back into the layer's output is replaced by
            ``fn(grad)``.
        relu_rule: ``"guided"`` or ``"deconvnet"`` to swap the backward rule of every ReLU/ReLU6.
        stop_after: a layer name; the forward pass ends right after it (use :meth:`Probe.forward`).
        eval_mode, freeze: put the model in eval mode / set ``requires_grad=False`` on its parameters.
        detach: record detached outputs (no graph kept: cheaper for pure feature extraction).
        keep_all_calls: keep every call of a module that runs several times (shared modules).
        reduce: ``fn(layer, output) -> value``: record ``value`` (computed on the detached output inside the hook)
            instead of the output itself, so a large activation is not kept alive after the next layer has
            consumed it (its buffer is reused at once) and is read while a later in-place op has not changed it.

    ``Probe.stop_after`` may be changed between forward passes (for example once the first pass has shown which
    layer runs last).
    """
    edit, grad_edit = dict(edit or {}), dict(grad_edit or {})
    wanted = [] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    extra = [n for n in [*edit, *grad_edit, *([stop_after] if stop_after else [])] if n not in wanted]
    resolved = resolve_layers(model, wanted + extra) if (wanted or extra) else {}
    if relu_rule is not None and relu_rule not in RELU_RULES:
        raise ValueError(f"relu_rule must be one of {RELU_RULES} or None, not {relu_rule!r}")
    p = Probe(list(resolved), keep_all_calls)
    p.stop_after = stop_after
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            new = output
            if isinstance(new, torch.Tensor):
                if name in edit:
                    new = edit[name](new)
                if name in grad_edit and new.requires_grad:
                    new = _GradEdit.apply(new, grad_edit[name])
                if not detach and not new.requires_grad and torch.is_grad_enabled():
                    # nothing upstream needs a gradient (frozen parameters, plain input): start the graph
                    # here, so gradients at this layer exist and the backward pass stops at it
                    new = new.detach().requires_grad_(True)
                recorded = new.detach() if detach else new
                if reduce is not None:
                    recorded = reduce(name, new.detach())
                if not detach and new.requires_grad:
                    # downstream gets a copy: a later in-place op (functional relu_) cannot rewrite the
                    # recorded value, and gradients w.r.t. the recorded tensor flow through the copy
                    new = new.clone()
            else:
                recorded = new
            p._record(name, recorded)
            if name == p.stop_after:
                raise StopForward
            return new if new is not output else None
        return hook

    mode = _ReLURuleMode(relu_rule) if relu_rule else contextlib.nullcontext()
    with preserved_state(model, eval_mode, freeze):
        try:
            for name, mod in resolved.items():
                handles.append(mod.register_forward_hook(make_hook(name)))
            with mode:
                yield p
        finally:
            for h in handles:
                h.remove()
