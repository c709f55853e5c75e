"""The computation graph of a model, traced from one forward pass.

:func:`model_graph` runs the model once (no gradients, eval mode, the model restored afterwards) with

* a forward pre-hook and a forward hook on every module: each call of a *leaf* module (one without children)
  becomes a node, named by its qualified ``named_modules()`` name (``name:k`` for the k-th call, from 0, of a
  module that runs several times; the bare name when it runs once); *container* modules become groups;
* a :class:`torch.overrides.TorchFunctionMode` that sees every functional op outside the leaf modules. An op whose
  tensor arguments come from two or more nodes joins branches and becomes a *join node* (``add`` for a residual
  ``h + x`` / ``torch.add`` / ``+=``, ``cat`` for a concatenation, ``mul`` for a squeeze-excite gate, else the
  op's own name); an op with one traced argument (``torch.flatten``, ``F.relu``, a view) passes the producer on.

Tensors are followed by identity from producer to consumer: a weak reference per produced tensor (so a freed
tensor whose ``id`` is reused is never mistaken for it), updated when an in-place op (``+=``) makes the same
tensor a join's output. Edges go from a node's producers to it, in the order of the call's arguments.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.model import default_input_size, float_dtype, model_device, model_name
from ..core.probe import preserved_state
from ..errors import ConvscopeError

__all__ = ["GraphGroup", "GraphNode", "ModelGraph", "model_graph"]

# the names of the graph's first and last nodes (node names, not layer names: core.layers.OUTPUT is the output layer)
INPUT_NODE, OUTPUT_NODE = "input", "output"
# functional op name (as TorchFunctionMode sees it, underscores stripped) -> the name of its join node
JOIN_NAMES = {"add": "add", "iadd": "add", "radd": "add", "sub": "sub", "isub": "sub", "rsub": "sub",
              "mul": "mul", "imul": "mul", "rmul": "mul", "cat": "cat", "concat": "cat", "concatenate": "cat",
              "stack": "stack", "truediv": "div", "itruediv": "div", "div": "div", "matmul": "matmul"}


@dataclass(frozen=True)
class GraphNode:
    """One node of a :class:`ModelGraph`.

    ``kind``: ``"input"``, ``"module"`` (one call of a leaf module), ``"join"`` (a functional op joining
    branches) or ``"output"``. ``type``: the module's class name, or the op (``add``, ``cat``, ``mul``, ...).
    ``module``: the module's qualified name (module nodes only); ``call``: which call of it (0-based);
    ``group``: the container the node belongs to (a module's parent in ``named_modules()``, for a join the
    container whose ``forward`` ran it; ``""`` for the model itself). ``output_shape`` has no batch dimension;
    ``units`` is its first entry (channels); ``params``: the module's parameter count (0 for others);
    ``inputs``: the nodes whose outputs it consumes, in argument order.
    """

    name: str
    kind: str
    type: str
    module: str | None
    call: int
    group: str
    output_shape: tuple[int, ...] | None
    units: int | None
    params: int
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class GraphGroup:
    """A container module: ``name`` (qualified), ``type``, ``params`` (all of its parameters, recursively),
    ``parent`` (``""`` for a child of the model, None for the model itself)."""

    name: str
    type: str
    params: int
    parent: str | None


@dataclass(frozen=True)
class ModelGraph:
    """Nodes in execution order (``input`` first, ``output`` last), edges ``(producer, consumer)`` and the
    container groups (``""`` is the model itself)."""

    model: str
    input_shape: tuple[int, ...]
    nodes: list[GraphNode]
    edges: list[tuple[str, str]]
    groups: dict[str, GraphGroup] = field(default_factory=dict)

    def node(self, name: str) -> GraphNode:
        """The node called ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConvscopeError(f"the graph has no node {name!r}; its nodes are listed in ModelGraph.nodes")

    @property
    def module_calls(self) -> list[GraphNode]:
        """The leaf-module nodes, in execution order."""
        return [n for n in self.nodes if n.kind == "module"]

    @property
    def joins(self) -> list[GraphNode]:
        """The join nodes (residual additions, concatenations, gates), in execution order."""
        return [n for n in self.nodes if n.kind == "join"]

    @property
    def params(self) -> int:
        """Parameters of the model (shared modules counted once)."""
        return self.groups[""].params if "" in self.groups else sum(
            n.params for n in {n.module: n for n in self.module_calls}.values())

    def members(self, group: str) -> list[GraphNode]:
        """The nodes directly in ``group`` (not in one of its sub-groups)."""
        return [n for n in self.nodes if n.group == group and n.kind in ("module", "join")]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: model, input shape, nodes, edges, groups."""
        return {"model": self.model, "input_shape": list(self.input_shape),
                "nodes": [{"name": n.name, "kind": n.kind, "type": n.type, "module": n.module, "call": n.call,
                           "group": n.group, "output_shape": None if n.output_shape is None else list(n.output_shape),
                           "units": n.units, "params": n.params, "inputs": list(n.inputs)} for n in self.nodes],
                "edges": [list(e) for e in self.edges],
                "groups": [{"name": g.name, "type": g.type, "params": g.params, "parent": g.parent}
                           for g in self.groups.values()]}


@dataclass
class _Raw:
    """A node while tracing: a unique key, the base name (before ``:k``) and what it records."""

    key: int
    base: str
    kind: str
    type: str
    module: str | None
    group: str
    inputs: list[int]
    shape: tuple[int, ...] | None = None
    params: int = 0


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) structure of arguments or outputs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _op_name(func: Callable) -> str:
    raw = getattr(func, "__name__", type(func).__name__).strip("_")
    return JOIN_NAMES.get(raw, raw)


class _Tracer(TorchFunctionMode):
    """Records leaf-module calls (through hooks) and the functional ops between them."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[_Raw] = []
        self.producer: dict[int, tuple[weakref.ref, int]] = {}
        self.leaf_depth = 0
        self.scope: list[str] = []  # containers whose forward is running (innermost last)
        self.pending: list[list[int]] = []  # producers of the inputs of the leaf calls running

    def source(self, t: torch.Tensor) -> int | None:
        entry = self.producer.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def sources(self, obj: Any) -> list[int]:
        out: list[int] = []
        for t in _tensors(obj):
            s = self.source(t)
            if s is not None and s not in out:
                out.append(s)
        return out

    def produce(self, obj: Any, key: int) -> tuple[int, ...] | None:
        shape = None
        for t in _tensors(obj):
            self.producer[id(t)] = (weakref.ref(t), key)
            shape = tuple(t.shape[1:]) if shape is None else shape
        return shape

    def add(self, base: str, kind: str, type_: str, module: str | None, group: str, inputs: list[int]) -> _Raw:
        node = _Raw(len(self.raw), base, kind, type_, module, group, inputs)
        self.raw.append(node)
        return node

    def pre_hook(self, name: str, leaf: bool) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any | None = None) -> None:
            if leaf:
                self.pending.append(self.sources((args, kwargs or {})))
                self.leaf_depth += 1
            else:
                self.scope.append(name)
        return hook

    def post_hook(self, name: str, leaf: bool) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any | None = None) -> None:
            if not leaf:
                self.scope.pop()
                return
            self.leaf_depth -= 1
            parent = name.rpartition(".")[0]
            node = self.add(name, "module", type(module).__name__, name, parent, self.pending.pop())
            node.params = sum(p.numel() for p in module.parameters())
            node.shape = self.produce(output, node.key)
        return hook

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.leaf_depth:
            return func(*args, **kwargs)
        srcs = self.sources((args, kwargs))
        out = func(*args, **kwargs)
        if len(srcs) >= 2:
            op = _op_name(func)
            group = self.scope[-1] if self.scope else ""
            node = self.add(f"{group}.{op}" if group else op, "join", op, None, group, srcs)
            node.shape = self.produce(out, node.key)
        elif len(srcs) == 1:
            for t in _tensors(out):
                if self.source(t) is None:
                    self.producer[id(t)] = (weakref.ref(t), srcs[0])
        return out


