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

from ..errors import ConvscopeError
from .layers import resolve_layers, split_call
from .rules import BackwardRule, RuleMode
from .rules import relu_rule as rule_named

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
          rules: Sequence[BackwardRule] = (),
          stop_after: str | None = None, stop_early: bool = False, check_first_pass: bool = True,
          eval_mode: bool = True, freeze: bool = True,
          detach: bool = False, keep_all_calls: bool = False,
          reduce: Callable[[str, torch.Tensor], Any] | None = None) -> Iterator[Probe]:
    """Capture/edit the outputs of named layers for the forward passes run inside the block.

    Args:
        model: any ``nn.Module``.
        layers: names from ``model.named_modules()`` (a list, or a comma-separated string).
        edit: ``{layer: fn}``; the layer's output is replaced by ``fn(output)`` (recorded after the edit).
        grad_edit: ``{layer: fn}``; the gradient flowing back into the layer's output is replaced by
            ``fn(grad)``.
        relu_rule: ``"guided"`` or ``"deconvnet"`` to swap the backward rule of every ReLU/ReLU6.
        rules: more backward rules (:mod:`convscope.core.rules`), e.g. ``LRN_PASS_THROUGH``; the first rule that
            handles a function wins, ``relu_rule`` first.
        stop_after: a layer name; the forward pass ends right after it (use :meth:`Probe.forward`).
        stop_early: end each forward pass as soon as every one of ``layers`` has produced an output (the deepest
            requested layer), whatever the execution order (use :meth:`Probe.forward`). The first pass still runs
            the whole model (``check_first_pass``), so a shared module asked for by its bare name is caught.
        eval_mode, freeze: put the model in eval mode / set ``requires_grad=False`` on its parameters.
        detach: record detached outputs (no graph kept: cheaper for pure feature extraction).
        keep_all_calls: keep every call of a module that runs several times (shared modules). Without it, a
            shared module named by its bare name is an error naming its calls: ``"name:k"`` is its k-th call (from
            0) in each ``model(x)`` pass (count by calling the model, not its submodules).
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
    all_rules = ([rule_named(relu_rule)] if relu_rule is not None else []) + list(rules)
    p = Probe(list(resolved), keep_all_calls)
    p.stop_after = stop_after
    # one hook per module; a shared module may be asked for by several call names ("relu:0", "relu:1")
    by_module: dict[str, list[tuple[str, int | None]]] = {}
    for name in resolved:
        base, call = split_call(name)
        by_module.setdefault(base, []).append((name, call))
    calls = dict.fromkeys(by_module, 0)  # calls of each module so far in this forward pass
    pending: set[str] = set()  # with stop_early: the layers this forward pass has still to run
    passes = [0]
    handles = []

    def start_pass(module: nn.Module, args: Any) -> None:
        for base in calls:
            calls[base] = 0
        pending.clear()
        # the first pass runs the whole model, so a shared module asked for by its bare name is caught
        if stop_early and (passes[0] > 0 or not check_first_pass):
            pending.update(resolved)
        passes[0] += 1

    def process(name: str, new: Any) -> Any:
        if isinstance(new, torch.Tensor):
            if name in edit:
                new = edit[name](new)
            if name in grad_edit and new.requires_grad:
                new = _GradEdit.apply(new, grad_edit[name])
            if not detach and not new.requires_grad and torch.is_grad_enabled():
                # nothing upstream needs a gradient (frozen parameters, plain input): start the graph
                # here, so gradients at this layer exist and the backward pass stops at it
                new = new.detach().requires_grad_(True)
            if reduce is not None:
                recorded = reduce(name, new.detach())
            elif detach:
                # a copy: a later in-place op of the model (torchvision's ``out += identity``) cannot rewrite it
                recorded = new.detach().clone()
            else:
                recorded = new
            if not detach and new.requires_grad:
                # downstream gets a copy: a later in-place op (functional relu_) cannot rewrite the
                # recorded value, and gradients w.r.t. the recorded tensor flow through the copy
                new = new.clone()
        else:
            recorded = new
        p._record(name, recorded)
        return new

    def make_hook(base: str, entries: list[tuple[str, int | None]]) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            k = calls[base]
            calls[base] = k + 1
            new = output
            done: list[str] = []
            for name, call in entries:
                if call is None:
                    if k > 0 and passes[0] and not keep_all_calls:  # pass boundaries known: model(x) ran
                        raise ConvscopeError(
                            f"layer {base!r} runs more than once per forward pass (a module shared by several places "
                            f"in the network); name one call, e.g. {base}:0 or {base}:1 (`convscope layers MODEL` "
                            "lists every call), or use a module that runs once")
                elif call != k:
                    continue
                new = process(name, new)
                done.append(name)
            for name in done:
                if name == p.stop_after:
                    raise StopForward
                if stop_early and pending:
                    pending.discard(name)
                    if not pending:
                        raise StopForward
            return new if new is not output else None
        return hook

    mode = RuleMode(all_rules) if all_rules else contextlib.nullcontext()
    with preserved_state(model, eval_mode, freeze):
        try:
            if resolved:
                handles.append(model.register_forward_pre_hook(start_pass))
            for base, entries in by_module.items():
                handles.append(resolved[entries[0][0]].register_forward_hook(make_hook(base, entries)))
            with mode:
                yield p
        finally:
            for h in handles:
                h.remove()
