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
  DeconvNet rectification, Zeiler & Fergus 2014); a whole forward pass that met no ReLU at all (a transformer's
  GELU, SiLU nets) is an error at the end of the block, since the result would silently be the plain gradient;
* token and channels-last layers are read as maps (``layout=``, default ``"auto"``): a ViT block's
  ``N x T x D`` tokens or a Swin stage's ``N x H x W x C`` output is recorded as its ``N x C x H x W`` view
  (:func:`convscope.core.tokens.as_feature_map`, the input size from the model's input, the patch size from a
  ``patch_size`` attribute of the model), so every method sees channels and a spatial grid; gradients taken
  w.r.t. the recorded map flow back through the tokens, ``edit`` functions work in map space and their result
  is written back (:func:`~convscope.core.tokens.from_feature_map`, extra tokens such as a class token put back
  unchanged), and :attr:`Probe.token_info` tells how each layer was read (dropped extra tokens included).
  Convolutional ``N x C x H x W`` and ``N x C`` outputs are untouched.

On exit, always (also when the body raises): hooks are removed, every module's train/eval flag, every
parameter's ``requires_grad`` and every ``inplace`` attribute are restored. Parameters are never modified.

Gradients at a layer are taken with ``torch.autograd.grad`` on the captured output (never
``register_full_backward_hook``, which breaks on in-place ReLUs; never ``.backward()`` into parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConvscopeError
from .checks import check_finite, check_forward_args, refuse_scripted
from .layers import resolve_layers, split_call
from .rules import BackwardRule, RuleMode
from .rules import relu_rule as rule_named
from .tokens import TokenInfo, as_feature_map, check_layout, from_feature_map

EditFn = Callable[[torch.Tensor], torch.Tensor]
Layout = str | Mapping[str, str] | None
"""``layout=`` of :func:`probe`: ``"auto"``, one layout for every layer (``"nchw"``, ``"nhwc"``, ``"tokens"``,
``"tokens:E"``), ``{layer: layout}`` (other layers ``"auto"``), or ``None`` (outputs recorded as they are)."""


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
        self.token_info: dict[str, TokenInfo] = {}  # how each layer's last output was read as a map
        self.layout_errors: dict[str, str] = {}  # why "auto" left a 3-D / 4-D output as it was

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
        self.token_info.clear()
        self.layout_errors.clear()

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
    def forward(ctx: Any, x: torch.Tensor, fn: EditFn) -> torch.Tensor:
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.fn(grad), None


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters and out-of-place activations; restore all on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    # TorchScript constants cannot be set; Any: nn.Module types an unknown attribute as a tensor or a module
    inplace: list[tuple[Any, bool]] = [
        (m, bool(m.inplace)) for m in model.modules()
        if isinstance(getattr(m, "inplace", None), bool) and not isinstance(m, torch.jit.ScriptModule)]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p, _ in grads:
                p.requires_grad_(False)
        for module, _ in inplace:
            module.inplace = False
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        for module, was_inplace in inplace:
            module.inplace = was_inplace


def _checked_input(model: nn.Module, args: tuple) -> tuple | None:
    return check_forward_args(model, args)


def _finite_output(model: nn.Module, args: tuple, out: Any) -> None:
    check_finite(model, args[0] if args and isinstance(args[0], torch.Tensor) else None, out)


_CALLS_PER_PASS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
"""Per model, how many times each probed module ran in the last whole forward pass (a stop_early probe skips its
checking first pass when every module it names by its bare name is known to run once)."""


@contextlib.contextmanager
def probe(model: nn.Module, layers: str | Sequence[str] | None = None, *, edit: dict[str, EditFn] | None = None,
          grad_edit: dict[str, EditFn] | None = None, relu_rule: str | None = None,
          rules: Sequence[BackwardRule] = (),
          stop_after: str | None = None, stop_early: bool = False, check_first_pass: bool = True,
          eval_mode: bool = True, freeze: bool = True,
          detach: bool = False, keep_all_calls: bool = False,
          reduce: Callable[[str, torch.Tensor], Any] | None = None, layout: Layout = "auto") -> Iterator[Probe]:
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
        detach: record detached outputs (no graph kept: cheaper for pure feature extraction). A record shares
            its layer's output memory; a later in-place write of the model (``out += identity``, ``F.relu(x,
            True)``) copies it first (copy-on-write, :class:`CopyOnWrite`; a copy at once for models with
            TorchScript parts).
        keep_all_calls: keep every call of a module that runs several times (shared modules). Without it, a
            shared module named by its bare name is an error naming its calls: ``"name:k"`` is its k-th call (from
            0) in each ``model(x)`` pass (count by calling the model, not its submodules).
        reduce: ``fn(layer, output) -> value``: record ``value`` (computed on the detached output inside the hook)
            instead of the output itself, so a large activation is not kept alive after the next layer has
            consumed it (its buffer is reused at once) and is read while a later in-place op has not changed it.
        layout: how 3-D / 4-D outputs are read (see :data:`Layout`). ``"auto"`` (default) reads an output as a map
            only when the pass's input is an image batch and :func:`~convscope.core.tokens.as_feature_map` finds
            one reading: ``N x T x D`` tokens (extra tokens dropped, ``Probe.token_info[layer].extra``) and
            ``N x H x W x C`` channels-last maps become ``N x C x H x W``; convolutional maps, ``N x C`` vectors and
            outputs no reading fits (``Probe.layout_errors[layer]`` says why) are recorded as they are. An
            explicit layout is applied to every tensor output of the layers it names (a mismatch is an error).
            ``edit`` / ``grad_edit`` / ``reduce`` then see the map, and ``edit``'s map is written back.

    ``Probe.stop_after`` may be changed between forward passes (for example once the first pass has shown which
    layer runs last).
    """
    edit, grad_edit = dict(edit or {}), dict(grad_edit or {})
    wanted = [] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    extra = [n for n in [*edit, *grad_edit, *([stop_after] if stop_after else [])] if n not in wanted]
    resolved = resolve_layers(model, wanted + extra) if (wanted or extra) else {}
    all_rules = ([rule_named(relu_rule)] if relu_rule is not None else []) + list(rules)
    if resolved or all_rules:
        refuse_scripted(model, resolved, bool(all_rules))  # hooks and rules cannot reach TorchScript: one line
    layout_of = _layouts(layout, list(resolved))
    patch = declared_patch_size(model) if any(layout_of.values()) else None
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
    completed = [0]  # forward passes of the whole model that ran to the end
    image_size: list[tuple[int, int] | None] = [None]  # the input's H x W in this forward pass (an image batch)
    handles = []

    def start_pass(module: nn.Module, args: Any) -> None:
        for base in calls:
            calls[base] = 0
        pending.clear()
        first = args[0] if args else None
        image_size[0] = (int(first.shape[-2]), int(first.shape[-1])) \
            if isinstance(first, torch.Tensor) and first.dim() == 4 else None
        # the first pass runs the whole model, so a shared module asked for by its bare name is caught, unless
        # an earlier whole pass of this model showed each of those modules running once
        known = _CALLS_PER_PASS.get(module, {})
        if stop_early and (passes[0] > 0 or not check_first_pass
                           or all(known.get(base) == 1 for base, entries in by_module.items()
                                  if any(call is None for _, call in entries))):
            pending.update(resolved)
        passes[0] += 1

    def record_calls(module: nn.Module, args: Any, output: Any) -> None:
        _CALLS_PER_PASS.setdefault(module, {}).update(calls)  # a whole pass ran: how often each module runs

    def read_map(name: str, t: torch.Tensor) -> tuple[torch.Tensor, TokenInfo] | None:
        """The map view of ``t`` and how it was read, or ``None`` to keep ``t`` as it is."""
        spec = layout_of.get(name)
        if spec is None:
            return None
        if spec == "auto":
            if t.dim() not in (3, 4) or image_size[0] is None:
                return None
            try:
                m, info = as_feature_map(t, "auto", image_size[0], patch if t.dim() == 3 else None)
            except ConvscopeError as exc:
                p.layout_errors[name] = str(exc)
                return None
        else:
            m, info = as_feature_map(t, spec, image_size[0], patch if t.dim() == 3 else None)
        p.token_info[name] = info if info.extra is None or not (detach or reduce is not None) else \
            dataclasses.replace(info, extra=info.extra.detach().clone())
        return None if info.layout == "nchw" else (m, info)

    def process_map(name: str, out: torch.Tensor, m: torch.Tensor, info: TokenInfo) -> Any:
        """:func:`process` in map space: edit, gradient edit, graph start and record on the map; downstream gets
        the (edited) map written back into the layer's layout."""
        if name in edit:
            m = edit[name](m)
        if name in grad_edit and m.requires_grad:
            m = _GradEdit.apply(m, grad_edit[name])
        if not detach and not m.requires_grad and torch.is_grad_enabled():
            m = m.detach().requires_grad_(True)  # as in process(): the graph starts at this layer's map
        if reduce is not None:
            recorded = reduce(name, m.detach())
        elif detach:
            recorded = m.detach().clone(memory_format=torch.contiguous_format)
        else:
            recorded = m
        p._record(name, recorded)
        if name not in edit and name not in grad_edit and (detach or not m.requires_grad):
            return out  # nothing changed and no gradient is wanted at the map: the output as it was
        back = from_feature_map(m, info)
        if back.untyped_storage().data_ptr() == m.untyped_storage().data_ptr():
            back = back.clone()  # a view of the recorded map: a later in-place op must not rewrite the record
        return back

    def process(name: str, new: Any) -> Any:
        if isinstance(new, torch.Tensor) and layout_of:
            read = read_map(name, new)
            if read is not None:
                return process_map(name, new, *read)
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
                # copy-on-write: a later in-place op of the model (torchvision's ``out += identity``) gives the
                # record its own copy first; without the mode (TorchScript parts), a copy now
                recorded = new.detach().clone() if cow is None else cow.share(new)
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

    def end_pass(module: nn.Module, args: Any, output: Any) -> None:
        completed[0] += 1

    mode = CountingRuleMode(all_rules) if all_rules else None
    cow = CopyOnWrite() if detach and reduce is None and resolved and CopyOnWrite.can_watch(model) else None
    with preserved_state(model, eval_mode, freeze):
        try:
            if not isinstance(model, torch.jit.ScriptModule):
                # every probed forward pass: the input checked against the model (rank, dtype, channels, device:
                # one line with the fix), and a non-finite output traced to the first layer that produced it
                handles.append(model.register_forward_pre_hook(_checked_input))
                handles.append(model.register_forward_hook(_finite_output))
            if resolved:
                handles.append(model.register_forward_pre_hook(start_pass))
            if relu_rule is not None:
                handles.append(model.register_forward_hook(end_pass))
            if stop_early and resolved:
                handles.append(model.register_forward_hook(record_calls))
            for base, entries in by_module.items():
                handles.append(resolved[entries[0][0]].register_forward_hook(make_hook(base, entries)))
            # copy-on-write below the rule mode: it sees the in-place copy_ a rule makes for relu_ / F.relu(x, True)
            with cow if cow is not None else contextlib.nullcontext(), \
                    mode if mode is not None else contextlib.nullcontext():
                yield p
            if relu_rule is not None and mode is not None and completed[0] and not mode.hits[relu_rule]:
                raise ConvscopeError(
                    f"relu_rule={relu_rule!r} changed nothing: {type(model).__name__} ran no ReLU / ReLU6 (GELU, SiLU "
                    "and other activations keep their own gradient), so the result would be the plain gradient; "
                    "use a ReLU network, or the plain gradient (saliency) for this model")
        finally:
            for h in handles:
                h.remove()