def _final_names(raw: list[_Raw], taken: set[str]) -> tuple[dict[int, str], dict[int, int]]:
    """``base`` for a node that runs once, ``base:k`` for the k-th of several; joins never take a module's name."""
    bases: dict[int, str] = {}
    for r in raw:
        base = r.base
        if r.kind == "join":
            while base in taken:
                base += "_"
        bases[r.key] = base
    counts: dict[str, int] = {}
    for b in bases.values():
        counts[b] = counts.get(b, 0) + 1
    seen: dict[str, int] = {}
    names, calls = {}, {}
    for r in raw:
        b = bases[r.key]
        k = calls[r.key] = seen.get(b, 0)
        seen[b] = k + 1
        names[r.key] = b if counts[b] == 1 else f"{b}:{k}"
    return names, calls


def model_graph(model: nn.Module, input_size: int | tuple[int, int] | None = None,
                sample: torch.Tensor | None = None) -> ModelGraph:
    """Trace one forward pass of ``model`` into a :class:`ModelGraph` (nodes, edges, container groups).

    The input is ``sample`` (a batch) or a zero image ``1 x 3 x H x W`` of ``input_size`` (default: the model's
    preprocess size, else 224 x 224). The model runs in eval mode without gradients and is left as it came.
    """
    if not isinstance(model, nn.Module):
        raise ConvscopeError(f"model_graph needs an nn.Module, not {type(model).__name__}; load one with "
                             "cs.load_model(NAME)")
    if sample is None:
        size = default_input_size(model, input_size)
        x = torch.zeros(1, 3, *size, device=model_device(model), dtype=float_dtype(model))
        what = f"a zero image of {size[0]}x{size[1]}"
    else:
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.dim() < 2:
            raise ConvscopeError(f"model_graph(sample=...) needs a floating-point batch N x C x H x W, got "
                                 f"{type(sample).__name__} {tuple(getattr(sample, 'shape', ()))}")
        x, what = sample, f"the sample of shape {tuple(sample.shape)}"
    modules = {name: m for name, m in model.named_modules() if name}
    tracer = _Tracer()
    handles = []
    with preserved_state(model):
        try:
            for name, mod in modules.items():
                leaf = next(mod.children(), None) is None
                handles.append(mod.register_forward_pre_hook(tracer.pre_hook(name, leaf), with_kwargs=True))
                handles.append(mod.register_forward_hook(tracer.post_hook(name, leaf), with_kwargs=True,
                                                         always_call=True))
            start = tracer.add(INPUT_NODE, "input", "Input", None, "", [])
            start.shape = tracer.produce(x, start.key)
            with torch.no_grad(), tracer:
                out = model(x)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ConvscopeError(f"{type(model).__name__} failed on {what} ({first}); pass another input size "
                                 "(input_size=(H, W), --size H W) or a sample it accepts") from exc
        finally:
            for h in handles:
                h.remove()
    end = tracer.add(OUTPUT_NODE, "output", "Output", None, "", tracer.sources(out))
    end.shape = next((tuple(t.shape[1:]) for t in _tensors(out)), None)
    names, calls = _final_names(tracer.raw, set(modules))
    nodes = []
    for r in tracer.raw:
        nodes.append(GraphNode(names[r.key], r.kind, r.type, r.module, calls[r.key], r.group, r.shape,
                               r.shape[0] if r.shape else None, r.params, tuple(names[i] for i in r.inputs)))
    edges = [(src, n.name) for n in nodes for src in n.inputs]
    groups = {"": GraphGroup("", type(model).__name__, sum(p.numel() for p in model.parameters()), None)}
    for name, mod in modules.items():
        if next(mod.children(), None) is not None:
            groups[name] = GraphGroup(name, type(mod).__name__, sum(p.numel() for p in mod.parameters()),
                                      name.rpartition(".")[0])
    return ModelGraph(model_name(model), tuple(x.shape[1:]), nodes, edges, groups)