class CountingRuleMode(RuleMode):
    """:class:`~convscope.core.rules.RuleMode` that also counts, per rule name, the calls each rule handled."""

    def __init__(self, rules: Sequence[BackwardRule]) -> None:
        super().__init__(rules)
        self.hits: dict[str, int] = {r.name: 0 for r in rules}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = self.table.get(func)
        if rule is not None:
            self.hits[rule.name] = self.hits.get(rule.name, 0) + 1
        return super().__torch_function__(func, types, args, kwargs)


_NOT_WRITES = frozenset({"requires_grad_", "detach_", "share_memory_", "retain_grad_"})
"""In-place by name, but they change a tensor's flags, never its values."""
_NOT_IOPS = frozenset({"__init__", "__index__", "__int__", "__invert__", "__iter__", "__init_subclass__",
                       "__instancecheck__"})
_UNKNOWN = -2  # the signature cannot be read
_ABSENT = -1  # no positional ``inplace`` parameter
_KINDS: dict[Any, tuple[tuple[int, ...], tuple[str, ...], int]] = {}


def write_kind(func: Any) -> tuple[tuple[int, ...], tuple[str, ...], int]:
    """How ``func`` writes in place (cached): ``(positions, keywords, inplace_at)``: the arguments it always writes
    (by position and keyword), and where its ``inplace`` flag sits (``-1``: keyword only or none, ``-2``: the
    signature cannot be read, so a positional ``True`` counts as one). An ``out=`` keyword is checked apart."""
    try:
        return _KINDS[func]
    except (KeyError, TypeError):
        pass
    kind: tuple[tuple[int, ...], tuple[str, ...], int]
    schema = getattr(func, "_schema", None)  # torch.ops overloads declare what they write (``Tensor(a!)``)
    if schema is not None and hasattr(schema, "arguments"):
        written = [(i, a.name) for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        kind = (tuple(i for i, _ in written), tuple(n for _, n in written), _ABSENT)
    else:
        name = str(getattr(func, "__name__", "") or "").split(".")[0]
        first = (name == "__setitem__" or (name.startswith("__i") and name.endswith("__") and name not in _NOT_IOPS)
                 or (name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES))
        at = _ABSENT
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            at = _UNKNOWN
        else:
            param = params.get("inplace")
            if param is not None and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                at = list(params).index("inplace")
        kind = ((0,) if first else (), ("input", "self") if first else (), at)
    with contextlib.suppress(TypeError):
        _KINDS[func] = kind
    return kind


def written_tensors(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func(*args, **kwargs)`` may write in place, conservatively: the first argument of an in-place
    function (``add_``, ``__iadd__``, ``__setitem__``, ``torch.ops`` schemas), ``out=``, and the input of a function
    whose ``inplace`` argument is true (``F.relu(x, True)``, ``F.hardtanh(x, 0., 6., True)``)."""
    positions, keywords, at = write_kind(func)
    found: list[Any] = [kwargs["out"]] if "out" in kwargs else []
    if not positions:
        flag = kwargs.get("inplace")
        if flag is None and at >= 0 and len(args) > at:
            flag = args[at]
        elif flag is None and at == _UNKNOWN:
            flag = any(a is True for a in args[1:])
        if flag is True or (isinstance(flag, int) and flag == 1):
            positions, keywords = (0,), ("input", "self")
    found += [args[i] for i in positions if i < len(args)] + [kwargs[k] for k in keywords if k in kwargs]
    tensors: list[torch.Tensor] = []
    for f in found:
        if isinstance(f, torch.Tensor):
            tensors.append(f)
        elif isinstance(f, (list, tuple)):  # out=(values, indices), torch._foreach_add_([...])
            tensors += [t for t in f if isinstance(t, torch.Tensor)]
    return tensors


class CopyOnWrite(TorchFunctionMode):
    """Records that share their storage with the model's tensors, copied only when something writes that storage.

    :meth:`share` returns a record aliasing a layer output (no copy) and remembers its storage; while the mode is
    active, every torch call that may write in place (:func:`written_tensors`) into a remembered storage first moves
    the records of that storage onto a copy of their own (same tensor objects, so references taken earlier stay
    right). A record written itself (``p.activations[n].relu_()``) gets its copy before the write, so the write
    lands in the record only, as with a recorded copy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shared: dict[int, list[weakref.ref[torch.Tensor]]] = {}  # storage address -> records on it
        self.thread = threading.get_ident()  # modes are per thread: a hook running elsewhere copies at once

    @staticmethod
    def can_watch(model: nn.Module) -> bool:
        """False when in-place ops of ``model`` may bypass Python's torch functions (TorchScript or compiled parts,
        replicas run in threads)."""
        return not any(isinstance(m, (torch.jit.ScriptModule, nn.DataParallel)) or hasattr(m, "_orig_mod")
                       for m in model.modules())

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """A detached record of ``t`` on the same storage (a copy when the storage cannot be watched)."""
        if (type(t) is not torch.Tensor or t.layout != torch.strided or t.is_quantized or t.is_complex()
                or threading.get_ident() != self.thread):
            return t.detach().clone()
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                return t.detach().clone()
            # a fresh tensor on t's storage, not a detach() view: its own version counter, and set_ may move it
            record = t.new_empty(0).set_(storage, t.storage_offset(), t.size(), t.stride())
        except (RuntimeError, NotImplementedError):  # functorch wrappers, inference tensors: no storage to watch
            return t.detach().clone()
        refs = [r for r in self.shared.get(key, ()) if r() is not None]
        refs.append(weakref.ref(record))
        self.shared[key] = refs
        return record

    def unshare(self, target: torch.Tensor) -> None:
        """Before ``target`` is written: move the records on its storage onto copies of their own."""
        try:
            keys = [target.untyped_storage().data_ptr()]
        except (RuntimeError, NotImplementedError, TypeError):
            keys = list(self.shared)  # the storage cannot be read: every record gets its copy
        for key in keys:
            records = [r for r in (ref() for ref in self.shared.pop(key, ())) if r is not None]
            if any(r is target for r in records):  # a record written itself: only it moves, the write follows it
                own_copy(target)
                records = [r for r in records if r is not target]
                if records:
                    self.shared[key] = [weakref.ref(r) for r in records]
                continue
            kept = [r for r in records if target._base is r]  # a view of a record: the write is for the record
            for r in records:
                if not any(r is k for k in kept):
                    own_copy(r)
            if kept:
                self.shared[key] = [weakref.ref(r) for r in kept]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.shared:
            for target in written_tensors(func, args, kwargs):
                self.unshare(target)
        return func(*args, **kwargs)


def own_copy(record: torch.Tensor) -> None:
    """Point ``record`` at a copy of its values (same tensor object, new storage)."""
    with torch.no_grad():
        copy = record.clone()
        record.set_(copy.untyped_storage(), copy.storage_offset(), copy.size(), copy.stride())


def declared_patch_size(model: nn.Module) -> int | tuple[int, int] | None:
    """The patch side a model declares (``patch_size`` of the model or of its first submodule that has one, e.g.
    a ViT's 16), which fixes the token grid of its layers to ``(H // p, W // p)``; ``None`` when none does."""
    for m in model.modules():
        ps = getattr(m, "patch_size", None)
        if isinstance(ps, int) and not isinstance(ps, bool) and ps > 0:
            return ps
        if isinstance(ps, (tuple, list)) and len(ps) == 2 and all(isinstance(v, int) and v > 0 for v in ps):
            return (int(ps[0]), int(ps[1]))
    return None


def _layouts(layout: Layout, names: Sequence[str]) -> dict[str, str]:
    """``{layer: layout string}`` for the probed layers (empty for ``layout=None``), checked up front."""
    if layout is None:
        return {}
    if isinstance(layout, str):
        return dict.fromkeys(names, check_layout(layout))
    if not isinstance(layout, Mapping):
        raise ConvscopeError(f"layout={layout!r}: give 'auto', one layout string, a {{layer: layout}} dict or None")
    unknown = [k for k in layout if k not in names]
    if unknown:
        raise ConvscopeError(f"layout= names layer(s) {', '.join(map(repr, unknown))} that are not probed; key the "
                             f"dict by the probed layers ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return {n: check_layout(layout.get(n, "auto")) for n in names}
